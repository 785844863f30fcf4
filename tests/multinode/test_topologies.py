"""The multi-node suite's core cases on a real Redis Cluster and a real Sentinel setup."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from redis.crc import key_slot

from tests.multinode.harness import LocalFleet, NodeProcess
from tests.sse import read_sse, ticks
from tests.topologies import LocalCluster, LocalSentinel, _ask

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


def test_placement_and_migration(topology: Topology) -> None:
    """Starts sent to one full node are placed on the others (and forwarded over their
    channels); a migrated session resumes on another node from its checkpoint. On Cluster
    the calls' slots spread over every shard."""
    with LocalFleet(3, redis=topology, FLEET_MAX_SESSIONS_PER_NODE="3") as fleet:
        first = fleet.nodes[0]
        placed = [fleet.start(f"call-{i}", node=first, params={"interval": 0.05}) for i in range(9)]
        assert sorted(p["node_id"] for p in placed) == sorted(["node-0", "node-1", "node-2"] * 3)
        full = fleet.request("POST", "/calls/more/sessions", first)
        assert full.status_code == 429 and full.json()["code"] == "no_capacity"
        fleet.request("DELETE", f"/calls/call-0/sessions/{placed[0]['session_id']}")
        elsewhere = next(p for p in placed if p["node_id"] != placed[0]["node_id"])
        call = elsewhere["call_id"]
        sid = elsewhere["session_id"]
        fleet.wait_session("call-0", placed[0]["session_id"], state="ended")
        time.sleep(0.2)  # a checkpoint or two
        moved = fleet.request("POST", f"/calls/{call}/sessions/{sid}/migrate", first)
        assert moved.status_code == 202, moved.text
        info = fleet.wait_session(call, sid, state="running", resumed_count=1)
        assert info["node_id"] == placed[0]["node_id"]  # the only node with room
        assert info["checkpoint_version"] >= 2


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
            # A replica promoted before it had synced has lost data: admission then waits
            # one lease (FLEET_NODE_TTL) for the nodes to write their sessions back.
            deadline = time.monotonic() + 15
            while (after := fleet.request("POST", "/calls/after/sessions")).status_code == 503:
                assert time.monotonic() < deadline, after.text
                time.sleep(0.2)
            assert after.status_code == 201, after.text
    finally:
        topo.stop()


async def test_live_events_across_nodes_and_slots(topology: Topology) -> None:
    """Listeners on B follow sessions on A in calls that hash to different slots (on
    Cluster, to different shards): every event once, in order, live, to the end; a
    reconnect resumes exactly; a close shows as session_closing then session_ended."""
    with LocalFleet(2, redis=topology) as fleet:
        a, b = fleet.nodes
        calls = [f"ev-{i}" for i in range(6)]
        sids = [
            fleet.start(call, node=a, params={"interval": 0.05, "limit": 30})["session_id"]
            for call in calls
        ]
        async with httpx.AsyncClient(timeout=10) as client:
            runs = await asyncio.gather(
                *(
                    read_sse(client, f"{b.url}/calls/{call}/sessions/{sid}/events")
                    for call, sid in zip(calls, sids, strict=True)
                )
            )
            for events in runs:
                assert [e["event"] for e in events[:1]] == ["session_started"]
                assert ticks(events) == list(range(1, 31))
                assert events[-1]["event"] == "session_ended"
                ids = [tuple(map(int, e["id"].split("-"))) for e in events]
                assert ids == sorted(ids) and len(set(ids)) == len(ids)

            # Live: a quiet session, followed from B, closed through A.
            sid = fleet.start("quiet", node=a, params={"interval": 3600})["session_id"]
            url = f"{b.url}/calls/quiet/sessions/{sid}/events"
            first = await read_sse(client, url, upto=1)
            follow = asyncio.create_task(
                read_sse(client, url, headers={"Last-Event-ID": first[0]["id"]})
            )
            await asyncio.sleep(0.5)  # the listener is live on B by now
            began = time.monotonic()
            closed = await client.delete(f"{a.url}/calls/quiet/sessions/{sid}")
            assert closed.status_code in (200, 202)
            rest = await follow
            assert [e["event"] for e in rest] == ["session_closing", "session_ended"]
            assert time.monotonic() - began < 2.0


