"""Nodes and their leases: renewal, who is live, and taking sessions away from dead nodes
(``reap.lua``) and draining ones (``handoff.lua``), at most once each."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

from redis.exceptions import ResponseError

from fleet.models import NodeInfo
from fleet.store.base import StoreBase, limit_arg
from fleet.store.keys import split_ref
from fleet.store.scripts import HandoffResult, HeartbeatStatus, ReapResult


class Nodes(StoreBase):
    _run_id_allowed = True  # until the ACL says otherwise

    async def heartbeat(
        self, node_id: str, info: dict[str, str], *, held_before: bool = False
    ) -> HeartbeatStatus:
        """Renew the lease. ``info`` is all the node reports (the directory keeps the latest
        whole). ``held_before``: this node held one already, so a Redis that forgot the
        fleet lost its data: admission then waits one lease (``place.lua``)."""
        k = self.keys
        fields = [x for pair in info.items() for x in pair]
        status, _ = await self.scripts(
            "heartbeat",
            [
                k.nodes(),
                k.node_info(node_id),
                k.settling(),
                k.born(),
                k.node_directory(),
                k.node_loads(),
                k.node_sessions(node_id),
            ],
            [
                node_id,
                int(self._settings.node_ttl * 1000),
                "1" if held_before else "0",
                json.dumps(info, separators=(",", ":")),
                *fields,
            ],
        )
        return HeartbeatStatus(status)

    async def server_run_id(self) -> str | None:
        """The Redis server's run id, which changes when another server answers (a
        failover, a restart); ``None`` on Cluster, where each shard has its own."""
        if self.cluster or not self._run_id_allowed:
            return None
        try:
            info = await self.redis.info("server")
        except ResponseError:
            # An ACL without +info (docs/redis.md), or a server that has no INFO (the
            # embedded one): a failover is then noticed only by the writes that find
            # their records gone.
            self._run_id_allowed = False
            return None
        return str(info.get("run_id", "")) or None

    async def node_slots(self, node_id: str) -> set[str]:
        return cast(set[str], await self.redis.smembers(self.keys.node_sessions(node_id)))

    async def count_live_nodes(self) -> int:
        """How many nodes hold their lease, by Redis' clock (``ZCOUNT``: never a list)."""
        return int(await self.scripts("expired_nodes", [self.keys.nodes()], [0, "count"]))

    async def live_nodes(self) -> list[NodeInfo]:
        """Nodes whose lease is held, by Redis' clock: two round trips of two commands
        each, whatever the fleet's size (the directory and load hashes the renewals and
        the slot scripts keep). A node whose renewal does not write the directory yet (an
        older version, in a rolling upgrade) is read from its own hash and SET."""
        k = self.keys
        now_s, now_us = await self.redis.time()
        now_ms = now_s * 1000 + now_us // 1000
        ids = cast(list[str], await self.redis.zrangebyscore(k.nodes(), now_ms, "+inf"))
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(k.node_directory(), ids)
        pipe.hmget(k.node_loads(), ids)
        entries, loads = await pipe.execute()
        found: dict[str, tuple[dict[str, str], int, int]] = {}
        for node_id, entry, load in zip(ids, entries, loads, strict=True):
            if entry is not None:
                renewed, _, described = entry.partition(" ")
                found[node_id] = (json.loads(described), int(renewed), max(0, int(load or 0)))
        older = [node_id for node_id in ids if node_id not in found]
        if older:
            found.update(await self._described_apart(older))
        return [_node_info(node_id, *found[node_id]) for node_id in ids if node_id in found]

    async def _described_apart(self, ids: list[str]) -> dict[str, tuple[dict[str, str], int, int]]:
        """Nodes read from their own hash and SET (two commands each)."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for node_id in ids:
            pipe.hgetall(k.node_info(node_id))
            pipe.scard(k.node_sessions(node_id))
        raw = await pipe.execute()
        return {
            node_id: (info, int(info.get("last_heartbeat_ms", "0")), int(count))
            for node_id, info, count in zip(ids, raw[::2], raw[1::2], strict=True)
            if info
        }

    async def publish_workers(self, described: Mapping[str, str]) -> None:
        """Describe the workers this node runs (name -> JSON), for ``GET /workers``."""
        if described:
            mapping: dict[Any, Any] = dict(described)
            await self.redis.hset(self.keys.workers(), mapping=mapping)

    async def worker_catalog(self) -> dict[str, str]:
        """Every worker described by some node: name -> JSON."""
        return cast(dict[str, str], await self.redis.hgetall(self.keys.workers()))

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
                k.node_loads(),
            ],
            [dead, ref, call_id, target, limit_arg(target_capacity), self._tombstone_ms],
        )
        return ReapResult(result)

    async def handoff(
        self, node_id: str, ref: str, target: str, capacity: int | None
    ) -> HandoffResult:
        k = self.keys
        result = await self.scripts(
            "handoff",
            [k.nodes(), k.node_sessions(node_id), k.node_sessions(target), k.node_loads()],
            [ref, target, limit_arg(capacity), node_id],
        )
        return HandoffResult(result)

    async def forget_node(self, node_id: str) -> bool:
        k = self.keys
        return bool(
            await self.scripts(
                "forget_node",
                [
                    k.nodes(),
                    k.node_sessions(node_id),
                    k.node_info(node_id),
                    k.node_directory(),
                    k.node_loads(),
                ],
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
        pipe.hdel(k.node_directory(), node_id)
        pipe.hdel(k.node_loads(), node_id)
        await pipe.execute()
        return True


def _node_info(node_id: str, info: dict[str, str], renewed_ms: int, sessions: int) -> NodeInfo:
    capacity = info.get("capacity", "")
    return NodeInfo(
        node_id=node_id,
        host=info.get("host", ""),
        started_at=float(info.get("started_at", "0")),
        last_heartbeat=renewed_ms / 1000,
        sessions=sessions,
        capacity=int(capacity) if capacity else None,
        draining=info.get("draining") == "1",
        version=info.get("version", ""),
        workers=[w for w in info.get("workers", "").split(",") if w],
    )
