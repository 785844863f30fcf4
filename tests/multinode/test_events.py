"""Live events across real ``fleet serve`` processes on one real redis-server: a listener
on node B follows a session that runs on node A."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from tests.multinode.harness import LocalFleet, NodeProcess
from tests.sse import SSE, read_sse, ticks

Events = list[SSE]


def events_url(node: NodeProcess, sid: str) -> str:
    return f"{node.url}/calls/demo/sessions/{sid}/events"


def clients(r: redis.Redis) -> int:
    return len(r.client_list())


def blocked_readers(r: redis.Redis, tries: int = 50) -> set[str]:
    """Ids of connections blocked in XREAD: the dispatchers' (polled, since a dispatcher
    is between two reads now and then)."""
    for _ in range(tries):
        found = {
            str(c["id"]) for c in r.client_list() if c.get("cmd") == "xread" and "b" in c["flags"]
        }
        if found:
            return found
        time.sleep(0.01)
    return set()


def settled_clients(r: redis.Redis, timeout: float = 10.0) -> int:
    """The connection count once it stops moving (pools grow lazily)."""
    deadline = time.monotonic() + timeout
    last = clients(r)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = clients(r)
        if now == last:
            return now
        last = now
    return last


def listener_gauge(fleet: LocalFleet, node: NodeProcess) -> float:
    text = fleet.request("GET", "/metrics", node).text
    line = next(x for x in text.splitlines() if x.startswith("fleet_event_listeners "))
    return float(line.split()[1])


async def test_listener_on_another_node_gets_every_tick_in_order() -> None:
    with LocalFleet(2) as fleet:
        a, b = fleet.nodes
        sid = fleet.start(node=a, params={"interval": 0.05, "limit": 40})["session_id"]
        async with httpx.AsyncClient(timeout=10) as client:
            events = await read_sse(client, events_url(b, sid))
        assert events[0]["event"] == "session_started"
        assert ticks(events) == list(range(1, 41))
        assert events[-1]["event"] == "session_ended"
        assert json.loads(events[-1]["data"]) == {
            "end_reason": "completed",
            "result": {"n": 40},
        }
        ids = [tuple(map(int, e["id"].split("-"))) for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_reconnect_with_last_event_id_gets_exactly_the_missed_events() -> None:
    with LocalFleet(2) as fleet:
        a, b = fleet.nodes
        sid = fleet.start(node=a, params={"interval": 0.05, "limit": 40})["session_id"]
        async with httpx.AsyncClient(timeout=10) as client:
            first = await read_sse(client, events_url(b, sid), upto=10)
            await asyncio.sleep(0.5)  # about ten ticks go by unseen
            # The reconnect lands on the other node, as behind a load balancer.
            rest = await read_sse(
                client, events_url(a, sid), headers={"Last-Event-ID": first[-1]["id"]}
            )
            everything = await read_sse(client, events_url(b, sid))
        assert ticks(first + rest) == list(range(1, 41))
        assert first + rest == everything


async def test_disconnect_frees_the_redis_connection() -> None:
    with LocalFleet(2) as fleet:
        a, b = fleet.nodes
        sid = fleet.start(node=a, params={"interval": 0.05})["session_id"]
        r = redis.Redis.from_url(fleet.redis.url, decode_responses=True)
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                # A first round lets every connection pool reach its working size.
                await _streams(fleet, client, b, sid, 30)
                baseline = settled_clients(r)
                during: list[int] = []
                readers: set[str] = set()

                def look() -> None:
                    during.append(clients(r))
                    readers.update(blocked_readers(r))

                await _streams(fleet, client, b, sid, 30, look)
            # One dedicated connection for 30 listeners, not one each ...
            assert during[0] <= baseline + 2, (during, baseline)
            assert len(readers) == 1, readers
            # ... and it is closed once the last listener has gone. (The node's pool may
            # keep a connection it grew for the catch-up reads: that one is idle, not ours.)
            await _wait(lambda: not readers & {str(c["id"]) for c in r.client_list()})
        finally:
            r.close()


async def _streams(
    fleet: LocalFleet,
    client: httpx.AsyncClient,
    node: NodeProcess,
    sid: str,
    n: int,
    meanwhile: Callable[[], None] = lambda: None,
) -> None:
    """Open ``n`` streams on ``node``, run ``meanwhile``, hang up, wait for the gauge."""
    streams = [asyncio.create_task(_hold(client, events_url(node, sid))) for _ in range(n)]
    await _wait(lambda: listener_gauge(fleet, node) == n)
    await asyncio.sleep(0.3)  # every stream has caught up and joined the fan-out
    meanwhile()
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    await _wait(lambda: listener_gauge(fleet, node) == 0)


async def _hold(client: httpx.AsyncClient, url: str) -> None:
    async with client.stream("GET", url) as resp:
        async for _ in resp.aiter_lines():
            pass


async def _wait(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _stalled_reader(node: NodeProcess, sid: str) -> socket.socket:
    """Asks for the stream and never reads it, with a tiny receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", node.port))
    sock.sendall(
        f"GET /calls/demo/sessions/{sid}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode("ascii")
    )
    return sock


async def test_stalled_readers_do_not_delay_the_worker() -> None:
    interval, limit = 0.05, 40
    with LocalFleet(2) as fleet:
        a, b = fleet.nodes
        sid = fleet.start(node=a, params={"interval": interval, "limit": limit})["session_id"]
        stalled = [_stalled_reader(b, sid) for _ in range(20)]
        try:
            arrivals: dict[int, float] = {}

            def note(event: dict[str, Any]) -> None:
                if event["event"] == "tick":
                    arrivals[json.loads(event["data"])["n"]] = time.monotonic()

            async with httpx.AsyncClient(timeout=10) as client:
                events = await read_sse(client, events_url(b, sid), on_event=note)
        finally:
            for sock in stalled:
                sock.close()
        assert ticks(events) == list(range(1, limit + 1))
        # The ticks were written on time (their ids are Redis' clock, in ms) ...
        written = [int(e["id"].split("-")[0]) / 1000 for e in events if e["event"] == "tick"]
        gaps = [b - a for a, b in zip(written, written[1:], strict=False)]
        assert max(gaps) < interval + 0.3, gaps
        assert written[-1] - written[0] < (limit - 1) * interval * 1.5
        # ... and reached a reader on the other node promptly.
        assert max(arrivals[n + 1] - arrivals[n] for n in range(1, limit)) < interval + 0.5
        assert fleet.session("demo", sid)["checkpoint_version"] == limit
