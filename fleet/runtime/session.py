"""One session running on this node: the worker's task and everything around it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from redis.exceptions import RedisError

from fleet import metrics
from fleet.errors import CheckpointTooLarge, EventTooLarge, InvalidResult, LeaseLost
from fleet.models import CloseReason, EndReason, SessionRecord, State
from fleet.runtime.control import Message as ControlMessage
from fleet.runtime.inbox import SessionInbox, to_message
from fleet.settings import Settings
from fleet.store.inbox import InboxEntry
from fleet.store.keys import make_ref
from fleet.store.registry import Registry
from fleet.store.scripts import FENCED, MISSING
from fleet.worker import Message, SessionContext, Worker

log = logging.getLogger("fleet.session")

#: Seconds a cancelled worker gets to stop before its session is recorded ended without it.
CANCEL_GRACE = 2.0
STUCK = "did not stop when cancelled"
T = TypeVar("T")

_END_REASON_FOR_CLOSE = {
    CloseReason.CLOSED: EndReason.CLOSED,
    CloseReason.MAX_DURATION: EndReason.MAX_DURATION,
    CloseReason.IDLE: EndReason.IDLE,
    CloseReason.HANDOFF: EndReason.NODE_SHUTDOWN,
}


class SessionHost(Protocol):
    """What a session needs from the node that runs it (``fleet.runtime.node.Node``)."""

    node_id: str
    settings: Settings
    registry: Registry

    def count_state(self, state: str, delta: int) -> None:
        """Keep the node's per-state session counts (a gauge) up to date."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a coroutine in the background, cancelled with the node."""

    async def finish(
        self, session: LocalSession, reason: EndReason, error: str, *, moved: bool
    ) -> None:
        """Record how the session ended (unless it moved), free its slot, tell who waits."""

    async def restore(self, session: LocalSession) -> None:
        """Write back the record and slot of this session, which Redis lost."""


