"""The node: one process's share of the fleet.

``Node(settings)`` runs start-up (lease, scripts, control channel), a few loops (lease
renewal every ``FLEET_NODE_TTL / 3``, a maintenance pass every
``FLEET_MAINTENANCE_INTERVAL``, a one-second tick for session limits) and shutdown (drain
with a timeout, then close what is left). Signals only call ``begin_drain``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from fleet import __version__, metrics
from fleet.control import ControlListener, Message
from fleet.errors import (
    AdmissionRejected,
    InvalidParams,
    NotAccepting,
    SessionNotFound,
)
from fleet.events import EventDispatcher
from fleet.events_cluster import AnnouncedDispatcher
from fleet.failover import Failover, Targets
from fleet.keys import make_ref
from fleet.models import CloseReason, EndReason, SessionRecord, State
from fleet.redis_client import connect
from fleet.registry import Registry
from fleet.scripts import EndResult, HeartbeatStatus
from fleet.session import LocalSession
from fleet.settings import Settings
from fleet.tasks import cancel_and_wait
from fleet.worker import load_worker

log = logging.getLogger("fleet.node")

REDIS_ERRORS = (RedisError, OSError)


class Node:
    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.worker = load_worker(settings.worker)
        self.redis = redis if redis is not None else connect(settings)
        self._owns_redis = redis is None
        self.registry = Registry(self.redis, settings)
        self.failover = Failover(self)
        self.started_at = time.time()
        self.host = socket.gethostname()

        self.sessions: dict[str, LocalSession] = {}
        self._pending: set[str] = set()  # refs admitted but not yet in ``sessions``
        self._strays: set[str] = set()  # slots with no local session, seen once
        self._unwritten_ends: dict[str, tuple[SessionRecord, EndReason, str]] = {}
        self._end_waiters: dict[str, list[asyncio.Future[None]]] = {}

        self.draining = False
        self.redis_ok = False
        self.lease_held = False
        self._last_renewal: float | None = None
        self._renewal_problem = ""  # the last ResponseError text a renewal met, if any
        self._maintain_now = asyncio.Event()
        self._maintain_lock = asyncio.Lock()
        self.drained = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self._handoff_targets: Targets | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._listener = ControlListener(
            self.redis,
            self.registry.keys.node_channel(self.node_id),
            self._on_message,
            self._on_subscribed,
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
        await self._renew_lease()
        for loop in (self._lease_loop, self._maintenance_loop, self._tick_loop):
            self._tasks.append(asyncio.create_task(loop(), name=f"{self.node_id} {loop.__name__}"))
        self._tasks.append(asyncio.create_task(self._listener.run(), name="control listener"))
        for task in self._tasks:
            task.add_done_callback(self._loop_ended)
        self.events.start()
        log.info(
            "node started (worker %s, lease %.1fs)",
            self.worker.import_string,
            self.settings.node_ttl,
            extra={"node_id": self.node_id},
        )

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A loop only ends when the node stops; anything else is a bug worth shouting."""
        if not task.cancelled() and task.exception() is not None:
            log.critical(
                "%s died: %r", task.get_name(), task.exception(), extra={"node_id": self.node_id}
            )

    def begin_drain(self) -> None:
        """Stop taking sessions and let the running ones finish (SIGTERM). Idempotent."""
        if self._drain_task is not None:
            return
        self.draining = True
        metrics.NODE_DRAINING.set(1)
        metrics.NODE_READY.set(0)
        log.info(
            "draining: %d sessions may run for up to %.0fs",
            len(self.sessions),
            self.settings.drain_timeout,
            extra={"node_id": self.node_id},
        )
        self._drain_task = asyncio.create_task(self._drain(), name="drain")

    async def _drain(self) -> None:
        with contextlib.suppress(Exception):
            await self._renew_lease()  # tell the fleet at once that this node drains
        await self._wait_sessions(self.settings.drain_timeout)
        if self.sessions:
            with contextlib.suppress(*REDIS_ERRORS):
                self._handoff_targets = await self.failover.hand_off_targets()
        for session in list(self.sessions.values()):
            session.request_close(CloseReason.HANDOFF)
        await self._wait_sessions(self.settings.close_grace + 1.0)
        self.drained.set()

    async def _wait_sessions(self, timeout: float) -> None:
        waits = [s.done.wait() for s in self.sessions.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout)

    async def stop(self) -> None:
        """Drain (if no drain ran yet), stop the loops and leave the registry."""
        self.begin_drain()
        await self.drained.wait()
        await cancel_and_wait(
            *self._tasks, *self._background, *(s.task for s in self.sessions.values())
        )
        await self.events.stop()  # ends the open event streams
        if self._unwritten_ends:
            # Some ends could not be written: keep this node in the registry, so that when
            # its lease lapses another node reaps those sessions instead of losing them.
            log.error(
                "%d session ends could not be written; leaving them to the reaper",
                len(self._unwritten_ends),
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
        if not self.redis_ok:
            return False, "redis_unavailable"
        if not self.lease_held:
            return False, "lease_not_held"
        if not self._listener.subscribed:
            return False, "control_channel_down"
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
        metrics.REDIS_UP.set(1 if self.redis_ok else 0)

    # -- sessions -----------------------------------------------------------------------
    async def start_session(
        self,
        call_id: str,
        call_type: str,
        params: dict[str, Any],
        principal: str = "",
        resumable: bool = True,
    ) -> SessionRecord:
        """Admit, record and start a session here; returns once it runs."""
        began = time.perf_counter()
        ready, reason = self.readiness()
        if not ready:
            code = "draining" if reason == "draining" else "not_ready"
            metrics.ADMISSION_REJECTED.labels(code).inc()
            raise NotAccepting(code, f"this node does not take new sessions now ({reason})")
        try:
            self.worker.validate_params(params)
        except (ValueError, TypeError) as exc:
            raise InvalidParams(str(exc)) from None
        worker = self.worker.create()
        session_id = secrets.token_hex(16)
        ref = make_ref(call_id, session_id)
        record = SessionRecord(
            session_id=session_id,
            call_id=call_id,
            call_type=call_type,
            node_id=self.node_id,
            params=params,
            principal=principal,
            started_at=time.time(),
            resumable=resumable and self.worker.resumable,
        )
        self._pending.add(ref)
        try:
            try:
                await self.registry.admit(self.node_id, call_id, session_id)
            except (NotAccepting, AdmissionRejected) as exc:
                metrics.ADMISSION_REJECTED.labels(exc.code).inc()
                raise
            try:
                if not await self.registry.create_running(record):
                    # Only a record already under this random id could refuse it.
                    raise NotAccepting("not_ready", "the session record could not be written")
            except BaseException:
                # The write may have happened even though its answer was lost: end the
                # record if there is one (fenced, idempotent) and free the slot either way.
                with contextlib.suppress(*REDIS_ERRORS):
                    await self.registry.end(record, EndReason.FAILED.value, error="start")
                raise
            session = LocalSession(self, record, worker, running=True)
            self.sessions[ref] = session
            self.count_state(State.RUNNING, +1)
        finally:
            self._pending.discard(ref)
        session.start()
        metrics.SESSIONS_STARTED.inc()
        metrics.SESSION_START_SECONDS.observe(time.perf_counter() - began)
        log.info("session started", extra=session.log_extra)
        return record

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
        waiter: asyncio.Future[None] | None = None
        if wait:
            waiter = asyncio.get_running_loop().create_future()
            self._end_waiters.setdefault(ref, []).append(waiter)
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
            return await self._await_end(call_id, session_id, waiter, wait)
        finally:
            if waiter is not None:
                self._forget_waiter(ref, waiter)

    async def _await_end(
        self, call_id: str, session_id: str, waiter: asyncio.Future[None], wait: float
    ) -> SessionRecord | None:
        """Wait for the owner's "ended" message; read the record now and then too, in case
        that message is lost."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), min(left, 0.5))
            record = await self.registry.get(call_id, session_id)
            if record is None or record.state == State.ENDED:
                return record
        return None

    def _forget_waiter(self, ref: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._end_waiters.get(ref, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._end_waiters.pop(ref, None)

    def _wake_waiters(self, ref: str) -> None:
        for waiter in self._end_waiters.get(ref, []):
            if not waiter.done():
                waiter.set_result(None)

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
        elif reason is EndReason.NODE_SHUTDOWN and await self._hand_off(session):
            moved = True
        replies = session.reply_to - {self.node_id}
        if not moved:
            # Whoever waits for this end is told in the same round trip as the end.
            await self._write_end(record, reason, error, replies)
        elif replies:
            self.spawn(self._publish_ended(session.ref, replies))
        self.sessions.pop(session.ref, None)
        self.count_state(record.state, -1)
        record.state = State.ENDED
        record.end_reason = reason.value
        record.ended_at = time.time()
        session.final = record
        if session.close_requested_at is not None:
            metrics.SESSION_CLOSE_SECONDS.observe(time.monotonic() - session.close_requested_at)
        self._wake_waiters(session.ref)
        log.info("session ended (%s)", reason.value, extra=session.log_extra)

    async def _hand_off(self, session: LocalSession) -> bool:
        if not (self.draining and session.record.resumable and self._handoff_targets):
            return False
        try:
            return await self.failover.hand_off(session, self._handoff_targets)
        except REDIS_ERRORS as exc:
            log.warning(
                "hand-off failed (%s): ending the session here",
                type(exc).__name__,
                extra=session.log_extra,
            )
            return False

    async def _write_end(
        self, record: SessionRecord, reason: EndReason, error: str, replies: set[str]
    ) -> None:
        ref = make_ref(record.call_id, record.session_id)
        notify = (Message("ended", ref).encode(), replies) if replies else ("", ())
        try:
            result = await self.registry.end(record, reason.value, error=error, notify=notify)
        except REDIS_ERRORS:
            # Written by the maintenance pass once Redis answers (still fenced by epoch).
            self._unwritten_ends[ref] = (record, reason, error)
            return
        if result is EndResult.ENDED:
            metrics.labelled(metrics.SESSIONS_ENDED, reason.value).inc()
        elif result is EndResult.FENCED:
            log.warning(
                "end not recorded: the session moved on",
                extra={
                    "node_id": self.node_id,
                    "session_id": record.session_id,
                    "call_id": record.call_id,
                },
            )

    async def _publish_ended(self, ref: str, nodes: set[str]) -> None:
        message = Message("ended", ref).encode()
        pipe = self.redis.pipeline(transaction=False)
        for node_id in nodes:
            pipe.publish(self.registry.keys.node_channel(node_id), message)
        with contextlib.suppress(*REDIS_ERRORS):
            await pipe.execute()

    def count_state(self, state: str, delta: int) -> None:
        if state in self._state_counts:
            self._state_counts[state] += delta
            metrics.labelled(metrics.SESSIONS_ACTIVE, state).set(self._state_counts[state])

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a fire-and-forget coroutine that is cancelled with the node."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- control channel ----------------------------------------------------------------
    def _on_message(self, message: Message) -> None:
        if message.op == "ended":
            self._wake_waiters(message.ref)
            return
        if message.op == "resume":
            self.spawn(self.failover.resume(message.ref))
            return
        if message.op != "close":
            return
        session = self.sessions.get(message.ref)
        if session is None:
            if message.reply_to and message.reply_to != self.node_id:
                self.spawn(self._publish_ended(message.ref, {message.reply_to}))
            return
        if message.reply_to:
            session.reply_to.add(message.reply_to)
        try:
            reason = CloseReason(message.reason)
        except ValueError:
            reason = CloseReason.CLOSED
        # The asker's request_close wrote the flag and session_closing already.
        session.request_close(reason, recorded=True)

    async def _on_subscribed(self) -> None:
        self._set_ready_gauge()
        self._maintain_now.set()

    # -- lease --------------------------------------------------------------------------
    def _node_info(self) -> dict[str, str]:
        capacity = self.settings.max_sessions_per_node
        return {
            "host": self.host,
            "started_at": repr(self.started_at),
            "capacity": "" if capacity is None else str(capacity),
            "draining": "1" if self.draining else "0",
            "version": __version__,
        }

    async def _renew_lease(self) -> None:
        now = time.monotonic()
        try:
            status = await self.registry.heartbeat(self.node_id, self._node_info())
        except REDIS_ERRORS as exc:
            metrics.LEASE_RENEWAL_FAILURES.inc()
            # Redis' own refusals (NOPERM, OOM, READONLY…) name the problem and hold no secret.
            problem = f"{type(exc).__name__}: {exc}" if isinstance(exc, ResponseError) else ""
            if self.redis_ok or problem != self._renewal_problem:
                log.warning(
                    "lease renewal failed: %s",
                    problem or type(exc).__name__,
                    extra={"node_id": self.node_id},
                )
            self._renewal_problem = problem
            self.redis_ok = False
            if self._last_renewal is not None and now - self._last_renewal > self.settings.node_ttl:
                self._lease_lapsed()
            self._set_ready_gauge()
            return
        lapsed = (
            self._last_renewal is not None and now - self._last_renewal > self.settings.node_ttl
        )
        recovering = not self.redis_ok or not self.lease_held
        self._renewal_problem = ""
        self.redis_ok = True
        self._last_renewal = now
        if status is not HeartbeatStatus.OK or lapsed or recovering:
            if self.sessions or status is not HeartbeatStatus.OK:
                log.info(
                    "lease %s: re-checking local sessions",
                    status.value,
                    extra={"node_id": self.node_id},
                )
            # Ready again only once what Redis may have lost is written back.
            try:
                await self._check_own_sessions()
            except REDIS_ERRORS:
                self.redis_ok = False
                self._set_ready_gauge()
                return
        self.lease_held = True
        self._set_ready_gauge()

    def _lease_lapsed(self) -> None:
        """Redis did not answer for longer than the lease: another node may own our
        sessions now, so stop them. Their ends are written when Redis is back."""
        if self.lease_held:
            log.error(
                "lease lapsed (Redis unreachable for over %.1fs): stopping %d local sessions",
                self.settings.node_ttl,
                len(self.sessions),
                extra={"node_id": self.node_id},
            )
        self.lease_held = False
        for session in list(self.sessions.values()):
            session.lose("lease_lapsed")

    async def _lease_loop(self) -> None:
        while True:
            # While Redis is away, knock more often: the node is ready again soon after
            # Redis is back, whatever the lease length.
            interval = self.settings.heartbeat_interval
            await asyncio.sleep(interval if self.redis_ok else min(interval, 0.25))
            await self._renew_lease()

    # -- maintenance --------------------------------------------------------------------
    async def _maintenance_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._maintain_now.wait(), self.settings.maintenance_interval
                )
            self._maintain_now.clear()
            try:
                await self.maintain()
            except REDIS_ERRORS as exc:
                log.warning(
                    "maintenance pass failed: %s",
                    type(exc).__name__,
                    extra={"node_id": self.node_id},
                )
            except Exception:
                log.exception("maintenance pass failed", extra={"node_id": self.node_id})

    async def maintain(self) -> None:
        """The fallback pass: this node's own sessions (close flags, ownership, records and
        slots Redis lost), then dead nodes."""
        if not self.lease_held:
            return
        await self._check_own_sessions()
        await self.failover.reap_dead_nodes()
        metrics.NODES_LIVE.set(await self.registry.count_live_nodes())

    async def _check_own_sessions(self) -> None:
        """One round trip for all of this node's sessions; then act on the few that need
        it: records Redis lost, sessions that moved, close flags a lost message carried.
        When the slot count disagrees, a second look finds stray and missing slots."""
        async with self._maintain_lock:
            await self._write_unwritten_ends()
            local = [s for s in self.sessions.values() if not s.done.is_set()]
            slot_count, attention = await self.registry.watch(
                self.node_id, [(s.ref, s.record.epoch) for s in local]
            )
            for index, code, detail in attention:
                session = local[index]
                if code == "missing":
                    await self.restore(session)
                elif code == "moved":
                    session.lose("moved")
                elif code == "close" and not session.closing:
                    # A flag only request_close sets, which wrote session_closing too.
                    try:
                        session.request_close(CloseReason(detail), recorded=True)
                    except ValueError:
                        session.request_close(CloseReason.CLOSED, recorded=True)
            if slot_count != len(local) or self._strays:
                await self._check_slots(local)

    async def _check_slots(self, local: list[LocalSession]) -> None:
        slots = await self.registry.node_slots(self.node_id)
        for session in local:
            if session.ref not in slots and not session.done.is_set():
                # Only a reaper takes a slot away: the session is being moved (or ended).
                session.lose("moved")
        await self._release_strays(slots)

    async def restore(self, session: LocalSession) -> None:
        """Redis lost a session this node runs (a restart without persistence): write its
        record and slot back. Never overwrites a record another node wrote meanwhile."""
        record = session.record
        if await self.registry.create(record):
            log.warning("re-asserted a session Redis had lost", extra=session.log_extra)
        await self.registry.reassert_slot(
            self.node_id, record.call_id, record.session_id, record.started_at
        )

    async def _release_strays(self, slots: set[str]) -> None:
        """Slots this node holds for sessions it does not run, once seen twice (a start in
        flight holds a slot before its session exists): resume or release them."""
        strays = slots - set(self.sessions) - self._pending
        confirmed = strays & self._strays
        self._strays = strays - confirmed
        if confirmed:
            await self.failover.adopt_or_release(sorted(confirmed))

    async def _write_unwritten_ends(self) -> None:
        for ref, (record, reason, error) in list(self._unwritten_ends.items()):
            result = await self.registry.end(record, reason.value, error=error)
            self._unwritten_ends.pop(ref, None)
            if result is EndResult.ENDED:
                metrics.labelled(metrics.SESSIONS_ENDED, reason.value).inc()

    # -- session limits -----------------------------------------------------------------
    async def _tick_loop(self) -> None:
        idle, longest = self.settings.idle_timeout, self.settings.max_session_duration
        period = min([1.0, *(x / 4 for x in (idle, longest) if x is not None)])
        while True:
            await asyncio.sleep(period)
            if idle is None and longest is None:
                continue  # no limit to check: do not walk every session each second
            now, wall = time.monotonic(), time.time()
            for session in list(self.sessions.values()):
                if session.closing:
                    continue
                if longest is not None and wall - session.record.started_at >= longest:
                    session.request_close(CloseReason.MAX_DURATION)
                elif idle is not None and now - session.last_activity >= idle:
                    session.request_close(CloseReason.IDLE)
