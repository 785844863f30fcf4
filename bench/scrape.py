"""scrape: ``GET /metrics`` of a node with 10 and with 10,000 live sessions.

One node (fleet's default ``FLEET_NODE_TTL=10`` and ``FLEET_MAINTENANCE_INTERVAL=5``,
``FLEET_LOG_LEVEL=warning``); idle counters (``interval`` 3600) started through HTTP with
64 in flight. At each size, after a maintenance pass has gone by, each run is a window of
50 scrapes, one every 100 ms (so a window spans a maintenance pass, as a real scraper's
would), over a keep-alive connection, timed from request sent to body read; ``GET
/health`` is timed the same way in between as the floor. The series count is the number
of sample lines (those not starting with ``#``) of the last scrape.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

from bench import common

NAME = "scrape"
TITLE = "scrape: /metrics with 10 and 10,000 sessions"
TARGET = 0.050
SCRAPES = 50
SPACING = 0.1
SETTINGS = {
    "FLEET_NODE_TTL": "10",
    "FLEET_MAINTENANCE_INTERVAL": "5",
    "FLEET_LOG_LEVEL": "warning",
}
_LABELS = re.compile(r"^([^ ]+) ")
_LE = re.compile(r',?le="[^"]*"')
_SUFFIX = re.compile(r"_(bucket|count|sum|created|total)(?=\{|$)")
_REPEAT = re.compile(r"\b(\w+)(?:\+\1\b)+")


def family(series: str) -> str:
    """A series without its histogram bucket and suffix, repeated names collapsed:
    ``x_bucket{command="watch+watch",le="0.1"}`` -> ``x{command="watch+watch (×2)"}``."""
    name = _LE.sub("", _SUFFIX.sub("", series)).replace("{}", "")
    return _REPEAT.sub(lambda m: f"{m[1]}+… (×{m[0].count('+') + 1})", name)


@dataclass
class Window:
    scrape: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    size_bytes: int = 0
    series: set[str] = field(default_factory=set)


def series_of(text: str) -> set[str]:
    """The sample lines' names with labels: one per time series."""
    out = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = _LABELS.match(line)
            if m:
                out.add(m[1])
    return out


async def window(port: int) -> Window:
    out = Window()
    async with common.RawHTTP("127.0.0.1", port) as conn:
        await conn.request("GET", "/metrics")  # warm the connection
        for _ in range(SCRAPES):
            began = time.perf_counter()
            status, body = await conn.request("GET", "/metrics")
            out.scrape.append(time.perf_counter() - began)
            if status != 200:
                raise RuntimeError(f"/metrics answered {status}")
            began = time.perf_counter()
            await conn.request("GET", "/health")
            out.health.append(time.perf_counter() - began)
            await asyncio.sleep(SPACING)
        out.size_bytes = len(body)
        out.series = series_of(body.decode())
    return out


async def measure(port: int, sizes: list[int], runs: int) -> tuple[dict[int, list[Window]], Any]:
    results: dict[int, list[Window]] = {}
    refused: dict[str, int] = {}
    running = 0
    for size in sizes:
        began = time.monotonic()
        running += await common.start_idle(port, size - running, "scrape", 3600, refused)
        common.progress(
            f"{running:,} sessions running ({time.monotonic() - began:.1f}s); letting a "
            "maintenance pass go by"
        )
        await asyncio.sleep(6.0)
        results[size] = []
        for i in range(runs):
            w = await window(port)
            common.progress(
                f"{size:,} sessions, window {i + 1}/{runs}: p50 "
                f"{common.quantile(w.scrape, 0.5) * 1000:.1f} ms, p99 "
                f"{common.quantile(w.scrape, 0.99) * 1000:.1f} ms, {len(w.series)} series"
            )
            results[size].append(w)
    return results, refused


def run(opts: common.Options) -> common.Report:
    sizes = [10, 1000] if opts.quick else [10, 10_000]
    load_before = common.load_average()
    with common.local_fleet(1, **SETTINGS) as fleet:
        node = fleet.nodes[0]
        results, refused = asyncio.run(measure(node.port, sizes, opts.runs))
        rss = common.rss_bytes(node.pid)
    return report(opts, sizes, results, refused, rss, load_before)


