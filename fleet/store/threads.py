"""Threads: conversations that outlive sessions, per principal.

A thread's record lives in a slot of its own (``keys.py``): it names the live session (at
most one, set by ``thread_claim.lua`` only), the latest session and the session whose
checkpoint holds the thread's state until the latest writes one of its own. The state
itself is never copied: it is the latest checkpoint of those sessions, kept for
``FLEET_THREAD_TTL`` by their end (``end_session.lua``). The sequence that spans a thread
and a session, and how a crash between its steps is repaired, is the runtime's
(``fleet/runtime/threads.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from fleet.models import SessionRecord
from fleet.settings import Settings
from fleet.store.base import Call, StoreBase
from fleet.store.keys import Keys, make_ref, split_ref


@dataclass(frozen=True)
class Claim:
    """What ``claim_thread`` found: the thread marked busy for the new session (``claimed``,
    with the latest session and the state's source), or held by ``live``."""

    claimed: bool
    latest: str = ""
    state_from: str = ""
    live: str = ""
    live_since_ms: int = 0
    live_started: bool = False  # the holder runs on the thread (thread_started is done)


@dataclass(frozen=True)
class ThreadRecord:
    principal: str
    thread_id: str
    live: str
    live_since_ms: int
    latest: str
    state_from: str
    created_at: float
    updated_at: float


def release_thread_call(keys: Keys, settings: Settings, record: SessionRecord) -> Call:
    """``thread_release.lua`` for an ended session on a thread (the ended session's end
    releases its thread: ``sessions.py``)."""
    assert record.thread_id is not None
    return (
        "thread_release",
        [
            keys.thread(record.principal, record.thread_id),
            keys.thread_sessions(record.principal, record.thread_id),
        ],
        [make_ref(record.call_id, record.session_id), settings.thread_ttl],
    )


class Threads(StoreBase):
    def _thread_keys(self, principal: str, thread_id: str) -> list[str]:
        return [
            self.keys.thread(principal, thread_id),
            self.keys.thread_sessions(principal, thread_id),
        ]

    async def claim_thread(self, principal: str, thread_id: str, ref: str) -> Claim:
        """Mark the thread busy with the session ``ref`` (about to start), or learn which
        session holds it."""
        reply = await self.scripts(
            "thread_claim", self._thread_keys(principal, thread_id), [ref, principal, thread_id]
        )
        if reply[0] == "claimed":
            return Claim(True, latest=str(reply[1]), state_from=str(reply[2]))
        return Claim(
            False, live=str(reply[1]), live_since_ms=int(reply[2]), live_started=reply[3] == 1
        )

    async def thread_started(
        self, principal: str, thread_id: str, ref: str, state_from: str, started_at: float
    ) -> tuple[str, str] | None:
        """Record that the session ``ref`` runs on the thread (its latest); the previous
        latest and state source, or ``None`` if the thread is no longer held by ``ref``."""
        reply = await self.scripts(
            "thread_started",
            self._thread_keys(principal, thread_id),
            [ref, state_from, int(started_at * 1000)],
        )
        if reply[0] != 1:
            return None
        return str(reply[1]), str(reply[2])

    async def release_thread(self, principal: str, thread_id: str, ref: str) -> bool:
        """The session ``ref`` is over (or never started): free the thread, only if
        ``ref`` holds it."""
        return bool(
            await self.scripts(
                "thread_release",
                self._thread_keys(principal, thread_id),
                [ref, self._settings.thread_ttl],
            )
        )

    async def get_thread(self, principal: str, thread_id: str) -> ThreadRecord | None:
        raw = cast(dict[str, str], await self.redis.hgetall(self.keys.thread(principal, thread_id)))
        if not raw.get("created_at"):
            return None
        created = int(raw["created_at"]) / 1000
        return ThreadRecord(
            principal=principal,
            thread_id=thread_id,
            live=raw.get("live", ""),
            live_since_ms=int(raw.get("live_since") or 0),
            latest=raw.get("latest", ""),
            state_from=raw.get("state_from", ""),
            created_at=created,
            updated_at=int(raw["updated_at"]) / 1000 if raw.get("updated_at") else created,
        )

    async def thread_sessions(
        self, principal: str, thread_id: str, offset: int, count: int
    ) -> list[tuple[str, float]]:
        """(ref, started_at) of the thread's sessions, newest first, from ``offset``."""
        rows = cast(
            list[tuple[str, float]],
            await self.redis.zrevrange(
                self.keys.thread_sessions(principal, thread_id),
                offset,
                offset + count - 1,
                withscores=True,
            ),
        )
        return [(str(ref), float(score) / 1000) for ref, score in rows]

    async def delete_thread(
        self, principal: str, thread_id: str, over: str = ""
    ) -> tuple[str, list[str]]:
        """Forget the thread unless a session holds it (``over``: a holder known to have
        ended, which may be overridden). ("deleted", the sessions whose checkpoints held its
        state), ("busy", [live ref]) or ("missing", [])."""
        reply = await self.scripts("thread_delete", self._thread_keys(principal, thread_id), [over])
        return str(reply[0]), [str(r) for r in reply[1:] if r]

    async def state_envelope(self, *refs: str) -> tuple[str, str | None]:
        """The first of ``refs`` that has a checkpoint, and its latest envelope; ("",
        None) if none has."""
        wanted = [ref for ref in refs if ref]
        pipe = self.redis.pipeline(transaction=False)  # one round trip for them all
        for ref in wanted:
            pipe.lindex(self.keys.checkpoint(*split_ref(ref)), 0)
        for ref, found in zip(wanted, await pipe.execute() if wanted else [], strict=True):
            if found is not None:
                return ref, str(found)
        return "", None

    async def expire_checkpoints(self, refs: list[str]) -> None:
        """Checkpoints that no longer hold a thread's state keep only a tombstone's time."""
        if not refs:
            return
        pipe = self.redis.pipeline(transaction=False)
        for ref in refs:
            pipe.expire(self.keys.checkpoint(*split_ref(ref)), self._settings.tombstone_ttl)
        await pipe.execute()
