"""/metrics: the figures follow what happened; names pass promtool; series stay bounded."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.test_sessions import start, wait_state


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def test_figures_follow_the_sessions(client: httpx.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    sids = [(await start(client, f"call-{i}"))["session_id"] for i in range(3)]
    resp = await client.delete(f"/calls/call-0/sessions/{sids[0]}", params={"wait": 5})
    assert resp.status_code == 200
    rejected = await client.post("/calls/x/sessions", json={"params": {"interval": -1}})
    assert rejected.status_code == 422
    after = (await client.get("/metrics")).text

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("fleet_sessions_started_total") == 3
    assert delta("fleet_sessions_ended_total", reason="closed") == 1
    assert value(after, "fleet_sessions_active", state="running") == 2
    assert delta("fleet_session_start_seconds_count") == 3
    assert delta("fleet_session_close_seconds_count") == 1
    assert value(after, "fleet_redis_up") == 1 and value(after, "fleet_node_ready") == 1
    assert (
        delta(
            "fleet_http_requests_total",
            method="POST",
            route="/calls/{call_id}/sessions",
            status="2xx",
        )
        == 3
    )
    assert delta("fleet_redis_command_seconds_count", command="place") == 3
    # Series for later events exist at zero already, so rate() and increase() see the first.
    assert ("fleet_failovers_total", (("result", "lost"),)) in samples(after)


async def test_series_do_not_grow_with_sessions_or_calls(client: httpx.AsyncClient) -> None:
    async def traffic(call: str) -> None:
        sid = (await start(client, call))["session_id"]
        await client.get(f"/calls/{call}/sessions/{sid}")
        await client.get(f"/calls/{call}/sessions")
        await client.get(f"/calls/{call}/sessions/unknown-{call}")

    await traffic("warm-up")
    node = client._transport.app.state.node  # type: ignore[attr-defined]
    await node.maintain()
    first = set(samples((await client.get("/metrics")).text))
    for i in range(25):
        await traffic(f"c{i}")
    await node.maintain()  # its pipelined reads are labelled by script, not by chunk count
    second = set(samples((await client.get("/metrics")).text))
    assert second == first
    assert not any(re.search(r"c\d+|unknown|warm-up", str(labels)) for _, labels in second)


async def test_promtool_accepts_real_output(client: httpx.AsyncClient) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: apt-get install -y prometheus", pytrace=False)
    sid = (await start(client))["session_id"]
    await client.delete(f"/calls/demo/sessions/{sid}", params={"wait": 5})
    text = (await client.get("/metrics")).text
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == "", check.stderr


async def test_ended_by_reason_counts_completions(client: httpx.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    sid = (await start(client, params={"interval": 0.01, "limit": 2}))["session_id"]
    await wait_state(client, "demo", sid, "ended")
    after = (await client.get("/metrics")).text
    key = {"reason": "completed"}
    assert (
        value(after, "fleet_sessions_ended_total", **key)
        - value(before, "fleet_sessions_ended_total", **key)
        == 1
    )
