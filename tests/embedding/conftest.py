"""Fixtures of the embedding tests: settings on the embedded Redis (no FLEET_REDIS_URL, as a
user's first run) and on a real redis-server."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from fleet.settings import Settings
from tests.conftest import SettingsFactory
from tests.redis_server import RedisServer


@pytest.fixture(params=["embedded", "redis-server"])
def settings(request: pytest.FixtureRequest, make_settings: SettingsFactory) -> Settings:
    if request.param == "embedded":
        return make_settings()
    server: RedisServer = request.getfixturevalue("redis_server")
    return make_settings(redis_url=server.url)


async def until_ready(client: httpx.AsyncClient, prefix: str) -> None:
    """Until the node behind ``prefix`` answers ``/ready`` (as a load balancer would wait)."""
    async with asyncio.timeout(10):
        while (await client.get(f"{prefix}/ready")).status_code != 200:
            await asyncio.sleep(0.02)
