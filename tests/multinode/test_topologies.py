"""The multi-node suite's core cases on a real Redis Cluster and a real Sentinel setup."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.multinode.harness import LocalFleet
from tests.topologies import LocalCluster, LocalSentinel

Topology = LocalCluster | LocalSentinel


@pytest.fixture(params=["cluster", "sentinel"])
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    try:
        topo: Topology = LocalCluster() if request.param == "cluster" else LocalSentinel()
        topo.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield topo
    topo.stop()


def test_close_through_another_node(topology: Topology) -> None:
    with LocalFleet(2, redis=topology, FLEET_MAINTENANCE_INTERVAL="60") as fleet:
        a, b = fleet.nodes
        sids = [fleet.start(f"call-{i}", node=a)["session_id"] for i in range(5)]
        for i, sid in enumerate(sids):
            began = time.monotonic()
            resp = fleet.request("DELETE", f"/calls/call-{i}/sessions/{sid}", b, params={"wait": 5})
            assert resp.status_code == 200 and resp.json()["end_reason"] == "closed"
            assert time.monotonic() - began < 1.0
        listed = fleet.request("GET", "/sessions", b, params={"state": "ended"}).json()
        assert {s["session_id"] for s in listed["sessions"]} == set(sids)


def test_admission_race(topology: Topology) -> None:
    with LocalFleet(
        3, redis=topology, FLEET_MAX_SESSIONS_PER_CALL="1", FLEET_MAX_SESSIONS="4"
    ) as fleet:
        urls = [node.url for node in fleet.nodes]

        def one(i: int) -> int:
            with httpx.Client(timeout=10) as client:
                return client.post(f"{urls[i % 3]}/calls/race/sessions").status_code

        with ThreadPoolExecutor(max_workers=30) as pool:
            codes = list(pool.map(one, range(30)))
        assert codes.count(201) == 1 and codes.count(429) == 29
        with ThreadPoolExecutor(max_workers=30) as pool:
            others = list(pool.map(lambda i: _start(urls[i % 3], i), range(30)))
        assert others.count(201) == 3  # 4 fleet-wide, one already taken


def _start(url: str, i: int) -> int:
    with httpx.Client(timeout=10) as client:
        return client.post(f"{url}/calls/c{i}/sessions").status_code


def test_dead_node_sessions_resume(topology: Topology) -> None:
    with LocalFleet(3, redis=topology, FLEET_NODE_TTL="2") as fleet:
        victim = fleet.nodes[0]
        sids = [
            fleet.start(f"c{i}", node=victim, params={"interval": 0.05})["session_id"]
            for i in range(4)
        ]
        time.sleep(0.4)
        victim.signal(signal.SIGKILL)
        victim.wait(5)
        for i, sid in enumerate(sids):
            info = fleet.wait_session(f"c{i}", sid, timeout=10, state="running", epoch=2)
            assert info["node_id"] != victim.name and info["checkpoint_version"] >= 5


def test_sentinel_failover_keeps_sessions_running() -> None:
    topo = LocalSentinel().start()
    try:
        with LocalFleet(2, redis=topo, FLEET_NODE_TTL="10") as fleet:
            sids = [fleet.start(f"c{i}", params={"interval": 0.1})["session_id"] for i in range(4)]
            time.sleep(0.5)
            before = {
                sid: fleet.session(f"c{i}", sid)["checkpoint_version"] for i, sid in enumerate(sids)
            }
            topo.failover()
            fleet.wait_ready(timeout=20)
            time.sleep(1.0)
            for i, sid in enumerate(sids):
                info = fleet.session(f"c{i}", sid)
                assert info["state"] == "running" and info["epoch"] == 1
                assert info["checkpoint_version"] > before[sid]
            assert fleet.request("POST", "/calls/after/sessions").status_code == 201
    finally:
        topo.stop()


def test_events_on_cluster_are_refused_clearly() -> None:
    cluster = LocalCluster().start()
    try:
        with LocalFleet(1, redis=cluster) as fleet:
            sid = fleet.start("c")["session_id"]
            resp = fleet.request("GET", f"/calls/c/sessions/{sid}/events")
            assert resp.status_code == 501 and resp.json()["code"] == "events_unavailable"
            assert "Cluster" in resp.json()["detail"]
    finally:
        cluster.stop()
