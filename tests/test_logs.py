"""Logs: one line per event, JSON on request, session context, no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from fleet.logs import configure, redact
from tests.api.test_sessions import start, wait_state
from tests.conftest import SettingsFactory, api_client


def test_redact_masks_credentials() -> None:
    assert redact("redis://:s3cret@host:6379/0") == "redis://***@host:6379/0"
    assert redact("rediss://user:pw@h/0 and more") == "rediss://***@h/0 and more"
    assert redact("Authorization: Bearer abc.def-123") == "Authorization: Bearer ***"
    assert redact("nothing to hide") == "nothing to hide"


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    configure("info", "json", stream)
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)


def read(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


async def test_session_lines_are_json_with_context(
    json_logs: io.StringIO, make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker="tests.workers:Boom"), redis) as client:
        sid = (await start(client, "logged"))["session_id"]
        await wait_state(client, "logged", sid, "ended")
        logging.getLogger("fleet.test").info("token redis://:hunter3@x/0")
    lines = read(json_logs)
    about = [line for line in lines if line.get("session_id") == sid]
    assert {"session started", "worker failed", "session ended (failed)"} <= {
        line["msg"] for line in about
    }
    for line in about:
        assert line["call_id"] == "logged" and line["node_id"]
        assert {"ts", "level", "logger", "msg"} <= set(line)
    failed = next(line for line in about if line["msg"] == "worker failed")
    assert "RuntimeError" in failed["exc"]
    assert "hunter3" not in json.dumps(lines)


async def test_request_id_reaches_the_log(
    json_logs: io.StringIO, client: httpx.AsyncClient
) -> None:
    resp = await client.post("/calls/rid/sessions", headers={"x-request-id": "req-42"})
    assert resp.headers["x-request-id"] == "req-42"
    lines = read(json_logs)
    assert any(line.get("request_id") == "req-42" for line in lines)
