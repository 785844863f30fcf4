"""Moving sessions between nodes: from dead nodes (reaping), from draining ones (hand-off),
and starting them again on their new owner (resume).

Each move is two atomic steps. First the admission slot moves to the new owner in the
fleet-wide slot (``reap.lua`` or ``handoff.lua``): only one node can win that, so only one
node ever moves a session. Then ``claim.lua`` bumps the epoch in the session's own slot, which
fences every later write of the old owner, and tells the new owner to resume. If the mover
dies between the two steps, the new owner finds the slot in its set during its maintenance
pass and finishes the claim itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from fleet import metrics
from fleet.errors import CannotMigrate, SessionEnded, SessionNotFound
from fleet.models import EndReason, NodeInfo, SessionRecord, State
from fleet.runtime.control import Message
from fleet.runtime.session import LocalSession, SessionHost
from fleet.store import REDIS_ERRORS
from fleet.store.keys import make_ref, split_ref
from fleet.store.scripts import FENCED, TAKEN, HandoffResult, ReapResult
from fleet.worker import WorkerSet

log = logging.getLogger("fleet.failover")

#: The error of a session that ended because no live node runs its worker.
NO_WORKER_NODE = "no_node_runs_worker"

# Dead-node sessions are reaped this many at a time: fast, without flooding Redis.
REAP_CONCURRENCY = 128
#: Maintenance intervals after a node is first seen dead before a survivor reaps the
#: sessions that are other survivors' share: each survivor sees it within one interval.
SHARE_WAIT = 2


def share_of(ref: str, reapers: list[str]) -> str:
    """The survivor whose share a dead node's session is: the same on every node that
    lists the same survivors (sorted), spread evenly."""
    return reapers[zlib.crc32(ref.encode()) % len(reapers)]


def _reap_missed(dead: str, missed: list[BaseException], node_id: str) -> None:
    """Re-raise a bug; log the Redis errors, whose sessions the next pass takes over."""
    for exc in missed:
        if not isinstance(exc, REDIS_ERRORS):
            raise exc
    log.warning(
        "node %s: %d sessions not taken over this pass (%s); the next pass retries",
        dead,
        len(missed),
        type(missed[0]).__name__,
        extra={"node_id": node_id},
    )


class Targets:
    """Live nodes that can take sessions, least loaded first, with their load kept up to
    date as sessions are placed."""

    def __init__(self, nodes: Iterable[NodeInfo], exclude: set[str]) -> None:
        self._nodes = {n.node_id: n for n in nodes if n.node_id not in exclude and not n.draining}
        self._load = {node_id: n.sessions for node_id, n in self._nodes.items()}
        self._runs = {node_id: set(n.workers) for node_id, n in self._nodes.items()}

    def take(self, worker: str) -> tuple[str, int | None] | None:
        """The least loaded node that runs ``worker``, counted as one session busier at
        once (moves run concurrently); ``give_back`` if the move does not happen."""
        able = [n for n in self._load if worker in self._runs[n]]
        if not able:
            return None
        node_id = min(able, key=lambda n: (self._load[n], n))
        self._load[node_id] += 1
        return node_id, self._nodes[node_id].capacity

    def room_for(self, worker: str) -> bool:
        """Whether a node that runs ``worker`` has room for one more session."""
        return any(worker in self._runs[n] and self._has_room(n) for n in self._load)

    def _has_room(self, node_id: str) -> bool:
        capacity = self._nodes[node_id].capacity
        return capacity is None or self._load[node_id] < capacity

    def runs(self, worker: str) -> bool:
        """Whether any of these nodes runs ``worker`` (full or not)."""
        return any(worker in workers for workers in self._runs.values())

    def give_back(self, node_id: str) -> None:
        if node_id in self._load:
            self._load[node_id] -= 1

    def full(self, node_id: str) -> None:
        self._load.pop(node_id, None)

    def any(self) -> bool:
        """Whether any node may still take a session."""
        return bool(self._load)


class Moves:
    """Moves sessions to and from this node. Handed what it needs: the node as a session
    host, its running sessions, its worker, and how to run a session that arrives."""

    def __init__(
        self,
        host: SessionHost,
        sessions: Mapping[str, LocalSession],
        workers: WorkerSet,
        adopt: Callable[[LocalSession], None],
    ) -> None:
        self.host = host
        self.node_id = host.node_id
        self.registry = host.registry
        self._sessions = sessions
        self._workers = workers
        self._adopt = adopt
        self._resuming: set[str] = set()
        self._dead_since: dict[str, float] = {}  # dead node -> when this node saw it dead
        #: A test hook: awaited between a move's two steps (the slot has moved, the claim
        #: has not run), so a test can pause a mover exactly there.
        self.before_claim: Callable[[str], Awaitable[None]] | None = None

    def _extra(self, ref: str) -> dict[str, str]:
        call_id, session_id = split_ref(ref)
        return {"node_id": self.node_id, "session_id": session_id, "call_id": call_id}

    # -- dead nodes ---------------------------------------------------------------------
    async def reap_dead_nodes(self) -> None:
        """Take over the sessions of dead nodes: at first only this node's share of them
        (``share_of``), then, once ``SHARE_WAIT`` maintenance intervals have passed since
        this node saw the node dead, whatever is left (a survivor whose share it was died
        too, or is slow). ``reap.lua`` stays the one judge of who moves a session; the
        shares only keep survivors from all racing for every session."""
        dead_nodes = [d for d in await self.registry.expired_nodes() if d != self.node_id]
        now = time.monotonic()
        self._dead_since = {d: self._dead_since.get(d, now) for d in dead_nodes}
        if not dead_nodes:
            return
        live = await self.registry.live_nodes()
        targets = Targets(live, exclude=set(dead_nodes))
        reapers = sorted({n.node_id for n in live} - set(dead_nodes) | {self.node_id})
        wait = SHARE_WAIT * self.host.settings.maintenance_interval
        for dead in dead_nodes:
            refs = sorted(await self.registry.node_slots(dead))
            if now - self._dead_since[dead] < wait:
                refs = [ref for ref in refs if share_of(ref, reapers) == self.node_id]
            if refs:
                log.warning(
                    "node %s is gone: taking over %d sessions",
                    dead,
                    len(refs),
                    extra={"node_id": self.node_id},
                )
            # In chunks: at most REAP_CONCURRENCY at a time, and never one task per
            # session of a node that held thousands. A session whose move met a Redis
            # error stays where it is (its slot on the dead node, or on its target for
            # the target to claim): the next pass takes it; the others go on.
            missed: list[BaseException] = []
            for first in range(0, len(refs), REAP_CONCURRENCY):
                chunk = refs[first : first + REAP_CONCURRENCY]
                done = await asyncio.gather(
                    *(self._reap_session(dead, ref, targets) for ref in chunk),
                    return_exceptions=True,
                )
                missed += [x for x in done if isinstance(x, BaseException)]
            if missed:
                _reap_missed(dead, missed, self.node_id)
                continue
            if await self.registry.forget_node(dead):
                log.warning(
                    "node %s removed from the registry", dead, extra={"node_id": self.node_id}
                )

    def _worker_of(self, record: SessionRecord) -> str:
        return record.worker or self._workers.default.name

    async def _reap_session(self, dead: str, ref: str, targets: Targets) -> None:
        record = await self.registry.get(*split_ref(ref))
        ended = record is not None and record.state == State.ENDED
        movable = record is not None and not ended and record.resumable and not record.close_reason
        worker = self._worker_of(record) if record is not None else ""
        while movable and (choice := targets.take(worker)) is not None:
            target, capacity = choice
            result = await self.registry.reap(dead, ref, target, capacity)
            if result is ReapResult.NO_ROOM:
                targets.full(target)
                continue
            if result is ReapResult.MOVED and await self._claim(ref, dead, target):
                metrics.FAILOVERS.labels("resumed").inc()
                log.info("session moved from dead %s to %s", dead, target, extra=self._extra(ref))
            else:
                targets.give_back(target)
            return  # moved, or ALIVE / GONE: nothing more to do here
        # No node takes it: it ends. The record first, then the slot, so that a Redis error
        # between the two leaves the slot on the dead node for the next pass to come back
        # to; the other way round, the record would stay running with no slot to find it by.
        # (Its lease lapsed: should it renew now, it drops every session it ran, this one too.)
        if record is not None and record.node_id == dead and not ended:
            error = ""
            if movable and not targets.runs(worker):
                error = NO_WORKER_NODE
                log.error(
                    "no live node runs worker %r: the session cannot resume",
                    worker,
                    extra=self._extra(ref),
                )
            # A close was asked for and the owner died first: the session is closed.
            reason = EndReason.CLOSED if record.close_reason else EndReason.NODE_LOST
            await self.registry.end(
                record, reason.value, error=error, owner=dead, any_epoch=True, release_from=""
            )
        if await self.registry.reap(dead, ref) is ReapResult.RELEASED:
            metrics.FAILOVERS.labels("lost").inc()
            log.warning("session lost with node %s", dead, extra=self._extra(ref))

    async def _claim(self, ref: str, previous: str, target: str) -> bool:
        """The second step of a move. When the session ended meanwhile the slot that moved
        is given back; when another node holds it already (the target finished this claim
        itself while this mover was paused) the slot is that node's and stays."""
        if self.before_claim is not None:
            await self.before_claim(ref)
        message = Message("resume", ref).encode()
        epoch = await self.registry.claim(ref, previous, target, message)
        if epoch == FENCED:
            call_id, session_id = split_ref(ref)
            await self.registry.release(target, call_id, session_id)
            return False
        return epoch != TAKEN

    # -- draining -----------------------------------------------------------------------
    async def hand_off_targets(self) -> Targets:
        return Targets(await self.registry.live_nodes(), exclude={self.node_id})

    async def hand_off(self, session: LocalSession, targets: Targets) -> bool:
        """Give a stopped session of this draining node to the least loaded node with room.
        Returns False when no node could take it."""
        while (choice := targets.take(self._worker_of(session.record))) is not None:
            target, capacity = choice
            result = await self.registry.handoff(self.node_id, session.ref, target, capacity)
            if result is HandoffResult.NO_ROOM:
                targets.full(target)
                continue
            if result is HandoffResult.MOVED and await self._claim(
                session.ref, self.node_id, target
            ):
                log.info("session handed off to %s", target, extra=session.log_extra)
                return True
            targets.give_back(target)
            return False
        return False

    async def migrate(self, call_id: str, session_id: str) -> str:
        """Move a running session to another node now: its worker is asked to stop
        (``close_reason`` ``handoff``) and its owner hands it to the node with most room
        that runs its worker. Returns the node it moves away from. Raises
        SessionNotFound, SessionEnded, or CannotMigrate (``not_resumable``, ``no_target``)."""
        record = await self.registry.get(call_id, session_id)
        if record is None:
            raise SessionNotFound(f"no session {session_id} in call {call_id}")
        if record.state == State.ENDED:
            raise SessionEnded(f"session {session_id} has ended")
        if not record.resumable:
            raise CannotMigrate(
                "not_resumable", f"session {session_id} is not resumable: it cannot move"
            )
        worker = self._worker_of(record)
        targets = Targets(await self.registry.live_nodes(), exclude={record.node_id})
        if not targets.room_for(worker):
            raise CannotMigrate(
                "no_target", f"no other node that runs worker {worker!r} has room for it"
            )
        ref = make_ref(call_id, session_id)
        local = self._sessions.get(ref)
        if record.node_id == self.node_id and local is not None:
            local.migrate()
        else:
            channel = self.registry.keys.node_channel(record.node_id)
            await self.registry.redis.publish(channel, Message("migrate", ref).encode())
        return record.node_id

    async def take_back(self, ref: str) -> None:
        """Resume here a session this node stopped to move it, when no node could take
        it after all (a migration that lost its target): a claim by this node for
        itself, which bumps the epoch and resumes it from its last checkpoint."""
        if await self._claim(ref, self.node_id, self.node_id):
            log.warning("no node could take the session: resuming it here", extra=self._extra(ref))

    # -- resume -------------------------------------------------------------------------
    async def resume(self, ref: str) -> None:
        """Start, on this node, a session that was claimed for it."""
        if ref in self._sessions or ref in self._resuming:
            return
        self._resuming.add(ref)
        try:
            record, latest = await self.registry.get_with_checkpoint(*split_ref(ref))
            if record is None or record.node_id != self.node_id or record.state == State.ENDED:
                return
            if latest is None and record.state_from:
                # A session on a thread that has no checkpoint of its own yet: the
                # thread's state it started from.
                latest = (await self.registry.state_envelope(record.state_from))[1]
            state: Any = json.loads(latest)["state"] if latest else None
            spec = self._workers.get(record.worker)
            if spec is None:
                # Placement only moves a session to a node that runs its worker.
                log.error(
                    "a session of worker %r was moved here, which does not run it",
                    record.worker,
                    extra=self._extra(ref),
                )
                await self.registry.end(record, EndReason.NODE_LOST.value, error=NO_WORKER_NODE)
                return
            session = LocalSession(self.host, record, spec.create(), state=state, resumed=True)
            self._adopt(session)
            log.info(
                "session resumed (epoch %d, checkpoint %d)",
                record.epoch,
                record.checkpoint_version,
                extra=session.log_extra,
            )
        finally:
            self._resuming.discard(ref)

    async def settle_strays(self, refs: Iterable[str], seen_before: set[str]) -> set[str]:
        """Slots this node holds for sessions it does not run. A session whose record names
        this node as its owner is resumed at once (its resume order was lost, or the mover
        was paused and the claim finished here). The others only once seen on two passes
        (``seen_before``): a move in flight holds a slot before its claim. Of those, a
        session whose owner is dead is claimed and resumed (the mover died between its two
        steps); the rest are released. Returns the strays left for the next pass."""
        later: set[str] = set()
        live: set[str] | None = None  # read once, and only if some slot needs it
        for ref in refs:
            record = await self.registry.get(*split_ref(ref))
            if record is not None and record.state != State.ENDED:
                if record.node_id == self.node_id:
                    await self.resume(ref)
                    continue
                if ref not in seen_before:
                    later.add(ref)
                    continue
                if live is None:
                    live = {n.node_id for n in await self.registry.live_nodes()}
                if record.node_id not in live:
                    # The mover died between moving the slot and claiming: finish it.
                    if await self._claim(ref, record.node_id, self.node_id):
                        await self.resume(ref)
                    continue
            elif ref not in seen_before:
                later.add(ref)
                continue
            call_id, session_id = split_ref(ref)
            if await self.registry.release(self.node_id, call_id, session_id):
                log.warning("released a stray admission slot", extra=self._extra(ref))
        return later
