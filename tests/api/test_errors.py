"""An unexpected error: a 500 in fleet's shape, and its traceback logged once, under a real
uvicorn server (which logs again whatever the application re-raises to it)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
import uvicorn
from fakeredis import FakeAsyncRedis, FakeServer

from fleet.api import create_app
from fleet.api.auth import Principal, start_permission
from fleet.runtime.node import Node
from tests.conftest import SettingsFactory, wait_ready
from tests.redis_server import free_port


async def broken_permission() -> Principal:
    raise RuntimeError("a bug in a permission hook")


async def test_a_500_logs_its_traceback_once(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings()
    node = Node(settings, redis=FakeAsyncRedis(server=FakeServer(), decode_responses=True))
    app = create_app(settings, node)
    app.dependency_overrides[start_permission] = broken_permission
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    caplog.set_level(logging.INFO)
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not serving.done(), "uvicorn did not start"
                await asyncio.sleep(0.01)
        await wait_ready(node)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{config.port}") as http:
            resp = await http.post("/calls/c/sessions", headers={"X-Request-ID": "req-500"})
            assert resp.status_code == 500
            assert resp.json() == {
                "detail": "internal error; see the node's log",
                "code": "internal_error",
            }
            # The node carries on.
            assert (await http.get("/health")).status_code == 200
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
    with_traceback = [r for r in caplog.records if r.exc_info]
    assert len(with_traceback) == 1, [(r.name, r.getMessage()) for r in with_traceback]
    record = with_traceback[0]
    assert record.name == "fleet.api"
    assert record.getMessage() == "unhandled error on POST /calls/c/sessions"
    assert "a bug in a permission hook" in str(record.exc_info[1] if record.exc_info else "")
    # Answered inside the other middleware: the 500 carries the request id like any answer.
    assert resp.headers["x-request-id"] == "req-500"
