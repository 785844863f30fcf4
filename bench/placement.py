"""placement: every start sent to one node, and the fleet fills evenly.

Three nodes with ``FLEET_MAX_SESSIONS_PER_NODE=100``. Each run, twice on a fresh fleet:

* **sequential**: 300 counter starts (``interval`` 3600: idle), all sent to node A over
  one keep-alive connection, each after the previous answer. The first 100 fit on A (a
  *local* start); A is then full, so the next 200 are placed on B or C (the live node
  with most room) and forwarded there over its Redis channel (a *forwarded* start): the
  latency of both kinds, in the same run, on the same connection. The first ``WARMUP`` of
  each kind are left out of the figures (first-request costs of a fresh process);
* **concurrent**: 300 starts to A with ``CONCURRENCY`` in flight (placement races with
  itself); the time they take.

After the 300 either way: where each 201 said it runs, each node's ``sessions`` in ``GET
/nodes`` (the size of its slot set), and one more start through each node (the 301st),
which should be 429 ``no_capacity``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench import common

NAME = "placement"
TITLE = "placement: starts sent to one node fill every node"
NODES = 3
CAPACITY = 100
STARTS = NODES * CAPACITY
WARMUP = 10
CONCURRENCY = 32
TARGET_FORWARD_P50 = 0.003
PARAMS = {"interval": 3600}
SETTINGS = {
    "FLEET_MAX_SESSIONS_PER_NODE": str(CAPACITY),
    "FLEET_NODE_TTL": "10",
    "FLEET_MAINTENANCE_INTERVAL": "5",
    "FLEET_LOG_LEVEL": "warning",
}


@dataclass
class Fill:
    """One fleet filled through A: where the starts landed and what came after."""

    landed: Counter[str] = field(default_factory=Counter)  # node id of each 201
    refused: Counter[str] = field(default_factory=Counter)  # non-201 among the 300
    listed: dict[str, int] = field(default_factory=dict)  # GET /nodes: sessions per node
    over: dict[str, str] = field(default_factory=dict)  # node asked -> "status code"
    seconds: float = float("nan")

    def even(self) -> bool:
        """100 per node, as the nodes list them, and every start answered 201."""
        listed = sorted(self.listed.values()) == [CAPACITY] * NODES
        return listed and sum(self.landed.values()) == STARTS

    def full(self) -> bool:
        return bool(self.over) and all(v == "429 no_capacity" for v in self.over.values())


@dataclass
class Run:
    local: list[float] = field(default_factory=list)
    forwarded: list[float] = field(default_factory=list)
    sequential: Fill = field(default_factory=Fill)
    concurrent: Fill = field(default_factory=Fill)


def _start_path(call: str) -> str:
    return f"/calls/{call}/sessions"


def _answer(status: int, raw: bytes) -> tuple[str, str]:
    """(node id, "") of a 201, or ("", "<status> <code>")."""
    body: dict[str, Any] = json.loads(raw) if raw else {}
    if status == 201:
        return str(body["node_id"]), ""
    return "", f"{status} {body.get('code', '?')}"


async def _after(fleet: Any, tag: str, out: Fill) -> None:
    """The nodes' slot counts, and one more start through each node."""
    a = fleet.nodes[0]
    async with common.RawHTTP("127.0.0.1", a.port) as conn:
        status, raw = await conn.request("GET", "/nodes")
    out.listed = {n["node_id"]: int(n["sessions"]) for n in json.loads(raw)["nodes"]}
    for node in fleet.nodes:
        async with common.RawHTTP("127.0.0.1", node.port) as conn:
            status, raw = await conn.request(
                "POST", _start_path(f"{tag}-over-{node.name}"), {"params": PARAMS}
            )
        landed, refused = _answer(status, raw)
        out.over[node.name] = refused or f"201 (on {landed})"


