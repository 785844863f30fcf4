"""The registry: sessions, nodes, admission, leases and reaping, in Redis.

Every method is one round trip unless it says otherwise. Atomic steps are Lua scripts
(``lua/``); key names come from ``keys.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot

from fleet.errors import AdmissionRejected, NotAccepting
from fleet.metrics import redis_timer
from fleet.models import NodeInfo, SessionRecord, State
from fleet.settings import Settings
from fleet.store.keys import Keys, make_ref, split_ref
from fleet.store.scripts import (
    AdmitResult,
    EndResult,
    HandoffResult,
    HeartbeatStatus,
    ReapResult,
    Scripts,
)

_ADMIT_DETAIL = {
    AdmitResult.MAX_SESSIONS_PER_CALL: "this call already has its maximum number of sessions",
    AdmitResult.MAX_SESSIONS: "the fleet already runs its maximum number of sessions",
    AdmitResult.NODE_CAPACITY: "this node is at capacity; retry, another node may have room",
}

# Sessions per watch.lua call: big enough to be cheap, small enough to keep Redis snappy.
WATCH_CHUNK = 500


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class Registry:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.scripts = Scripts(redis)
        self.cluster = isinstance(redis, RedisCluster)
        self._settings = settings
        self._tombstone_ms = settings.tombstone_ttl * 1000

    def _announce(self, call_id: str, session_id: str) -> str:
        """The channel a stream write is announced on: only on Cluster, where nodes cannot
        block on all their streams in one read (``fleet/events_cluster.py``)."""
        return self.keys.events_channel(call_id, session_id) if self.cluster else ""

    async def load(self) -> None:
        await self.scripts.load()

    # -- admission ----------------------------------------------------------------------
    async def admit(self, node_id: str, call_id: str, session_id: str) -> None:
        """Check every limit and reserve a slot for the session on ``node_id``."""
        k, s = self.keys, self._settings
        code, _ = await self.scripts(
            "admit",
            [k.nodes(), k.node_sessions(node_id), k.call_counts(), k.live()],
            [
                node_id,
                make_ref(call_id, session_id),
                call_id,
                _limit(s.max_sessions_per_call),
                _limit(s.max_sessions),
                _limit(s.max_sessions_per_node),
            ],
        )
        result = AdmitResult(code)
        if result is AdmitResult.OK:
            return
        if result is AdmitResult.NOT_READY:
            raise NotAccepting("not_ready", "this node's lease is not held; retry another node")
        raise AdmissionRejected(result.value, _ADMIT_DETAIL[result])

    def _release_call(
        self, node_id: str, call_id: str, session_id: str
    ) -> tuple[str, list[str], list[Any]]:
        k = self.keys
        return (
            "release",
            [k.node_sessions(node_id), k.call_counts(), k.live(), k.ended()],
            [make_ref(call_id, session_id), call_id, self._tombstone_ms],
        )

    async def release(self, node_id: str, call_id: str, session_id: str) -> bool:
        """Free a session's slot, once; the session is listed as ended (a listing drops it
        when it has no tombstone)."""
        return bool(await self.scripts(*self._release_call(node_id, call_id, session_id)))

    async def reassert_slot(
        self, node_id: str, call_id: str, session_id: str, start: float
    ) -> bool:
        k = self.keys
        return bool(
            await self.scripts(
                "reassert",
                [k.node_sessions(node_id), k.call_counts(), k.live()],
                [make_ref(call_id, session_id), call_id, int(start * 1000)],
            )
        )

    # -- session records ----------------------------------------------------------------
    def _create_call(self, record: SessionRecord) -> tuple[str, list[str], list[Any]]:
        k = self.keys
        fields = [x for pair in record.to_hash().items() for x in pair]
        return (
            "create_session",
            [
                k.session(record.call_id, record.session_id),
                k.call_live(record.call_id),
                k.call_ended(record.call_id),
            ],
            [int(record.started_at * 1000), record.session_id, *fields],
        )

    def _mark_running_call(
        self, record: SessionRecord, event: str, data: Any
    ) -> tuple[str, list[str], list[Any]]:
        c, sid = record.call_id, record.session_id
        return (
            "mark_running",
            [self.keys.session(c, sid), self.keys.events(c, sid)],
            [
                record.node_id,
                record.epoch,
                self._settings.events_maxlen,
                event,
                _json(data),
                self._announce(c, sid),
            ],
        )

    async def create(self, record: SessionRecord) -> bool:
        """Write a new record, or write back one Redis lost. Never overwrites."""
        return bool(await self.scripts(*self._create_call(record)))

    async def create_running(self, record: SessionRecord) -> bool:
        """Write a new session's record as running. Its stream starts empty: the
        ``session_started`` event is made from the record (``fleet/events.py``), so a
        session that emits nothing costs no stream. False if a record was there."""
        record.state = State.RUNNING
        return await self.create(record)

    async def mark_running(self, record: SessionRecord, event: str, data: Any) -> str:
        """starting -> running for this owner and epoch, emitting the lifecycle ``event``
        (``session_started`` or ``session_resumed``). Returns the state, or ``lease_lost``."""
        return str(await self.scripts(*self._mark_running_call(record, event, data)))

    async def end(
        self,
        record: SessionRecord,
        reason: str,
        *,
        error: str = "",
        owner: str | None = None,
        any_epoch: bool = False,
        release_from: str | None = None,
        notify: tuple[str, Iterable[str]] = ("", ()),
    ) -> EndResult:
        """End a session (fenced by owner and epoch, emitting ``session_ended``) and release
        its slot, in one round trip.

        ``owner`` defaults to the record's node; the reaper passes the dead node with
        ``any_epoch``. ``release_from`` names the node whose slot to free (default: the
        owner; ``""`` for none). ``notify``: a message and the nodes to publish it to once
        the session is ended (now or before), in the same step.
        """
        message, nodes = notify
        k = self.keys
        c, sid = record.call_id, record.session_id
        owner = owner or record.node_id
        calls: list[tuple[str, list[str], list[Any]]] = [
            (
                "end_session",
                [
                    k.session(c, sid),
                    k.call_live(c),
                    k.call_ended(c),
                    k.checkpoint(c, sid),
                    k.events(c, sid),
                ],
                [
                    owner,
                    "" if any_epoch else record.epoch,
                    reason,
                    repr(time.time()),
                    self._settings.tombstone_ttl,
                    error,
                    self._settings.events_maxlen,
                    _json({"end_reason": reason}),
                    self._announce(c, sid),
                    message,
                    *(k.node_channel(node) for node in nodes),
                ],
            )
        ]
        if release_from != "":
            calls.append(self._release_call(release_from or owner, c, sid))
        results = await self.scripts.run_pipeline(calls)
        return EndResult(int(results[0]))

    async def checkpoint(self, record: SessionRecord, state_json: str, history: int) -> int:
        """Save a checkpoint under the record's owner and epoch; -1 when fenced out."""
        k = self.keys
        c, sid = record.call_id, record.session_id
        return int(
            await self.scripts(
                "checkpoint",
                [k.session(c, sid), k.checkpoint(c, sid)],
                [record.node_id, record.epoch, state_json, repr(time.time()), history],
            )
        )

    async def emit(self, record: SessionRecord, type: str, data_json: str) -> str | int:
        """Append an event to the session's stream, fenced like a checkpoint. Returns the
        entry id, or ``FENCED`` / ``MISSING``."""
        c, sid = record.call_id, record.session_id
        result = await self.scripts(
            "emit",
            [self.keys.session(c, sid), self.keys.events(c, sid)],
            [
                record.node_id,
                record.epoch,
                self._settings.events_maxlen,
                type,
                data_json,
                self._announce(c, sid),
            ],
        )
        return result if isinstance(result, int) else str(result)

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

    async def claim(self, ref: str, previous: str, new_owner: str, message: str) -> int:
        """Give a session whose slot moved to ``new_owner``: epoch + 1, and a message to the
        new owner. Returns the new epoch, or ``FENCED``."""
        return int(
            await self.scripts(
                "claim",
                [self.keys.session(*split_ref(ref))],
                [previous, new_owner, self.keys.node_channel_prefix(), message],
            )
        )

    async def handoff(
        self, node_id: str, ref: str, target: str, capacity: int | None
    ) -> HandoffResult:
        k = self.keys
        result = await self.scripts(
            "handoff",
            [k.nodes(), k.node_sessions(node_id), k.node_sessions(target)],
            [ref, target, _limit(capacity)],
        )
        return HandoffResult(result)

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

    async def get(self, call_id: str, session_id: str) -> SessionRecord | None:
        with redis_timer("get_session"):
            raw = await self.redis.hgetall(self.keys.session(call_id, session_id))
        return SessionRecord.from_hash(cast(dict[str, str], raw)) if raw else None

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

    # -- close --------------------------------------------------------------------------
    async def request_close(
        self,
        call_id: str,
        session_id: str,
        reason: str,
        message: str,
        *,
        asker: str = "",
        principal: str = "",
    ) -> tuple[str, str, SessionRecord | None]:
        """Set the close flag, write ``session_closing`` and publish ``message`` to the
        owner (unless the owner is ``asker``), in one round trip. With ``principal``, a
        session someone else started counts as missing. Returns (status, owner, record):
        status ``missing``, ``closing`` or ``ended`` (then with the ended record)."""
        c, sid = call_id, session_id
        status, *rest = await self.scripts(
            "request_close",
            [self.keys.session(c, sid), self.keys.events(c, sid)],
            [
                reason,
                repr(time.time()),
                self.keys.node_channel_prefix(),
                message,
                asker,
                principal,
                self._settings.events_maxlen,
                _json({"reason": reason}),
                self._announce(c, sid),
            ],
        )
        if status == "missing":
            return "missing", "", None
        owner, fields = str(rest[0]), rest[1:]
        record = None
        if status == "ended":
            record = SessionRecord.from_hash(dict(zip(fields[::2], fields[1::2], strict=True)))
        return str(status), owner, record

    async def watch(
        self, node_id: str, sessions: list[tuple[str, int]]
    ) -> tuple[int, list[tuple[int, str, str]]]:
        """The node's slot count, and the sessions among ``sessions`` (ref, epoch) that need
        attention as (index, code, detail): see ``watch.lua``. One round trip: the sessions
        go in pipelined chunks (on Cluster, one hash slot per chunk)."""
        groups: dict[int, list[int]] = {}
        for i, (ref, _) in enumerate(sessions):
            slot = key_slot(self.keys.session(*split_ref(ref)).encode()) if self.cluster else 0
            groups.setdefault(slot, []).append(i)
        chunks: list[list[int]] = []
        for indexes in groups.values():
            for start in range(0, len(indexes), WATCH_CHUNK):
                chunks.append(indexes[start : start + WATCH_CHUNK])
        calls: list[tuple[str, list[str], list[Any]]] = [
            (
                "watch",
                [self.keys.session(*split_ref(sessions[i][0])) for i in chunk],
                [node_id, *(sessions[i][1] for i in chunk)],
            )
            for chunk in chunks
        ]
        slot_key = self.keys.node_sessions(node_id)
        with redis_timer("watch"):
            count, *answers = await self.scripts.run_pipeline(
                calls, before=lambda pipe: pipe.scard(slot_key)
            )
        found: list[tuple[int, str, str]] = []
        for chunk, flat in zip(chunks, answers, strict=True):
            for j in range(0, len(flat), 3):
                found.append((chunk[int(flat[j]) - 1], str(flat[j + 1]), str(flat[j + 2])))
        return int(count), found

    # -- nodes and leases ---------------------------------------------------------------
    async def heartbeat(self, node_id: str, info: dict[str, str]) -> HeartbeatStatus:
        k = self.keys
        fields = [x for pair in info.items() for x in pair]
        status, _ = await self.scripts(
            "heartbeat",
            [k.nodes(), k.node_info(node_id)],
            [node_id, int(self._settings.node_ttl * 1000), *fields],
        )
        return HeartbeatStatus(status)

    async def node_slots(self, node_id: str) -> set[str]:
        return cast(set[str], await self.redis.smembers(self.keys.node_sessions(node_id)))

    async def count_live_nodes(self) -> int:
        return len(await self.scripts("expired_nodes", [self.keys.nodes()], [0, "live"]))

    async def live_nodes(self) -> list[NodeInfo]:
        """Nodes whose lease is held, by Redis' clock. Two round trips."""
        k = self.keys
        now_s, now_us = await self.redis.time()
        now_ms = now_s * 1000 + now_us // 1000
        ids = cast(list[str], await self.redis.zrangebyscore(k.nodes(), now_ms, "+inf"))
        pipe = self.redis.pipeline(transaction=False)
        for node_id in ids:
            pipe.hgetall(k.node_info(node_id))
            pipe.scard(k.node_sessions(node_id))
        raw = await pipe.execute()
        nodes = []
        for node_id, info, count in zip(ids, raw[::2], raw[1::2], strict=True):
            if not info:
                continue
            capacity = info.get("capacity", "")
            nodes.append(
                NodeInfo(
                    node_id=node_id,
                    host=info.get("host", ""),
                    started_at=float(info.get("started_at", "0")),
                    last_heartbeat=int(info.get("last_heartbeat_ms", "0")) / 1000,
                    sessions=int(count),
                    capacity=int(capacity) if capacity else None,
                    draining=info.get("draining") == "1",
                    version=info.get("version", ""),
                )
            )
        return nodes

    async def expired_nodes(self, limit: int = 100) -> list[str]:
        return list(await self.scripts("expired_nodes", [self.keys.nodes()], [limit]))

    async def reap(
        self, dead: str, ref: str, target: str = "", target_capacity: int | None = None
    ) -> ReapResult:
        """Take one session away from a dead node: move its slot to ``target`` or release
        it. Exactly one reaper wins for each session."""
        k = self.keys
        call_id, _ = split_ref(ref)
        result = await self.scripts(
            "reap",
            [
                k.nodes(),
                k.node_sessions(dead),
                k.node_sessions(target) if target else k.node_sessions(dead),
                k.call_counts(),
                k.live(),
                k.ended(),
            ],
            [dead, ref, call_id, target, _limit(target_capacity), self._tombstone_ms],
        )
        return ReapResult(result)

    async def forget_node(self, node_id: str) -> bool:
        k = self.keys
        return bool(
            await self.scripts(
                "forget_node",
                [k.nodes(), k.node_sessions(node_id), k.node_info(node_id)],
                [node_id],
            )
        )

    async def remove_node(self, node_id: str) -> bool:
        """A clean shutdown: the node leaves the registry at once, unless it still holds
        slots (then its lease lapses and the reapers take care of them)."""
        k = self.keys
        if await self.redis.scard(k.node_sessions(node_id)):
            return False
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(k.nodes(), node_id)
        pipe.delete(k.node_info(node_id))
        await pipe.execute()
        return True
