"""Moving sessions when the mover is paused between its two steps (``reap.lua``, then
``claim.lua``): the target finishes the claim itself, and the mover's late claim must not
take the slot away from it (which left a session ``running`` on record that no node ran)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from fleet.runtime.node import Node
from fleet.store.keys import make_ref
from tests.conftest import SettingsFactory, running_node, wait_ready
from tests.runtime.test_node import _ghost, eventually


@contextlib.asynccontextmanager
async def beside_a_dead_node(
    make_settings: SettingsFactory, redis: Redis, sids: list[str], *, resumable: bool
) -> AsyncIterator[Node]:
    """A live node with no maintenance pass of its own (tests run it), and a dead one,
    ``ghost``, whose lease has lapsed, holding sessions ``sids`` of call ``c``."""
    settings = make_settings(node_id="a-node", node_ttl=10.0, maintenance_interval=3600.0)
    async with running_node(settings, redis) as node:
        await wait_ready(node)
        await _ghost(make_settings(node_ttl=1.0), redis, sids, resumable=resumable)
        await asyncio.sleep(1.2)  # the ghost's lease lapses
        yield node


async def _runs(node: Node, ref: str) -> bool:
    session = node.sessions.get(ref)
    return session is not None and not session.done.is_set()


async def test_a_paused_movers_late_claim_leaves_the_targets_session_alone(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    # Passes run only when the test says so (the interval is long), so the order of steps
    # is the test's: the mover reaps, pauses, the target claims, the mover wakes.
    quiet = {"node_ttl": 10.0, "maintenance_interval": 3600.0}
    ghost_settings = make_settings(node_ttl=1.0)
    await _ghost(ghost_settings, redis, ["s0"], resumable=True)
    ref = make_ref("c", "s0")
    # The target sorts first, and the mover has no room: the mover moves the slot there.
    target_settings = make_settings(node_id="a-target", **quiet)
    mover_settings = make_settings(node_id="b-mover", max_sessions_per_node=0, **quiet)
    async with (
        running_node(target_settings, redis) as target,
        running_node(mover_settings, redis) as mover,
    ):
        await wait_ready(target)
        await wait_ready(mover)
        await asyncio.sleep(1.2)  # the ghost's lease lapses

        paused, resume = asyncio.Event(), asyncio.Event()

        async def pause(_: str) -> None:
            paused.set()
            await resume.wait()

        mover.moves.before_claim = pause
        reaping = asyncio.create_task(mover.maintain())
        await asyncio.wait_for(paused.wait(), 5)
        assert ref in await target.registry.node_slots("a-target")  # step one done

        # The target finds the slot (once to notice, once to act) and finishes the claim.
        await target.maintain()
        await target.maintain()
        await eventually(lambda: _runs(target, ref), timeout=5)

        mover.moves.before_claim = None
        resume.set()
        await asyncio.wait_for(reaping, 5)  # the mover's claim is refused now

        for _ in range(3):
            await target.maintain()
        record = await target.registry.get("c", "s0")
        assert record is not None
        assert (record.node_id, record.epoch, record.state) == ("a-target", 2, "running")
        assert ref in await target.registry.node_slots("a-target")
        assert await _runs(target, ref), "the target stopped its copy: a ghost on record"
        session = target.sessions[ref]
        assert session.ctx.resumed and session.ctx.state == {"n": 10}


async def test_a_slot_whose_record_names_this_node_is_resumed_in_one_pass(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """The resume order was lost: the node resumes on its next pass, not two passes later."""
    settings = make_settings(node_id="a-node", node_ttl=10.0, maintenance_interval=3600.0)
    async with running_node(settings, redis) as node:
        await wait_ready(node)
        ghost_settings = make_settings(node_ttl=1.0)
        await _ghost(ghost_settings, redis, ["s1"], resumable=True)
        await asyncio.sleep(1.2)
        ref = make_ref("c", "s1")
        # Both steps of a move to this node, with the resume message going nowhere.
        assert await node.registry.reap("ghost", ref, "a-node", None) == "moved"
        assert await node.registry.claim(ref, "ghost", "a-node", "lost") == 2
        await node.maintain()
        await eventually(lambda: _runs(node, ref), timeout=5)


async def test_redis_errors_while_taking_over_fail_no_session(
    make_settings: SettingsFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead node's sessions meet Redis errors as they are taken over: one while its
    record is read (it waits for the next pass, the others go on), two as it resumes
    (retried). Each resumes, none ends."""
    sids = ["s0", "s1", "s2"]
    async with beside_a_dead_node(make_settings, redis, sids, resumable=True) as node:
        failures = {"get": 1, "mark_running": 2}

        def failing(name: str, original: Callable[..., Awaitable[Any]]) -> Any:
            async def call(*args: Any, **kwargs: Any) -> Any:
                if failures[name] and (name != "get" or args[1] == "s1"):
                    failures[name] -= 1
                    raise RedisConnectionError("a hiccup")
                return await original(*args, **kwargs)

            return call

        for name in failures:
            monkeypatch.setattr(node.registry, name, failing(name, getattr(node.registry, name)))
        await node.maintain()
        refs = [make_ref("c", sid) for sid in sids]
        await eventually(lambda: _runs(node, refs[0]), timeout=5)
        await eventually(lambda: _runs(node, refs[2]), timeout=5)
        assert refs[1] in await node.registry.node_slots("ghost")  # left for the next pass
        await node.maintain()
        await eventually(lambda: _runs(node, refs[1]), timeout=5)

        async def resumed(sid: str) -> bool:
            record = await node.registry.get("c", sid)
            assert record is not None and record.state != "ended"
            return record.state == "running" and record.epoch == 2

        for sid in sids:
            await eventually(lambda sid=sid: resumed(sid), timeout=5)  # type: ignore[misc]
        assert failures == {"get": 0, "mark_running": 0}


async def test_a_redis_error_as_a_lost_session_ends_leaves_it_for_the_next_pass(
    make_settings: SettingsFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead node's session that no node can take ends there: its record is written
    ended, then its slot released. A Redis error at the first step leaves the slot on the
    dead node, so the next pass ends it; nothing stays "running" with no slot to find it
    by (released first, that is what a failed end left behind)."""
    sids = ["s0", "s1", "s2"]
    async with beside_a_dead_node(make_settings, redis, sids, resumable=False) as node:
        failures = 1
        end = node.registry.end

        async def failing_end(record: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal failures
            if failures and record.session_id == "s1":
                failures -= 1
                raise RedisConnectionError("a hiccup")
            return await end(record, *args, **kwargs)

        monkeypatch.setattr(node.registry, "end", failing_end)
        await node.maintain()
        assert failures == 0
        for sid in ("s0", "s2"):
            assert await _ended_as(node, sid) == "node_lost"
        assert await _ended_as(node, "s1") is None  # still running on record...
        assert make_ref("c", "s1") in await node.registry.node_slots("ghost")  # ...and found
        await node.maintain()
        assert await _ended_as(node, "s1") == "node_lost"
        assert await node.registry.node_slots("ghost") == set()


async def _ended_as(node: Node, sid: str) -> str | None:
    record = await node.registry.get("c", sid)
    assert record is not None
    return record.end_reason if record.state == "ended" else None
