"""topologies: start, close and live events on a single Redis, on a 3-master Cluster, and
on Sentinel.

Two nodes, A and B, each time, on a fresh topology (tests/topologies.py); they run the
``Pinger`` worker of bench/events_latency.py. Per run: live events first (10 sessions on A,
each in a call of its own, ping 5 times a second; one SSE listener per session on B notes
each ping's delay), then, on A, sequential starts and closes over one keep-alive
connection (latency, p50/p99), then starts with 16 in flight (throughput). Sessions are in
calls of their own, so they spread over the Cluster's shards; the idle ones ping once a
minute, which no run lasts.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bench import common

NAME = "topologies"
TITLE = "topologies: start, close and live events on one Redis, Cluster and Sentinel"
SETTINGS = {
    "FLEET_WORKER": "bench.events_latency:Pinger",
    "FLEET_MAINTENANCE_INTERVAL": "60",
    "FLEET_LOG_LEVEL": "warning",
}
PARAMS = {"interval": 60}
EVENT_SESSIONS = 10
EVENT_INTERVAL = 0.2


@dataclass
class Run:
    start: list[float] = field(default_factory=list)
    close: list[float] = field(default_factory=list)
    throughput: float = 0.0
    events: list[float] = field(default_factory=list)


def _topology(kind: str) -> Any:
    common._harness()  # puts the repository root on sys.path
    from tests.redis_server import RedisServer
    from tests.topologies import LocalCluster, LocalSentinel

    if kind == "cluster":
        return LocalCluster()
    if kind == "sentinel":
        return LocalSentinel()
    return RedisServer()


async def _events(a: int, b: int, seconds: float, tag: str) -> list[float]:
    """Delays of the pings of sessions on A, as B's SSE listeners receive them."""
    from bench.events_latency import Window, _listen

    out: list[float] = []
    window = Window()
    started: list[tuple[str, str]] = []
    async with common.RawHTTP("127.0.0.1", a) as conn:
        for i in range(EVENT_SESSIONS):
            call = f"{tag}-e{i}"
            body = {"params": {"interval": EVENT_INTERVAL}}
            status, raw = await conn.request("POST", f"/calls/{call}/sessions", body)
            if status == 201:
                started.append((call, str(json.loads(raw)["session_id"])))
        listeners = [
            asyncio.create_task(_listen(b, f"/calls/{call}/sessions/{sid}/events", window, out))
            for call, sid in started
        ]
        deadline = time.monotonic() + 30
        while window.live < len(started) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        window.start = time.time()
        await asyncio.sleep(seconds)
        window.end = time.time()
        await asyncio.sleep(0.3)
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        for call, sid in started:
            await conn.request("DELETE", f"/calls/{call}/sessions/{sid}")
    return out


async def _measure(
    ports: tuple[int, int], sequential: int, burst: int, tag: str, seconds: float
) -> Run:
    run = Run()
    run.events = await _events(*ports, seconds, tag)
    port = ports[0]
    started: list[tuple[str, str]] = []
    async with common.RawHTTP("127.0.0.1", port) as conn:
        for i in range(sequential):
            call = f"{tag}-s{i}"
            t0 = time.perf_counter()
            status, body = await conn.request("POST", f"/calls/{call}/sessions", {"params": PARAMS})
            run.start.append(time.perf_counter() - t0)
            if status == 201:
                started.append((call, str(json.loads(body)["session_id"])))
        for call, sid in started:
            t0 = time.perf_counter()
            await conn.request("DELETE", f"/calls/{call}/sessions/{sid}?wait=5")
            run.close.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    done = await common.start_sessions(
        [port], burst, PARAMS, lambda i: f"{tag}-b{i}", concurrency=16, label="burst"
    )
    run.throughput = len(done) / (time.perf_counter() - t0)
    return run


def run(opts: common.Options) -> common.Report:
    began = time.monotonic()
    sequential, burst = (50, 300) if opts.quick else (200, 2000)
    seconds = 2.0 if opts.quick else 5.0
    rows = []
    for kind in ("single", "cluster", "sentinel"):
        runs: list[Run] = []
        for n in range(opts.runs):
            topology = _topology(kind).start()
            try:
                harness = common._harness()
                with harness.LocalFleet(2, redis=topology, **SETTINGS) as fleet:
                    common.progress(f"{kind}: run {n + 1}/{opts.runs}")
                    a, b = fleet.nodes
                    one = asyncio.run(
                        _measure((a.port, b.port), sequential, burst, f"r{n}", seconds)
                    )
                    common.progress(
                        f"{kind}: events p50 {common.quantile(one.events, 0.5) * 1000:.2f} ms "
                        f"over {len(one.events)}; start p50 "
                        f"{common.quantile(one.start, 0.5) * 1000:.2f} ms"
                    )
                    runs.append(one)
            finally:
                topology.stop()
        start = [common.quantile(r.start, q) for r in runs for q in (0.5,)]
        start99 = [common.quantile(r.start, 0.99) for r in runs]
        close = [common.quantile(r.close, 0.5) for r in runs]
        close99 = [common.quantile(r.close, 0.99) for r in runs]
        rows.append(
            [
                kind,
                common.Agg.of(start).ms(),
                common.Agg.of(start99).ms(),
                common.Agg.of(close).ms(),
                common.Agg.of(close99).ms(),
                common.Agg.of([r.throughput for r in runs]).fmt("/s", 0),
                common.Agg.of([common.quantile(r.events, 0.5) for r in runs]).ms(),
                common.Agg.of([common.quantile(r.events, 0.99) for r in runs]).ms(),
            ]
        )
    body = [
        f"{opts.runs} runs per topology, each on a fresh topology with two nodes A and B "
        f"(`FLEET_MAINTENANCE_INTERVAL=60`). Per run: live events first ({EVENT_SESSIONS} "
        f"sessions on A pinging every {EVENT_INTERVAL} s, one SSE listener each on B, "
        f"{seconds:.0f} s window; the delay from the worker's emit to B's listener); then, "
        f"on A, {sequential} sequential starts then their closes (`DELETE ...?wait=5`) over "
        f"one keep-alive connection, then {burst} starts with 16 in flight. Each session has "
        "a call of its own, so on the Cluster they spread over the three shards.",
        "",
        *common.table(
            [
                "topology",
                "start p50",
                "start p99",
                "close p50",
                "close p99",
                "starts/s at 16",
                "event p50",
                "event p99",
            ],
            rows,
        ),
    ]
    notes = [
        "On the Cluster an end's two scripts (end, release) go one after the other instead "
        "of in one pipeline (redis-py refuses scripts in Cluster pipelines), and admission "
        "runs on the shard that holds the fleet-wide keys: expect a little more latency, "
        "not less.",
        "Live events on the Cluster: each emit also publishes the entry's id on the "
        "stream's channel, and B reads announced streams (one `XREAD` per hash slot) "
        "instead of blocking in one `XREAD` over all of them: one more round trip per "
        "announced batch (docs/topologies.md).",
        "Sentinel adds nothing per command: the client talks to the master directly once "
        "the sentinels have named it.",
    ]
    return common.Report(
        NAME,
        TITLE,
        "Start and close latency, start throughput and live event delay on each topology.",
        body,
        notes,
        time.monotonic() - began,
    )
