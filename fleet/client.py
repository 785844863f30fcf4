"""A typed client for fleet's HTTP API, sync (``FleetClient``) and async
(``AsyncFleetClient``), on httpx.

Both clients have the same methods and answer with the pydantic models the API serves
(``SessionInfo``, ``NodeInfo``, ``Checkpoint``...). A node that answers with an error
raises ``FleetAPIError(status, code, detail)``; a node that cannot be reached raises
``FleetConnectionError``. Both are ``FleetError``\\ s.

The base URL and token come from the arguments or from ``FLEET_URL`` (default
``http://127.0.0.1:8000``) and ``FLEET_TOKEN``. The token is sent as
``Authorization: Bearer``; it is never logged and never shown in a ``repr``.

Each request is described once, as a ``_Request`` (method, path, parameters, and how to
read the answer); the two clients only differ in how they send it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from fleet import __version__
from fleet.errors import FleetError
from fleet.models import (
    Checkpoint,
    CloseAccepted,
    NodeInfo,
    NodeList,
    SessionInfo,
    SessionList,
    SessionMetrics,
    SessionPage,
    State,
)

__all__ = [
    "AsyncFleetClient",
    "FleetAPIError",
    "FleetClient",
    "FleetConnectionError",
    "Health",
    "Readiness",
    "SSEDecoder",
    "ServerSentEvent",
    "SessionMetrics",
]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# The server writes a comment line every 15 s on an idle stream: a stream silent for
# much longer than that is dead, not idle.
STREAM_READ_TIMEOUT = 60.0
WAIT_MARGIN = 10.0  # a close with ?wait=S may take S seconds plus a round trip or two
RETRYABLE_STATUS = frozenset({502, 503, 504})  # a proxy or a draining node: try again
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


# ---- errors ----------------------------------------------------------------------------


class FleetAPIError(FleetError):
    """A node answered with an error: ``status`` is the HTTP status, ``code`` the
    machine-readable code from the body (``not_found``, ``draining``...)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.detail}"


class FleetConnectionError(FleetError):
    """No answer: the node is down, the URL is wrong, or the request timed out."""

    code = "unreachable"


