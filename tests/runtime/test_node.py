"""Node behaviour in one process, on fakeredis and on a real redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from fleet.models import SessionRecord
from fleet.runtime import maintenance
from fleet.runtime.node import Node
from fleet.settings import Settings
from fleet.store.keys import make_ref
from fleet.store.registry import Registry
from tests.conftest import SettingsFactory, running_node, wait_ready


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def ended_with(node: Node, call: str, sid: str) -> str | None:
    rec = await node.registry.get(call, sid)
    return rec.end_reason if rec and rec.state == "ended" else None


async def test_idle_timeout_ends_idle_sessions_only(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with running_node(
        make_settings(worker="tests.workers:Quiet", idle_timeout=0.4), redis
    ) as node:
        await wait_ready(node)
        quiet = await node.start_session("c", "default", {})
        await eventually(lambda: _is(node, "c", quiet.session_id, "idle"))
    settings = make_settings(worker="tests.workers:Chatty", idle_timeout=0.4)
    async with running_node(settings, redis) as node:
        await wait_ready(node)
        chatty = await node.start_session("c", "default", {})
        await asyncio.sleep(1.0)
        rec = await node.registry.get("c", chatty.session_id)
        assert rec is not None and rec.state == "running"


async def _is(node: Node, call: str, sid: str, reason: str) -> bool:
    return await ended_with(node, call, sid) == reason


async def test_max_duration_goes_through_closing(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(worker="tests.workers:Quiet", max_session_duration=0.4)
    async with running_node(settings, redis) as node:
        await wait_ready(node)
        rec = await node.start_session("c", "default", {})
        session = node.sessions[make_ref("c", rec.session_id)]
        await eventually(lambda: _is(node, "c", rec.session_id, "max_duration"))
        assert session.ctx.close_reason == "max_duration"
        events = await redis.xrange(node.registry.keys.events("c", rec.session_id))
        types = [fields["type"] for _, fields in cast(list[tuple[str, dict[str, str]]], events)]
        # session_started is made from the record when listened to, never stored.
        assert types == ["session_closing", "session_ended"]


async def test_lost_close_message_is_caught_by_the_maintenance_pass(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with running_node(make_settings(maintenance_interval=0.3), redis) as node:
        await wait_ready(node)
        rec = await node.start_session("c", "default", {})
        # Write the durable flag and the owner's index entry as a close does, but publish
        # nothing: the message is lost.
        await redis.hset(node.registry.keys.session("c", rec.session_id), "close_reason", "closed")
        await node.registry.note_close(node.node_id, make_ref("c", rec.session_id), "closed")
        await eventually(lambda: _is(node, "c", rec.session_id, "closed"), timeout=3)
        assert await redis.hgetall(node.registry.keys.node_closes(node.node_id)) == {}


async def test_a_pass_costs_what_changed_not_what_runs(
    make_settings: SettingsFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing to do, a pass reads the node's close requests and slot count (one
    pipelined round trip) and the fleet's live nodes, whatever the session count."""
    async with running_node(make_settings(maintenance_interval=3600), redis) as node:
        await wait_ready(node)
        for _ in range(50):
            await node.start_session("c", "default", {"interval": 3600})
        watched: list[int] = []
        watch = node.registry.watch

        async def counting(node_id: str, sessions: list[tuple[str, int]]) -> Any:
            watched.append(len(sessions))
            return await watch(node_id, sessions)

        node.registry.watch = counting  # type: ignore[method-assign]
        await node.maintain()
        assert watched == []  # no session's record was read
        # What a data loss runs: every record, in chunks of one round trip each.
        monkeypatch.setattr(maintenance, "RECORDS_CHUNK", 20)
        await node.maintenance.check_own_sessions(full=True)
        assert watched == [20, 20, 10]


