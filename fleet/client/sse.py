"""Server-Sent Events as the clients read them: a decoder, a follower that resumes a cut
stream where it stopped, and the attempts at a stream that a start opens."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx

from fleet.client.base import Request, answer
from fleet.client.errors import api_error, unreachable
from fleet.client.retries import RETRYABLE_ERRORS, worth_retrying
from fleet.errors import FleetError

# ---- Server-Sent Events ------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event. ``data`` is the text as sent; fleet sends JSON, read it with
    ``json()``. ``id`` is the last event id in force (what ``Last-Event-ID`` resumes)."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SSEDecoder:
    """Turns the bytes of a ``text/event-stream`` into events, as the HTML standard's
    event-stream parser does: lines end with CRLF, LF or CR (and nothing else); ``:``
    starts a comment; a blank line dispatches; an event with no data is dropped; an
    unfinished event at the end of the stream is dropped."""

    last_event_id: str | None = None
    retry: int | None = None
    _id: str | None = field(default=None, init=False)  # counts once its event ends
    _buffer: bytes = field(default=b"", init=False)
    _pending_cr: bool = field(default=False, init=False)  # a LF next belongs to this CR
    _started: bool = field(default=False, init=False)
    _event: str = field(default="", init=False)
    _data: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._id = self.last_event_id

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = False
        self._buffer += chunk
        events: list[ServerSentEvent] = []
        while True:
            cr, lf = self._buffer.find(b"\r"), self._buffer.find(b"\n")
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                return events
            end = min(ends)
            line, skip = self._buffer[:end], 1
            if end == cr and self._buffer[end + 1 : end + 2] == b"\n":
                skip = 2
            elif end == cr and end + 1 == len(self._buffer):
                self._pending_cr = True
            self._buffer = self._buffer[end + skip :]
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> ServerSentEvent | None:
        if not self._started:
            self._started = True
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        self.last_event_id = self._id
        data, kind = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent(kind or "message", "\n".join(data), self.last_event_id, self.retry)


@dataclass
class Follow:
    """The reconnection policy of ``events()``, shared by both clients. Like EventSource,
    a stream cut short is resumed after the last event id; unlike it, the attempts are
    bounded, and the stream is over after ``session_ended`` or when a connection ends
    without bringing anything new."""

    path: str
    last_event_id: str | None
    reconnect: bool
    max_attempts: int = 5
    attempts: int = 0  # failed connections in a row
    retry_ms: int | None = None
    finished: bool = False
    fresh: int = 0  # events seen on the current connection
    decoder: SSEDecoder = field(default_factory=SSEDecoder)

    @classmethod
    def opened(cls, path: str | None, reconnect: bool) -> Follow:
        """The policy of a stream that is open already (a start's own): it resumes at
        ``path`` (``None``: nowhere, a cut stream is not resumed)."""
        follow = cls(path or "", None, reconnect and path is not None)
        follow.open()
        return follow

    def open(self) -> dict[str, str]:
        """Headers for a new connection."""
        self.decoder = SSEDecoder(self.last_event_id, self.retry_ms)
        self.fresh = 0
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        return headers

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        events = self.decoder.feed(chunk)
        self.last_event_id = self.decoder.last_event_id
        self.retry_ms = self.decoder.retry
        if events:
            self.fresh += len(events)
            self.attempts = 0
            self.finished = any(e.event == "session_ended" for e in events)
        return events

    def ended_cleanly(self) -> None:
        if self.fresh == 0 or not self.reconnect:
            self.finished = True

    def failed(self, error: FleetError) -> None:
        """A connection failed: raise ``error`` unless another attempt is due."""
        self.attempts += 1
        if not self.reconnect or self.attempts > self.max_attempts:
            raise error

    @property
    def delay(self) -> float:
        base = self.retry_ms / 1000 if self.retry_ms is not None else 0.5
        return float(min(5.0, base * max(1, self.attempts)))


@dataclass
class Opening:
    """The attempts of ``stream()``, shared by both clients: the start is sent again, as
    any start is, until its stream opens; from then on ``follow`` resumes it."""

    req: Request[str | None]
    url: str
    reconnect: bool
    attempt: int = 0  # attempts that failed before this one
    follow: Follow | None = None

    def answered(self, resp: httpx.Response) -> Follow | None:
        """The follower of the stream that opened, or ``None`` if another attempt is due;
        raises the error the answer stands for when none is."""
        if resp.status_code == 200:
            self.follow = Follow.opened(answer(self.req, resp), self.reconnect)
            return self.follow
        if self.attempt >= self.req.retries or not worth_retrying(resp):
            raise api_error(resp)
        return None

    def cut(self, exc: httpx.TransportError) -> None:
        """No answer, or the open stream was cut: raise unless another attempt is due."""
        error = unreachable(self.url, exc)
        if self.follow is not None:
            self.follow.failed(error)
        elif self.attempt >= self.req.retries or not isinstance(exc, RETRYABLE_ERRORS):
            raise error from exc
