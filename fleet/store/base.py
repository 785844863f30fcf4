"""What every part of the registry shares: the client, the key names, the scripts."""

from __future__ import annotations

import json
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster

from fleet.errors import ConfigError
from fleet.settings import Settings
from fleet.store.keys import Keys
from fleet.store.scripts import Scripts

#: A script call: its name, its keys and its arguments.
Call = tuple[str, list[str], list[Any]]


def to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def limit_arg(value: int | None) -> int:
    """A limit as the scripts take it: -1 for none."""
    return -1 if value is None else value


class StoreBase:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.scripts = Scripts(redis)
        self.cluster = isinstance(redis, RedisCluster)
        self._settings = settings
        self._tombstone_ms = settings.tombstone_ttl * 1000

    def _announce(self, call_id: str, session_id: str) -> str:
        """The channel a stream write is announced on: only on Cluster, where nodes cannot
        block on all their streams in one read (``fleet/events/cluster.py``)."""
        return self.keys.events_channel(call_id, session_id) if self.cluster else ""

    async def load(self) -> None:
        """Load the scripts; on Cluster, first check that the servers know sharded pub/sub,
        which the scripts announce stream entries with (``ConfigError`` if not)."""
        if self.cluster:
            cluster = cast(RedisCluster, self.redis)
            await cluster.initialize()
            if "spublish" not in cluster.commands_parser.commands:
                raise ConfigError(
                    "Redis Cluster 7.0 or later is needed: fleet announces stream entries "
                    "with sharded pub/sub (SPUBLISH)"
                )
        await self.scripts.load()
