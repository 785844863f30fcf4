"""One client's cursor over one session's event stream, and the events themselves.

A listener never misses or repeats an event, whatever its speed:

* it reads its backlog from Redis first (``XREAD`` without ``BLOCK``, from its own
  position) and joins its node's fan-out (``dispatcher.py``) once it has caught up;
* it hands out strictly increasing ids only, so an entry that arrives both ways is dropped;
* when its buffer is full (a slow client) it leaves the fan-out and reads what it missed
  from Redis again, at its own pace. A slow client never slows the worker, the dispatcher
  or the other listeners. Entries trimmed by ``FLEET_EVENTS_MAXLEN`` meanwhile are gone;
  it gets what is left.

``session_started`` is not stored: a session that never emits costs no stream at all (a
Redis stream takes about 4 KB from its first entry). Every listener is handed it first,
made from the session record, with the id ``0-1``, which sorts before any stored entry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from fleet.models import State
from fleet.store import REDIS_ERRORS
from fleet.store.registry import Registry

log = logging.getLogger("fleet.events")

EVENT_ID_PATTERN = r"^\d+-\d+$"
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
START = "0-0"  # before the first entry of any stream
STARTED_ID = "0-1"  # session_started's id: after START, before any stored entry
STARTED, ENDED = "session_started", "session_ended"

BUFFER_SIZE = 256  # live entries a listener may hold before it falls back to Redis
CATCH_UP_COUNT = 100  # entries per backlog read
RETRY_MIN, RETRY_MAX = 0.05, 2.0  # reconnect backoff, seconds


_SSE_LINES = re.compile(r"\r\n|\r|\n")


def is_event_id(value: str) -> bool:
    return _EVENT_ID.match(value) is not None


def id_order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


@dataclass(frozen=True)
class Event:
    """One stream entry; ``data`` is the JSON text as stored. The wire forms are built once
    per entry, however many listeners it goes to."""

    id: str
    type: str
    data: str

    @cached_property
    def order(self) -> tuple[int, int]:
        return id_order(self.id)

    @cached_property
    def sse(self) -> bytes:
        """The Server-Sent Events frame: ``id:``, ``event:``, one ``data:`` per line."""
        # Only CR, LF and CRLF end an SSE line: str.splitlines() would also split on
        # U+2028 and friends, which JSON text may hold unescaped, and break the data.
        kind = " ".join(_SSE_LINES.split(self.type))
        data = "".join(f"data: {line}\n" for line in _SSE_LINES.split(self.data))
        return f"id: {self.id}\nevent: {kind}\n{data}\n".encode()

    @cached_property
    def message(self) -> str:
        """The WebSocket message: ``{"id", "event", "data"}`` with ``data`` as JSON."""
        try:
            data: Any = json.loads(self.data)
        except ValueError:
            data = self.data
        return json.dumps(
            {"id": self.id, "event": self.type, "data": data},
            separators=(",", ":"),
            ensure_ascii=False,
        )


class Hub(Protocol):
    """What a listener needs from its node's dispatcher (``dispatcher.EventDispatcher``)."""

    registry: Registry
    buffer_size: int
    catch_up_count: int
    read_slots: asyncio.Semaphore

    def join(self, listener: Listener, tail: str) -> bool:
        """Join the fan-out, unless entries after ``tail`` arrived meanwhile."""


