"""Several real ``fleet serve`` processes on one real redis-server."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.multinode.harness import LocalFleet
from tests.redis_server import RedisServer


def test_close_through_another_node_is_immediate() -> None:
    # The maintenance pass is far away: only the pub/sub message can close the session.
    with LocalFleet(3, FLEET_MAINTENANCE_INTERVAL="60") as fleet:
        a, b, _ = fleet.nodes
        sid = fleet.start(node=a)["session_id"]
        assert fleet.session("demo", sid, node=b)["node_id"] == "node-0"
        began = time.monotonic()
        resp = fleet.request("DELETE", f"/calls/demo/sessions/{sid}", b, params={"wait": 5})
        elapsed = time.monotonic() - began
        assert resp.status_code == 200, resp.text
        assert resp.json()["state"] == "ended" and resp.json()["end_reason"] == "closed"
        assert elapsed < 1.0
        # Without wait: 202 from a third node, and the session is ended well within 1 s.
        sid2 = fleet.start(node=a)["session_id"]
        began = time.monotonic()
        assert fleet.request("DELETE", f"/calls/demo/sessions/{sid2}", b).status_code == 202
        fleet.wait_session("demo", sid2, timeout=1.0, state="ended", end_reason="closed")
        assert time.monotonic() - began < 1.0


def test_any_node_lists_and_reads_any_session() -> None:
    with LocalFleet(3) as fleet:
        sids = {fleet.start("room")["session_id"] for _ in range(6)}
        owners = {fleet.session("room", sid)["node_id"] for sid in sids}
        assert owners == {"node-0", "node-1", "node-2"}
        for node in fleet.nodes:
            listed = fleet.request("GET", "/calls/room/sessions", node).json()["sessions"]
            assert {s["session_id"] for s in listed} == sids
            nodes = fleet.request("GET", "/nodes", node).json()["nodes"]
            assert sorted(n["node_id"] for n in nodes) == ["node-0", "node-1", "node-2"]
            assert sum(n["sessions"] for n in nodes) == 6


def _race_answers(
    fleet: LocalFleet, call: str, n: int, headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    urls = [node.url for node in fleet.nodes]

    def one(i: int) -> httpx.Response:
        with httpx.Client(timeout=10) as client:
            return client.post(f"{urls[i % len(urls)]}/calls/{call}/sessions", headers=headers)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def _race(fleet: LocalFleet, call: str, n: int) -> list[int]:
    return [resp.status_code for resp in _race_answers(fleet, call, n)]


def test_repeats_of_one_start_across_nodes_start_one_session() -> None:
    # A start that takes 0.3 s: the repeats on the other node find it in progress and wait.
    with LocalFleet(2, FLEET_WORKER="tests.workers:SlowStart") as fleet:
        answers = _race_answers(fleet, "once", 20, {"Idempotency-Key": "the-only-one"})
        assert [r.status_code for r in answers] == [201] * 20, [r.text for r in answers]
        assert len({r.text for r in answers}) == 1
        for node in fleet.nodes:
            listed = fleet.request("GET", "/calls/once/sessions", node).json()["sessions"]
            assert [s["session_id"] for s in listed] == [answers[0].json()["session_id"]]


def test_per_call_limit_holds_across_nodes() -> None:
    with LocalFleet(3, FLEET_MAX_SESSIONS_PER_CALL="1") as fleet:
        codes = _race(fleet, "one-call", 50)
        assert codes.count(201) == 1 and codes.count(429) == 49
        # Other calls are not affected.
        assert fleet.request("POST", "/calls/another/sessions").status_code == 201


def test_fleet_wide_limit_holds_and_frees_on_close() -> None:
    with LocalFleet(3, FLEET_MAX_SESSIONS="5") as fleet:
        codes = _race(fleet, "many", 50)
        assert codes.count(201) == 5 and codes.count(429) == 45
        rejected = fleet.request("POST", "/calls/x/sessions")
        assert rejected.status_code == 429 and rejected.json()["code"] == "max_sessions"
        live = fleet.request("GET", "/sessions", params={"state": "running"}).json()["sessions"]
        assert len(live) == 5
        victim = live[0]
        closed = fleet.request(
            "DELETE", f"/calls/{victim['call_id']}/sessions/{victim['session_id']}",
            params={"wait": 5},
        )  # fmt: skip
        assert closed.status_code == 200
        assert fleet.request("POST", "/calls/x/sessions").status_code == 201
        assert fleet.request("POST", "/calls/x/sessions").status_code == 429


def test_killed_node_unresumable_sessions_end_as_node_lost() -> None:
    with LocalFleet(3, FLEET_NODE_TTL="2", FLEET_MAINTENANCE_INTERVAL="0.5") as fleet:
        victim = fleet.nodes[0]
        lost = [fleet.start("c", node=victim, resumable=False)["session_id"] for _ in range(4)]
        kept = fleet.start("c", node=fleet.nodes[1])["session_id"]
        victim.signal(signal.SIGKILL)
        victim.wait(5)
        began = time.monotonic()
        for sid in lost:
            fleet.wait_session("c", sid, timeout=6, state="ended", end_reason="node_lost")
        # Within the lease plus one maintenance interval (and some slack for a busy box).
        assert time.monotonic() - began < 2 + 0.5 + 1.5
        assert fleet.session("c", kept)["state"] == "running"
        nodes = fleet.request("GET", "/nodes").json()["nodes"]
        assert sorted(n["node_id"] for n in nodes) == ["node-1", "node-2"]
        assert (
            fleet.request("GET", "/sessions", params={"node_id": "node-0"}).json()["sessions"] == []
        )


def test_redis_restart_without_data_is_recovered() -> None:
    redis = RedisServer().start()
    again = RedisServer(redis.port)
    try:
        with LocalFleet(3, redis=redis, FLEET_NODE_TTL="3") as fleet:
            sids = [fleet.start("c")["session_id"] for _ in range(3)]
            redis.stop()
            for node in fleet.nodes:
                deadline = time.monotonic() + 3.0
                while (ready := fleet.http.get(f"{node.url}/ready")).status_code == 200:
                    assert time.monotonic() < deadline, "still ready with Redis gone"
                    time.sleep(0.05)
                assert ready.status_code == 503, ready.text
                while ready.json()["reason"] != "redis_unavailable":
                    assert time.monotonic() < deadline, ready.text
                    time.sleep(0.05)
                    ready = fleet.http.get(f"{node.url}/ready")
                assert fleet.http.get(f"{node.url}/health").status_code == 200
                start = fleet.http.post(f"{node.url}/calls/c/sessions")
                assert start.status_code == 503, start.text
            again.start()  # empty: nothing was persisted
            recovered = fleet.wait_ready(timeout=10)
            assert recovered < 2.0, recovered
            for sid in sids:
                # Every session is back within 2 s. (A read may still miss one for a
                # moment after every node answers ready: seen about once in five runs,
                # before and after #17; see the closing note of that stop.)
                deadline = time.monotonic() + 2
                while fleet.request("GET", f"/calls/c/sessions/{sid}").status_code == 404:
                    assert time.monotonic() < deadline, f"session {sid} was forgotten"
                    time.sleep(0.05)
                fleet.wait_session("c", sid, timeout=2, state="running")
            listed = fleet.request("GET", "/calls/c/sessions").json()["sessions"]
            assert {s["session_id"] for s in listed} == set(sids)
            # And they can still be closed from anywhere.
            for sid in sids:
                resp = fleet.request("DELETE", f"/calls/c/sessions/{sid}", params={"wait": 5})
                assert resp.json()["end_reason"] == "closed"
    finally:
        redis.stop()
        again.stop()


def test_after_an_empty_redis_restart_requests_succeed_and_a_drain_hands_off() -> None:
    """Every pooled connection is stale after a restart: each call that meets one is retried
    on a fresh connection, so once Redis has been back 2 s no request fails, and a drain
    hands its sessions off instead of ending them ``node_shutdown``."""
    redis = RedisServer().start()
    again = RedisServer(redis.port)
    try:
        with LocalFleet(3, redis=redis, FLEET_NODE_TTL="3", FLEET_DRAIN_TIMEOUT="0.5") as fleet:
            leaving = fleet.nodes[0]
            sids = [fleet.start("c", node=leaving)["session_id"] for _ in range(8)]
            paths = [f"/calls/c/sessions/{sid}" for sid in sids]

            def burst() -> list[int]:
                # Concurrent requests to every node: each pool opens several connections.
                jobs = [(node, path) for node in fleet.nodes for path in paths] * 3
                with ThreadPoolExecutor(16) as pool:
                    return list(
                        pool.map(lambda job: fleet.request("GET", job[1], job[0]).status_code, jobs)
                    )

            assert set(burst()) == {200}
            redis.stop()
            again.start()  # empty
            fleet.wait_ready(timeout=10)
            time.sleep(2.0)
            statuses = burst() + burst()
            assert set(statuses) == {200}, sorted(set(statuses))
            leaving.signal(signal.SIGTERM)
            staying = fleet.nodes[1]
            for sid in sids:
                info = fleet.wait_session(
                    "c", sid, timeout=8, via=staying, state="running", epoch=2
                )
                assert info["node_id"] != leaving.name
            assert leaving.wait(10) == 0
    finally:
        redis.stop()
        again.stop()


def test_outage_longer_than_the_lease_stops_sessions() -> None:
    redis = RedisServer().start()
    try:
        with LocalFleet(2, redis=redis, FLEET_NODE_TTL="1.5") as fleet:
            sids = [fleet.start("c")["session_id"] for _ in range(2)]
            assert redis.proc is not None
            redis.proc.send_signal(signal.SIGSTOP)  # Redis hangs, keeping its data
            time.sleep(3.0)
            redis.proc.send_signal(signal.SIGCONT)
            fleet.wait_ready(timeout=10)
            for sid in sids:
                fleet.wait_session("c", sid, timeout=5, state="ended", end_reason="node_lost")
            assert fleet.request("POST", "/calls/c/sessions").status_code == 201
    finally:
        if redis.proc is not None:
            redis.proc.send_signal(signal.SIGCONT)
        redis.stop()


def test_sigterm_drains_and_exits_zero() -> None:
    with LocalFleet(2, FLEET_DRAIN_TIMEOUT="5") as fleet:
        node = fleet.nodes[0]
        sid = fleet.start("c", node=node, params={"interval": 0.05, "limit": 20})["session_id"]
        node.signal(signal.SIGTERM)
        time.sleep(0.2)
        ready = fleet.http.get(f"{node.url}/ready")
        assert ready.status_code == 503 and ready.json()["reason"] == "draining"
        # A draining node does not refuse a start: it places it on the other node.
        placed = fleet.http.post(f"{node.url}/calls/c/sessions")
        assert placed.status_code == 201 and placed.json()["node_id"] == fleet.nodes[1].name
        assert node.wait(15) == 0
        assert fleet.session("c", sid)["end_reason"] == "completed"
