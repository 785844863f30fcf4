"""On Redis Cluster the scripts announce stream entries by sharded pub/sub (``SPUBLISH``,
Redis 7): a Cluster whose servers do not know it is refused when the scripts load, with a
message that says why, rather than failing every emit later."""

from __future__ import annotations

from typing import Any, cast

import pytest
from pydantic import SecretStr

from fleet.errors import ConfigError
from fleet.settings import Settings
from fleet.store.connect import connect
from fleet.store.registry import Registry
from tests.topologies import LocalCluster


async def test_a_cluster_without_sharded_pubsub_is_refused() -> None:
    cluster = LocalCluster().start()
    try:
        settings = Settings(redis_url=SecretStr(cluster.url))
        client = connect(settings)
        registry = Registry(client, settings)
        try:
            await registry.load()  # Redis 7 knows SPUBLISH
            commands: dict[str, Any] = cast(Any, client).commands_parser.commands
            del commands["spublish"]  # as Redis 6 answers COMMAND
            with pytest.raises(ConfigError, match="Redis Cluster 7.0 or later"):
                await registry.load()
        finally:
            await client.aclose()
    finally:
        cluster.stop()
