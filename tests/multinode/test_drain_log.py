"""What a drained node says about its sessions: a hand-off is logged as a hand-off, not also
as an end; a session no node could take is logged as ended (node_shutdown)."""

from __future__ import annotations

import signal

from tests.multinode.harness import LocalFleet

FAST = {"interval": 0.05}


def lines_about(log: str, session_id: str) -> list[str]:
    return [line for line in log.splitlines() if f"session_id={session_id}" in line]


def test_a_drained_node_logs_a_hand_off_alone() -> None:
    with LocalFleet(2, FLEET_DRAIN_TIMEOUT="0.5", FLEET_MAINTENANCE_INTERVAL="60") as fleet:
        leaving, staying = fleet.nodes
        moved = fleet.start("c", node=leaving, params=FAST)["session_id"]
        pinned = fleet.start("c", node=leaving, resumable=False, params=FAST)["session_id"]
        leaving.signal(signal.SIGTERM)
        assert leaving.wait(15) == 0, leaving.log()[-3000:]
        fleet.wait_session("c", moved, timeout=5, via=staying, state="running", epoch=2)
        log = leaving.log()

    about_moved = lines_about(log, moved)
    assert any(f"session handed off to {staying.name}" in line for line in about_moved), log
    assert not any("session ended" in line for line in about_moved), about_moved
    about_pinned = lines_about(log, pinned)
    assert any("session ended (node_shutdown)" in line for line in about_pinned), about_pinned
