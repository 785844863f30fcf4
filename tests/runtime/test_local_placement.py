"""``local`` placement (the default): a node that can take a start takes it without reading
the list of the fleet's nodes, so a start costs the same in a fleet of 3 nodes or 1,000;
only a start it cannot take reads the list and goes to the node with the most room."""

from __future__ import annotations

from redis.asyncio import Redis

from fleet.models import NodeInfo
from tests.conftest import SettingsFactory, running_node, wait_ready


async def test_a_start_the_node_can_take_reads_no_list_of_nodes(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with (
        running_node(make_settings(max_sessions_per_node=1), redis) as a,
        running_node(make_settings(), redis) as b,
    ):
        await wait_ready(a)
        await wait_ready(b)
        reads = 0
        read = a.registry.live_nodes

        async def counted() -> list[NodeInfo]:
            nonlocal reads
            reads += 1
            return await read()

        a.registry.live_nodes = counted  # type: ignore[method-assign]
        first = await a.start_session("here", "default", {"interval": 3600})
        assert (first.node_id, reads) == (a.node_id, 0)
        # A is full now: the next start reads the list, once, and goes to B.
        second = await a.start_session("there", "default", {"interval": 3600})
        assert (second.node_id, reads) == (b.node_id, 1)
