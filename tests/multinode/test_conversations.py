"""Conversations across real nodes and faults: every message sent is applied to the
checkpointed state exactly once, in order, whichever node runs the session and however it
moves (kill -9 of the owner, a drain's hand-off)."""

from __future__ import annotations

import itertools
import signal
import time
from typing import Any

import httpx

from tests.multinode.harness import LocalFleet, NodeProcess

SESSIONS = 6
MESSAGES = 40  # per session


def _send(fleet: LocalFleet, sid: str, i: int, alive: list[NodeProcess]) -> None:
    """Send message ``i`` through any live node, retrying with the same id until one takes
    it: a send is accepted once, whatever the retries."""
    for attempt in itertools.count():
        node = alive[(i + attempt) % len(alive)]
        try:
            resp = fleet.request(
                "POST",
                f"/calls/chat/sessions/{sid}/messages",
                node,
                json={"data": i, "id": f"{sid}-{i}"},
                timeout=5,
            )
        except httpx.HTTPError:
            resp = None
        if resp is not None and resp.status_code == 202:
            return
        assert attempt < 50, resp.text if resp is not None else "no answer"
        time.sleep(0.1)


def _heard(fleet: LocalFleet, sid: str, via: NodeProcess) -> list[Any]:
    resp = fleet.request("GET", f"/calls/chat/sessions/{sid}/checkpoint", via)
    if resp.status_code != 200:
        return []
    heard: list[Any] = resp.json()["state"]["heard"]
    return heard


def _converse_through(fault: str) -> None:
    with LocalFleet(
        3, FLEET_WORKER="tests.workers:Echo", FLEET_NODE_TTL="2", FLEET_DRAIN_TIMEOUT="0"
    ) as fleet:
        victim = fleet.nodes[0]
        sids = [fleet.start("chat", node=victim)["session_id"] for _ in range(SESSIONS)]
        alive = list(fleet.nodes)
        for i in range(MESSAGES):
            if i == MESSAGES // 3:
                victim.signal(signal.SIGKILL if fault == "kill" else signal.SIGTERM)
                alive = fleet.nodes[1:]
            for sid in sids:
                _send(fleet, sid, i, alive)
        expected = list(range(MESSAGES))
        deadline = time.monotonic() + 20
        for sid in sids:
            while (heard := _heard(fleet, sid, alive[0])) != expected:
                # Nothing applied twice, nothing out of order, at any moment.
                assert heard == expected[: len(heard)], (sid, heard)
                assert time.monotonic() < deadline, (sid, heard)
                time.sleep(0.1)
            info = fleet.session("chat", sid, alive[0])
            assert info["state"] == "running" and info["epoch"] == 2, info
            assert info["node_id"] != victim.name


def test_messages_survive_a_kill_of_the_owner_exactly_once() -> None:
    _converse_through("kill")


def test_messages_survive_a_hand_off_exactly_once() -> None:
    _converse_through("term")
