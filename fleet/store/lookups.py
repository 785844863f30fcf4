"""Reading sessions: one record, a call's sessions, the fleet-wide list, checkpoints and
events. No ``KEYS`` and no keyspace ``SCAN``: the per-call, per-node and fleet-wide indexes
answer every lookup."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from fleet.metrics import redis_timer
from fleet.models import SessionRecord, State
from fleet.store.keys import split_ref
from fleet.store.nodes import Nodes


class Lookups(Nodes):
    async def get(self, call_id: str, session_id: str) -> SessionRecord | None:
        with redis_timer("get_session"):
            raw = await self.redis.hgetall(self.keys.session(call_id, session_id))
        return SessionRecord.from_hash(cast(dict[str, str], raw)) if raw else None

    async def get_with_checkpoint(
        self, call_id: str, session_id: str
    ) -> tuple[SessionRecord | None, str | None]:
        """The record and the latest checkpoint envelope, in one round trip (a resume)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.session(call_id, session_id))
        pipe.lrange(self.keys.checkpoint(call_id, session_id), 0, 0)
        raw, latest = await pipe.execute()
        record = SessionRecord.from_hash(raw) if raw else None
        return record, (latest[0] if latest else None)

    async def checkpoints(self, call_id: str, session_id: str) -> list[str]:
        """The kept checkpoint envelopes (JSON text), newest first."""
        key = self.keys.checkpoint(call_id, session_id)
        return cast(list[str], await self.redis.lrange(key, 0, -1))

    async def read_events(
        self, call_id: str, session_id: str, after: str, block_ms: int | None, count: int = 100
    ) -> list[tuple[str, str, str]]:
        """Events after ``after`` as (id, type, data JSON), waiting up to ``block_ms``."""
        reply = await self.redis.xread(
            {self.keys.events(call_id, session_id): after}, count=count, block=block_ms
        )
        out: list[tuple[str, str, str]] = []
        for _stream, entries in cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], reply):
            out += [(entry_id, f["type"], f["data"]) for entry_id, f in entries]
        return out

    async def get_refs(self, refs: Iterable[str]) -> list[SessionRecord | None]:
        """The records of several sessions (refs), in one round trip; ``None`` for each
        that does not exist (any more)."""
        raws = await self._records(self.keys.session(*split_ref(ref)) for ref in refs)
        return [SessionRecord.from_hash(raw) if raw else None for raw in raws]

    async def _records(self, keys: Iterable[str]) -> list[dict[str, str] | None]:
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return [raw or None for raw in await pipe.execute()]

    async def list_call(self, call_id: str) -> list[SessionRecord]:
        """The call's sessions, live ones first (oldest first), then ended (newest first).
        Two round trips; entries whose tombstone expired are pruned on the way."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrange(k.call_live(call_id), 0, -1)
        pipe.zrevrange(k.call_ended(call_id), 0, -1)
        with redis_timer("list_call"):
            live, ended = await pipe.execute()
        ids: list[str] = [*live, *ended]
        raws = await self._records(k.session(call_id, sid) for sid in ids)
        gone = [sid for sid, raw in zip(ids, raws, strict=True) if raw is None]
        if gone:
            await self.redis.zrem(k.call_ended(call_id), *gone)
        return [SessionRecord.from_hash(raw) for raw in raws if raw]

    async def list_sessions(
        self,
        *,
        state: State | None,
        node_id: str | None,
        limit: int,
        cursor: int,
    ) -> tuple[list[SessionRecord], int | None]:
        """A page of the fleet-wide list: live sessions (oldest first), then recently ended
        ones (newest first). ``cursor`` is an offset in that order; the next cursor is
        ``None`` at the end. With ``node_id``, that node's live sessions (its index)."""
        k = self.keys
        if node_id is not None:
            members = sorted(await self.node_slots(node_id))
            refs = members[cursor : cursor + limit]
            total = len(members)
        else:
            want_live = state is None or state is not State.ENDED
            want_ended = state is None or state is State.ENDED
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcard(k.live())
            pipe.zcard(k.ended())
            n_live, n_ended = await pipe.execute()
            n_live = n_live if want_live else 0
            total = n_live + (n_ended if want_ended else 0)
            refs = []
            if cursor < n_live:
                refs = cast(
                    list[str], await self.redis.zrange(k.live(), cursor, cursor + limit - 1)
                )
            if len(refs) < limit and want_ended:
                start = max(0, cursor - n_live)
                stop = start + limit - len(refs) - 1
                refs += cast(list[str], await self.redis.zrevrange(k.ended(), start, stop))
        raws = await self._records(k.session(*split_ref(ref)) for ref in refs)
        records = [SessionRecord.from_hash(raw) for raw in raws if raw]
        if state is not None:
            records = [r for r in records if r.state == state]
        end = cursor + len(refs)
        return records, (end if refs and end < total else None)