async def _sequential(fleet: Any, out: Run) -> None:
    a = fleet.nodes[0]
    seen = {"local": 0, "forwarded": 0}
    began = time.monotonic()
    async with common.RawHTTP("127.0.0.1", a.port) as conn:
        for i in range(STARTS):
            t0 = time.perf_counter()
            status, raw = await conn.request("POST", _start_path(f"seq-{i}"), {"params": PARAMS})
            elapsed = time.perf_counter() - t0
            landed, refused = _answer(status, raw)
            if refused:
                out.sequential.refused[refused] += 1
                continue
            out.sequential.landed[landed] += 1
            kind = "local" if landed == a.name else "forwarded"
            seen[kind] += 1
            if seen[kind] > WARMUP:
                (out.local if kind == "local" else out.forwarded).append(elapsed)
    out.sequential.seconds = time.monotonic() - began
    await _after(fleet, "seq", out.sequential)


async def _concurrent(fleet: Any, out: Fill) -> None:
    a = fleet.nodes[0]

    async def one(i: int, conn: common.RawHTTP) -> tuple[str, str]:
        return _answer(*await conn.request("POST", _start_path(f"con-{i}"), {"params": PARAMS}))

    began = time.monotonic()
    results = await common.fan_out([a.port], STARTS, CONCURRENCY, one)
    out.seconds = time.monotonic() - began
    for r in results:
        if isinstance(r, BaseException):
            out.refused[type(r).__name__] += 1
        elif r[1]:
            out.refused[r[1]] += 1
        else:
            out.landed[r[0]] += 1
    await _after(fleet, "con", out)


def one_run() -> Run:
    out = Run()
    with common.local_fleet(NODES, **SETTINGS) as fleet:
        asyncio.run(_sequential(fleet, out))
    with common.local_fleet(NODES, **SETTINGS) as fleet:
        asyncio.run(_concurrent(fleet, out.concurrent))
    return out


def run(opts: common.Options) -> common.Report:
    load_before = common.load_average()
    runs: list[Run] = []
    q = common.quantile
    for i in range(opts.runs):
        common.progress(f"run {i + 1}/{opts.runs}")
        r = one_run()
        common.progress(
            f"run {i + 1}: local p50 {q(r.local, 0.5) * 1000:.2f} ms, forwarded p50 "
            f"{q(r.forwarded, 0.5) * 1000:.2f} ms p99 {q(r.forwarded, 0.99) * 1000:.2f} ms; "
            f"/nodes {r.sequential.listed} / {r.concurrent.listed}; 301st "
            f"{r.sequential.over} / {r.concurrent.over}"
        )
        runs.append(r)
    return report(opts, runs, load_before)


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _counts(fill: Fill, names: list[str]) -> str:
    return "/".join(str(fill.listed.get(n, 0)) for n in names)


def _landed(fill: Fill, names: list[str]) -> str:
    return "/".join(str(fill.landed.get(n, 0)) for n in names)


def _fill_rows(label: str, fills: list[Fill], names: list[str]) -> list[list[str]]:
    def distinct(values: list[str]) -> str:
        seen = Counter(values)
        return "; ".join(f"{v} ({k} runs)" if len(seen) > 1 else v for v, k in seen.items())

    refused: Counter[str] = Counter()
    for f in fills:
        refused.update(f.refused)
    over = [" / ".join(f"{n}: {f.over.get(n, '?')}" for n in names) for f in fills]
    return [
        [
            label,
            distinct([_landed(f, names) for f in fills]),
            distinct([_counts(f, names) for f in fills]),
            str(sum(refused.values())) + (f" {dict(refused)}" if refused else ""),
            distinct(over),
        ]
    ]


