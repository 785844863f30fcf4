"""Idempotency keys of starts: a request's reservation of a key, and the answer kept for it.

A key lives in its call's slot (``keys.py``), per principal, next to the call's session
records: creating the session and keeping the answer are then one atomic step
(``create_session.lua``, given the reservation). ``idempotency_reserve.lua`` takes a key or
says what holds it; ``idempotency_release.lua`` gives back a reservation whose start failed.
The sequence around them is the runtime's (``fleet/runtime/idempotency.py``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fleet.store.base import StoreBase
from fleet.store.scripts import ReserveResult


@dataclass(frozen=True)
class Reservation:
    """One request's claim on an idempotency key: the Redis key, a token only this request
    knows (so it can only ever release or answer its own reservation) and the fingerprint of
    what it asks (a repeat must ask the same)."""

    key: str
    token: str
    fingerprint: str


class Idempotency(StoreBase):
    def reservation(self, call_id: str, principal: str, key: str, fingerprint: str) -> Reservation:
        """A new claim on ``key`` (not yet taken: see ``reserve_idempotency_key``)."""
        return Reservation(
            self.keys.idempotency(call_id, principal, key), secrets.token_hex(8), fingerprint
        )

    async def reserve_idempotency_key(
        self, reservation: Reservation, pending_ttl: float
    ) -> tuple[ReserveResult, str]:
        """Take the key for ``pending_ttl`` seconds, or learn what holds it: (result, the
        kept answer when the result is ``DONE``, else ``""``)."""
        result, *answer = await self.scripts(
            "idempotency_reserve",
            [reservation.key],
            [reservation.fingerprint, reservation.token, max(1, int(pending_ttl * 1000))],
        )
        return ReserveResult(result), str(answer[0]) if answer else ""

    async def release_idempotency_key(self, reservation: Reservation) -> bool:
        """Give the key back after a failed start; only this request's pending reservation
        is removed, never an answer."""
        return bool(
            await self.scripts("idempotency_release", [reservation.key], [reservation.token])
        )
