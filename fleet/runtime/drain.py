"""Graceful drain (SIGTERM): stop taking sessions, let them run on for up to
``FLEET_DRAIN_TIMEOUT``, then ask the rest to stop with ``close_reason = "handoff"`` and
hand each to the least loaded other node at once (``Moves.hand_off``). Sessions of
workers that say ``migratable = True`` are handed off at the start of the drain instead.

With no other node to take them (a lone node, or the embedded Redis) the wait is skipped:
it would only delay the end. A hand-off that fails because Redis does not answer leaves the
session with its slot, for the other nodes to resume once this node's lease lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from fleet import metrics
from fleet.models import CloseReason
from fleet.runtime.moves import Moves, Targets
from fleet.runtime.session import CANCEL_GRACE, LocalSession
from fleet.settings import Settings
from fleet.store import REDIS_ERRORS

log = logging.getLogger("fleet.node")


class Drain:
    def __init__(
        self,
        settings: Settings,
        *,
        sessions: Mapping[str, LocalSession],
        moves: Moves,
        announce: Callable[[], Awaitable[None]],
        alone: bool,
        migratable: Callable[[LocalSession], bool] = lambda _: False,
    ) -> None:
        """``announce``: tell the fleet this node drains (a lease renewal); ``alone``: no
        other node can exist (the embedded Redis); ``migratable``: whether a session is
        handed off at once rather than after the drain timeout (its worker says
        ``migratable = True``)."""
        self.settings = settings
        self.node_id = settings.node_id
        self._sessions = sessions
        self._moves = moves
        self._announce = announce
        self._alone = alone
        self._migratable = migratable
        self.active = False
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._targets: Targets | None = None

    def begin(self) -> None:
        """Stop taking sessions and let the running ones finish. Idempotent."""
        if self._task is not None:
            return
        self.active = True
        metrics.NODE_DRAINING.set(1)
        metrics.NODE_READY.set(0)
        log.info(
            "draining: %d sessions may run for up to %.0fs",
            len(self._sessions),
            self.settings.drain_timeout,
            extra={"node_id": self.node_id},
        )
        self._task = asyncio.create_task(self._run(), name="drain")

    async def _run(self) -> None:
        with contextlib.suppress(Exception):
            await self._announce()
        if self._sessions and await self._nowhere_to_hand_off():
            log.info(
                "no other node to hand %d sessions to: closing them now rather than after "
                "the %.0fs drain",
                len(self._sessions),
                self.settings.drain_timeout,
                extra={"node_id": self.node_id},
            )
        else:
            migratable = [s for s in self._sessions.values() if self._migratable(s)]
            if migratable:
                # One list of targets for all of them, read before any stops: each
                # hand-off then counts the ones before it (else every session, stopping at
                # once, would read the nodes' counts on its own and pick alike).
                with contextlib.suppress(*REDIS_ERRORS):
                    self._targets = await self._moves.hand_off_targets()
            for session in migratable:
                session.request_close(CloseReason.HANDOFF)
            await self._wait_sessions(self.settings.drain_timeout)
        if self._sessions:
            with contextlib.suppress(*REDIS_ERRORS):
                self._targets = await self._moves.hand_off_targets()
        for session in list(self._sessions.values()):
            session.request_close(CloseReason.HANDOFF)
        # The grace, then the cancel grace after which a stuck worker is left behind.
        await self._wait_sessions(self.settings.close_grace + CANCEL_GRACE + 1.0)
        self.done.set()

    async def _nowhere_to_hand_off(self) -> bool:
        if self._alone:
            return True
        try:
            targets = await self._moves.hand_off_targets()
        except REDIS_ERRORS:
            return False  # cannot tell: drain as usual
        return not targets.any()

    async def _wait_sessions(self, timeout: float) -> None:
        waits = [s.done.wait() for s in self._sessions.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout)

    async def hand_off(self, session: LocalSession) -> bool:
        """Whether a stopped session of a draining node, or one being migrated, is no
        longer this node's to end: handed to another node, or, when Redis did not answer,
        left with its slot for the other nodes to resume once this node's lease lapses
        (ending it here would lose a session that other nodes have room for). False: no
        node can take it."""
        moving = self.active or session.migrating
        if not (moving and session.record.resumable) or session.abandoned:
            return False
        try:
            if not self.active:  # a migration: the nodes as they are now
                return await self._moves.hand_off(session, await self._moves.hand_off_targets())
            if self._targets is None:
                self._targets = await self._moves.hand_off_targets()
            return await self._moves.hand_off(session, self._targets)
        except REDIS_ERRORS as exc:
            log.warning(
                "hand-off failed (%s): leaving the session to the other nodes, which resume "
                "it once this node's lease lapses",
                type(exc).__name__,
                extra=session.log_extra,
            )
            return True