def report(
    opts: common.Options,
    sizes: list[int],
    results: dict[int, list[Window]],
    refused: dict[str, int],
    rss: int,
    load_before: str,
) -> common.Report:
    small, large = sizes

    def agg(size: int, q: float, get: str = "scrape") -> common.Agg:
        return common.Agg.of(common.quantile(getattr(w, get), q) for w in results[size])

    def count(size: int) -> common.Agg:
        return common.Agg.of(len(w.series) for w in results[size])

    rows = []
    for size in sizes:
        rows.append(
            [
                f"{size:,}",
                agg(size, 0.5).ms(),
                agg(size, 0.99).ms(),
                common.Agg.of(max(w.scrape) for w in results[size]).ms(),
                agg(size, 0.5, "health").ms(),
                count(size).fmt("", 0),
                common.Agg.of(w.size_bytes / 1024 for w in results[size]).fmt(" KiB", 1),
            ]
        )
    p99_large = agg(large, 0.99)
    p50_large = agg(large, 0.5)
    latency_met = p99_large.median <= TARGET and agg(small, 0.99).median <= TARGET
    series_small = set().union(*(w.series for w in results[small]))
    series_large = set().union(*(w.series for w in results[large]))
    added = sorted({family(x) for x in series_large - series_small})
    flat = count(large).median <= count(small).median
    body = [
        f"One node (`FLEET_NODE_TTL=10`, `FLEET_MAINTENANCE_INTERVAL=5`, "
        f"`FLEET_LOG_LEVEL=warning`), idle counters (`interval` 3600) started through HTTP "
        f"(64 in flight). At each size, {opts.runs} windows of {SCRAPES} scrapes, one every "
        f"{SPACING * 1000:.0f} ms over a keep-alive connection (a window spans a "
        "maintenance pass, as a real scraper's would), each timed from request sent to body "
        "read, with a `GET /health` in between as the floor. Series: the sample lines (not "
        f"starting with `#`). Target: a scrape ≤ {TARGET * 1000:.0f} ms (p99) at "
        f"{large:,} sessions; the series count does not grow with the sessions.",
        "",
        *common.table(
            ["sessions", "scrape p50", "scrape p99", "slowest", "/health p50", "series", "body"],
            rows,
        ),
        "",
        f"Scrape at {large:,} sessions: p50 {p50_large.ms()}, p99 {p99_large.ms()} "
        f"(target ≤ {TARGET * 1000:.0f} ms: {common.verdict(latency_met)}). Series: "
        f"{count(small).fmt('', 0)} at {small:,} sessions, {count(large).fmt('', 0)} at "
        f"{large:,} ({common.verdict(flat)}: no more series at the larger size"
        + (
            f"; the new ones are {len(series_large - series_small)} series of "
            + ", ".join(f"`{s}`" for s in added[:8])
            if added
            else ""
        )
        + ").",
    ]
    notes = [
        "No label carries a session or call id; the other labels are meant to be small "
        "fixed sets (route templates, status classes, end reasons, Redis operation "
        "names), each value adding its series when first used.",
        f"The node's RSS at the end: {rss / 2**20:,.0f} MiB with {large:,} idle sessions.",
        common.load_note(load_before),
    ]
    if any("watch+" in a for a in added):
        notes.insert(
            0,
            "**The series grow with the sessions**: `fleet_redis_command_seconds` labels a "
            "pipelined Redis call with its scripts' names joined by `+` "
            "(`Scripts.run_pipeline`), and the maintenance pass's `watch` pipeline holds one "
            "call per 500 local sessions, so each new multiple of 500 sessions adds a label "
            "value (`watch+watch+…`, one more `watch` per 500 sessions) and its 17 series. "
            "The label set is not bounded.",
        )
    if refused:
        notes.append(f"Starts refused on the way (retried): {refused}.")
    summary = (
        f"`GET /metrics` with {large:,} live sessions: p50 {p50_large.ms()}, p99 "
        f"{p99_large.ms()} (target ≤ {TARGET * 1000:.0f} ms: {common.verdict(latency_met)}); "
        f"{count(large).fmt('', 0)} series, as at {small:,} sessions "
        f"({count(small).fmt('', 0)}): {common.verdict(flat)}."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
