"""Live events: one dispatcher per node fans session streams out to their listeners.

Every session's events live in a Redis Stream (``Keys.events``). A node may serve hundreds
of SSE and WebSocket clients; giving each one a connection blocked in ``XREAD`` would cost
hundreds of idle connections, and polling would cost round trips. Instead the node's
``EventDispatcher`` owns ONE dedicated connection that blocks in ``XREAD`` over every stream
that has a listener here (each from the last id it read) and hands the entries to bounded
per-listener buffers (``listener.py``). When a stream gains its first listener (or the node
loses its last one) the blocking read is interrupted with ``CLIENT UNBLOCK`` from the
regular pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from fleet import metrics
from fleet.events.listener import (
    BUFFER_SIZE,
    CATCH_UP_COUNT,
    RETRY_MAX,
    RETRY_MIN,
    START,
    Listener,
    event_from_entry,
    id_order,
)
from fleet.store import REDIS_ERRORS
from fleet.store.registry import Registry
from fleet.tasks import cancel_and_wait

log = logging.getLogger("fleet.events")

READ_COUNT = 256  # entries per stream per dispatcher read
READ_CONCURRENCY = 4  # Redis reads for listeners in flight per node: bounds pool growth
BLOCK_MS = 5000  # the dispatcher's XREAD BLOCK when CLIENT UNBLOCK can interrupt it
FALLBACK_BLOCK_MS = 50  # ... and when it cannot (see ``_probe_unblock``)
READ_GRACE = 5.0  # seconds a blocked read may overrun its BLOCK before it counts as lost


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
            except Exception as exc:
                # Anything but cancellation reconnects: a reader that died would leave
                # every listener of this node waiting for good.
                if isinstance(exc, self.read_errors):
                    log.warning(
                        "event dispatcher lost Redis (%s); reconnecting in %.2fs",
                        type(exc).__name__,
                        backoff,
                    )
                else:
                    log.exception("event dispatcher failed; reconnecting in %.2fs", backoff)
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
            events = [event_from_entry(entry_id, fields) for entry_id, fields in entries]
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
