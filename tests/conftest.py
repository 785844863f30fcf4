"""Fixtures: every registry and API behaviour runs on fakeredis and on a real redis-server.

The real server is started on a free loopback port; if ``redis-server`` is not installed the
run fails with the install command (nothing is silently skipped).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fakeredis import FakeAsyncRedis, FakeServer
from fastapi import FastAPI
from redis.asyncio import Redis

from fleet.api import create_app
from fleet.runtime.node import Node
from fleet.settings import Settings
from tests.redis_server import RedisServer, free_port


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    try:
        server = RedisServer().start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(params=["fakeredis", "redis-server"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def redis_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    if backend == "fakeredis":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def redis(backend: str, redis_url: str | None) -> AsyncIterator[Redis]:
    client: Redis
    if backend == "fakeredis":
        client = FakeAsyncRedis(server=FakeServer(), decode_responses=True)
    else:
        assert redis_url is not None
        client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    """A key prefix of its own per test, so tests on the shared server never meet."""
    return f"t{uuid.uuid4().hex[:10]}"


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(prefix: str) -> SettingsFactory:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "key_prefix": prefix,
            "node_ttl": 3.0,
            "maintenance_interval": 0.5,
            "close_grace": 1.0,
            "drain_timeout": 0.5,
            **overrides,
        }
        values.setdefault("node_id", f"node-{uuid.uuid4().hex[:6]}")
        return Settings(**values)

    return make


@asynccontextmanager
async def running_node(settings: Settings, redis: Redis) -> AsyncIterator[Node]:
    node = Node(settings, redis=redis)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


@pytest.fixture
async def node(make_settings: SettingsFactory, redis: Redis) -> AsyncIterator[Node]:
    async with running_node(make_settings(), redis) as n:
        await wait_ready(n)
        yield n


async def wait_ready(node: Node, timeout: float = 5.0) -> None:
    if not await node.wait_ready(timeout):
        raise AssertionError(f"node not ready: {node.readiness()[1]}")


@asynccontextmanager
async def api_node(
    settings: Settings, redis: Redis
) -> AsyncIterator[tuple[httpx.AsyncClient, Node]]:
    """An in-process client of a node's app, and the node (to reach behind the API)."""
    node = Node(settings, redis=redis)
    app = create_app(settings, node)
    async with app.router.lifespan_context(app):
        await wait_ready(node)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
            yield client, node


@asynccontextmanager
async def api_client(settings: Settings, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with api_node(settings, redis) as (client, _):
        yield client


@pytest.fixture
async def client(make_settings: SettingsFactory, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(make_settings(), redis) as c:
        yield c


@asynccontextmanager
async def uvicorn_node(node: Node, app: FastAPI | None = None) -> AsyncIterator[str]:
    """The node's app (or ``app``, built on it) on a loopback port, served from this event
    loop."""
    config = uvicorn.Config(
        app if app is not None else create_app(node.settings, node),
        host="127.0.0.1",
        port=free_port(),
        log_config=None,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not task.done(), "uvicorn did not start"
                await asyncio.sleep(0.01)
        await wait_ready(node)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
