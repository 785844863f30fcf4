"""Live events: one dispatcher per node fans session streams out to their listeners.

Every session's events live in a Redis Stream (``Keys.events``). A node may serve hundreds
of SSE and WebSocket clients; giving each one a connection blocked in ``XREAD`` would cost
hundreds of idle connections, and polling would cost round trips. Instead the node's
``EventDispatcher`` owns ONE dedicated connection that blocks in ``XREAD`` over every stream
that has a listener here (each from the last id it read) and hands the entries to bounded
per-listener buffers. When a stream gains its first listener (or the node loses its last
one) the blocking read is interrupted with ``CLIENT UNBLOCK`` from the regular pool.

``session_started`` is not stored: a session that never emits costs no stream at all (a
Redis stream takes about 4 KB from its first entry). Every listener is handed it first,
made from the session record, with the id ``0-1``, which sorts before any stored entry.

A listener never misses or repeats an event, whatever its speed:

* it reads its backlog from Redis first (``XREAD`` without ``BLOCK``, from its own
  position) and joins the fan-out once it has caught up;
* it hands out strictly increasing ids only, so an entry that arrives both ways is dropped;
* when its buffer is full (a slow client) it leaves the fan-out and reads what it missed
  from Redis again, at its own pace. A slow client never slows the worker, the dispatcher
  or the other listeners. Entries trimmed by ``FLEET_EVENTS_MAXLEN`` meanwhile are gone;
  it gets what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

from fleet import metrics
from fleet.models import State
from fleet.store.registry import Registry
from fleet.tasks import cancel_and_wait

log = logging.getLogger("fleet.events")

EVENT_ID_PATTERN = r"^\d+-\d+$"
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
START = "0-0"  # before the first entry of any stream
STARTED_ID = "0-1"  # session_started's id: after START, before any stored entry
STARTED, ENDED = "session_started", "session_ended"
REDIS_ERRORS = (RedisError, OSError)

BUFFER_SIZE = 256  # live entries a listener may hold before it falls back to Redis
CATCH_UP_COUNT = 100  # entries per backlog read
READ_COUNT = 256  # entries per stream per dispatcher read
READ_CONCURRENCY = 4  # Redis reads for listeners in flight per node: bounds pool growth
BLOCK_MS = 5000  # the dispatcher's XREAD BLOCK when CLIENT UNBLOCK can interrupt it
FALLBACK_BLOCK_MS = 50  # ... and when it cannot (see ``_probe_unblock``)
READ_GRACE = 5.0  # seconds a blocked read may overrun its BLOCK before it counts as lost
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


class Listener:
    """One client's cursor over one session's stream. Open it with
    ``EventDispatcher.listen``; ``next`` hands out events in id order and ``done`` turns
    true once ``session_ended`` was handed out (or the replay of an ended session ran dry).
    """

    def __init__(
        self,
        hub: EventDispatcher,
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


class EventDispatcher:
    """The node's single reader of session streams. ``start`` it with the node; ``listen``
    opens a ``Listener``. Holds a Redis connection only while some listener is live."""

    #: What a read may raise that means "reconnect and go on".
    read_errors: tuple[type[Exception], ...] = REDIS_ERRORS

    def __init__(
        self,
        registry: Registry,
        *,
        buffer_size: int = BUFFER_SIZE,
        catch_up_count: int = CATCH_UP_COUNT,
        read_count: int = READ_COUNT,
        block_ms: int = BLOCK_MS,
        fallback_block_ms: int = FALLBACK_BLOCK_MS,
    ) -> None:
        self.registry = registry
        self._redis = registry.redis
        self.buffer_size = buffer_size
        self.catch_up_count = catch_up_count
        self.read_count = read_count
        self.block_ms = block_ms
        self.fallback_block_ms = fallback_block_ms
        # Every Redis read made for listeners (look-ups, backlogs) takes a slot: a burst of
        # new clients then reuses a few pool connections instead of opening one each.
        self.read_slots = asyncio.Semaphore(READ_CONCURRENCY)
        self._open: set[Listener] = set()
        self._groups: dict[str, set[Listener]] = {}  # stream key -> joined listeners
        self._positions: dict[str, str] = {}  # stream key -> last id the dispatcher read
        self._conn: AbstractConnection | None = None
        self._client_id: int | None = None
        self.can_unblock = False
        self._reading = False
        self._stale = False  # the watched set changed since the current read began
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unblock_task: asyncio.Task[None] | None = None

    @property
    def listeners(self) -> int:
        return len(self._open)

    @property
    def streams(self) -> int:
        return len(self._groups)

    @property
    def holds_connection(self) -> bool:
        return self._conn is not None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event dispatcher")

    async def stop(self) -> None:
        """Stop reading and end every open listener (their clients then reconnect,
        to another node if this one is going away)."""
        await cancel_and_wait(self._task, self._unblock_task)
        self._task = self._unblock_task = None
        await self._drop_connection()
        for listener in list(self._open):
            listener.close()

    @contextlib.contextmanager
    def listen(
        self,
        call_id: str,
        session_id: str,
        after: str = START,
        *,
        replay_only: bool = False,
        started_at: float | None = None,
    ) -> Iterator[Listener]:
        """A listener for events after ``after``, beginning with ``session_started`` when
        ``started_at`` (the record's) is given; with ``replay_only`` (an ended session) it
        hands out what the stream holds and is then done. Leaving the block frees it."""
        listener = Listener(self, call_id, session_id, after, replay_only, started_at)
        self._open.add(listener)
        metrics.EVENT_LISTENERS.inc()
        try:
            yield listener
        finally:
            self._open.discard(listener)
            metrics.EVENT_LISTENERS.dec()
            self._leave(listener)

    # -- membership ----------------------------------------------------------------------
    def join(self, listener: Listener, tail: str) -> bool:
        """Add a caught-up listener (whose backlog ended at ``tail``) to the fan-out.
        True when the dispatcher has already read past ``tail``: the listener must read
        that gap from Redis itself."""
        if listener not in self._open:
            return False
        group = self._groups.get(listener.key)
        if group is None:
            self._groups[listener.key] = {listener}
            self._positions[listener.key] = tail
            self._changed()
            return False
        group.add(listener)
        return id_order(self._positions[listener.key]) > id_order(tail)

    def _leave(self, listener: Listener) -> None:
        group = self._groups.get(listener.key)
        if group is None or listener not in group:
            return
        group.discard(listener)
        if not group:
            del self._groups[listener.key]
            del self._positions[listener.key]
            if not self._groups:
                self._changed()  # let the read end, so the connection is released
        # A stream that lost its last listener but not the node's last one stays in the
        # current read; the next read leaves it out. No need to interrupt for that.

    def _changed(self) -> None:
        self._stale = True
        self._wakeup.set()
        if (
            self._reading
            and self.can_unblock
            and (self._unblock_task is None or self._unblock_task.done())
        ):
            self._unblock_task = asyncio.create_task(self._unblock(), name="event unblock")

    async def _unblock(self) -> None:
        """Interrupt the blocked read so the next one covers the new set of streams. The
        read may not have reached Redis yet (then nothing is unblocked): try again."""
        for attempt in range(50):
            if not (self._reading and self._stale) or self._client_id is None:
                return
            try:
                if await self._redis.client_unblock(self._client_id):
                    return
            except REDIS_ERRORS:
                return  # the read ends by its own BLOCK timeout
            await asyncio.sleep(0.001 * (attempt + 1))

    # -- the read loop -------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = RETRY_MIN
        while True:
            if not self._groups:
                await self._drop_connection()
                self._wakeup.clear()
                if not self._groups:
                    await self._wakeup.wait()
                continue
            try:
                await self._read()
                backoff = RETRY_MIN
            except self.read_errors as exc:
                log.warning(
                    "event dispatcher lost Redis (%s); reconnecting in %.2fs",
                    type(exc).__name__,
                    backoff,
                )
                await self._drop_connection()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)

    async def _read(self) -> None:
        conn = self._conn or await self._connect()
        keys = list(self._positions)
        ids = [self._positions[key] for key in keys]
        block = self.block_ms if self.can_unblock else self.fallback_block_ms
        self._stale = False
        self._reading = True
        try:
            await conn.send_command(
                "XREAD", "COUNT", self.read_count, "BLOCK", block, "STREAMS", *keys, *ids
            )
            reply = await conn.read_response(timeout=block / 1000 + READ_GRACE)
        finally:
            self._reading = False
        self._fan_out(reply)

    def _fan_out(self, reply: Any) -> None:
        if not reply:
            return  # timed out, or unblocked
        for key, entries in reply.items() if isinstance(reply, dict) else reply:
            group = self._groups.get(key)
            if group is None or not entries:
                continue
            events = [_event(entry_id, fields) for entry_id, fields in entries]
            self._positions[key] = events[-1].id
            for listener in list(group):
                listener.offer(events)

    async def _connect(self) -> AbstractConnection:
        """Open a connection of our own, made like the node's (same pool settings) but
        never lent to it, and find out whether CLIENT UNBLOCK can interrupt its reads."""
        pool = self._redis.connection_pool
        conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
        self._conn = conn
        await conn.connect()  # type: ignore[no-untyped-call]
        self._client_id = await self._probe_unblock(conn)
        self.can_unblock = self._client_id is not None
        return conn

    async def _probe_unblock(self, conn: AbstractConnection) -> int | None:
        """The connection's CLIENT ID, if CLIENT UNBLOCK works here (on an idle client it
        answers 0). Where it does not (older fakeredis, the embedded mode's stand-in; a
        managed Redis that disables CLIENT), ``None``: the dispatcher then blocks for only
        ``fallback_block_ms`` at a time, so a new stream waits at most that long."""
        try:
            await conn.send_command("CLIENT", "ID")
            client_id = int(await conn.read_response())
            await self._redis.client_unblock(client_id)
        except ResponseError as exc:
            log.warning(
                "CLIENT UNBLOCK is not available (%s): event reads block for %d ms at a time",
                exc,
                self.fallback_block_ms,
            )
            return None
        return client_id

    async def _drop_connection(self) -> None:
        conn, self._conn, self._client_id = self._conn, None, None
        if conn is None:
            return
        with contextlib.suppress(*REDIS_ERRORS):
            await conn.disconnect()


def started_event(started_at: float) -> Event:
    """``session_started``, made from the record rather than stored."""
    return Event(STARTED_ID, STARTED, json.dumps({"started_at": started_at}))


def _event(entry_id: str, fields: Any) -> Event:
    if not isinstance(fields, dict):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    return Event(entry_id, str(fields.get("type", "")), str(fields.get("data", "null")))
