"""Named workers, placement and migration across real ``fleet serve`` processes and a real
redis-server, with real faults (SIGSTOP, kill -9, SIGTERM).

Invariants: a session runs on a node that runs its worker; no node holds more than its
capacity; a start answered 503 ``start_failed`` never runs; a moved session resumes from
its last checkpoint, never from an older one.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import httpx

from tests.multinode.harness import LocalFleet, NodeProcess

COUNTER = "counter=fleet.workers.counter:Counter"
VOICE = "voice=tests.workers:Voice"
MIGRATABLE = "counter=tests.workers:Migratable"


def sessions_per_node(fleet: LocalFleet, via: NodeProcess | None = None) -> dict[str, int]:
    nodes = fleet.request("GET", "/nodes", via).json()["nodes"]
    return {n["node_id"]: n["sessions"] for n in nodes}


def checkpoint_n(fleet: LocalFleet, call: str, sid: str) -> int:
    resp = fleet.request("GET", f"/calls/{call}/sessions/{sid}/checkpoint")
    return int(resp.json()["state"]["n"]) if resp.status_code == 200 else 0


def test_starts_sent_to_one_node_fill_the_fleet_then_429() -> None:
    with LocalFleet(3, FLEET_MAX_SESSIONS_PER_NODE="4") as fleet:
        first = fleet.nodes[0]
        placed = [fleet.start("c", node=first)["node_id"] for _ in range(12)]
        assert sorted(placed) == sorted(["node-0", "node-1", "node-2"] * 4)
        full = fleet.request("POST", "/calls/c/sessions", first)
        assert full.status_code == 429 and full.json()["code"] == "no_capacity", full.text
        assert sessions_per_node(fleet) == {"node-0": 4, "node-1": 4, "node-2": 4}


def test_heterogeneous_nodes_run_only_their_workers() -> None:
    with LocalFleet(0) as fleet:
        plain = fleet.add_node("plain", FLEET_WORKER=COUNTER)
        fleet.add_node("gpu-0", FLEET_WORKER=f"{VOICE},{COUNTER}")
        listed = {w["name"]: w for w in fleet.request("GET", "/workers", plain).json()["workers"]}
        assert listed["voice"]["nodes"] == ["gpu-0"]
        assert listed["voice"]["params_schema"]["required"] == ["language"]
        # Asked of a node that does not run it: placed on one that does, params checked there.
        voice = fleet.start("c", node=plain, worker="voice", params={"language": "en"})
        assert voice["node_id"] == "gpu-0" and voice["worker"] == "voice"
        bad = fleet.request(
            "POST", "/calls/c/sessions", plain, json={"worker": "voice", "params": {}}
        )
        assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == [
            "params",
            "language",
        ]
        unknown = fleet.request("POST", "/calls/c/sessions", plain, json={"worker": "coder"})
        assert unknown.status_code == 422 and unknown.json()["code"] == "unknown_worker"

        # A second voice node: when gpu-0 dies, its voice session resumes there, never on
        # the plain node, which has room but does not run the worker.
        fleet.add_node("gpu-1", FLEET_WORKER=VOICE)
        fleet.node_named("gpu-0").signal(signal.SIGKILL)
        moved = fleet.wait_session("c", voice["session_id"], via=plain, node_id="gpu-1")
        assert moved["state"] in ("starting", "running") and moved["resumed_count"] == 1

        # When the last voice node dies, the session ends node_lost, saying why.
        fleet.node_named("gpu-1").signal(signal.SIGKILL)
        lost = fleet.wait_session("c", voice["session_id"], via=plain, state="ended")
        assert lost["end_reason"] == "node_lost" and lost["error"] == "no_node_runs_worker"


def test_a_target_frozen_during_a_forward_starts_nothing_and_its_slot_comes_back() -> None:
    with LocalFleet(0) as fleet:
        plain = fleet.add_node("plain", FLEET_WORKER=COUNTER)
        gpu = fleet.add_node("gpu", FLEET_WORKER=VOICE)
        gpu.signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            answer = fleet.request(
                "POST",
                "/calls/c/sessions",
                plain,
                json={"worker": "voice", "params": {"language": "en"}},
            )
            assert answer.status_code == 503 and answer.json()["code"] == "start_failed"
            assert time.monotonic() - began < 8  # bounded: FORWARD_WAIT, not a hang
        finally:
            gpu.signal(signal.SIGCONT)
        # Woken up, the target finds the start given up: it runs nothing, frees the slot.
        deadline = time.monotonic() + 10
        while sessions_per_node(fleet).get("gpu") != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sessions_per_node(fleet)["gpu"] == 0
        listed = fleet.request("GET", "/calls/c/sessions", plain).json()["sessions"]
        assert [(s["state"], s["error"]) for s in listed] == [("ended", "not_started")]
        ok = fleet.start("c", node=plain, worker="voice", params={"language": "en"})
        assert ok["node_id"] == "gpu" and ok["state"] == "running"


def test_a_target_killed_during_a_forward_leaves_no_slot_behind() -> None:
    with LocalFleet(0, FLEET_NODE_TTL="2") as fleet:
        plain = fleet.add_node("plain", FLEET_WORKER=COUNTER)
        gpu = fleet.add_node("gpu", FLEET_WORKER=VOICE)
        gpu.signal(signal.SIGSTOP)
        answer = fleet.request(
            "POST",
            "/calls/c/sessions",
            plain,
            json={"worker": "voice", "params": {"language": "en"}},
        )
        assert answer.status_code == 503 and answer.json()["code"] == "start_failed"
        gpu.signal(signal.SIGKILL)
        # The dead node's slot is reaped like any dead node's: nothing is left live.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if set(sessions_per_node(fleet, plain)) == {"plain"}:
                break
            time.sleep(0.2)
        assert sessions_per_node(fleet, plain) == {"plain": 0}
        assert fleet.request("GET", "/sessions?state=running", plain).json()["sessions"] == []


def test_migrate_moves_a_session_during_its_checkpoints() -> None:
    with LocalFleet(2) as fleet:
        a, b = fleet.nodes
        # A checkpoint every few milliseconds: the migration lands in the middle of them.
        sid = fleet.start("c", node=a, params={"interval": 0.005})["session_id"]
        seen: list[int] = []
        for hop in range(4):
            owner = fleet.session("c", sid)["node_id"]
            time.sleep(0.2)
            before = checkpoint_n(fleet, "c", sid)
            moved = fleet.request("POST", f"/calls/c/sessions/{sid}/migrate", b if hop % 2 else a)
            assert moved.status_code == 202 and moved.json()["node_id"] == owner, moved.text
            info = fleet.wait_session("c", sid, state="running", resumed_count=hop + 1)
            assert info["node_id"] != owner
            after = checkpoint_n(fleet, "c", sid)
            assert after >= before  # resumed from the last checkpoint, never an older one
            seen.append(after)
        assert seen == sorted(seen)
        metrics = [fleet.http.get(f"{n.url}/metrics").text for n in (a, b)]
        # No write was fenced: every checkpoint was made by the owner of its epoch.
        assert all('fleet_checkpoints_total{result="stale"} 0.0' in m for m in metrics)


def test_migrate_refusals() -> None:
    with LocalFleet(1) as fleet:
        sid = fleet.start("c")["session_id"]
        alone = fleet.request("POST", f"/calls/c/sessions/{sid}/migrate")
        assert alone.status_code == 409 and alone.json()["code"] == "no_target"
        pinned = fleet.start("c", resumable=False)["session_id"]
        refused = fleet.request("POST", f"/calls/c/sessions/{pinned}/migrate")
        assert refused.status_code == 409 and refused.json()["code"] == "not_resumable"


def drain_seconds(node: NodeProcess) -> float:
    began = time.monotonic()
    node.signal(signal.SIGTERM)
    assert node.wait(30) == 0
    return time.monotonic() - began


def test_a_draining_node_hands_migratable_sessions_off_at_once() -> None:
    with LocalFleet(3, FLEET_WORKER=MIGRATABLE, FLEET_DRAIN_TIMEOUT="30") as fleet:
        first = fleet.nodes[0]
        sids = [
            fleet.start("c", node=first, params={"interval": 0.05})["session_id"] for _ in range(20)
        ]
        assert sessions_per_node(fleet)["node-0"] == 20
        assert drain_seconds(first) < 10  # not FLEET_DRAIN_TIMEOUT
        for sid in sids:
            info: dict[str, Any] = fleet.wait_session("c", sid, state="running", resumed_count=1)
            assert info["node_id"] in ("node-1", "node-2")
        assert sum(sessions_per_node(fleet).values()) == 20


def test_starts_through_any_node_never_fail_while_one_drains() -> None:
    with LocalFleet(3, FLEET_DRAIN_TIMEOUT="30") as fleet:
        draining = fleet.nodes[0]
        fleet.start("c", node=draining, params={"interval": 0.05})  # keeps the drain going
        draining.signal(signal.SIGTERM)
        time.sleep(0.2)
        answers: list[httpx.Response] = []
        for _ in range(30):
            for node in fleet.nodes:
                answers.append(fleet.request("POST", "/calls/c/sessions", node))
        assert [a.status_code for a in answers] == [201] * len(answers)
        assert {a.json()["node_id"] for a in answers} == {"node-1", "node-2"}
        draining.signal(signal.SIGKILL)
