"""A session's ``…/metrics`` read through a node that does not run it, on real ``fleet serve``
processes (on one redis-server, and on a Redis Cluster, where the sessions' records live in
several hash slots): the owner's reports reach every node, during the session and after
its end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from fleet.cli import main as cli
from tests.multinode.harness import LocalFleet, NodeProcess
from tests.redis_server import RedisServer
from tests.topologies import LocalCluster

INTERVAL = 0.3
# On Cluster: several slots, and two sessions in one.
CALLS = ["room-0", "room-1", "room-1", "room-2", "room-3"]


@pytest.fixture(params=["redis-server", "cluster"])
def redis(request: pytest.FixtureRequest) -> Iterator[RedisServer | LocalCluster]:
    try:
        server = LocalCluster().start() if request.param == "cluster" else RedisServer().start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


def metrics(fleet: LocalFleet, call: str, sid: str, node: NodeProcess) -> dict[str, Any]:
    resp = fleet.request("GET", f"/calls/{call}/sessions/{sid}/metrics", node)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def show(
    capsys: pytest.CaptureFixture[str], call: str, sid: str, node: NodeProcess
) -> dict[str, str]:
    assert cli.main(["sessions", "show", call, sid, "--url", node.url]) == 0
    out = capsys.readouterr().out
    return dict(line.split(None, 1) for line in out.splitlines() if " " in line)


def test_metrics_through_a_node_that_does_not_own_the_sessions(
    redis: RedisServer | LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    with LocalFleet(
        2,
        redis=redis,
        FLEET_WORKER="tests.workers:Metered",
        FLEET_METRICS_REPORT_INTERVAL=str(INTERVAL),
    ) as fleet:
        owner, other = fleet.nodes
        began = time.time()
        sids = [(call, fleet.start(call, node=owner)["session_id"]) for call in CALLS]
        for call, sid in sids:
            assert fleet.session(call, sid, other)["node_id"] == owner.name
            deadline = time.monotonic() + INTERVAL + 1.0  # the interval, and a margin
            while (seen := metrics(fleet, call, sid, other))["reported_at"] is None:
                assert time.monotonic() < deadline, f"not reported within {INTERVAL}s: {seen}"
                time.sleep(0.02)
            assert seen["metrics"] == {"turns": 3, "latency_ms": 12.5}
            assert type(seen["metrics"]["turns"]) is int
            assert began <= seen["reported_at"] <= time.time()

        call, sid = sids[0]
        shown = show(capsys, call, sid, other)
        assert shown["node"] == owner.name
        assert shown["metrics"].startswith("latency_ms=12.5 turns=3 (as of ")

        path = f"/calls/{call}/sessions/{sid}"
        closed = fleet.request("DELETE", path, other, params={"wait": 5})
        assert closed.status_code == 200 and closed.json()["state"] == "ended", closed.text
        for node in (other, owner):
            final = metrics(fleet, call, sid, node)
            assert final["state"] == "ended", final
            # The worker's last turn, taken on its way out: only the end reported it.
            assert final["metrics"] == {"turns": 4, "latency_ms": 12.5}
            assert final["reported_at"] == final["ended_at"]
        assert show(capsys, call, sid, other)["metrics"].startswith("latency_ms=12.5 turns=4 ")
