"""Shutdown is bounded, whatever the workers do, and a second signal or a lone node does
not wait out the drain."""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path

import httpx

from tests.multinode.harness import LocalFleet, LoneNode

ROOT = Path(__file__).resolve().parents[2]


def _exits_within(proc_wait: object, limit: float) -> float:
    began = time.monotonic()
    assert callable(proc_wait)
    proc_wait(limit)
    return time.monotonic() - began


def test_sigterm_exits_within_its_bound_with_a_worker_that_ignores_cancellation() -> None:
    with LocalFleet(
        2,
        FLEET_WORKER="tests.workers:Deaf",
        FLEET_DRAIN_TIMEOUT="1",
        FLEET_CLOSE_GRACE="1",
        PYTHONPATH=str(ROOT),
    ) as fleet:
        leaving, staying = fleet.nodes
        sid = fleet.start("c", node=leaving)["session_id"]
        leaving.signal(signal.SIGTERM)
        took = _exits_within(leaving.wait, 20)
        # drain 1 + grace 1 + cancel grace 2, and a little: well inside the watchdog's bound
        assert took < 1 + 1 + 2 + 4, took
        assert leaving.wait(0) == 0
        info = fleet.wait_session("c", sid, timeout=5, via=staying, state="ended")
        assert info["end_reason"] == "node_shutdown"
        log = leaving.log()
        assert "did not stop when cancelled" in log
        assert "Traceback" not in log


def test_a_second_signal_exits_at_once_and_the_session_resumes_elsewhere() -> None:
    with LocalFleet(2, FLEET_DRAIN_TIMEOUT="30", FLEET_NODE_TTL="2") as fleet:
        leaving, staying = fleet.nodes
        sid = fleet.start("c", node=leaving, params={"interval": 0.1})["session_id"]
        leaving.signal(signal.SIGTERM)
        time.sleep(0.5)
        leaving.signal(signal.SIGTERM)
        took = _exits_within(leaving.wait, 10)
        assert took < 2.0, took
        assert "second signal: exiting now" in leaving.log()
        info = fleet.wait_session("c", sid, timeout=10, via=staying, state="running", epoch=2)
        assert info["node_id"] == staying.name


def test_ctrl_c_on_a_lone_embedded_node_does_not_wait_out_the_drain() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "node.log"
        settings = {"FLEET_DRAIN_TIMEOUT": "30", "FLEET_CLOSE_GRACE": "1"}
        with LoneNode(log, **settings) as node:
            assert httpx.post(f"{node.url}/calls/c/sessions", timeout=5).status_code == 201
            assert node.proc is not None
            node.proc.send_signal(signal.SIGINT)
            took = _exits_within(node.proc.wait, 15)
            assert took < 1 + 3, (took, node.log())
            assert node.proc.returncode == 0
            assert "no other node to hand 1 sessions to" in node.log()