async def test_redis_data_loss_is_reasserted(make_settings: SettingsFactory, redis: Redis) -> None:
    async with running_node(make_settings(node_ttl=1.5, max_sessions=5), redis) as node:
        await wait_ready(node)
        rec = await node.start_session("c", "default", {})
        await redis.flushdb()
        await redis.script_flush()
        began = time.monotonic()

        async def back() -> bool:
            got = await node.registry.get("c", rec.session_id)
            slots = await node.registry.node_slots(node.node_id)
            nodes = await node.registry.live_nodes()
            return (
                got is not None
                and got.state == "running"
                and make_ref("c", rec.session_id) in slots
                and [n.node_id for n in nodes] == [node.node_id]
            )

        await eventually(back, timeout=3)
        assert time.monotonic() - began < 2.0
        assert node.readiness() == (True, "ok")
        # The restored slot counts against the limits again.
        assert await redis.zcard(node.registry.keys.live()) == 1


async def _ghost(settings: Settings, redis: Redis, sids: list[str], resumable: bool) -> None:
    """A node that registered, took sessions, checkpointed, and died."""
    ghost = Registry(redis, settings)
    await ghost.load()
    await ghost.heartbeat("ghost", {"host": "gone"})
    for i, sid in enumerate(sids):
        await ghost.admit("ghost", "c", sid)
        record = SessionRecord(
            session_id=sid, call_id="c", call_type="default", node_id="ghost",
            started_at=time.time(), resumable=resumable, state="running",
            params={"interval": 3600},
        )  # fmt: skip
        await ghost.create(record)
        assert await ghost.checkpoint(record, json.dumps({"n": 10 + i}), 1) == 1


async def test_a_dead_nodes_unresumable_sessions_end_as_node_lost(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(node_ttl=1.0, maintenance_interval=0.2)
    sids = [f"s{i}" for i in range(3)]
    await _ghost(settings, redis, sids, resumable=False)
    async with running_node(settings, redis) as node:
        await wait_ready(node)
        for sid in sids:
            await eventually(lambda sid=sid: _is(node, "c", sid, "node_lost"), timeout=4)  # type: ignore[misc]
        await eventually(lambda: _only_node(node), timeout=2)
        assert await redis.hgetall(node.registry.keys.call_counts()) == {}


async def test_a_dead_nodes_sessions_resume_from_their_checkpoint(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(node_ttl=1.0, maintenance_interval=0.2)
    sids = [f"s{i}" for i in range(3)]
    await _ghost(settings, redis, sids, resumable=True)
    async with running_node(settings, redis) as node:
        await wait_ready(node)
        for i, sid in enumerate(sids):
            ref = make_ref("c", sid)
            await eventually(lambda ref=ref: _runs(node, ref), timeout=4)  # type: ignore[misc]
            session = node.sessions[ref]
            assert session.ctx.resumed and session.ctx.state == {"n": 10 + i}
            rec = await node.registry.get("c", sid)
            assert rec is not None and rec.node_id == node.node_id
            assert (rec.epoch, rec.resumed_count, rec.state) == (2, 1, "running")
            events = await node.registry.read_events("c", sid, "0-0", None)
            assert [e[1] for e in events] == ["session_resumed"]
        await eventually(lambda: _only_node(node), timeout=2)
        assert await node.registry.node_slots(node.node_id) == {make_ref("c", s) for s in sids}


async def _runs(node: Node, ref: str) -> bool:
    session = node.sessions.get(ref)
    return session is not None and session.record.state == "running"


async def _only_node(node: Node) -> bool:
    ids = await node.registry.redis.zrange(node.registry.keys.nodes(), 0, -1)
    return list(ids) == [node.node_id]


async def test_stray_slot_is_released(make_settings: SettingsFactory, redis: Redis) -> None:
    async with running_node(make_settings(maintenance_interval=0.2), redis) as node:
        await wait_ready(node)
        await node.registry.admit(node.node_id, "c", "orphan")  # a start that died half-way
        await eventually(lambda: _no_slots(node), timeout=3)


async def _no_slots(node: Node) -> bool:
    return not await node.registry.node_slots(node.node_id)


async def test_node_loops_keep_running(make_settings: SettingsFactory, redis: Redis) -> None:
    for extra in ({}, {"idle_timeout": 2.0}, {"max_session_duration": 3.0}):
        async with running_node(make_settings(**extra), redis) as node:
            await wait_ready(node)
            await asyncio.sleep(0.3)
            assert all(not task.done() for task in node._tasks), node._tasks
