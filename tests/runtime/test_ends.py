"""Waiting for a session's end from a node that does not run it: the owner is asked (a
``watch`` message) to send its "ended" notice to the waiting node, so the wait ends at
once, not at the next re-read of the record. On fakeredis and on a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from fleet.runtime import ends
from tests.conftest import SettingsFactory, running_node, wait_ready


async def test_a_remote_owner_tells_the_waiting_node_when_the_session_ends(
    make_settings: SettingsFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ends, "REREAD_SECONDS", 30.0)  # only the notice can end the wait
    worker = "tests.workers:Answer"
    async with (
        running_node(make_settings(worker=worker), redis) as owner,
        running_node(make_settings(worker=worker), redis) as waiter,
    ):
        await wait_ready(owner)
        await wait_ready(waiter)
        record = await owner.start_session("c", "default", {"after": 0.5})
        loop = asyncio.get_running_loop()
        began = loop.time()
        ended = await waiter.wait_for_end("c", record.session_id, 10)
        assert ended is not None and ended.end_reason == "completed"
        assert ended.result == '{"answer":42}'
        assert loop.time() - began < 3


async def test_a_wait_on_a_session_that_ended_already_answers_at_once(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with running_node(make_settings(worker="tests.workers:Answer"), redis) as node:
        await wait_ready(node)
        record = await node.start_session("c", "default", {})
        first = await node.wait_for_end("c", record.session_id, 5)
        assert first is not None and first.state == "ended"
        again = await asyncio.wait_for(node.wait_for_end("c", record.session_id, 5), 1)
        assert again is not None and again.ended_at == first.ended_at
        assert await node.wait_for_end("c", "no-such-session", 5) is None