def _api_error(resp: httpx.Response) -> FleetAPIError:
    """The error a response stands for. fleet answers ``{"detail", "code"}``; a proxy in
    front of it may answer HTML, which becomes ``http_<status>``."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])
        return FleetAPIError(resp.status_code, str(body.get("code") or "http_error"), detail)
    reason = resp.reason_phrase or "error"
    return FleetAPIError(resp.status_code, f"http_{resp.status_code}", f"HTTP {reason}")


def _unreachable(url: str, exc: httpx.TransportError) -> FleetConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        why = "timed out"
    else:
        why = str(exc) or type(exc).__name__
    return FleetConnectionError(f"cannot reach {url}: {why}")


# ---- answers that have no model in fleet.models ------------------------------------------


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    """``/ready``: 200 and 503 are both answers here, not errors."""

    status: str
    reason: str | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"


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
class _Follow:
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


# ---- requests, described once ------------------------------------------------------------


Params = Mapping[str, str | int | float]


@dataclass(frozen=True)
class _Request(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Params | None = None
    body: Any = None
    timeout: httpx.Timeout | None = None
    answers: frozenset[int] = frozenset({200})  # statuses that are answers, not errors


def _model(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda resp: model.model_validate_json(resp.content)


def _seg(value: str) -> str:
    return quote(value, safe="")


def _session_path(call_id: str, session_id: str, tail: str = "") -> str:
    return f"/calls/{_seg(call_id)}/sessions/{_seg(session_id)}{tail}"


def _clean(params: Mapping[str, str | int | float | None]) -> dict[str, str | int | float]:
    return {k: v for k, v in params.items() if v is not None}


def _close_answer(resp: httpx.Response) -> SessionInfo | CloseAccepted:
    if resp.status_code == 202:
        return CloseAccepted.model_validate_json(resp.content)
    return SessionInfo.model_validate_json(resp.content)


def _readiness(resp: httpx.Response) -> Readiness:
    try:
        return Readiness.model_validate_json(resp.content)
    except ValidationError:
        if resp.status_code != 200:  # e.g. a proxy's own 503 page: no node answered
            raise _api_error(resp) from None
        raise


class _Requests:
    """What each API call sends, and how its answer is read."""

    @staticmethod
    def start_session(
        call_id: str, params: dict[str, Any] | None, call_type: str, resumable: bool
    ) -> _Request[SessionInfo]:
        body = {"call_type": call_type, "params": params or {}, "resumable": resumable}
        path = f"/calls/{_seg(call_id)}/sessions"
        return _Request("POST", path, _model(SessionInfo), body=body, answers=frozenset({201}))

    @staticmethod
    def get_session(call_id: str, session_id: str) -> _Request[SessionInfo]:
        return _Request("GET", _session_path(call_id, session_id), _model(SessionInfo))

    @staticmethod
    def list_call_sessions(call_id: str) -> _Request[list[SessionInfo]]:
        path = f"/calls/{_seg(call_id)}/sessions"
        return _Request("GET", path, lambda r: SessionList.model_validate_json(r.content).sessions)

    @staticmethod
    def list_sessions(
        state: State | str | None, node_id: str | None, limit: int | None, cursor: str | None
    ) -> _Request[SessionPage]:
        params = _clean({"state": state, "node_id": node_id, "limit": limit, "cursor": cursor})
        return _Request("GET", "/sessions", _model(SessionPage), params=params)

    @staticmethod
    def close_session(
        call_id: str, session_id: str, wait: float | None, timeout: httpx.Timeout
    ) -> _Request[SessionInfo | CloseAccepted]:
        params = _clean({"wait": wait})
        if wait is not None:
            read = max(timeout.read or 0.0, wait + WAIT_MARGIN)
            timeout = httpx.Timeout(timeout.connect, read=read, write=timeout.write, pool=None)
        path = _session_path(call_id, session_id)
        return _Request(
            "DELETE", path, _close_answer, params, timeout=timeout, answers=frozenset({200, 202})
        )

    @staticmethod
    def get_checkpoint(call_id: str, session_id: str, version: int | None) -> _Request[Checkpoint]:
        path = _session_path(call_id, session_id, "/checkpoint")
        return _Request("GET", path, _model(Checkpoint), params=_clean({"version": version}))

    @staticmethod
    def session_metrics(call_id: str, session_id: str) -> _Request[SessionMetrics]:
        path = _session_path(call_id, session_id, "/metrics")
        return _Request("GET", path, _model(SessionMetrics))

    @staticmethod
    def nodes() -> _Request[list[NodeInfo]]:
        return _Request("GET", "/nodes", lambda r: NodeList.model_validate_json(r.content).nodes)

    @staticmethod
    def health() -> _Request[Health]:
        return _Request("GET", "/health", _model(Health))

    @staticmethod
    def ready() -> _Request[Readiness]:
        return _Request("GET", "/ready", _readiness, answers=frozenset({200, 503}))


def _answer(req: _Request[T], resp: httpx.Response) -> T:
    if resp.status_code not in req.answers:
        raise _api_error(resp)
    try:
        return req.parse(resp)
    except (ValidationError, ValueError):
        raise FleetAPIError(
            resp.status_code, "invalid_response", "the answer is not fleet's (wrong URL?)"
        ) from None


# ---- the clients -------------------------------------------------------------------------


class _Base:
    """Configuration both clients share: URL, token, timeouts, headers."""

    def __init__(
        self, url: str | None, token: str | None, timeout: float | httpx.Timeout | None
    ) -> None:
        self.url = (url or os.environ.get("FLEET_URL") or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise FleetError(f"the fleet URL must start with http:// or https://: {self.url!r}")
        token = token if token is not None else os.environ.get("FLEET_TOKEN")
        self._token = token or None
        if timeout is None:
            self.timeout = DEFAULT_TIMEOUT
        elif isinstance(timeout, httpx.Timeout):
            self.timeout = timeout
        else:
            self.timeout = httpx.Timeout(timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"fleet-client/{__version__}", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _stream_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout.connect, read=STREAM_READ_TIMEOUT, write=10.0, pool=None)

    def __repr__(self) -> str:
        token = "'***'" if self._token else "None"
        return f"{type(self).__name__}(url={self.url!r}, token={token})"


class FleetClient(_Base):
    """The API of a fleet node (or of the load balancer in front of several), blocking.

    Use it as a context manager, or call ``close()``. ``transport`` replaces httpx's
    network transport (tests pass an in-process one)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, timeout)
        self._http = httpx.Client(
            base_url=self.url, headers=self._headers(), timeout=self.timeout, transport=transport
        )

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, req: _Request[T]) -> T:
        try:
            resp = self._http.request(
                req.method,
                req.path,
                params=req.params,
                json=req.body,
                timeout=req.timeout or httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        return _answer(req, resp)

    def start_session(
        self,
        call_id: str,
        params: dict[str, Any] | None = None,
        call_type: str = "default",
        resumable: bool = True,
    ) -> SessionInfo:
        """Start a session of the node's worker in ``call_id``."""
        return self._send(_Requests.start_session(call_id, params, call_type, resumable))

    def get_session(self, call_id: str, session_id: str) -> SessionInfo:
        return self._send(_Requests.get_session(call_id, session_id))

    def list_call_sessions(self, call_id: str) -> list[SessionInfo]:
        """The call's sessions, live ones first."""
        return self._send(_Requests.list_call_sessions(call_id))

    def list_sessions(
        self,
        *,
        state: State | str | None = None,
        node_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SessionPage:
        """One page of the fleet-wide list; ``next_cursor`` asks for the next."""
        return self._send(_Requests.list_sessions(state, node_id, limit, cursor))

    def iter_sessions(
        self, *, state: State | str | None = None, node_id: str | None = None, page_size: int = 100
    ) -> Generator[SessionInfo, None, None]:
        """Every session of the fleet, page after page."""
        cursor: str | None = None
        while True:
            page = self.list_sessions(state=state, node_id=node_id, limit=page_size, cursor=cursor)
            yield from page.sessions
            if page.next_cursor is None or page.next_cursor == cursor:
                return
            cursor = page.next_cursor

    def close_session(
        self, call_id: str, session_id: str, wait: float | None = None
    ) -> SessionInfo | CloseAccepted:
        """Ask for the close. With ``wait``, the final ``SessionInfo`` once the session
        ended, or ``CloseAccepted`` if it still runs after ``wait`` seconds."""
        return self._send(_Requests.close_session(call_id, session_id, wait, self.timeout))

    def get_checkpoint(
        self, call_id: str, session_id: str, version: int | None = None
    ) -> Checkpoint:
        return self._send(_Requests.get_checkpoint(call_id, session_id, version))

    def session_metrics(self, call_id: str, session_id: str) -> SessionMetrics:
        return self._send(_Requests.session_metrics(call_id, session_id))

    def nodes(self) -> list[NodeInfo]:
        """The live nodes of the fleet."""
        return self._send(_Requests.nodes())

    def health(self) -> Health:
        return self._send(_Requests.health())

    def ready(self) -> Readiness:
        """Readiness of the node that answers; ``.ready`` is False on a 503."""
        return self._send(_Requests.ready())

    def events(
        self,
        call_id: str,
        session_id: str,
        last_event_id: str | None = None,
        *,
        reconnect: bool = True,
    ) -> Generator[ServerSentEvent, None, None]:
        """The session's events from the start (or after ``last_event_id``), live, until
        ``session_ended``. A cut stream is resumed where it stopped, on whatever node
        answers. Break out early with ``contextlib.closing`` to free the connection."""
        follow = _Follow(_session_path(call_id, session_id, "/events"), last_event_id, reconnect)
        while not follow.finished:
            try:
                with self._http.stream(
                    "GET", follow.path, headers=follow.open(), timeout=self._stream_timeout()
                ) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        error = _api_error(resp)
                        if resp.status_code not in RETRYABLE_STATUS:
                            raise error
                        follow.failed(error)
                    else:
                        for chunk in resp.iter_bytes():
                            yield from follow.feed(chunk)
                            if follow.finished:
                                return
                        follow.ended_cleanly()
                        continue
            except httpx.TransportError as exc:
                follow.failed(_unreachable(self.url, exc))
            time.sleep(follow.delay)


class AsyncFleetClient(_Base):
    """The same API as ``FleetClient``, for asyncio: every method is a coroutine, and
    ``iter_sessions`` and ``events`` are async iterators."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, timeout)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self._headers(), timeout=self.timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncFleetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, req: _Request[T]) -> T:
        try:
            resp = await self._http.request(
                req.method,
                req.path,
                params=req.params,
                json=req.body,
                timeout=req.timeout or httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        return _answer(req, resp)

    async def start_session(
        self,
        call_id: str,
        params: dict[str, Any] | None = None,
        call_type: str = "default",
        resumable: bool = True,
    ) -> SessionInfo:
        """Start a session of the node's worker in ``call_id``."""
        return await self._send(_Requests.start_session(call_id, params, call_type, resumable))

    async def get_session(self, call_id: str, session_id: str) -> SessionInfo:
        return await self._send(_Requests.get_session(call_id, session_id))

    async def list_call_sessions(self, call_id: str) -> list[SessionInfo]:
        """The call's sessions, live ones first."""
        return await self._send(_Requests.list_call_sessions(call_id))

    async def list_sessions(
        self,
        *,
        state: State | str | None = None,
        node_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SessionPage:
        """One page of the fleet-wide list; ``next_cursor`` asks for the next."""
        return await self._send(_Requests.list_sessions(state, node_id, limit, cursor))

    async def iter_sessions(
        self, *, state: State | str | None = None, node_id: str | None = None, page_size: int = 100
    ) -> AsyncGenerator[SessionInfo, None]:
        """Every session of the fleet, page after page."""
        cursor: str | None = None
        while True:
            page = await self.list_sessions(
                state=state, node_id=node_id, limit=page_size, cursor=cursor
            )
            for info in page.sessions:
                yield info
            if page.next_cursor is None or page.next_cursor == cursor:
                return
            cursor = page.next_cursor

    async def close_session(
        self, call_id: str, session_id: str, wait: float | None = None
    ) -> SessionInfo | CloseAccepted:
        """Ask for the close. With ``wait``, the final ``SessionInfo`` once the session
        ended, or ``CloseAccepted`` if it still runs after ``wait`` seconds."""
        return await self._send(_Requests.close_session(call_id, session_id, wait, self.timeout))

    async def get_checkpoint(
        self, call_id: str, session_id: str, version: int | None = None
    ) -> Checkpoint:
        return await self._send(_Requests.get_checkpoint(call_id, session_id, version))

    async def session_metrics(self, call_id: str, session_id: str) -> SessionMetrics:
        return await self._send(_Requests.session_metrics(call_id, session_id))

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes of the fleet."""
        return await self._send(_Requests.nodes())

    async def health(self) -> Health:
        return await self._send(_Requests.health())

    async def ready(self) -> Readiness:
        """Readiness of the node that answers; ``.ready`` is False on a 503."""
        return await self._send(_Requests.ready())

    async def events(
        self,
        call_id: str,
        session_id: str,
        last_event_id: str | None = None,
        *,
        reconnect: bool = True,
    ) -> AsyncGenerator[ServerSentEvent, None]:
        """The session's events from the start (or after ``last_event_id``), live, until
        ``session_ended``. A cut stream is resumed where it stopped, on whatever node
        answers. Break out early with ``contextlib.aclosing`` to free the connection."""
        follow = _Follow(_session_path(call_id, session_id, "/events"), last_event_id, reconnect)
        while not follow.finished:
            try:
                async with self._http.stream(
                    "GET", follow.path, headers=follow.open(), timeout=self._stream_timeout()
                ) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        error = _api_error(resp)
                        if resp.status_code not in RETRYABLE_STATUS:
                            raise error
                        follow.failed(error)
                    else:
                        async for chunk in resp.aiter_bytes():
                            for event in follow.feed(chunk):
                                yield event
                            if follow.finished:
                                return
                        follow.ended_cleanly()
                        continue
            except httpx.TransportError as exc:
                follow.failed(_unreachable(self.url, exc))
            await asyncio.sleep(follow.delay)