async def test_cluster_listener_survives_a_lost_subscription() -> None:
    """On Cluster a node learns of new entries through its subscriptions: when they are
    cut (every pub/sub client killed on every shard), it subscribes again and reads what
    was appended meanwhile. Nothing is lost or repeated."""
    cluster = LocalCluster().start()
    try:
        with LocalFleet(2, redis=cluster) as fleet:
            a, b = fleet.nodes
            sid = fleet.start("cut", node=a, params={"interval": 0.05, "limit": 60})["session_id"]

            def cut(event: dict[str, str]) -> None:
                if event["event"] == "tick" and json.loads(event["data"])["n"] == 10:
                    for server in cluster.servers:
                        _ask(server.port, "client", "kill", "type", "pubsub")

            async with httpx.AsyncClient(timeout=10) as client:
                events = await read_sse(
                    client, f"{b.url}/calls/cut/sessions/{sid}/events", on_event=cut
                )
            assert ticks(events) == list(range(1, 61))
            assert events[-1]["event"] == "session_ended"
            assert "event dispatcher lost Redis" in b.log()  # the cut did reach it
    finally:
        cluster.stop()


def test_conversation_across_slots_and_a_kill(topology: Topology) -> None:
    """Sessions on A in calls on different slots (``conv-0`` to ``conv-3`` hash to slots
    5402, 1339, 9593 and 13656: all three masters of the Cluster) are sent to through B
    with ``?wait``; A is killed; the conversation goes on from the checkpoint: each Echo's
    ``heard`` holds every message exactly once, in order."""
    with LocalFleet(
        3, redis=topology, FLEET_WORKER="tests.workers:Echo", FLEET_NODE_TTL="2"
    ) as fleet:
        a, b, c = fleet.nodes
        calls = [f"conv-{i}" for i in range(4)]
        sids = [fleet.start(call, node=a)["session_id"] for call in calls]

        def ask(call: str, sid: str, i: int, via: NodeProcess) -> dict[str, Any]:
            resp = fleet.request(
                "POST",
                f"/calls/{call}/sessions/{sid}/messages",
                via,
                params={"wait": 10},
                json={"data": i, "id": f"{sid}-{i}"},
                timeout=15,
            )
            assert resp.status_code == 200, resp.text
            reply: dict[str, Any] = resp.json()["reply"]
            return reply

        for i in range(5):
            for call, sid in zip(calls, sids, strict=True):
                assert ask(call, sid, i, b) == {"echo": i, "count": i + 1}
        a.signal(signal.SIGKILL)
        a.wait(5)
        for i in range(5, 10):
            for n, (call, sid) in enumerate(zip(calls, sids, strict=True)):
                # The reply counts on from the checkpoint: nothing lost, nothing twice.
                assert ask(call, sid, i, (b, c)[n % 2]) == {"echo": i, "count": i + 1}
        for call, sid in zip(calls, sids, strict=True):
            resp = fleet.request("GET", f"/calls/{call}/sessions/{sid}/checkpoint", c)
            assert resp.json()["state"]["heard"] == list(range(10))
            info = fleet.session(call, sid, b)
            assert info["state"] == "running" and info["epoch"] == 2
            assert info["node_id"] != a.name


def test_threads_across_slots_with_a_repair() -> None:
    """On Cluster a thread's keys and its sessions' keys sit on different shards (threads
    ``t-0`` to ``t-3`` of principal ``anonymous`` in calls of their own). Conversations on
    them go on across sessions and a kill; two racing sends start one session; and a
    thread left marked busy by a session that ended (the crash between the end and the
    release, two steps on two shards) is released by the next send."""
    cluster = LocalCluster()
    try:
        cluster.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        with LocalFleet(
            3, redis=cluster, FLEET_WORKER="tests.workers:Echo", FLEET_NODE_TTL="2"
        ) as fleet:
            a, b, c = fleet.nodes
            threads = [f"t-{i}" for i in range(4)]

            def say(thread: str, data: Any, via: NodeProcess) -> dict[str, Any]:
                resp = fleet.request(
                    "POST",
                    f"/threads/{thread}/messages",
                    via,
                    params={"wait": 15},
                    json={"data": data, "id": f"{thread}-{data}"},
                    timeout=20,
                )
                assert resp.status_code == 200, resp.text
                out: dict[str, Any] = resp.json()
                return out

            sends = [(thread, data) for thread in threads for data in (0, 1)]
            with ThreadPoolExecutor(8) as pool:
                racing = list(pool.map(lambda s: say(s[0], s[1], a), sends))
            for thread in threads:
                mine = [r for r in racing if r["call_id"] == thread]
                assert len({r["session_id"] for r in mine}) == 1
                assert sum(r["started"] for r in mine) == 1
            a.signal(signal.SIGKILL)
            for thread in threads:
                assert say(thread, 2, b)["reply"]["count"] == 3
            first = say(threads[0], 3, c)
            closed = fleet.request(
                "DELETE", f"/calls/t-0/sessions/{first['session_id']}", c, params={"wait": 5}
            )
            assert closed.json()["state"] == "ended"
            # The crash between the end and the release, as the thread's shard sees it.
            ref = f"t-0/{first['session_id']}"
            key = f"{fleet.prefix}:{{t:anonymous/t-0}}:thread"
            port = cluster.servers[0].port
            assert _ask(port, "-c", "hget", key, "latest") == ref  # the thread's record
            _ask(port, "-c", "hset", key, "live", ref, "live_since", "1")
            again = say(threads[0], 4, b)
            assert again["started"] and again["reply"]["count"] == 5
            thread = fleet.request("GET", "/threads/t-0", c).json()
            heard = thread["state"]["heard"]
            assert sorted(heard[:2]) == [0, 1] and heard[2:] == [2, 3, 4]
            assert len(thread["sessions"]) == 2
    finally:
        cluster.stop()


