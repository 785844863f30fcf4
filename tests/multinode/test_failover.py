"""Checkpoints, failover and drain with real processes: kill -9, SIGSTOP, SIGTERM."""

from __future__ import annotations

import json
import signal
import time
from typing import Any, cast

import redis as redis_sync

from fleet.store.keys import Keys
from tests.multinode.harness import LocalFleet

FAST = {"params": {"interval": 0.05}}


def ticks(fleet: LocalFleet, call: str, sid: str) -> list[tuple[str, Any]]:
    """The session's events as (type, data), in stream order."""
    with redis_sync.Redis.from_url(fleet.redis.url, decode_responses=True) as r:
        entries = cast(
            list[tuple[str, dict[str, str]]], r.xrange(Keys(fleet.prefix).events(call, sid))
        )
    return [(f["type"], json.loads(f["data"])) for _, f in entries]


def tick_numbers(events: list[tuple[str, Any]]) -> list[int]:
    return [data["n"] for kind, data in events if kind == "tick"]


def test_killed_node_sessions_resume_from_their_checkpoint() -> None:
    with LocalFleet(3, FLEET_NODE_TTL="2", FLEET_MAINTENANCE_INTERVAL="0.5") as fleet:
        victim = fleet.nodes[0]
        sids = [fleet.start("c", node=victim, **FAST)["session_id"] for _ in range(6)]
        time.sleep(0.6)
        before = {sid: fleet.session("c", sid)["checkpoint_version"] for sid in sids}
        assert all(v >= 5 for v in before.values()), before
        victim.signal(signal.SIGKILL)
        victim.wait(5)
        for sid in sids:
            info = fleet.wait_session("c", sid, timeout=8, state="running", epoch=2)
            assert info["node_id"] in ("node-1", "node-2") and info["resumed_count"] == 1
        time.sleep(0.5)
        owners = {fleet.session("c", sid)["node_id"] for sid in sids}
        assert owners == {"node-1", "node-2"}  # least loaded first: spread over both
        for sid in sids:
            events = ticks(fleet, "c", sid)
            kinds = [k for k, _ in events]
            cut = kinds.index("session_resumed")
            before_n = tick_numbers(events[:cut])
            after_n = tick_numbers(events[cut:])
            assert after_n, events
            # It continues from the checkpoint (the last tick may repeat if the node died
            # between emitting it and saving it), never from 0, and counts on by one.
            assert after_n[0] in (before_n[-1], before_n[-1] + 1), (before_n, after_n)
            assert after_n == list(range(after_n[0], after_n[0] + len(after_n)))
            checkpoint = fleet.request("GET", f"/calls/c/sessions/{sid}/checkpoint").json()
            assert checkpoint["epoch"] == 2 and checkpoint["state"]["n"] >= after_n[0]


def test_paused_node_finds_its_sessions_moved_and_rejoins() -> None:
    with LocalFleet(2, FLEET_NODE_TTL="1.5", FLEET_MAINTENANCE_INTERVAL="0.3") as fleet:
        zombie, other = fleet.nodes
        sid = fleet.start("c", node=zombie, **FAST)["session_id"]
        time.sleep(0.3)
        zombie.signal(signal.SIGSTOP)
        fleet.wait_session(
            "c", sid, timeout=6, via=other, node_id=other.name, epoch=2, state="running"
        )
        zombie.signal(signal.SIGCONT)
        fleet.wait_ready([zombie], timeout=5)
        time.sleep(1.0)  # the zombie's copy had its chance to tick
        events = ticks(fleet, "c", sid)
        numbers = tick_numbers(events)
        # One sequence, one writer at a time: no tick written twice, none after the move
        # from the old owner (its writes are fenced by the epoch).
        cut = [k for k, _ in events].index("session_resumed")
        after = tick_numbers(events[cut:])
        assert after == list(range(after[0], after[0] + len(after)))
        assert numbers == sorted(numbers) and len(numbers) - len(set(numbers)) <= 1
        assert (
            fleet.request("GET", "/sessions", params={"node_id": zombie.name}).json()["sessions"]
            == []
        )
        metrics = fleet.http.get(f"{zombie.url}/metrics").text
        assert 'fleet_sessions_active{state="running"} 0.0' in metrics
        nodes = {n["node_id"] for n in fleet.request("GET", "/nodes").json()["nodes"]}
        assert nodes == {zombie.name, other.name}
        # The rejoined node takes new sessions.
        assert fleet.start("c", node=zombie)["node_id"] == zombie.name


def test_sigterm_completes_short_sessions_and_hands_off_the_rest() -> None:
    with LocalFleet(3, FLEET_DRAIN_TIMEOUT="1.5", FLEET_MAINTENANCE_INTERVAL="60") as fleet:
        leaving, staying = fleet.nodes[0], fleet.nodes[1]
        short = fleet.start("c", node=leaving, params={"interval": 0.05, "limit": 10})
        longs = [fleet.start("c", node=leaving, **FAST)["session_id"] for _ in range(4)]
        pinned = fleet.start("c", node=leaving, resumable=False, **FAST)["session_id"]
        began = time.monotonic()
        leaving.signal(signal.SIGTERM)
        fleet.wait_session("c", short["session_id"], timeout=3, via=staying, end_reason="completed")
        for sid in longs:
            info = fleet.wait_session("c", sid, timeout=5, via=staying, state="running", epoch=2)
            assert info["node_id"] != leaving.name
        # Handed over right after the drain timeout, not after a lease timeout.
        assert time.monotonic() - began < 1.5 + 1.0 + 1.0
        assert fleet.session("c", pinned, staying)["end_reason"] == "node_shutdown"
        assert leaving.wait(10) == 0
        for sid in longs:
            events = ticks(fleet, "c", sid)
            cut = [k for k, _ in events].index("session_resumed")
            before_n, after_n = tick_numbers(events[:cut]), tick_numbers(events[cut:])
            time.sleep(0.2)
            after_n = tick_numbers(ticks(fleet, "c", sid)[cut:])
            assert after_n and after_n[0] == before_n[-1] + 1
