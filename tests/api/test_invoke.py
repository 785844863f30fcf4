"""Invoke and stream on start: ``POST …/sessions?wait=`` answers with the ended session and
its ``result``; ``Accept: text/event-stream`` answers with the session's events. The result
limit, a wait that runs out, an invoke racing a close, a stream the client cuts. On
fakeredis and on a real redis-server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from redis.asyncio import Redis

from fleet.api import create_app
from fleet.runtime.node import Node
from tests.conftest import SettingsFactory, api_client, uvicorn_node
from tests.sse import read_sse

ANSWER = "tests.workers:Answer"
STEPS = "tests.workers:Steps"
SSE_HEADERS = {"Accept": "text/event-stream"}


async def invoke(client: httpx.AsyncClient, wait: float = 5, **body: Any) -> dict[str, Any]:
    resp = await client.post("/calls/c/sessions", params={"wait": wait}, json=body or None)
    assert resp.status_code == 201, resp.text
    info: dict[str, Any] = resp.json()
    return info


async def test_invoke_answers_with_the_result_which_the_tombstone_keeps(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=ANSWER), redis) as client:
        info = await invoke(client)
        assert info["state"] == "ended" and info["end_reason"] == "completed"
        assert info["result"] == {"answer": 42}
        again = await client.get(f"/calls/c/sessions/{info['session_id']}")
        assert again.json()["result"] == {"answer": 42}
        # Any JSON value is a result: a list, a string, a number, false.
        for value in ([1, "two", None], "text", 3.5, False):
            assert (await invoke(client, params={"value": value}))["result"] == value
        # Without wait, the start answers at once: no result yet.
        started = await client.post("/calls/c/sessions")
        assert started.json()["state"] == "running" and started.json()["result"] is None


async def test_a_result_over_the_limit_or_not_json_fails_the_session_clearly(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(worker=ANSWER, max_result_bytes=100)
    async with api_client(settings, redis) as client:
        fits = await invoke(client, params={"bytes": 98})  # 98 characters + 2 quotes
        assert fits["end_reason"] == "completed" and len(fits["result"]) == 98
        big = await invoke(client, params={"bytes": 99})
        assert big["end_reason"] == "failed" and big["error"] == "invalid_result"
        assert big["result"] is None
        odd = await invoke(client, params={"object": True})
        assert odd["end_reason"] == "failed" and odd["error"] == "invalid_result"
        ended = await client.get(f"/calls/c/sessions/{big['session_id']}/events")
        last = ended.text.strip().splitlines()[-1]
        assert json.loads(last.removeprefix("data: ")) == {"end_reason": "failed"}


async def test_a_wait_that_runs_out_answers_with_the_running_session(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=ANSWER), redis) as client:
        loop = asyncio.get_running_loop()
        began = loop.time()
        info = await invoke(client, wait=0.3, params={"after": 30})
        assert 0.25 <= loop.time() - began < 3
        assert info["state"] == "running" and info["result"] is None
        closed = await client.delete(f"/calls/c/sessions/{info['session_id']}", params={"wait": 5})
        # The worker returns its value on the way out: a closed session has a result too.
        assert closed.json()["end_reason"] == "closed"
        assert closed.json()["result"] == {"answer": 42}


async def test_an_invoke_racing_a_close_answers_with_the_closed_session(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=ANSWER), redis) as client:
        waiting = asyncio.create_task(invoke(client, wait=10, params={"after": 30}))
        async with asyncio.timeout(5):
            while not (listed := (await client.get("/calls/c/sessions")).json()["sessions"]):
                await asyncio.sleep(0.01)
        sid = listed[0]["session_id"]
        assert (await client.delete(f"/calls/c/sessions/{sid}")).status_code == 202
        info = await asyncio.wait_for(waiting, 5)
        assert info["session_id"] == sid
        assert info["state"] == "ended" and info["end_reason"] == "closed"


async def test_stream_on_start_answers_with_the_events_to_the_end(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=STEPS), redis) as client:
        events = await read_sse(
            client, "/calls/c/sessions", method="POST", headers=SSE_HEADERS, timeout=10
        )
        kinds = [e["event"] for e in events]
        assert kinds == ["session_started", "step", "step", "step", "session_ended"], kinds
        assert [json.loads(e["data"])["n"] for e in events[1:4]] == [1, 2, 3]
        assert json.loads(events[-1]["data"]) == {
            "end_reason": "completed",
            "result": {"steps": 3},
        }
        # The headers a proxy needs, and where the session is.
        async with client.stream("POST", "/calls/c/sessions", headers=SSE_HEADERS) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["cache-control"] == "no-cache"
            assert resp.headers["x-accel-buffering"] == "no"
            assert resp.headers["location"].startswith("/calls/c/sessions/")


async def test_a_stream_cut_by_the_client_leaves_the_session_running_unless_asked(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """Through a real uvicorn, which tells the app when the client leaves."""
    settings = make_settings(worker=STEPS)
    node = Node(settings, redis=redis)
    async with uvicorn_node(node, create_app(settings, node)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for close_on_disconnect, end_reason in ((False, "completed"), (True, "closed")):
                body = {
                    "params": {"steps": 20, "interval": 0.1},
                    "close_on_disconnect": close_on_disconnect,
                }
                async with client.stream(
                    "POST", "/calls/c/sessions", headers=SSE_HEADERS, json=body
                ) as resp:
                    where = resp.headers["location"]
                    async for line in resp.aiter_lines():
                        if line == "event: step":
                            break  # hang up after the first step
                info = (await client.get(where, params={})).json()
                assert info["state"] in ("running", "closing"), info
                async with asyncio.timeout(8):
                    while (info := (await client.get(where)).json())["state"] != "ended":
                        await asyncio.sleep(0.05)
                assert info["end_reason"] == end_reason, info
                if close_on_disconnect:
                    assert info["checkpoint_version"] < 20
                else:
                    assert info["result"] == {"steps": 20}