class Listener:
    """One client's cursor over one session's stream. Open it with
    ``EventDispatcher.listen``; ``next`` hands out events in id order and ``done`` turns
    true once ``session_ended`` was handed out (or the replay of an ended session ran dry).
    """

    def __init__(
        self,
        hub: Hub,
        call_id: str,
        session_id: str,
        after: str,
        replay_only: bool,
        started_at: float | None,
    ) -> None:
        self._hub = hub
        self.call_id = call_id
        self.session_id = session_id
        self.key = hub.registry.keys.events(call_id, session_id)
        self.last = after  # id of the last event handed out
        self._last = id_order(after)
        self._backlog: deque[Event] = deque()  # read from Redis, handed out first
        if started_at is not None and self._last < id_order(STARTED_ID):
            self._backlog.append(started_event(started_at))
        self._live: deque[Event] = deque()  # from the fan-out
        self._behind = True  # read Redis before taking from the fan-out
        self._joined = False
        self._replay_only = replay_only
        self._wake = asyncio.Event()
        self._backoff = RETRY_MIN
        self.done = False
        self.lagged = 0  # times the buffer overflowed and Redis had to be read again

    # -- called by the dispatcher (synchronously: nothing interleaves) -------------------
    def offer(self, events: list[Event]) -> None:
        if self._behind or self.done:
            return
        if len(self._live) + len(events) > self._hub.buffer_size:
            # Too slow: drop the buffer and read the missed entries from Redis later.
            self._behind = True
            self._live.clear()
            self.lagged += 1
        else:
            self._live.extend(events)
        self._wake.set()

    def close(self) -> None:
        self.done = True
        self._wake.set()

    # -- for the client ------------------------------------------------------------------
    async def next(self, timeout: float) -> Event | None:
        """The next event, or ``None`` when none came within ``timeout`` seconds (time
        for a keep-alive) or the listener is done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.done:
            event = self._take()
            if event is not None or self.done:
                return event
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            if self._behind:
                await self._catch_up_within(remaining)
                continue
            self._wake.clear()
            # A bare timer that wakes us, not wait_for or asyncio.timeout: this is the hot
            # path of every listener, and wait_for on Python 3.11 can also swallow a
            # cancellation (a client that left would keep its listener).
            timer = loop.call_at(deadline, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
        return None

    def take_ready(self, limit: int) -> list[Event]:
        """Up to ``limit`` events that are already here, without waiting: lets a sender
        write a burst in one go."""
        out: list[Event] = []
        while len(out) < limit and (event := self._take()) is not None:
            out.append(event)
        return out

    def finish(self) -> None:
        """The session has ended (or is gone): hand out what Redis still holds, then stop."""
        self._replay_only = True
        self._behind = True
        self._wake.set()

    async def check_session(self) -> None:
        """Between keep-alives: finish if the session ended or vanished without its
        ``session_ended`` reaching us (say Redis lost its data), so no stream hangs."""
        try:
            async with self._hub.read_slots:
                record = await self._hub.registry.get(self.call_id, self.session_id)
        except REDIS_ERRORS:
            return
        if record is None or record.state == State.ENDED:
            self.finish()

    # -- internals -----------------------------------------------------------------------
    def _take(self) -> Event | None:
        while not self.done:
            if self._backlog:
                source = self._backlog
            elif self._behind:
                return None
            elif self._replay_only:
                self.done = True
                return None
            elif self._live:
                source = self._live
            else:
                return None
            event = source.popleft()
            if event.order <= self._last:
                continue  # seen already: it came both from Redis and the fan-out
            self._last = event.order
            self.last = event.id
            if event.type == ENDED:
                self.done = True
            return event
        return None

    async def _catch_up_within(self, remaining: float) -> None:
        try:
            async with asyncio.timeout(remaining):
                await self._catch_up()
        except TimeoutError:
            return
        except REDIS_ERRORS as exc:
            log.debug("event backlog read failed (%s); retrying", type(exc).__name__)
            delay = min(self._backoff, remaining)
            self._backoff = min(self._backoff * 2, RETRY_MAX)
            await asyncio.sleep(delay)
            return
        self._backoff = RETRY_MIN

    async def _catch_up(self) -> None:
        hub = self._hub
        async with hub.read_slots:
            # From here on the fan-out fills ``_live`` again; what it handed out before is
            # in Redis already, so this read covers it.
            self._behind = False
            self._live.clear()
            try:
                rows = await hub.registry.read_events(
                    self.call_id, self.session_id, self.last, None, hub.catch_up_count
                )
            except BaseException:
                self._behind = True
                raise
        self._backlog.extend(Event(*row) for row in rows)
        if len(rows) >= hub.catch_up_count:
            self._behind = True  # there may be more
        elif not self._joined and not self._replay_only:
            self._joined = True
            if hub.join(self, rows[-1][0] if rows else self.last):
                self._behind = True  # the fan-out is past our tail: read the gap


def started_event(started_at: float) -> Event:
    """``session_started``, made from the record rather than stored."""
    return Event(STARTED_ID, STARTED, json.dumps({"started_at": started_at}))


def event_from_entry(entry_id: str, fields: Any) -> Event:
    if not isinstance(fields, dict):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    return Event(entry_id, str(fields.get("type", "")), str(fields.get("data", "null")))
