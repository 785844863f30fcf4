"""What fleet's calls on the fleet-wide ``{g}`` slot cost as the fleet grows: a start
placed on the node asked, counting live nodes and reading the directory must not run more
Redis commands for more nodes. Counted with ``INFO commandstats`` on a real redis-server
(scripts' own commands included); the answers are checked on fakeredis too."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from fleet.errors import NotAccepting
from fleet.store.keys import make_ref
from fleet.store.registry import Registry
from tests.conftest import SettingsFactory

INFO = {"counter": "counter"}


async def registry(redis: Redis, make_settings: SettingsFactory, **kw: object) -> Registry:
    reg = Registry(redis, make_settings(**kw))
    await reg.load()
    return reg


async def commandstats(redis: Redis) -> dict[str, int]:
    """Calls per command so far, less the ``INFO`` calls that read them."""
    stats = await redis.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(v["calls"])
        for name, v in stats.items()
        if name != "cmdstat_info"
    }


def spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {n: c - before.get(n, 0) for n, c in after.items() if c != before.get(n, 0)}


async def fleet_of(reg: Registry, size: int, capacity: str = "") -> list[str]:
    nodes = [f"n{i:04d}" for i in range(size)]
    for node in nodes:
        await reg.heartbeat(node, {"workers": "counter", "capacity": capacity})
    return nodes


@pytest.mark.parametrize("backend", ["redis-server"])
async def test_a_local_start_costs_the_same_whatever_the_fleet_size(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    cost = {}
    for size in (3, 300):
        reg = await registry(redis, make_settings, key_prefix=f"{make_settings().key_prefix}{size}")
        nodes = await fleet_of(reg, size)
        await reg.place(nodes[0], "c", "warm", "counter", nodes)  # scripts loaded, keys there
        before = await commandstats(redis)
        assert await reg.place(nodes[0], "c", "s1", "counter", nodes) == nodes[0]
        cost[size] = spent(before, await commandstats(redis))
    assert cost[3] == cost[300], cost
    assert sum(cost[300].values()) <= 15, cost[300]
    assert "sismember" not in cost[300], "a first start looked for a retry in every node's set"


async def test_a_retried_place_answers_the_first_node_and_counts_once(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings)
    nodes = await fleet_of(reg, 5, capacity="1")
    await reg.place(nodes[0], "c", "s0", "counter", nodes)  # the node asked is full now
    first = await reg.place(nodes[0], "c", "s1", "counter", nodes, "spread")
    assert first != nodes[0]
    # The answer was lost and the call runs again, with the candidates in another order.
    again = await reg.place(nodes[0], "c", "s1", "counter", [nodes[0], *reversed(nodes[1:])])
    assert again == first
    k = reg.keys
    assert await redis.hget(k.call_counts(), "c") == "2"
    assert await redis.zcard(k.live()) == 2
    assert [await redis.scard(k.node_sessions(n)) for n in nodes].count(1) == 2
    # Its slot moved meanwhile to a node that is no candidate: refused, not counted twice.
    with pytest.raises(NotAccepting) as err:
        await reg.place(nodes[0], "c", "s1", "counter", [n for n in nodes if n != first])
    assert err.value.code == "start_failed"
    assert await redis.hget(k.call_counts(), "c") == "2"
    assert await reg.node_slots(first) == {make_ref("c", "s1")}


async def test_counting_live_nodes_counts_without_listing(
    redis: Redis, make_settings: SettingsFactory, backend: str
) -> None:
    reg = await registry(redis, make_settings)
    await fleet_of(reg, 4)
    await redis.zadd(reg.keys.nodes(), {"gone": 1})  # a lapsed lease
    before = await commandstats(redis) if backend == "redis-server" else {}
    assert await reg.count_live_nodes() == 4
    if backend == "redis-server":
        cost = spent(before, await commandstats(redis))
        assert "zcount" in cost and "zrangebyscore" not in cost, cost
