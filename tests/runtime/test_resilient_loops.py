"""A node's long-lived loops outlive an error that is not Redis' (redis-py has raised
``AttributeError`` from a connection torn down under it): the control listener subscribes
again, and the event reader reconnects, rather than dying and leaving the node deaf to
close requests, or every live listener waiting for good."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from tests.conftest import SettingsFactory, running_node, wait_ready


async def test_the_control_listener_survives_an_error_that_is_not_redis(
    make_settings: SettingsFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No maintenance pass to fall back on: a close reaches A through its channel or not at all.
    a_settings = make_settings(maintenance_interval=3600.0)
    async with running_node(a_settings, redis) as a, running_node(make_settings(), redis) as b:
        await wait_ready(a)
        await wait_ready(b)
        record = await a.start_session("c", "default", {"interval": 3600})
        failures = 1
        get_message = PubSub.get_message

        async def failing(self: PubSub, *args: Any, **kwargs: Any) -> Any:
            nonlocal failures
            if failures:
                failures -= 1
                raise AttributeError("'NoneType' object has no attribute 'writelines'")
            return await get_message(self, *args, **kwargs)

        monkeypatch.setattr(PubSub, "get_message", failing)
        deadline = time.monotonic() + 5
        while failures or not a._listener.subscribed:
            assert time.monotonic() < deadline, "the listener did not subscribe again"
            await asyncio.sleep(0.02)
        monkeypatch.setattr(PubSub, "get_message", get_message)
        began = time.monotonic()
        await b.close_session("c", record.session_id, wait=5)
        ended = await a.registry.get("c", record.session_id)
        assert ended is not None and ended.state == "ended"
        assert time.monotonic() - began < 2


async def test_the_event_reader_survives_an_error_that_is_not_redis(
    make_settings: SettingsFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_node(make_settings(), redis) as node:
        await wait_ready(node)
        failures = 1
        read = node.events._read

        async def failing() -> None:
            nonlocal failures
            if failures:
                failures -= 1
                raise AttributeError("'NoneType' object has no attribute 'writelines'")
            await read()

        monkeypatch.setattr(node.events, "_read", failing)
        record = await node.start_session("c", "default", {"interval": 0.02, "limit": 30})
        kinds: list[str] = []
        with node.events.listen("c", record.session_id) as listener:
            async with asyncio.timeout(10):
                while not listener.done:
                    event = await listener.next(1.0)
                    if event is not None:
                        kinds.append(event.type)
        assert failures == 0
        assert kinds.count("tick") == 30 and kinds[-1] == "session_ended"
