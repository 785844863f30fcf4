"""The node: one process's share of the fleet.

``Node(settings)`` composes the parts (``lease``, ``maintenance``, ``moves``, ``ends``, the
control channel and the event dispatcher), runs start-up and shutdown (drain with a timeout,
then hand off or close what is left), and starts and closes sessions. Signals only call
``begin_drain``. Each loop lives with its concern: lease renewal in ``lease.py``, the
maintenance pass and the limits tick in ``maintenance.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Coroutine
from typing import Any

from redis.asyncio import Redis

from fleet import __version__, metrics
from fleet.errors import SessionNotFound
from fleet.events.cluster import AnnouncedDispatcher
from fleet.events.dispatcher import EventDispatcher
from fleet.models import CloseReason, EndReason, SessionRecord, State
from fleet.runtime.control import ControlListener, Message
from fleet.runtime.drain import Drain
from fleet.runtime.ends import Ends
from fleet.runtime.idempotency import IdempotentStarts
from fleet.runtime.inbox import Conversations
from fleet.runtime.lease import Lease
from fleet.runtime.maintenance import Maintenance, enforce_limits
from fleet.runtime.moves import Moves
from fleet.runtime.orders import Orders
from fleet.runtime.placement import Directory, Forwards
from fleet.runtime.probes import probe_loop_lag
from fleet.runtime.reports import MetricsReports
from fleet.runtime.session import CANCEL_GRACE, LocalSession
from fleet.runtime.starts import Starts
from fleet.runtime.threads import OnThread, Threads
from fleet.settings import Settings
from fleet.store import REDIS_ERRORS
from fleet.store.connect import connect
from fleet.store.idempotency import Reservation
from fleet.store.keys import make_ref
from fleet.store.registry import Registry
from fleet.tasks import cancel_and_wait
from fleet.worker import load_workers

log = logging.getLogger("fleet.node")


class Node:
    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.workers = load_workers(settings.worker)
        self.redis = redis if redis is not None else connect(settings)
        self._owns_redis = redis is None
        self.registry = Registry(self.redis, settings)
        self.started_at = time.time()
        self.host = socket.gethostname()

        self.sessions: dict[str, LocalSession] = {}
        self._pending: set[str] = set()  # refs admitted but not yet in ``sessions``
        self.ends = Ends(self.registry, self.node_id)
        self.reports = MetricsReports(self.registry, settings, self.sessions)
        self.conversations = Conversations(self.registry, self.node_id, settings.inbox_maxlen)
        self.threads = Threads(
            self.registry, self.start_session, self.close_session, self.conversations
        )
        self.idempotent = IdempotentStarts(self.registry, self.threads.start)
        self.directory = Directory(self.registry)
        self.forwards = Forwards(self.registry, settings)
        self.starts = Starts(self, self.workers, self.directory, self.forwards, self._pending)
        self.moves = Moves(self, self.sessions, self.workers, self.adopt)
        self.lease = Lease(
            self.registry,
            settings,
            info=self._node_info,
            recover=self._recover,
            lapse=self._lease_lapsed,
            changed=self._set_ready_gauge,
            session_count=lambda: len(self.sessions),
        )
        self.maintenance = Maintenance(
            self.registry,
            settings,
            sessions=self.sessions,
            pending=self._pending,
            moves=self.moves,
            ends=self.ends,
            lease_held=lambda: self.lease.held,
            live_count=lambda: sum(self._state_counts.values()),
        )
        self.drain = Drain(
            settings,
            sessions=self.sessions,
            moves=self.moves,
            announce=self.lease.renew,
            alone=self._owns_redis and settings.embedded,
            migratable=self._migratable,
        )

        self.left_behind: set[asyncio.Task[Any]] = set()  # tasks that ignored cancellation
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._listener = ControlListener(
            self.redis,
            self.registry.keys.node_channel(self.node_id),
            Orders(self, self.sessions, self.ends, self.conversations, self.moves),
            self._on_subscribed,
            on_lost=self.lease.wake,
        )
        self._state_counts: dict[str, int] = {s: 0 for s in State if s is not State.ENDED}
        # One reader of session streams for every SSE and WebSocket client on this node.
        dispatcher = AnnouncedDispatcher if self.registry.cluster else EventDispatcher
        self.events = dispatcher(self.registry)

    # -- start-up and shutdown ----------------------------------------------------------
    async def start(self) -> None:
        metrics.init_labels()
        metrics.BUILD_INFO.labels(__version__).set(1)
        metrics.NODE_DRAINING.set(0)
        with contextlib.suppress(*REDIS_ERRORS):
            await self.registry.load()  # else each script's first call meets NOSCRIPT
        await self.lease.renew()
        with contextlib.suppress(*REDIS_ERRORS):
            await self._describe_workers()
        loops = {
            "lease": self.lease.run(),
            "maintenance": self.maintenance.run(),
            "limits": enforce_limits(self.settings, self.sessions),
            "metrics reports": self.reports.run(),
            "control listener": self._listener.run(),
            "loop lag probe": probe_loop_lag(),
        }
        for name, loop in loops.items():
            self._tasks.append(asyncio.create_task(loop, name=f"{self.node_id} {name}"))
        for task in self._tasks:
            task.add_done_callback(self._loop_ended)
        self.events.start()
        log.info(
            "node started (workers %s, lease %.1fs)",
            ", ".join(f"{w.name}={w.import_string}" for w in self.workers),
            self.settings.node_ttl,
            extra={"node_id": self.node_id},
        )

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A loop only ends when the node stops; anything else is a bug worth shouting."""
        if not task.cancelled() and task.exception() is not None:
            log.critical(
                "%s died: %r", task.get_name(), task.exception(), extra={"node_id": self.node_id}
            )

    @property
    def draining(self) -> bool:
        return self.drain.active

    @property
    def drained(self) -> asyncio.Event:
        return self.drain.done

    def begin_drain(self) -> None:
        """Stop taking sessions and let the running ones finish (SIGTERM). Idempotent."""
        self.drain.begin()

    async def stop(self) -> None:
        """Drain (if no drain ran yet), stop the loops and leave the registry."""
        self.begin_drain()
        await self.drained.wait()
        stuck = await cancel_and_wait(
            *self._tasks,
            *self._background,
            *(s.task for s in self.sessions.values()),
            *self.left_behind,
            timeout=CANCEL_GRACE,
        )
        if stuck:
            log.error(
                "%d tasks did not stop when cancelled; leaving them behind",
                len(stuck),
                extra={"node_id": self.node_id},
            )
        self.left_behind = stuck
        await self.events.stop()  # ends the open event streams
        if self.ends.unwritten:
            # Some ends could not be written: keep this node in the registry, so that when
            # its lease lapses another node reaps those sessions instead of losing them.
            log.error(
                "%d session ends could not be written; leaving them to the reaper",
                len(self.ends.unwritten),
                extra={"node_id": self.node_id},
            )
        else:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.registry.remove_node(self.node_id)
        if self._owns_redis:
            await self.redis.aclose()
        log.info("node stopped", extra={"node_id": self.node_id})

    # -- readiness ----------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.lease.redis_ok:
            return False, "redis_unavailable"
        if not self.lease.held:
            return False, "lease_not_held"
        if not self._listener.subscribed:
            # Both down at once: Redis is away (one failed renewal alone does not say so).
            return False, "redis_unavailable" if self.lease.failures else "control_channel_down"
        return True, "ok"

    async def wait_ready(self, timeout: float) -> bool:
        """Whether the node became ready within ``timeout`` seconds. Start-up subscribes to
        the control channel in the background, so a node is not ready the moment ``start``
        returns; for in-process callers (``fleet run``, tests) that start a session at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.readiness()[0]:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def refresh_gauges(self) -> None:
        """Bring the readiness gauges up to date (before a scrape)."""
        self._set_ready_gauge()

    def _set_ready_gauge(self) -> None:
        metrics.NODE_READY.set(1 if self.readiness()[0] else 0)
        metrics.REDIS_UP.set(1 if self.lease.redis_ok else 0)

    # -- sessions -----------------------------------------------------------------------
    async def start_session(
        self,
        call_id: str,
        call_type: str,
        params: dict[str, Any],
        principal: str = "",
        resumable: bool = True,
        *,
        worker: str | None = None,
        once: Reservation | None = None,
        session_id: str | None = None,
        thread: OnThread | None = None,
    ) -> SessionRecord:
        """Admit, record and start a session, on this node or on the one placement picks
        (``starts.py``); returns once it runs. ``worker``: its name (the default worker
        for ``None``). With ``once`` (an idempotency reservation: ``self.idempotent``), the
        record is only written while the reservation holds, together with the answer kept
        for the key. ``thread``: the thread it runs on, claimed for it (``self.threads``),
        and the state it starts from."""
        return await self.starts.start(
            call_id,
            call_type,
            params,
            principal,
            resumable,
            worker=worker,
            once=once,
            session_id=session_id,
            thread=thread,
        )

    async def migrate_session(self, call_id: str, session_id: str) -> str:
        """Move a running session to another node now (``Moves.migrate``); returns the
        node it moves away from."""
        return await self.moves.migrate(call_id, session_id)

    def adopt(self, session: LocalSession) -> None:
        """Run a session that moved here from another node."""
        self.sessions[session.ref] = session
        self.count_state(State.STARTING, +1)
        session.record.state = State.STARTING
        session.start()
        if session.record.close_reason:
            session.request_close(CloseReason.CLOSED, recorded=True)

    async def close_session(
        self, call_id: str, session_id: str, wait: float | None = None, *, principal: str = ""
    ) -> SessionRecord | None:
        """Ask the owner, wherever it runs, to close the session: one round trip here, and
        the owner's end is one more. With ``principal``, another principal's session is
        not found.

        Returns the ended record when the session has ended (at once, or within ``wait``
        seconds), ``None`` while it is still closing. Raises SessionNotFound.
        """
        ref = make_ref(call_id, session_id)
        waiter = self.ends.waiter(ref) if wait else None
        try:
            message = Message("close", ref, CloseReason.CLOSED.value, self.node_id)
            status, owner, ended = await self.registry.request_close(
                call_id,
                session_id,
                CloseReason.CLOSED.value,
                message.encode(),
                asker=self.node_id,
                principal=principal,
            )
            if status == "missing":
                raise SessionNotFound(f"no session {session_id} in call {call_id}")
            if status == "ended":
                return ended
            local = self.sessions.get(ref)
            if owner == self.node_id and local is not None:
                local.request_close(CloseReason.CLOSED, recorded=True)
            if waiter is None or wait is None:
                return None
            return await self.ends.wait(call_id, session_id, waiter, wait, told=owner)
        finally:
            if waiter is not None:
                self.ends.forget(ref, waiter)

    async def wait_for_end(
        self, call_id: str, session_id: str, wait: float
    ) -> SessionRecord | None:
        """The session's record once it has ended, wherever it runs and if it moves
        (``Ends.wait``); ``None`` if it still runs after ``wait`` seconds."""
        ref = make_ref(call_id, session_id)
        waiter = self.ends.waiter(ref)
        try:
            return await self.ends.wait(call_id, session_id, waiter, wait)
        finally:
            self.ends.forget(ref, waiter)

    async def finish(
        self, session: LocalSession, reason: EndReason, error: str, *, moved: bool
    ) -> None:
        """Record how a local session ended (unless it moved), free its slot, tell whoever
        waits. Called once per session, from its own task."""
        record = session.record
        if moved:
            log.warning(
                "session moved to another node; local copy stopped", extra=session.log_extra
            )
        elif reason is EndReason.NODE_SHUTDOWN and await self.drain.hand_off(session):
            moved = True
        elif reason is EndReason.NODE_SHUTDOWN and session.migrating and not session.abandoned:
            # A migration found no node to take it after all: it resumes here.
            self.spawn(self.moves.take_back(session.ref))
            moved = True
        replies = session.reply_to - {self.node_id}
        record.result = session.result
        if not moved:
            # Whoever waits for this end is told in the same round trip as the end.
            await self.ends.write(record, reason, error, replies, self.reports.final(session))
        elif replies:
            self.spawn(self.ends.publish_ended(session.ref, replies))
        self.sessions.pop(session.ref, None)
        if session.abandoned and session.task is not None:
            self.left_behind.add(session.task)
        self.count_state(record.state, -1)
        record.state = State.ENDED
        record.end_reason = reason.value
        record.ended_at = time.time()
        session.final = record
        if session.close_requested_at is not None:
            metrics.SESSION_CLOSE_SECONDS.observe(time.monotonic() - session.close_requested_at)
        self.ends.wake(session.ref)
        if not moved:  # a move (hand-off, takeover) has logged itself
            log.info("session ended (%s)", reason.value, extra=session.log_extra)

    def count_state(self, state: str, delta: int) -> None:
        if state in self._state_counts:
            self._state_counts[state] += delta
            metrics.labelled(metrics.SESSIONS_ACTIVE, state).set(self._state_counts[state])

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a fire-and-forget coroutine that is cancelled with the node."""
        task = asyncio.create_task(coro, name=getattr(coro, "__qualname__", None))
        self._background.add(task)
        task.add_done_callback(self._spawned_ended)
        return task

    def _spawned_ended(self, task: asyncio.Task[Any]) -> None:
        """Log why a background task failed (what it was doing is left to the maintenance
        pass), rather than leave asyncio to say "Task exception was never retrieved"."""
        self._background.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        extra = {"node_id": self.node_id}
        if isinstance(exc, REDIS_ERRORS):
            log.warning("%s failed: %s", task.get_name(), type(exc).__name__, extra=extra)
        else:
            log.error("%s failed", task.get_name(), exc_info=exc, extra=extra)

    # -- control channel ----------------------------------------------------------------
    async def _on_subscribed(self) -> None:
        self._set_ready_gauge()
        self.lease.wake()  # after a reconnect: is it the same Redis (``Lease.renew``)?
        self.maintenance.wake()
        for session in self.sessions.values():
            session.inbox.wake()  # nudges sent while the channel was down are lost

    # -- what the lease and the sessions need -------------------------------------------
    def _node_info(self) -> dict[str, str]:
        capacity = self.settings.max_sessions_per_node
        return {
            "host": self.host,
            "started_at": repr(self.started_at),
            "capacity": "" if capacity is None else str(capacity),
            "draining": "1" if self.draining else "0",
            "version": __version__,
            "workers": ",".join(self.workers.names),
        }

    async def _describe_workers(self) -> None:
        await self.registry.publish_workers(
            {w.name: json.dumps(w.describe(), separators=(",", ":")) for w in self.workers}
        )

    def _migratable(self, session: LocalSession) -> bool:
        spec = self.workers.get(session.record.worker)
        return spec is not None and spec.migratable and session.record.resumable

    async def _recover(self) -> None:
        await self._describe_workers()  # Redis may have lost the descriptions too
        await self.maintenance.check_own_sessions(full=True)

    def _lease_lapsed(self) -> None:
        for session in list(self.sessions.values()):
            session.lose("lease_lapsed")

    async def restore(self, session: LocalSession) -> None:
        await self.maintenance.restore(session)

    async def maintain(self) -> None:
        """One maintenance pass now (tests and benchmarks)."""
        await self.maintenance.run_pass()