def report(opts: common.Options, runs: list[Run], load_before: str) -> common.Report:
    names = [f"node-{i}" for i in range(NODES)]
    v = common.verdict

    def q(kind: str, p: float) -> common.Agg:
        return common.Agg.of(common.quantile(getattr(r, kind), p) for r in runs)

    l50, l99 = q("local", 0.5), q("local", 0.99)
    f50, f99 = q("forwarded", 0.5), q("forwarded", 0.99)
    extra = common.Agg.of(
        common.quantile(r.forwarded, 0.5) - common.quantile(r.local, 0.5) for r in runs
    )
    fills = [f for r in runs for f in (r.sequential, r.concurrent)]
    even = all(f.even() for f in fills)
    full = all(f.full() for f in fills)
    fwd_met = f50.median <= TARGET_FORWARD_P50
    samples = (_span([len(r.local) for r in runs]), _span([len(r.forwarded) for r in runs]))
    counts = sorted({_counts(f, names) for f in fills})
    rate = common.Agg.of(STARTS / r.concurrent.seconds for r in runs)
    seq_rate = common.Agg.of(STARTS / r.sequential.seconds for r in runs)
    latency_rows = [
        ["local start: A has room, runs it (first 100 to A)", l50.ms(), l99.ms(),
         samples[0], ""],
        ["**forwarded start**: A is full, places it on B or C and forwards it",
         f50.ms(), f99.ms(), samples[1],
         f"p50 ≤ {TARGET_FORWARD_P50 * 1000:.0f} ms {v(fwd_met)}"],
        ["forwarded − local (p50, per run)", extra.ms(), "", "", ""],
    ]  # fmt: skip
    body = [
        f"{opts.runs} runs; each run fills two fresh fleets of {NODES} nodes "
        f"(`FLEET_MAX_SESSIONS_PER_NODE={CAPACITY}`, placement `local`, the default; "
        "`FLEET_NODE_TTL=10`, `FLEET_MAINTENANCE_INTERVAL=5`, `FLEET_LOG_LEVEL=warning`) "
        f"with {STARTS} counter starts (`interval` 3600, idle), every one sent to node A "
        "(node-0): once **sequentially** over one keep-alive connection (a minimal "
        "HTTP/1.1 client, each start after the previous answer), once **concurrently** "
        f"({CONCURRENCY} in flight). Then `GET /nodes` gives each node's `sessions` (the "
        "size of its slot set) and one more start is sent through each node (the 301st). "
        f"Targets: {CAPACITY}/{CAPACITY}/{CAPACITY} and the 301st answered 429 "
        f"`no_capacity`; a forwarded start p50 ≤ {TARGET_FORWARD_P50 * 1000:.0f} ms.",
        "",
        "Where the starts landed (node-0/node-1/node-2; identical in every run unless the "
        "runs are listed):",
        "",
        *common.table(
            [
                "fill",
                "201s by node (from their `node_id`)",
                "`GET /nodes` sessions",
                "non-201 among the 300",
                "the 301st, through each node",
            ],
            [
                *_fill_rows("sequential", [r.sequential for r in runs], names),
                *_fill_rows(
                    f"concurrent ({CONCURRENCY} in flight)", [r.concurrent for r in runs], names
                ),
            ],
        ),
        "",
        f"Sessions {CAPACITY} per node in every fill: {v(even)}. 301st = 429 "
        f"`no_capacity` through every node: {v(full)}.",
        "",
        "Latency of the sequential starts through A, by where they ran (the first "
        f"{WARMUP} of each kind left out; samples per run in the fourth column):",
        "",
        *common.table(["start", "p50", "p99", "samples", "target"], latency_rows),
        "",
        f"Rates: the 300 sequential starts {seq_rate.fmt(' starts/s', 0)}; with "
        f"{CONCURRENCY} in flight (two thirds forwarded) {rate.fmt(' starts/s', 0)}.",
    ]
    notes = [
        "A local start: A's `place.lua` (every limit checked, A chosen, its slot reserved, "
        "one script) and the record's creation, then the 201. A forwarded start: the same "
        "script picks B or C (the most room, so they fill alternately), A publishes the "
        "start on that node's channel, that node creates the record, starts the session "
        "and publishes `placed` back to A's channel, and A answers: one PUBLISH each way "
        "and two more process wake-ups, on top of what a local start costs.",
        "The 301st: `place.lua` finds no candidate with room and answers `no_capacity`; "
        "the node asked reads the live nodes afresh once (a node may have joined) and "
        "tries again before it answers 429.",
        common.load_note(load_before),
    ]
    summary = (
        f"{STARTS} starts all sent to one node of three (capacity {CAPACITY} each), "
        f"sequential and concurrent: sessions per node {', '.join(counts)} "
        f"({CAPACITY}/{CAPACITY}/{CAPACITY}: {v(even)}); the 301st 429 `no_capacity` through "
        f"every node: {v(full)}. Forwarded start p50 "
        f"{f50.ms()}, p99 {f99.ms()} (target p50 ≤ {TARGET_FORWARD_P50 * 1000:.0f} ms: "
        f"{v(fwd_met)}); local start p50 {l50.ms()}, p99 {l99.ms()}."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
