"""topologies: start and close on a single Redis, on a 3-master Cluster, and on Sentinel.

One node each time, on a fresh topology (tests/topologies.py). Per run: sequential starts
and closes over one keep-alive connection (latency, p50/p99), then starts with 16 in flight
(throughput). Sessions are idle counters (interval 3600), each in a call of its own so
they spread over the Cluster's shards.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bench import common

NAME = "topologies"
TITLE = "topologies: start and close on one Redis, Cluster and Sentinel"
PARAMS = {"interval": 3600}


@dataclass
class Run:
    start: list[float] = field(default_factory=list)
    close: list[float] = field(default_factory=list)
    throughput: float = 0.0


def _topology(kind: str) -> Any:
    common._harness()  # puts the repository root on sys.path
    from tests.redis_server import RedisServer
    from tests.topologies import LocalCluster, LocalSentinel

    if kind == "cluster":
        return LocalCluster()
    if kind == "sentinel":
        return LocalSentinel()
    return RedisServer()


async def _measure(port: int, sequential: int, burst: int, tag: str) -> Run:
    run = Run()
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
    rows = []
    for kind in ("single", "cluster", "sentinel"):
        runs: list[Run] = []
        for n in range(opts.runs):
            topology = _topology(kind).start()
            try:
                harness = common._harness()
                with harness.LocalFleet(
                    1, redis=topology, FLEET_MAINTENANCE_INTERVAL="60"
                ) as fleet:
                    common.progress(f"{kind}: run {n + 1}/{opts.runs}")
                    port = fleet.nodes[0].port
                    runs.append(asyncio.run(_measure(port, sequential, burst, f"r{n}")))
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
            ]
        )
    body = [
        f"{opts.runs} runs per topology, each on a fresh topology with one node "
        f"(`FLEET_MAINTENANCE_INTERVAL=60`). Per run: {sequential} sequential starts then "
        f"their closes (`DELETE ...?wait=5`) over one keep-alive connection, then {burst} "
        "starts with 16 in flight. Each session has a call of its own, so on the Cluster "
        "they spread over the three shards.",
        "",
        *common.table(
            ["topology", "start p50", "start p99", "close p50", "close p99", "starts/s at 16"],
            rows,
        ),
    ]
    notes = [
        "On the Cluster a start's two scripts (create, mark running) and an end's two "
        "(end, release) go one after the other instead of in one pipeline (redis-py refuses "
        "scripts in Cluster pipelines), and admission runs on the shard that holds the "
        "fleet-wide keys: expect a little more latency, not less.",
        "Sentinel adds nothing per command: the client talks to the master directly once "
        "the sentinels have named it.",
    ]
    return common.Report(
        NAME,
        TITLE,
        "Start and close latency and start throughput, one node, on each topology.",
        body,
        notes,
        time.monotonic() - began,
    )