def to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class LocalSession:
    """Runs a worker for one session and records how it ends.

    The end is written once, fenced by owner and epoch: if another node took the session
    over (``moved``), this copy stops without writing anything.
    """

    # A node holds thousands of these and walks them all (the maintenance pass checks each
    # one's ``done``): slots keep each session's attributes in one place, which halves the
    # time such a walk spends fetching them from memory.
    __slots__ = (
        "_cancel_timer",
        "_closing_event",
        "_ended",
        "_inbox",
        "_lost",
        "_moved",
        "_reply_to",
        "abandoned",
        "close_requested_at",
        "ctx",
        "done",
        "final",
        "host",
        "last_activity",
        "migrating",
        "record",
        "ref",
        "result",
        "running",
        "started_mono",
        "task",
        "worker",
    )

    def __init__(
        self,
        host: SessionHost,
        record: SessionRecord,
        worker: Worker,
        *,
        state: Any = None,
        resumed: bool = False,
        running: bool = False,
    ) -> None:
        """``running``: the record was already written running (a new session's is)."""
        self.host = host
        self.record = record
        self.ref = make_ref(record.call_id, record.session_id)
        self.worker = worker
        self.ctx = SessionContext(
            session_id=record.session_id,
            call_id=record.call_id,
            call_type=record.call_type,
            params=record.params,
            node_id=host.node_id,
            state=state,
            resumed=resumed,
            hooks=self,
            thread_id=record.thread_id,
        )
        # Until the worker starts: its state (``running``, or how it failed). A new session's
        # record is written running before it is made, so it has none to wait for. Nothing
        # has to wait for it: its exception counts as seen (or asyncio logs each one).
        self.running: asyncio.Future[str] | None = None
        if not running:
            self.running = asyncio.get_running_loop().create_future()
            self.running.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.done = asyncio.Event()
        self.final: SessionRecord | None = None
        self.last_activity = time.monotonic()
        self.started_mono = time.monotonic()
        self.close_requested_at: float | None = None
        self._reply_to: set[str] | None = None
        self.result: str | None = None  # what ``run`` returned, as JSON text
        self._moved = False
        self._lost: str | None = None
        self._cancel_timer: asyncio.TimerHandle | None = None
        self._ended = False  # the end went to the host (finish) already
        self.abandoned = False  # the worker ignored its cancellation: left behind
        self.migrating = False  # asked to move to another node now (``migrate``)
        self.task: asyncio.Task[None] | None = None
        self._closing_event: asyncio.Task[None] | None = None
        self._inbox: SessionInbox | None = None

    # Made when first needed: most sessions never receive a message or a reply-to (an idle
    # session keeps fewer objects alive, and a full garbage collection walks fewer).
    @property
    def inbox(self) -> SessionInbox:
        """What the worker receives, and how far it got (from the record's position until
        the first checkpoint, which alone moves that position)."""
        if self._inbox is None:
            record = self.record
            self._inbox = SessionInbox(
                self.host.registry,
                record.call_id,
                record.session_id,
                record.inbox_pos,
                record.inbox_done,
            )
        return self._inbox

    @property
    def reply_to(self) -> set[str]:
        """The nodes waiting for this session's end (besides those Redis tells)."""
        if self._reply_to is None:
            self._reply_to = set()
        return self._reply_to

    def _wake_inbox(self) -> None:
        # An inbox not made yet looks once when it is: nothing to wake.
        if self._inbox is not None:
            self._inbox.wake()

    @property
    def log_extra(self) -> dict[str, str]:
        return {
            "node_id": self.host.node_id,
            "session_id": self.record.session_id,
            "call_id": self.record.call_id,
        }

    def start(self) -> None:
        self.task = asyncio.create_task(self._main(), name=f"session {self.ref}")

    # -- hooks the context calls --------------------------------------------------------
    def touch(self) -> None:
        self.last_activity = time.monotonic()

    async def emit(self, type: str, data: Any) -> None:
        self.touch()
        payload = to_json(data)
        limit = self.host.settings.max_event_bytes
        if len(payload.encode()) > limit:
            raise EventTooLarge(f"event {type!r} is over the {limit}-byte limit")
        await self._fenced(lambda: self.host.registry.emit(self.record, type, payload))
        metrics.EVENTS_EMITTED.inc()

    async def checkpoint(self, state: Any) -> None:
        payload = to_json(state)
        size = len(payload.encode())
        limit = self.host.settings.max_checkpoint_bytes
        if size > limit:
            metrics.labelled(metrics.CHECKPOINTS, "too_large").inc()
            raise CheckpointTooLarge(f"checkpoint of {size} bytes is over the {limit}-byte limit")
        history = self.host.settings.checkpoint_history
        # The messages handed out so far are consumed with this state, in the same step.
        pos, count = self.inbox.consumed
        consumed = (pos, count) if count != self.record.inbox_done else None
        try:
            version = await self._fenced(
                lambda: self.host.registry.checkpoint(self.record, payload, history, consumed)
            )
        except LeaseLost:
            metrics.labelled(metrics.CHECKPOINTS, "stale").inc()
            raise
        metrics.labelled(metrics.CHECKPOINTS, "ok").inc()
        metrics.CHECKPOINT_BYTES.observe(size)
        self.record.checkpoint_version = int(version)
        self.record.inbox_pos, self.record.inbox_done = pos, count

    async def receive(self, timeout: float | None) -> Message | None:
        entry = await self._through_outages(lambda: self.inbox.next(self.ctx.closing, timeout))
        if entry is None:
            return None
        self.touch()
        return to_message(entry, lambda _, data: self._reply(entry, data))

    async def _reply(self, entry: InboxEntry, data: Any) -> None:
        """A ``reply`` event for followers; then the answer to the node that waits for it,
        if any (whichever node this session runs on now)."""
        payload = to_json(data)
        await self.emit("reply", {"message_id": entry.id, "data": data})
        if entry.reply_to and entry.ask:
            message = ControlMessage("reply", self.ref, entry.ask, payload=payload).encode()
            channel = self.host.registry.keys.node_channel(entry.reply_to)
            with contextlib.suppress(RedisError, OSError):
                await self.host.registry.redis.publish(channel, message)

    def nudge(self) -> None:
        """A message arrived: look in the inbox; with ``inbox = "interrupt"`` tell the
        worker to listen."""
        self.inbox.wake()
        if self.record.inbox == "interrupt":
            self.ctx.interrupt.set()

    async def _fenced(self, write: Callable[[], Awaitable[T]]) -> T:
        """A write fenced by owner and epoch: refused means another node owns the session
        now, so this copy stops. A record Redis lost is written back first."""
        result = await self._through_outages(write)
        if result == MISSING:
            await self._through_outages(lambda: self.host.restore(self))
            result = await self._through_outages(write)
        if result in (FENCED, MISSING):
            self.lose("moved")
            raise LeaseLost(f"session {self.ref} is no longer owned by this node at this epoch")
        return result

    async def _through_outages(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry while Redis does not answer. The worker waits rather than fails: if the
        outage outlasts the lease, the node stops this session anyway (cancelling this)."""
        delay = 0.05
        while True:
            try:
                return await call()
            except (RedisError, OSError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    # -- control ------------------------------------------------------------------------
    @property
    def closing(self) -> bool:
        return self.ctx.closing.is_set()

    def request_close(
        self, reason: CloseReason, grace: float | None = None, *, recorded: bool = False
    ) -> None:
        """Ask the worker to stop; cancel it if it has not returned after the grace.
        ``recorded``: the close came through Redis (``request_close.lua``), which has
        written ``session_closing`` already; otherwise this node emits it."""
        if self.closing or self.done.is_set():
            return
        self.close_requested_at = time.monotonic()
        log.info("closing (%s)", reason.value, extra=self.log_extra)
        self.ctx.close_reason = reason.value
        self.ctx.closing.set()
        self._wake_inbox()  # a worker waiting for a message gets None
        if self.record.state != State.ENDED:
            self.host.count_state(self.record.state, -1)
            self.record.state = State.CLOSING
            self.host.count_state(State.CLOSING, +1)
        grace = self.host.settings.close_grace if grace is None else grace
        self._cancel_timer = asyncio.get_running_loop().call_later(grace, self._cancel)
        if reason is not CloseReason.HANDOFF and not recorded:
            self._closing_event = self.host.spawn(
                self.emit("session_closing", {"reason": reason.value})
            )

    def migrate(self) -> None:
        """Move the session to another node now (``POST …/migrate``): the worker is asked
        to stop with ``close_reason`` ``handoff``, then the node hands it off."""
        if self.closing or self.done.is_set():
            return
        self.migrating = True
        self.request_close(CloseReason.HANDOFF)

    def lose(self, why: str) -> None:
        """Stop this copy without writing its end: the session is not ours any more (it was
        moved to another node), or our lease lapsed (the end is written when Redis is back,
        fenced)."""
        if self.done.is_set():
            return
        self._lost = why
        self._moved = why == "moved"
        if not self.closing:
            self.ctx.close_reason = CloseReason.HANDOFF.value
            self.ctx.closing.set()
            self._wake_inbox()
        if asyncio.current_task() is not self.task:
            self._cancel()
        elif self._cancel_timer is None:
            # From a write inside the worker: the LeaseLost it gets should end it; if the
            # worker swallows that, it is cancelled after the grace like any close.
            grace = self.host.settings.close_grace
            self._cancel_timer = asyncio.get_running_loop().call_later(grace, self._cancel)

    def _cancel(self) -> None:
        # Once the worker is over, the task is writing the end: a cancel would lose it.
        if self.task is not None and not self.task.done() and not self._ended:
            self.task.cancel()
            self._cancel_timer = asyncio.get_running_loop().call_later(CANCEL_GRACE, self._abandon)

    def _abandon(self) -> None:
        """The worker caught its cancellation and runs on: record the end without it (the
        reason asked for, the error ``STUCK``), free its slot and tell whoever waits, so a
        close completes and a drain ends. Its task is left behind; every write it tries
        from now on is refused (the session is ended), and shutdown is bounded anyway
        (``fleet.serve.server``)."""
        if self.task is None or self.task.done() or self._ended:
            return
        self.abandoned = True
        log.warning(
            "worker %s after %.0fs; recording the end without it",
            STUCK,
            CANCEL_GRACE,
            extra=self.log_extra,
        )
        self.host.spawn(self._end(self._end_reason_for_close(), STUCK))

    # -- lifecycle ----------------------------------------------------------------------
    async def _main(self) -> None:
        cancelled = False
        try:
            reason, error = await self._run_worker()
        except asyncio.CancelledError:
            # The node is being torn down without a drain: still record the end.
            cancelled = True
            reason, error = EndReason.NODE_SHUTDOWN, ""
        if self._cancel_timer is not None:
            self._cancel_timer.cancel()
        if self._closing_event is not None:
            # session_closing goes into the stream before session_ended.
            await asyncio.gather(self._closing_event, return_exceptions=True)
        await self._end(reason, error)
        if cancelled:
            raise asyncio.CancelledError

    async def _end(self, reason: EndReason, error: str) -> None:
        """Hand the end to the host, once: from the session's own task, or on its behalf
        when its worker would not stop."""
        if self._ended:
            return
        self._ended = True
        try:
            await self.host.finish(self, reason, error, moved=self._moved)
        finally:
            self.done.set()

    async def _run_worker(self) -> tuple[EndReason, str]:
        running = self.running
        try:
            if running is not None and not running.done():
                await self._mark_running(running)
            self.result = self._result(await self.worker.run(self.ctx))
        except asyncio.CancelledError:
            if self._lost is None and not self.closing:
                raise  # the node itself is going away: finish() still runs in _main
            return self._end_reason_for_close(), ""
        except LeaseLost as exc:
            if running is not None and not running.done():
                running.set_exception(exc)
            return EndReason.NODE_LOST, ""
        except InvalidResult as exc:
            log.error("worker failed: %s", exc, extra=self.log_extra)
            return EndReason.FAILED, exc.code
        except Exception as exc:
            log.exception("worker failed", extra=self.log_extra)
            if running is not None and not running.done():
                running.set_exception(exc)
            return EndReason.FAILED, type(exc).__name__
        finally:
            if running is not None and not running.done():
                running.set_exception(LeaseLost("the session stopped before it ran"))
        if self.closing:
            return self._end_reason_for_close(), ""
        return EndReason.COMPLETED, ""

    def _result(self, value: Any) -> str | None:
        """``run``'s return value as the session's result: JSON, within the limit."""
        if value is None:
            return None
        try:
            payload = to_json(value)
        except (TypeError, ValueError):
            raise InvalidResult(
                f"the worker returned a {type(value).__name__}, which is not JSON"
            ) from None
        limit = self.host.settings.max_result_bytes
        if len(payload.encode()) > limit:
            raise InvalidResult(f"the result is over the {limit}-byte limit")
        return payload

    async def _mark_running(self, running: asyncio.Future[str]) -> None:
        # Through outages, like the worker's writes: a Redis hiccup as a moved session
        # resumes must not fail it (a retry after a lost answer may repeat the event).
        event = "session_resumed" if self.ctx.resumed else "session_started"
        data = {"node_id": self.host.node_id, "epoch": self.record.epoch}
        state = await self._through_outages(
            lambda: self.host.registry.mark_running(self.record, event, data)
        )
        if state == "lease_lost":
            self._moved = True
            raise LeaseLost("this node lost the session before its worker started")
        if self.record.state == State.STARTING:
            self.host.count_state(State.STARTING, -1)
            self.record.state = State.RUNNING
            self.host.count_state(State.RUNNING, +1)
        running.set_result(state)

    def _end_reason_for_close(self) -> EndReason:
        if self._lost is not None:
            return EndReason.NODE_LOST
        return _END_REASON_FOR_CLOSE[CloseReason(self.ctx.close_reason or "closed")]
