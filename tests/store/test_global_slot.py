"""What fleet's calls on the fleet-wide ``{g}`` slot cost as the fleet grows: a start
placed on the node asked, counting live nodes and reading the directory must not run more
Redis commands for more nodes. Counted with ``INFO commandstats`` on a real redis-server
(scripts' own commands included); the answers are checked on fakeredis too."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from fleet.errors import NotAccepting
from fleet.store.keys import make_ref
from fleet.store.registry import Registry
from tests.conftest import SettingsFactory

INFO = {"workers": "counter"}


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
        await reg.place_here(nodes[0], "c", "warm", "counter")  # scripts loaded, keys there
        before = await commandstats(redis)
        assert await reg.place_here(nodes[0], "c", "s1", "counter") == nodes[0]
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


@pytest.mark.parametrize("backend", ["redis-server"])
async def test_the_directory_read_costs_the_same_whatever_the_fleet_size(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    cost = {}
    for size in (3, 300):
        reg = await registry(redis, make_settings, key_prefix=f"{make_settings().key_prefix}{size}")
        await fleet_of(reg, size)
        before = await commandstats(redis)
        assert len(await reg.live_nodes()) == size
        cost[size] = spent(before, await commandstats(redis))
    assert cost[3] == cost[300] and sum(cost[300].values()) <= 4, cost


async def test_the_directory_counts_every_nodes_slots_as_the_scripts_move_them(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings, node_ttl=1.0)
    a, b, dead = await fleet_of(reg, 3)
    for i in range(3):
        await reg.place(a, "c", f"a{i}", "counter", [a])
        await reg.place(dead, "c", f"d{i}", "counter", [dead])
    await reg.release(a, "c", "a0")
    await reg.release(a, "c", "a0")  # once only
    assert await reg.handoff(a, make_ref("c", "a1"), b, None) == "moved"
    assert await reg.reassert_slot(b, "c", "b1", 0.0)  # a slot Redis had lost, put back

    async def counts() -> dict[str, int]:
        return {n.node_id: n.sessions for n in await reg.live_nodes()}

    assert await counts() == {a: 1, b: 2, dead: 3}
    # A count that missed a change (a slot removed behind the scripts' back) is right
    # again after the node's next renewal.
    await redis.srem(reg.keys.node_sessions(b), make_ref("c", "b1"))
    await asyncio.sleep(1.1)  # the dead node's lease lapses; the others renew
    await reg.heartbeat(a, INFO)
    await reg.heartbeat(b, INFO)
    assert await counts() == {a: 1, b: 1}
    assert await reg.reap(dead, make_ref("c", "d0"), b, None) == "moved"
    assert await reg.reap(dead, make_ref("c", "d1")) == "released"
    assert await counts() == {a: 1, b: 2}
    assert await reg.reap(dead, make_ref("c", "d2")) == "released"
    assert await reg.forget_node(dead)
    assert dead not in await redis.hkeys(reg.keys.node_loads())
    assert dead not in await redis.hkeys(reg.keys.node_directory())
    for node in (a, b):  # what the directory says is what the sets hold
        assert (await counts())[node] == await redis.scard(reg.keys.node_sessions(node))


async def test_a_node_that_writes_no_directory_entry_is_read_apart(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    """An older node in a rolling upgrade renews without writing the directory."""
    reg = await registry(redis, make_settings)
    new, old = await fleet_of(reg, 2)
    await reg.place(old, "c", "s1", "counter", [old])
    await redis.hdel(reg.keys.node_directory(), old)
    await redis.hdel(reg.keys.node_loads(), old)
    nodes = {n.node_id: n for n in await reg.live_nodes()}
    assert set(nodes) == {new, old}
    assert nodes[old].sessions == 1 and nodes[old].workers == ["counter"]
    assert nodes[new].last_heartbeat > 0 and nodes[new].workers == ["counter"]
