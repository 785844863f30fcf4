"""A worker that catches its cancellation and carries on no longer wedges its session,
its close, or its node: after the close grace and ``CANCEL_GRACE`` the session is recorded
ended without it."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from redis.asyncio import Redis

from fleet.runtime.session import CANCEL_GRACE, STUCK
from fleet.store.keys import make_ref
from tests.conftest import SettingsFactory, running_node, wait_ready
from tests.workers import Deaf


async def test_a_worker_that_ignores_cancellation_is_recorded_ended(
    make_settings: SettingsFactory, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    Deaf.release = asyncio.Event()
    settings = make_settings(worker="tests.workers:Deaf", close_grace=0.3)
    try:
        async with running_node(settings, redis) as node:
            await wait_ready(node)
            rec = await node.start_session("c", "default", {})
            began = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="fleet.session"):
                ended = await node.close_session("c", rec.session_id, wait=10)
            took = time.monotonic() - began
            assert ended is not None and ended.state == "ended", ended
            assert ended.end_reason == "closed"
            assert 0.3 + CANCEL_GRACE - 0.1 < took < 0.3 + CANCEL_GRACE + 2.0, took
            raw = await redis.hgetall(node.registry.keys.session("c", rec.session_id))
            assert raw["error"] == STUCK
            assert make_ref("c", rec.session_id) not in await node.registry.node_slots(node.node_id)
            assert await redis.zcard(node.registry.keys.live()) == 0
            warned = [r for r in caplog.records if STUCK in r.getMessage()]
            assert len(warned) == 1 and warned[0].session_id == rec.session_id  # type: ignore[attr-defined]
            assert make_ref("c", rec.session_id) not in node.sessions
    finally:
        Deaf.release.set()
