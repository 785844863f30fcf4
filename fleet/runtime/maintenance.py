"""The maintenance pass: the fallback that catches what a lost message or a lost Redis
left behind, every ``FLEET_MAINTENANCE_INTERVAL`` (and at once after the control channel
resubscribes).

A pass costs what changed, not what runs: one round trip reads the close requests sent to
this node since the last pass (each close writes one into the node's index, beside its
message: a request whose message was lost is acted on here) and the node's slot count.
Only when that count differs from the sessions it runs does it read the slots, to stop
sessions whose slot moved away and to resume or release slots it holds for sessions it
does not run. Then dead nodes' sessions are taken over (``fleet.runtime.moves``).

What Redis lost is found from the signal that it lost it, not by reading every record
each pass: a lease that Redis no longer knows (or a Redis with a new run id) makes the
node re-check every session it runs (``check_own_sessions(full=True)``, in chunks), and a
fenced write that finds its record gone writes it back first (``LocalSession._fenced``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from fleet import metrics
from fleet.models import CloseReason
from fleet.runtime.ends import Ends
from fleet.runtime.moves import Moves
from fleet.runtime.session import LocalSession
from fleet.settings import Settings
from fleet.store import REDIS_ERRORS
from fleet.store.registry import Registry

log = logging.getLogger("fleet.maintenance")

#: Sessions whose records one round trip of a full check reads (after Redis lost data).
RECORDS_CHUNK = 500


class Maintenance:
    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        *,
        sessions: Mapping[str, LocalSession],
        pending: set[str],
        moves: Moves,
        ends: Ends,
        lease_held: Callable[[], bool],
        live_count: Callable[[], int],
    ) -> None:
        """``sessions``: the node's running sessions; ``pending``: refs admitted but not yet
        running (their slots are not strays); ``live_count``: how many of ``sessions`` have
        not ended, kept as they start and end, so that a pass need not count them."""
        self.registry = registry
        self.settings = settings
        self.node_id = settings.node_id
        self._sessions = sessions
        self._pending = pending
        self._moves = moves
        self._ends = ends
        self._lease_held = lease_held
        self._live_count = live_count
        self._strays: set[str] = set()  # slots with no local session, seen once
        self._unslotted: set[str] = set()  # local sessions with no slot, seen once
        self._now = asyncio.Event()
        self._lock = asyncio.Lock()

    def wake(self) -> None:
        """Run a pass now rather than at the next interval."""
        self._now.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._now.wait(), self.settings.maintenance_interval)
            self._now.clear()
            try:
                await self.run_pass()
            except REDIS_ERRORS as exc:
                log.warning(
                    "maintenance pass failed: %s",
                    type(exc).__name__,
                    extra={"node_id": self.node_id},
                )
            except Exception:
                log.exception("maintenance pass failed", extra={"node_id": self.node_id})

    async def run_pass(self) -> None:
        """This node's own sessions (close requests, slots), then dead nodes."""
        if not self._lease_held():
            return
        await self.check_own_sessions()
        await self._moves.reap_dead_nodes()
        metrics.NODES_LIVE.set(await self.registry.count_live_nodes())

    async def check_own_sessions(self, *, full: bool = False) -> None:
        """The close requests this node may have missed, and its slots when their count
        is off. ``full`` (after Redis lost data): every session's record too, in chunks of
        one round trip each, writing back what was lost and stopping what moved."""
        async with self._lock:
            await self._ends.write_unwritten()
            if full:
                slot_count = await self._check_records(self._local())
            else:
                closes, slot_count = await self.registry.steady_look(self.node_id)
                for ref, reason in closes.items():
                    session = self._sessions.get(ref)
                    if session is not None and not session.closing:
                        self._close(session, reason)
            # A count kept as sessions start and end, not a walk over them: a steady pass
            # costs the same at 10 sessions and at 10,000.
            if slot_count != self._live_count() or self._strays or self._unslotted:
                await self._check_slots(self._local())

    def _local(self) -> list[LocalSession]:
        return [s for s in self._sessions.values() if not s.done.is_set()]

    async def _check_records(self, local: list[LocalSession]) -> int:
        """Every session's record, ``RECORDS_CHUNK`` sessions per round trip, acting on
        each chunk's answers before the next: the loop is never held for long, whatever
        the session count. Returns the node's slot count."""
        slot_count = 0
        for first in range(0, len(local), RECORDS_CHUNK) or [0]:
            chunk = local[first : first + RECORDS_CHUNK]
            slot_count, attention = await self.registry.watch(
                self.node_id, [(s.ref, s.record.epoch) for s in chunk]
            )
            for index, code, detail in attention:
                session = chunk[index]
                if code == "missing":
                    await self.restore(session)
                elif code == "moved":
                    session.lose("moved")
                elif code == "close" and not session.closing:
                    self._close(session, detail)
        return slot_count

    @staticmethod
    def _close(session: LocalSession, reason: str) -> None:
        # A flag only request_close sets, which wrote session_closing too.
        try:
            session.request_close(CloseReason(reason), recorded=True)
        except ValueError:
            session.request_close(CloseReason.CLOSED, recorded=True)

    async def restore(self, session: LocalSession) -> None:
        """Redis lost a session this node runs (a restart without persistence): write its
        record and slot back. Never overwrites a record another node wrote meanwhile."""
        record = session.record
        if await self.registry.create_code(record) == 1:
            log.warning("re-asserted a session Redis had lost", extra=session.log_extra)
        await self.registry.reassert_slot(
            self.node_id, record.call_id, record.session_id, record.started_at
        )

    async def _check_slots(self, local: list[LocalSession]) -> None:
        slots = await self.registry.node_slots(self.node_id)
        unslotted = [s for s in local if s.ref not in slots and not s.done.is_set()]
        if unslotted:
            await self._check_unslotted(unslotted)
        await self._release_strays(slots)

    async def _check_unslotted(self, unslotted: list[LocalSession]) -> None:
        """Sessions this node runs whose slot is gone: a reaper moved it (the record
        names another owner, or will once the mover's claim runs), or Redis lost it. Their
        records say which: written back when lost too, stopped when moved; a slot lost on
        its own (a shard that restarted empty) is put back once seen on two passes, as a
        move in flight also shows no slot until its claim."""
        await self._check_records(unslotted)
        seen, self._unslotted = self._unslotted, set()
        for session in unslotted:
            if session.closing or session.done.is_set():
                continue
            if session.ref not in seen:
                self._unslotted.add(session.ref)
                continue
            record = session.record
            await self.registry.reassert_slot(
                self.node_id, record.call_id, record.session_id, record.started_at
            )

    async def _release_strays(self, slots: set[str]) -> None:
        """Slots this node holds for sessions it does not run: resume, claim or release
        them (``Moves.settle_strays``)."""
        strays = slots - set(self._sessions) - self._pending
        self._strays = (
            await self._moves.settle_strays(sorted(strays), self._strays) if strays else set()
        )


async def enforce_limits(settings: Settings, sessions: Mapping[str, LocalSession]) -> None:
    """``FLEET_IDLE_TIMEOUT`` and ``FLEET_MAX_SESSION_DURATION``: a tick that closes the
    sessions past either, as a close request would (``ctx.closing``)."""
    idle, longest = settings.idle_timeout, settings.max_session_duration
    period = min([1.0, *(x / 4 for x in (idle, longest) if x is not None)])
    while True:
        await asyncio.sleep(period)
        if idle is None and longest is None:
            continue  # no limit to check: do not walk every session each second
        now, wall = time.monotonic(), time.time()
        for session in list(sessions.values()):
            if session.closing:
                continue
            if longest is not None and wall - session.record.started_at >= longest:
                session.request_close(CloseReason.MAX_DURATION)
            elif idle is not None and now - session.last_activity >= idle:
                session.request_close(CloseReason.IDLE)
