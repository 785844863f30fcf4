"""How sessions end, on record: the fenced end write, the nodes waiting for it, and ends
that could not be written yet.

An end is written once by the owner (``end_session.lua``, fenced by owner and epoch) and
releases the admission slot in the same round trip; it carries the worker's final metrics
(``fleet/runtime/reports.py``) too. Nodes that asked for the close with
``?wait`` are told over their channels in that same step; waiters on this node are woken
directly. An end that meets a Redis outage is kept here and written by the maintenance pass
once Redis answers, still fenced, so a session that moved meanwhile is not ended twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fleet import metrics
from fleet.models import EndReason, SessionRecord, State
from fleet.runtime.control import Message
from fleet.store import REDIS_ERRORS
from fleet.store.keys import make_ref
from fleet.store.registry import Registry
from fleet.store.scripts import EndResult

log = logging.getLogger("fleet.ends")

#: While waiting for an end, the record is read this often in case the notice is lost.
REREAD_SECONDS = 0.5


class Ends:
    def __init__(self, registry: Registry, node_id: str) -> None:
        self.registry = registry
        self.node_id = node_id
        # ref -> what to write once Redis answers again: record, reason, error, metrics
        # (the record carries the result)
        self.unwritten: dict[str, tuple[SessionRecord, EndReason, str, str]] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    # -- writing ------------------------------------------------------------------------
    async def write(
        self,
        record: SessionRecord,
        reason: EndReason,
        error: str,
        replies: set[str],
        final_metrics: str = "",
    ) -> None:
        """Record the end and free the slot; tell the nodes in ``replies`` it happened.
        ``final_metrics``: the worker's last metrics (JSON), ``""`` when the last report
        holds them."""
        ref = make_ref(record.call_id, record.session_id)
        notify = (Message("ended", ref).encode(), replies) if replies else ("", ())
        try:
            result = await self.registry.end(
                record, reason.value, error=error, notify=notify, metrics=final_metrics
            )
        except REDIS_ERRORS:
            # Written by the maintenance pass once Redis answers (still fenced by epoch).
            self.unwritten[ref] = (record, reason, error, final_metrics)
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

    async def write_unwritten(self) -> None:
        for ref, (record, reason, error, final) in list(self.unwritten.items()):
            result = await self.registry.end(record, reason.value, error=error, metrics=final)
            self.unwritten.pop(ref, None)
            if result is EndResult.ENDED:
                metrics.labelled(metrics.SESSIONS_ENDED, reason.value).inc()

    async def publish_ended(self, ref: str, nodes: set[str]) -> None:
        """Tell ``nodes`` that a session ended (or is not here to end)."""
        message = Message("ended", ref).encode()
        redis = self.registry.redis
        pipe = redis.pipeline(transaction=False)
        for node_id in nodes:
            pipe.publish(self.registry.keys.node_channel(node_id), message)
        with contextlib.suppress(*REDIS_ERRORS):
            await pipe.execute()

    # -- waiting ------------------------------------------------------------------------
    def waiter(self, ref: str) -> asyncio.Future[None]:
        """A future resolved when the session ends; ``forget`` it when done waiting."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(ref, []).append(waiter)
        return waiter

    def forget(self, ref: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(ref, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiters.pop(ref, None)

    def wake(self, ref: str) -> None:
        for waiter in self._waiters.get(ref, []):
            if not waiter.done():
                waiter.set_result(None)

    async def wait(
        self,
        call_id: str,
        session_id: str,
        waiter: asyncio.Future[None],
        wait: float,
        *,
        told: str = "",
    ) -> SessionRecord | None:
        """Wait for the session's end, wherever it runs and if it moves: a local end wakes
        ``waiter``; a remote owner is asked (a ``watch`` message) to send its "ended"
        notice here, and asked again should the session move to another owner. The record
        is read now and then too, in case a notice is lost. ``told``: an owner that knows
        already (a close request carries the asker). The ended record, or ``None`` if the
        wait ran out."""
        ref = make_ref(call_id, session_id)
        deadline = time.monotonic() + wait
        current = waiter
        read = not told  # an owner that was told has just been read by the asker
        try:
            while True:
                if read or current.done():
                    record = await self.registry.get(call_id, session_id)
                    if record is None or record.state == State.ENDED:
                        return record
                    if record.node_id not in (told, self.node_id):
                        told = record.node_id
                        await self._watch(ref, told)
                    if current.done():  # woken, but not ended: the session moved on
                        if current is not waiter:
                            self.forget(ref, current)
                        current = self.waiter(ref)
                read = True
                if (left := deadline - time.monotonic()) <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(current), min(left, REREAD_SECONDS))
        finally:
            if current is not waiter:
                self.forget(ref, current)

    async def _watch(self, ref: str, owner: str) -> None:
        message = Message("watch", ref, reply_to=self.node_id).encode()
        with contextlib.suppress(*REDIS_ERRORS):
            await self.registry.redis.publish(self.registry.keys.node_channel(owner), message)
