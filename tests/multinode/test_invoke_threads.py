"""Invoke and threads across real ``fleet serve`` processes and faults: an invoke's answer
still comes when the node running the session is killed (a retry with the same
Idempotency-Key waits for the resumed session) or drains (the session is handed off and the
asked node's wait follows it); a thread's conversation goes on across three sessions and a
kill -9, also when the kill comes before a new session's first checkpoint."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.multinode.harness import LocalFleet, NodeProcess

STEPS = "tests.workers:Steps"


def _invoke(fleet: LocalFleet, node: NodeProcess, body: dict[str, Any], key: str) -> httpx.Response:
    return fleet.request(
        "POST",
        "/calls/inv/sessions",
        node,
        params={"wait": 30},
        json=body,
        headers={"Idempotency-Key": key},
        timeout=40,
    )


def _running(fleet: LocalFleet, via: NodeProcess) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while not (listed := fleet.request("GET", "/calls/inv/sessions", via).json()["sessions"]):
        assert time.monotonic() < deadline, "the invoke's session did not start"
        time.sleep(0.02)
    info: dict[str, Any] = listed[0]
    return info


def test_an_invoke_retried_after_a_kill_answers_with_the_resumed_sessions_result() -> None:
    with LocalFleet(3, FLEET_WORKER=STEPS, FLEET_NODE_TTL="2") as fleet:
        a, b, _ = fleet.nodes
        body = {"params": {"steps": 30, "interval": 0.1}}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_invoke, fleet, a, body, "inv-1")
            started = _running(fleet, b)
            assert started["node_id"] == a.name
            time.sleep(0.5)
            a.signal(signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                first.result()
        info = _invoke(fleet, b, body, "inv-1").json()  # the client's retry
        assert info["session_id"] == started["session_id"]
        assert (info["state"], info["end_reason"]) == ("ended", "completed"), info
        assert info["result"] == {"steps": 30}
        assert info["epoch"] == 2 and info["node_id"] != a.name


def test_an_invoke_follows_its_session_through_a_drains_hand_off() -> None:
    with LocalFleet(2, FLEET_WORKER=STEPS, FLEET_DRAIN_TIMEOUT="0", FLEET_CLOSE_GRACE="3") as fleet:
        a, b = fleet.nodes
        body = {"params": {"steps": 15, "interval": 0.1}}
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(_invoke, fleet, a, body, "inv-2")
            started = _running(fleet, b)
            time.sleep(0.2)
            a.signal(signal.SIGTERM)  # hands the session to b at once
            resp = answer.result(timeout=30)
        assert resp.status_code == 201, resp.text
        info = resp.json()
        assert info["session_id"] == started["session_id"]
        assert (info["state"], info["end_reason"]) == ("ended", "completed"), info
        assert info["result"] == {"steps": 15} and info["node_id"] == b.name
        assert a.wait(10) == 0


def _say(fleet: LocalFleet, via: NodeProcess, data: Any, **body: Any) -> dict[str, Any]:
    resp = fleet.request(
        "POST",
        "/threads/conv/messages",
        via,
        params={"wait": 15},
        json={"data": data, "id": f"m-{data}", **body},
        timeout=20,
    )
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def test_a_thread_goes_on_across_three_sessions_and_kills() -> None:
    with LocalFleet(3, FLEET_WORKER="tests.workers:Echo", FLEET_NODE_TTL="2") as fleet:
        n0, n1, n2 = fleet.nodes
        first = _say(fleet, n0, "m1")
        assert first["started"] and first["reply"] == {"echo": "m1", "count": 1}
        sid1 = first["session_id"]
        assert _say(fleet, n1, "m2")["session_id"] == sid1
        n0.signal(signal.SIGKILL)  # the owner of session 1
        third = _say(fleet, n1, "m3")  # reaches session 1 once it resumed elsewhere
        assert third["session_id"] == sid1 and third["reply"]["count"] == 3
        assert fleet.session("conv", sid1, n1)["epoch"] == 2
        fleet.request("DELETE", f"/calls/conv/sessions/{sid1}", n2, params={"wait": 5})

        fourth = _say(fleet, n2, "m4")  # session 2
        assert fourth["started"] and fourth["session_id"] != sid1
        assert fourth["reply"]["count"] == 4
        fleet.request(
            "DELETE", f"/calls/conv/sessions/{fourth['session_id']}", n1, params={"wait": 5}
        )

        # Session 3 starts on the thread without a message, on n1, which is killed before
        # it writes any checkpoint: resumed elsewhere, it starts from the thread's state.
        resp = fleet.request(
            "POST", "/calls/conv/sessions", n1, json={"thread_id": "conv"}, timeout=10
        )
        assert resp.status_code == 201, resp.text
        sid3 = resp.json()["session_id"]
        n1.signal(signal.SIGKILL)
        fifth = _say(fleet, n2, "m5")
        assert fifth["session_id"] == sid3 and fifth["reply"]["count"] == 5

        thread = fleet.request("GET", "/threads/conv", n2).json()
        assert thread["state"] == {"heard": ["m1", "m2", "m3", "m4", "m5"]}
        assert [s["session_id"] for s in thread["sessions"]][::-1][0] == sid1
        assert len(thread["sessions"]) == 3
        assert thread["live_session"] == {"call_id": "conv", "session_id": sid3}
