"""The HTTP API on one node, on fakeredis and on a real redis-server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from redis.asyncio import Redis

from tests.conftest import SettingsFactory, api_client, api_node

COUNTER_FAST: dict[str, Any] = {"params": {"interval": 0.02, "limit": 3}}


async def start(client: httpx.AsyncClient, call: str = "demo", **body: Any) -> dict[str, Any]:
    resp = await client.post(f"/calls/{call}/sessions", json=body or None)
    assert resp.status_code == 201, resp.text
    data: dict[str, Any] = resp.json()
    return data


async def wait_state(
    client: httpx.AsyncClient, call: str, sid: str, state: str, timeout: float = 5.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data: dict[str, Any] = (await client.get(f"/calls/{call}/sessions/{sid}")).json()
        if data.get("state") == state or time.monotonic() > deadline:
            assert data.get("state") == state, data
            return data
        await asyncio.sleep(0.02)


async def test_start_runs_and_close_ends_closed(client: httpx.AsyncClient) -> None:
    resp = await client.post("/calls/demo/sessions")  # no body at all, like the README's curl
    assert resp.status_code == 201
    info = resp.json()
    assert info["state"] == "running"
    assert info["call_id"] == "demo" and info["call_type"] == "default"
    assert info["epoch"] == 1 and info["resumed_count"] == 0 and info["end_reason"] is None
    sid = info["session_id"]

    got = (await client.get(f"/calls/demo/sessions/{sid}")).json()
    assert got["state"] == "running" and got["node_id"] == info["node_id"]

    closed = await client.delete(f"/calls/demo/sessions/{sid}", params={"wait": 5})
    assert closed.status_code == 200
    assert closed.json()["state"] == "ended" and closed.json()["end_reason"] == "closed"
    assert closed.json()["ended_at"] >= info["session_started_at"]


async def test_close_without_wait_is_202_then_ends(client: httpx.AsyncClient) -> None:
    sid = (await start(client))["session_id"]
    resp = await client.delete(f"/calls/demo/sessions/{sid}")
    assert resp.status_code == 202 and resp.json() == {"state": "closing"}
    ended = await wait_state(client, "demo", sid, "ended")
    assert ended["end_reason"] == "closed"


async def test_closing_twice_and_closing_ended_answer_200(client: httpx.AsyncClient) -> None:
    sid = (await start(client))["session_id"]
    first = await client.post(f"/calls/demo/sessions/{sid}/close", params={"wait": 5})
    second = await client.delete(f"/calls/demo/sessions/{sid}")
    third = await client.post(f"/calls/demo/sessions/{sid}/close")
    assert first.status_code == second.status_code == third.status_code == 200
    assert second.json() == first.json() == third.json()


async def test_counter_with_limit_completes_and_checkpoints(client: httpx.AsyncClient) -> None:
    sid = (await start(client, **COUNTER_FAST))["session_id"]
    ended = await wait_state(client, "demo", sid, "ended")
    assert ended["end_reason"] == "completed"
    assert ended["checkpoint_version"] == 3


async def test_unknown_ids_are_404_and_malformed_ids_422(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/calls/demo/sessions/nope"),
        ("DELETE", "/calls/demo/sessions/nope"),
        ("POST", "/calls/demo/sessions/nope/close"),
        ("GET", "/calls/demo/sessions/nope/metrics"),
    ]:
        resp = await client.request(method, path)
        assert resp.status_code == 404, (method, path, resp.text)
        assert resp.json()["code"] == "not_found" and resp.json()["detail"]
    for path in [
        "/calls/bad%20id/sessions",
        "/calls/demo/sessions/x%7By%7D",
        "/calls/" + "a" * 129 + "/sessions",
        "/calls/demo/sessions/%2A",
    ]:
        resp = await client.get(path)
        assert resp.status_code == 422, (path, resp.text)
        assert resp.json()["code"] == "invalid_request"
    assert (await client.get("/health")).status_code == 200


async def test_bad_bodies_are_4xx_with_detail_and_code(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    cases = [
        (b"{bad", 422, "invalid_request"),
        (b'{"foo": 1}', 422, "invalid_request"),
        (b'{"params": []}', 422, "invalid_request"),
        (b'{"call_type": "no spaces"}', 422, "invalid_request"),
        (b'{"params": {"interval": -1}}', 422, "invalid_params"),
        (b'{"params": {"interval": 1, "nope": 2}}', 422, "invalid_params"),
        (b'{"params": {"x": "' + b"a" * 70_000 + b'"}}', 413, "body_too_large"),
    ]
    for body, status, code in cases:
        resp = await client.post("/calls/demo/sessions", content=body, headers=headers)
        assert resp.status_code == status, (body[:40], resp.text)
        assert resp.json()["code"] == code and resp.json()["detail"]
    # A streamed body without Content-Length is counted as it arrives.

    async def chunks() -> Any:
        for _ in range(20):
            yield b"x" * 8192

    resp = await client.post("/calls/demo/sessions", content=chunks(), headers=headers)
    assert resp.status_code == 413
    # The node keeps serving, and nothing was admitted by the rejected requests.
    assert (await client.get("/calls/demo/sessions")).json() == {"sessions": []}
    await start(client)


async def test_call_listing_puts_live_sessions_first(client: httpx.AsyncClient) -> None:
    done = (await start(client, "room", **COUNTER_FAST))["session_id"]
    await wait_state(client, "room", done, "ended")
    live = (await start(client, "room"))["session_id"]
    await start(client, "other-call")
    listed = (await client.get("/calls/room/sessions")).json()["sessions"]
    assert [s["session_id"] for s in listed] == [live, done]
    assert [s["state"] for s in listed] == ["running", "ended"]


async def test_fleet_listing_pages_and_filters(client: httpx.AsyncClient) -> None:
    sids = [(await start(client, f"call-{i}"))["session_id"] for i in range(5)]
    ended = (await start(client, "call-x", **COUNTER_FAST))["session_id"]
    await wait_state(client, "call-x", ended, "ended")

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/sessions", params=params)).json()
        seen += [s["session_id"] for s in page["sessions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [*sids, ended]

    running = (await client.get("/sessions", params={"state": "running"})).json()
    assert {s["session_id"] for s in running["sessions"]} == set(sids)
    only_ended = (await client.get("/sessions", params={"state": "ended"})).json()
    assert [s["session_id"] for s in only_ended["sessions"]] == [ended]

    node_id = running["sessions"][0]["node_id"]
    on_node = (await client.get("/sessions", params={"node_id": node_id})).json()
    assert {s["session_id"] for s in on_node["sessions"]} == set(sids)
    assert (await client.get("/sessions", params={"cursor": "x"})).status_code == 422
    assert (await client.get("/sessions", params={"limit": 0})).status_code == 422
    assert (await client.get("/sessions", params={"state": "bogus"})).status_code == 422


async def test_nodes_health_ready_metrics(client: httpx.AsyncClient) -> None:
    await start(client)
    nodes = (await client.get("/nodes")).json()["nodes"]
    assert len(nodes) == 1 and nodes[0]["sessions"] == 1 and nodes[0]["draining"] is False
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).json() == {"status": "ready"}
    text = (await client.get("/metrics")).text
    for name in (
        "fleet_sessions_active",
        "fleet_sessions_started_total",
        "fleet_session_start_seconds_bucket",
        "fleet_redis_up 1.0",
    ):
        assert name in text, name
    assert 'route="/calls/{call_id}/sessions"' in text


async def test_request_id_is_returned(client: httpx.AsyncClient) -> None:
    resp = await client.get("/health", headers={"x-request-id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    generated = (await client.get("/health")).headers["x-request-id"]
    assert len(generated) == 32


async def test_failing_worker_ends_failed_without_leaking_error(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker="tests.workers:Boom"), redis) as client:
        sid = (await start(client))["session_id"]
        ended = await wait_state(client, "demo", sid, "ended")
        assert ended["end_reason"] == "failed"
        assert "hunter2" not in (await client.get(f"/calls/demo/sessions/{sid}")).text
        assert (await client.get("/ready")).status_code == 200
        await start(client)  # the node takes the next one


async def test_stubborn_worker_is_cancelled_after_grace(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(worker="tests.workers:Stubborn", close_grace=0.3)
    async with api_client(settings, redis) as client:
        sid = (await start(client))["session_id"]
        began = time.monotonic()
        resp = await client.delete(f"/calls/demo/sessions/{sid}", params={"wait": 5})
        assert resp.status_code == 200 and resp.json()["end_reason"] == "closed"
        assert 0.25 <= time.monotonic() - began < 2.0


async def test_close_wait_that_runs_out_answers_202(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(worker="tests.workers:Stubborn", close_grace=2.0)
    async with api_client(settings, redis) as client:
        sid = (await start(client))["session_id"]
        resp = await client.delete(f"/calls/demo/sessions/{sid}", params={"wait": 0.2})
        assert resp.status_code == 202 and resp.json() == {"state": "closing"}
        assert (await client.get(f"/calls/demo/sessions/{sid}")).json()["state"] == "closing"


async def test_session_metrics_endpoint(make_settings: SettingsFactory, redis: Redis) -> None:
    async with api_client(make_settings(worker="tests.workers:Quiet"), redis) as client:
        sid = (await start(client))["session_id"]
        await asyncio.sleep(0.05)
        data = (await client.get(f"/calls/demo/sessions/{sid}/metrics")).json()
        assert data["metrics"] == {"answer": 42}
        assert data["state"] == "running" and data["duration_seconds"] >= 0


async def test_any_node_answers_the_metrics_as_last_reported(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    metered = {"worker": "tests.workers:Metered", "metrics_report_interval": 0.2}
    async with (
        api_node(make_settings(**metered), redis) as (owner, owner_node),
        api_node(make_settings(**metered), redis) as (other, _),
    ):
        sid = (await start(owner))["session_id"]
        path = f"/calls/demo/sessions/{sid}/metrics"
        deadline = time.monotonic() + 0.2 + 0.3  # within the interval, and a margin
        while (seen := (await other.get(path)).json())["reported_at"] is None:
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.01)
        assert seen["metrics"] == {"turns": 3, "latency_ms": 12.5}
        assert seen["node_id"] == owner_node.node_id and seen["state"] == "running"
        assert type(seen["metrics"]["turns"]) is int  # the JSON says 3, not 3.0
        # The owner answers its live values, as of now.
        owner_node.sessions[f"demo/{sid}"].ctx.metrics["turns"] = 7
        live = (await owner.get(path)).json()
        assert live["metrics"] == {"turns": 7, "latency_ms": 12.5}
        assert live["reported_at"] >= seen["reported_at"]
        # After the end, every node answers the final report (the owner too).
        await owner.delete(f"/calls/demo/sessions/{sid}", params={"wait": 5})
        for client in (owner, other):
            final = (await client.get(path)).json()
            assert final["state"] == "ended" and final["metrics"] == {
                "turns": 4,
                "latency_ms": 12.5,
            }
            assert final["reported_at"] == final["ended_at"]


async def test_tombstone_expires(make_settings: SettingsFactory, redis: Redis) -> None:
    async with api_client(make_settings(tombstone_ttl=1), redis) as client:
        sid = (await start(client, **COUNTER_FAST))["session_id"]
        await wait_state(client, "demo", sid, "ended")
        await asyncio.sleep(1.3)
        assert (await client.get(f"/calls/demo/sessions/{sid}")).status_code == 404
        assert (await client.get("/calls/demo/sessions")).json() == {"sessions": []}


async def test_openapi_documents_every_route(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert {
        "/calls/{call_id}/sessions",
        "/calls/{call_id}/sessions/{session_id}",
        "/calls/{call_id}/sessions/{session_id}/close",
        "/calls/{call_id}/sessions/{session_id}/metrics",
        "/sessions",
        "/nodes",
        "/health",
        "/ready",
        "/metrics",
    } <= set(spec["paths"])


async def test_checkpoint_route_serves_latest_and_kept_versions(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(checkpoint_history=2), redis) as client:
        sid = (await start(client, **COUNTER_FAST))["session_id"]
        await wait_state(client, "demo", sid, "ended")
        latest = (await client.get(f"/calls/demo/sessions/{sid}/checkpoint")).json()
        assert latest["version"] == 3 and latest["epoch"] == 1 and latest["state"] == {"n": 3}
        assert latest["saved_at"] > 0
        older = await client.get(f"/calls/demo/sessions/{sid}/checkpoint", params={"version": 2})
        assert older.json()["state"] == {"n": 2}
        gone = await client.get(f"/calls/demo/sessions/{sid}/checkpoint", params={"version": 1})
        assert gone.status_code == 404 and gone.json()["code"] == "not_found"
        fresh = (await start(client, params={"interval": 60}))["session_id"]
        none_yet = await client.get(f"/calls/demo/sessions/{fresh}/checkpoint")
        assert none_yet.status_code == 404
        assert (await client.get("/calls/demo/sessions/nope/checkpoint")).status_code == 404


async def test_oversized_checkpoint_is_refused_clearly(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(worker="tests.workers:Hoarder", max_checkpoint_bytes=1024)
    async with api_client(settings, redis) as client:
        sid = (await start(client))["session_id"]
        ended = await wait_state(client, "demo", sid, "ended")
        assert ended["end_reason"] == "completed" and ended["checkpoint_version"] == 1
