"""The connection class ``connect`` builds packs commands exactly as redis-py does."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from fleet.settings import Settings
from fleet.store.connect import connect

COMMANDS: list[tuple[Any, ...]] = [
    ("EVALSHA", "f" * 40, 2, "fleet:{g}:nodes", "k", "node-1", -1, 1.5, "1795239346.62"),
    ("HSET", "k", "params", '{"name":"üñí€ 😀"}', b"\x00\xff raw", 12345678901234567890),
    ("SET", "k", 0.1, 1e100, float("inf"), -0.0, 0),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT LIST",),
    ("SET", "k", memoryview(b"view"), bytearray(b"array")),
]


def fleet_connection() -> Connection:
    redis = connect(Settings(redis_url=SecretStr("redis://127.0.0.1:1/0")))
    pool = redis.connection_pool
    connection = pool.connection_class(**pool.connection_kwargs)
    assert isinstance(connection, Connection)
    return connection


@pytest.mark.parametrize("args", COMMANDS)
def test_commands_pack_to_the_same_bytes_as_redis_py(args: tuple[Any, ...]) -> None:
    ours = b"".join(bytes(chunk) for chunk in fleet_connection().pack_command(*args))
    theirs = b"".join(bytes(chunk) for chunk in Connection().pack_command(*args))
    assert ours == theirs


@pytest.mark.parametrize("value", [True, None, {"a": 1}])
def test_values_redis_cannot_take_are_refused_as_before(value: Any) -> None:
    with pytest.raises(DataError):
        fleet_connection().pack_command("SET", "k", value)