async def test_cluster_announcements_stay_on_their_shard() -> None:
    """On Cluster a stream's entries are announced by sharded pub/sub: a listener follows
    a session live, and the other shards get none of it over the cluster bus (a classic
    PUBLISH reaches every shard, whoever listens: docs/capacity.md)."""
    cluster = LocalCluster().start()
    try:
        with LocalFleet(2, redis=cluster) as fleet:
            a, b = fleet.nodes
            before = cluster.bus_publishes()
            sid = fleet.start("quiet-bus", node=a, params={"interval": 0.02, "limit": 50})
            async with httpx.AsyncClient(timeout=10) as client:
                url = f"{b.url}/calls/quiet-bus/sessions/{sid['session_id']}/events"
                events = await read_sse(client, url)
            assert ticks(events) == list(range(1, 51))
            grown = [x - y for x, y in zip(cluster.bus_publishes(), before, strict=True)]
            # 52 entries were announced (started, 50 ticks, ended); the few classic
            # messages left are the nodes' own (a start's placement, the end's waiters).
            assert sum(grown) < 10, grown
    finally:
        cluster.stop()


async def test_cluster_listener_follows_a_moved_slot() -> None:
    """When the slot of a followed session's call moves to another shard mid-stream, the
    old shard drops the subscription; the node subscribes again where the slot is now and
    reads what was written meanwhile: every event once, in order, to the end."""
    cluster = LocalCluster().start()
    try:
        with LocalFleet(2, redis=cluster) as fleet:
            a, b = fleet.nodes
            sid = fleet.start("moving", node=a, params={"interval": 0.05, "limit": 60})
            slot = key_slot(b"{c:moving}")
            was = cluster.owner(slot)

            def move(event: dict[str, str]) -> None:
                if event["event"] == "tick" and json.loads(event["data"])["n"] == 10:
                    cluster.move_slot(slot, (was + 1) % 3)

            async with httpx.AsyncClient(timeout=10) as client:
                url = f"{b.url}/calls/moving/sessions/{sid['session_id']}/events"
                events = await read_sse(client, url, on_event=move)
            assert cluster.owner(slot) == (was + 1) % 3
            assert ticks(events) == list(range(1, 61))
            assert events[-1]["event"] == "session_ended"
            ended = fleet.session("moving", sid["session_id"], node=b)
            assert ended["end_reason"] == "completed", ended
    finally:
        cluster.stop()


class SmallPools:
    """A Cluster whose URL gives each node only ``pool`` connections per shard."""

    def __init__(self, cluster: LocalCluster, pool: int) -> None:
        self.cluster = cluster
        self.pool = pool

    @property
    def url(self) -> str:
        return f"{self.cluster.url}?max_connections={self.pool}"

    def start(self) -> SmallPools:
        self.cluster.start()
        return self

    def stop(self) -> None:
        self.cluster.stop()


def test_cluster_failover_with_small_pools_ends_no_session() -> None:
    """A node holding 60 sessions is killed; the two others take them over while their
    pools hold only 4 connections per shard (the reapers send dozens of calls to the
    ``{g}`` shard at once): every session resumes, none ends."""
    topo = SmallPools(LocalCluster(), pool=4)
    try:
        topo.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        with LocalFleet(3, redis=topo, FLEET_NODE_TTL="2") as fleet:
            victim = fleet.nodes[0]
            calls = [f"c{i}" for i in range(60)]
            sids = [
                fleet.start(call, node=victim, params={"interval": 0.2})["session_id"]
                for call in calls
            ]
            victim.signal(signal.SIGKILL)
            victim.wait(5)
            for call, sid in zip(calls, sids, strict=True):
                info = fleet.wait_session(call, sid, timeout=20, state="running", epoch=2)
                assert info["node_id"] != victim.name
            ended = fleet.request("GET", "/sessions", params={"state": "ended"}).json()
            assert ended["sessions"] == []
    finally:
        topo.stop()
