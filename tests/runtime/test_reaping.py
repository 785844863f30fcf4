"""Survivors share a dead node's sessions (``Moves.reap_dead_nodes``): each reaps its own
share at once rather than all racing for every session, and what a survivor leaves (it
died too, or is slow) is taken by the others a little later. Each session moves once."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from fleet.runtime.moves import SHARE_WAIT, share_of
from fleet.runtime.node import Node
from fleet.store.keys import make_ref
from fleet.store.registry import Registry
from tests.conftest import SettingsFactory, running_node, wait_ready
from tests.runtime.test_node import _ghost, eventually

SESSIONS = 24


def reap_calls() -> float:
    return REGISTRY.get_sample_value("fleet_redis_command_seconds_count", {"command": "reap"}) or 0


async def moved_once(nodes: list[Node], refs: set[str]) -> None:
    """Every session runs on exactly one survivor, claimed once (epoch 2)."""
    slots = [await n.registry.node_slots(n.node_id) for n in nodes]
    assert sum(len(s) for s in slots) == len(refs) and set().union(*slots) == refs
    for ref in refs:
        record = await nodes[0].registry.get(*ref.split("/"))
        assert record is not None and (record.epoch, record.resumed_count) == (2, 1), record


async def test_survivors_reap_their_own_share_once_each(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    # Passes run only when the test says so, all four at once: they would race.
    quiet = {"node_ttl": 10.0, "maintenance_interval": 3600.0}
    sids = [f"s{i}" for i in range(SESSIONS)]
    await _ghost(make_settings(node_ttl=1.0), redis, sids, resumable=True)
    refs = {make_ref("c", sid) for sid in sids}
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                running_node(make_settings(node_id=f"survivor-{i}", **quiet), redis)
            )
            for i in range(4)
        ]
        for node in nodes:
            await wait_ready(node)
        await asyncio.sleep(1.2)  # the ghost's lease lapses
        before = reap_calls()
        await asyncio.gather(*(node.maintain() for node in nodes))
        calls = reap_calls() - before
        await moved_once(nodes, refs)
        # One reap per session: no survivor tried another's share (racing, each of the
        # four tried nearly every session).
        assert calls == SESSIONS, calls
        owners = {share_of(ref, sorted(n.node_id for n in nodes)) for ref in refs}
        assert len(owners) > 1  # the work was shared


async def test_a_share_left_by_a_survivor_that_never_reaps_is_taken_later(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    interval = 0.2
    sids = [f"s{i}" for i in range(SESSIONS)]
    await _ghost(make_settings(node_ttl=1.0), redis, sids, resumable=True)
    refs = {make_ref("c", sid) for sid in sids}
    settings = [
        make_settings(node_id=f"survivor-{i}", node_ttl=10.0, maintenance_interval=interval)
        for i in range(2)
    ]
    async with AsyncExitStack() as stack:
        # A survivor that holds its lease but never runs a pass (frozen, or dying); it
        # runs no worker, so no session is moved to it.
        lazy = make_settings(node_id="survivor-lazy", node_ttl=10.0)
        await Registry(redis, lazy).heartbeat("survivor-lazy", {"workers": "other"})
        await asyncio.sleep(1.1)  # the ghost's lease lapses
        nodes = [await stack.enter_async_context(running_node(s, redis)) for s in settings]
        reapers = sorted([*(s.node_id for s in settings), "survivor-lazy"])
        left = {ref for ref in refs if share_of(ref, reapers) == "survivor-lazy"}
        assert left, "the lazy survivor's share is empty: pick other ids"
        # Theirs at once; the lazy one's after SHARE_WAIT intervals.
        await eventually(lambda: _holds(nodes, refs), timeout=SHARE_WAIT * interval + 4)
        await moved_once(nodes, refs)


async def _holds(nodes: list[Node], refs: set[str]) -> bool:
    held: set[str] = set()
    for node in nodes:
        held |= await node.registry.node_slots(node.node_id)
    return refs <= held
