"""Starts with an ``Idempotency-Key``: one session per key, however often it is asked for.

Reserve, start, remember. The first request with a key reserves it for ``pending_ttl``
seconds, with the fingerprint of what it asks. The session's record and the answer to the
start are then written in one atomic step, and only while the reservation is still that
request's own: a start that outlived its reservation (a frozen node that wakes up after a
retry took the key over) creates nothing. A repeat that finds the answer returns it; one
that finds the key reserved waits for the answer, up to ``wait`` seconds; one that asks
for something else is refused.

Only a session that started is remembered. A start that fails (a limit, bad params, a
draining node) gives the key back, so a retry after capacity frees up can succeed rather
than replay a 429 for a day.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from typing import Any, Protocol

from fleet.errors import IdempotencyInProgress, IdempotencyMismatch
from fleet.models import SessionInfo, SessionRecord
from fleet.store import REDIS_ERRORS
from fleet.store.idempotency import Reservation
from fleet.store.registry import Registry
from fleet.store.scripts import ReserveResult


class StartSession(Protocol):
    """``Threads.start`` (a start, on a thread or not), seen from here."""

    async def __call__(
        self,
        call_id: str,
        call_type: str,
        params: dict[str, Any],
        principal: str = "",
        resumable: bool = True,
        *,
        worker: str | None = None,
        thread_id: str | None = None,
        once: Reservation | None = None,
    ) -> SessionRecord: ...


def fingerprint(
    call_id: str,
    call_type: str,
    params: dict[str, Any],
    resumable: bool,
    thread_id: str | None = None,
    worker: str | None = None,
) -> str:
    """What a start asks, as a digest: the same JSON values give the same fingerprint,
    whatever their key order or the spelling of the body (defaults included)."""
    asked = {"call_id": call_id, "call_type": call_type, "params": params, "resumable": resumable}
    if thread_id is not None:
        asked["thread_id"] = thread_id
    if worker is not None:
        asked["worker"] = worker
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotentStarts:
    #: Seconds a reservation lives without an answer. Losing it is safe (the holder then
    #: creates nothing), so it only bounds how long a dead holder blocks the key.
    pending_ttl = 15.0
    #: Seconds a repeat waits for the holder's answer before 409 ``idempotency_in_progress``;
    #: below the 10 s an HTTP client (fleet's own) commonly waits for an answer.
    wait = 5.0

    def __init__(self, registry: Registry, start: StartSession) -> None:
        self.registry = registry
        self._start = start

    async def start(
        self,
        key: str,
        call_id: str,
        call_type: str,
        params: dict[str, Any],
        *,
        principal: str,
        resumable: bool,
        thread_id: str | None = None,
        worker: str | None = None,
    ) -> SessionInfo:
        """Start the session that ``key`` stands for, once; the first answer every time.
        Raises IdempotencyMismatch, IdempotencyInProgress, or whatever the start raises."""
        once = self.registry.reservation(
            call_id,
            principal,
            key,
            fingerprint(call_id, call_type, params, resumable, thread_id, worker),
        )
        answer = await self._reserve(once)
        if answer is not None:
            return SessionInfo.model_validate_json(answer)
        try:
            record = await self._start(
                call_id,
                call_type,
                params,
                principal,
                resumable,
                worker=worker,
                thread_id=thread_id,
                once=once,
            )
        except BaseException:
            with contextlib.suppress(*REDIS_ERRORS):  # else it expires after pending_ttl
                await self.registry.release_idempotency_key(once)
            raise
        return record.info()

    async def _reserve(self, once: Reservation) -> str | None:
        """``None`` once this request holds the key; the first start's answer if it has
        one. While another request holds it, ask again (quickly at first) until ``wait``
        runs out; a holder that died stops holding it after ``pending_ttl``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        pause = 0.01
        while True:
            result, answer = await self.registry.reserve_idempotency_key(once, self.pending_ttl)
            if result is ReserveResult.RESERVED:
                return None
            if result is ReserveResult.DONE:
                return answer
            if result is ReserveResult.MISMATCH:
                raise IdempotencyMismatch(
                    "this Idempotency-Key was used for a start with another body; "
                    "use a new key for a new start"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise IdempotencyInProgress(
                    "a start with this Idempotency-Key is still in progress; retry shortly"
                )
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.1)
