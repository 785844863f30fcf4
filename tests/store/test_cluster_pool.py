"""fleet's Redis Cluster client under load, on a real local Cluster
(``fleet/store/cluster_pool.py``): a full pool makes a command wait rather than fail, and a
reset of the client never cuts a command in flight."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import RedisCluster
from redis.asyncio.client import PubSub
from redis.exceptions import MovedError

from fleet.store.cluster_pool import PoolTimeout, WaitingNode
from fleet.store.topology import connect_topology
from tests.redis_server import free_port
from tests.topologies import LocalCluster

POOL = 4  # connections per shard


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    try:
        topo = LocalCluster().start()  # every master sees it whole
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield topo
    topo.stop()


def client_for(cluster: LocalCluster, timeout: float = 2.0, pool: int = POOL) -> RedisCluster:
    client: Any = connect_topology(f"{cluster.url}?max_connections={pool}", timeout)
    assert isinstance(client, RedisCluster)
    return client


async def test_a_burst_to_one_shard_waits_for_a_small_pool(cluster: LocalCluster) -> None:
    """What a reaping node does: hundreds of commands and pipelines to the ``{g}`` shard at
    once, while other loops read other shards and a subscription holds a connection. With
    4 connections per shard, none of them fails and no shard gets more than 4."""
    client = client_for(cluster)
    errors: Counter[str] = Counter()
    stop = asyncio.Event()

    def count(where: str, exc: BaseException) -> None:
        errors[f"{where}: {type(exc).__name__}"] += 1

    async def bystander(i: int) -> None:
        while not stop.is_set():
            try:
                await client.get(f"{{c:call-{i}}}:x")
            except Exception as exc:
                count("bystander", exc)
            await asyncio.sleep(0.005)

    async def listener(pubsub: PubSub) -> None:
        while not stop.is_set():
            try:
                await pubsub.get_message(timeout=0.2)
            except Exception as exc:
                count("subscription", exc)
                await asyncio.sleep(0.05)

    async def one(i: int) -> None:
        try:
            if i % 3 == 0:
                pipe = client.pipeline(transaction=False)
                pipe.hgetall(f"{{g}}:node-info:n{i}")
                pipe.scard(f"{{g}}:node-sessions:n{i}")
                await pipe.execute()
            else:
                await client.hgetall(f"{{g}}:node-info:n{i}")
        except Exception as exc:
            count("burst", exc)

    await client.ping()
    pubsub = client.pubsub()
    await pubsub.subscribe("{g}:chan:node:probe")
    loops = [asyncio.create_task(bystander(i)) for i in range(40)]
    loops.append(asyncio.create_task(listener(pubsub)))
    try:
        for _ in range(3):
            await asyncio.gather(*(one(i) for i in range(300)))
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*loops)
        await pubsub.aclose()
    assert not errors
    nodes = client.get_nodes()
    assert all(isinstance(node, WaitingNode) for node in nodes)
    assert max(len(node._connections) for node in nodes) <= POOL
    await client.aclose()


async def test_a_wait_ends_at_the_socket_timeout_without_resetting_the_client(
    cluster: LocalCluster,
) -> None:
    """Subscriptions hold every connection to a shard: a command there waits for the
    socket timeout and then fails alone, with an error that does not make redis-py reset
    the client; the subscriptions keep working, and once one ends the command runs."""
    client = client_for(cluster, timeout=0.5)
    await client.ping()
    shard = client.get_node_from_key("{g}")
    assert shard is not None
    holders = [client.pubsub(node=shard) for _ in range(POOL)]
    for i, holder in enumerate(holders):
        await holder.subscribe(f"{{g}}:hold-{i}")
        assert await holder.get_message(timeout=1) is not None  # the confirmation
    began = time.monotonic()
    with pytest.raises(PoolTimeout):
        await client.get("{g}:x")
    assert 0.4 < time.monotonic() - began < 2.0
    elsewhere = next(node for node in client.get_nodes() if node is not shard)
    await client.execute_command("PUBLISH", "{g}:hold-0", "still here", target_nodes=elsewhere)
    message = await holders[0].get_message(timeout=2)
    assert message is not None and message["data"] == "still here"
    await holders.pop().aclose()
    assert await client.get("{g}:x") is None
    for holder in holders:
        await holder.aclose()
    await client.aclose()


async def test_a_reset_does_not_cut_commands_in_flight(cluster: LocalCluster) -> None:
    """redis-py resets the whole client (``aclose``) after some errors of one command: the
    others in flight at that moment finish; their connections close when they return."""
    client = client_for(cluster, pool=100)
    await client.ping()
    failed: Counter[str] = Counter()
    for steps in range(30):  # the reset at every stage of the calls: connecting, sending…
        calls = [asyncio.ensure_future(client.get(f"{{c:call-{i}}}:x")) for i in range(100)]
        for _ in range(steps):
            await asyncio.sleep(0)
        await client.aclose()
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if result is not None:
                failed[repr(result)] += 1
    assert not failed
    assert await client.get("{c:call-0}:x") is None
    await client.aclose()


async def test_nodes_found_later_wait_too(cluster: LocalCluster) -> None:
    """A node first met in a ``MOVED`` (a replica promoted by a failover) gets the same
    pool as the start-up nodes."""
    client = client_for(cluster)
    await client.ping()
    assert all(isinstance(node, WaitingNode) for node in client.get_nodes())
    await client.nodes_manager.move_slot(MovedError(f"7 127.0.0.1:{free_port()}"))
    promoted = client.nodes_manager.slots_cache[7][0]
    assert isinstance(promoted, WaitingNode) and promoted in client.get_nodes()
    await client.aclose()
