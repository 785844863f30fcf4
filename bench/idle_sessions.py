"""idle_sessions: one node holding 10,000 concurrent idle sessions.

One node; 10,000 counter sessions with ``interval`` 60 (so none ticks within the run: each
run ends well under a minute after its first start) are started through HTTP with 64 in
flight. Per run, on a fresh fleet:

* RSS (``VmRSS`` of the node's ``/proc/<pid>/status``) before the starts and after them
  (at the end of the quiet window), and the peak (``VmHWM``);
* the time to start all 10,000;
* event-loop lag, measured from outside: a separate process sends ``GET /health`` every
  10 ms over a keep-alive connection, during the starts and through a quiet window of 15 s
  after them, and records each answer's latency. ``/health`` does nothing but answer, so
  its latency is an upper bound of how long the loop was busy with something else (it
  includes the HTTP round trip itself, about half a millisecond here).

Two variants: the default maintenance interval (5 s) and ``FLEET_MAINTENANCE_INTERVAL=1``,
to see what a maintenance pass over 10,000 sessions costs the loop.

To tell the causes of long stalls apart, the node also records its full (generation 2)
garbage collections: a ``sitecustomize`` module put on the node's ``PYTHONPATH`` adds a
``gc.callbacks`` hook that writes when each one ran and how long it took. fleet itself is
unchanged; the hook costs two clock reads per collection.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common

NAME = "idle_sessions"
TITLE = "idle_sessions: 10,000 idle sessions on one node"
SESSIONS = 10_000
QUICK_SESSIONS = 2_000
QUIET = 15.0
QUICK_QUIET = 6.0
MAX_RUNS = 3
TARGET_RSS = 300 * 2**20
TARGET_LAG = 0.050
VARIANTS = (("5", "default: every 5 s"), ("1", "every 1 s"))
POLLER = r"""
import os, re, socket, sys, time
port, seconds, out, stop = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
request = b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n"
length = re.compile(rb"content-length:\s*(\d+)", re.I)
sock = socket.create_connection(("127.0.0.1", port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
lines = []
end = time.monotonic() + seconds
while time.monotonic() < end and not os.path.exists(stop):
    began = time.monotonic()
    sock.sendall(request)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    need = int(length.search(head)[1])
    while len(rest) < need:
        rest += sock.recv(65536)
    took = time.monotonic() - began
    lines.append(f"{began:.6f} {took:.6f}")
    time.sleep(0.01)
with open(out, "w") as f:
    f.write("\n".join(lines))
"""


SITECUSTOMIZE = """\
import gc, os, time
_path = os.environ.get("BENCH_GC_LOG")
if _path:
    _out = open(_path, "a", buffering=1)
    _began = [0.0]

    def _timed(phase, info):
        if phase == "start":
            _began[0] = time.perf_counter()
        elif info["generation"] == 2:
            took = time.perf_counter() - _began[0]
            _out.write(f"{time.monotonic():.6f} {took:.6f} {info['collected']}\\n")

    gc.callbacks.append(_timed)
"""


@dataclass
class Run:
    rss_before: int = 0
    rss_after: int = 0
    rss_peak: int = 0
    started: int = 0
    start_seconds: float = 0.0
    during: list[float] = field(default_factory=list)
    quiet: list[float] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    watch_mean: float = float("nan")
    gc_during: list[float] = field(default_factory=list)  # full collections' pauses (s)
    gc_quiet: list[float] = field(default_factory=list)
    gc_collected: int = 0
    began: float = 0.0
    ended: float = 0.0
    stop: float = 0.0


def status_bytes(pid: int, field_name: str) -> int:
    m = re.search(rf"^{field_name}:\s*(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m[1]) * 1024 if m else 0


_WATCH = re.compile(r'^fleet_redis_command_seconds_(sum|count)\{command="watch"\} (\S+)$', re.M)


def watch_mean(text: str) -> float:
    """Mean seconds of the maintenance pass's Redis part (``watch``), from /metrics."""
    values = {m[1]: float(m[2]) for m in _WATCH.finditer(text)}
    return values["sum"] / values["count"] if values.get("count") else float("nan")


def one_run(interval: str, sessions: int, quiet: float) -> Run:
    out = Run()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        gc_file = Path(tmp) / "gc.txt"
        settings = {
            "FLEET_NODE_TTL": "10",
            "FLEET_MAINTENANCE_INTERVAL": interval,
            "FLEET_LOG_LEVEL": "warning",
            "PYTHONPATH": tmp,
            "BENCH_GC_LOG": str(gc_file),
        }
        with common.local_fleet(1, **settings) as fleet:
            measure_node(fleet, tmp, sessions, quiet, out)
        if gc_file.exists():
            for line in gc_file.read_text().splitlines():
                t, took, collected = map(float, line.split())
                out.gc_collected += int(collected)
                if out.began <= t < out.ended:
                    out.gc_during.append(took)
                elif out.ended <= t < out.stop:
                    out.gc_quiet.append(took)
    return out


def measure_node(fleet: Any, tmp: str, sessions: int, quiet: float, out: Run) -> None:
    node = fleet.nodes[0]
    time.sleep(1.0)
    out.rss_before = common.rss_bytes(node.pid)
    lag_file, stop_file = Path(tmp) / "lag.txt", Path(tmp) / "stop"
    budget = 300.0 + quiet
    poller = subprocess.Popen(
        [sys.executable, "-c", POLLER, str(node.port), str(budget), str(lag_file),
         str(stop_file)]
    )  # fmt: skip
    time.sleep(0.5)
    out.began = began = time.monotonic()
    out.started = asyncio.run(common.start_idle(node.port, sessions, "idle", 60, out.refused))
    out.ended = ended = time.monotonic()
    out.start_seconds = ended - began
    common.progress(
        f"{out.started:,} sessions started in {out.start_seconds:.1f}s; quiet window {quiet:.0f}s"
    )
    time.sleep(quiet)
    out.stop = stop = time.monotonic()
    out.rss_after = common.rss_bytes(node.pid)
    out.rss_peak = status_bytes(node.pid, "VmHWM")
    out.watch_mean = watch_mean(fleet.http.get(f"{node.url}/metrics").text)
    stop_file.touch()
    poller.wait(30)
    if not lag_file.exists():
        raise RuntimeError("the /health poller wrote nothing")
    for line in lag_file.read_text().splitlines():
        t, took = map(float, line.split())
        if began <= t < ended:
            out.during.append(took)
        elif ended <= t < stop:
            out.quiet.append(took)


def run(opts: common.Options) -> common.Report:
    sessions = QUICK_SESSIONS if opts.quick else SESSIONS
    quiet = QUICK_QUIET if opts.quick else QUIET
    runs = min(opts.runs, MAX_RUNS)
    load_before = common.load_average()
    results: dict[str, list[Run]] = {}
    for i in range(runs):
        for interval, _ in VARIANTS:
            r = one_run(interval, sessions, quiet)
            common.progress(
                f"run {i + 1}/{runs}, maintenance {interval}s: RSS "
                f"{r.rss_before / 2**20:.0f} -> {r.rss_after / 2**20:.0f} MiB; /health p99 "
                f"during {common.quantile(r.during, 0.99) * 1000:.1f} ms, after "
                f"{common.quantile(r.quiet, 0.99) * 1000:.1f} ms"
            )
            results.setdefault(interval, []).append(r)
    return report(opts, runs, sessions, quiet, results, load_before)


def report(
    opts: common.Options,
    runs: int,
    sessions: int,
    quiet: float,
    results: dict[str, list[Run]],
    load_before: str,
) -> common.Report:
    def agg(interval: str, get: Any) -> common.Agg:
        return common.Agg.of(get(r) for r in results[interval])

    mib = 1 / 2**20
    rows: list[list[str]] = []
    figures = [
        ("sessions started", lambda r: r.started, "", 0, 1.0),
        ("time to start them (64 in flight)", lambda r: r.start_seconds, " s", 1, 1.0),
        ("starts per second", lambda r: r.started / r.start_seconds, "", 0, 1.0),
        ("RSS before", lambda r: r.rss_before, " MiB", 0, mib),
        ("**RSS after**", lambda r: r.rss_after, " MiB", 0, mib),
        ("RSS peak (`VmHWM`)", lambda r: r.rss_peak, " MiB", 0, mib),
        ("RSS per session", lambda r: (r.rss_after - r.rss_before) / r.started, " KiB", 1,
         1 / 1024),
        ("`/health` p50 during the starts", lambda r: common.quantile(r.during, 0.5), " ms", 2,
         1000.0),
        ("**`/health` p99 during the starts**", lambda r: common.quantile(r.during, 0.99),
         " ms", 1, 1000.0),
        ("`/health` max during the starts", lambda r: max(r.during), " ms", 1, 1000.0),
        (f"`/health` p50, quiet {quiet:.0f} s after", lambda r: common.quantile(r.quiet, 0.5),
         " ms", 2, 1000.0),
        (f"**`/health` p99, quiet {quiet:.0f} s after**",
         lambda r: common.quantile(r.quiet, 0.99), " ms", 1, 1000.0),
        (f"`/health` max, quiet {quiet:.0f} s after", lambda r: max(r.quiet), " ms", 1, 1000.0),
        ("`/health` polls over 50 ms, quiet window", lambda r: sum(x > 0.05 for x in r.quiet),
         "", 0, 1.0),
        ("maintenance pass, Redis part (`watch` mean)", lambda r: r.watch_mean, " ms", 1,
         1000.0),
        ("full GCs during the starts", lambda r: len(r.gc_during), "", 0, 1.0),
        ("…their total pause", lambda r: sum(r.gc_during), " s", 2, 1.0),
        ("…the longest", lambda r: max(r.gc_during, default=0.0), " ms", 0, 1000.0),
        (f"full GCs, quiet {quiet:.0f} s after", lambda r: len(r.gc_quiet), "", 0, 1.0),
        ("…the longest", lambda r: max(r.gc_quiet, default=0.0), " ms", 0, 1000.0),
    ]  # fmt: skip
    for label, get, unit, digits, scale in figures:
        rows.append([label, *(agg(i, get).fmt(unit, digits, scale) for i, _ in VARIANTS)])
    default = VARIANTS[0][0]
    rss = agg(default, lambda r: r.rss_after)
    lag_during = agg(default, lambda r: common.quantile(r.during, 0.99))
    lag_quiet = {i: agg(i, lambda r: common.quantile(r.quiet, 0.99)) for i, _ in VARIANTS}
    rss_met = all(agg(i, lambda r: r.rss_after).median <= TARGET_RSS for i, _ in VARIANTS)
    lag_met = lag_during.median <= TARGET_LAG and all(
        a.median <= TARGET_LAG for a in lag_quiet.values()
    )
    refused: dict[str, int] = {}
    for rs in results.values():
        for r in rs:
            for k, v in r.refused.items():
                refused[k] = refused.get(k, 0) + v
    body = [
        f"{runs} runs per variant, each on a fresh one-node fleet (`FLEET_NODE_TTL=10`, "
        f"`FLEET_LOG_LEVEL=warning`): {sessions:,} counters with `interval` 60 (none ticks "
        "within a run), started through HTTP with 64 in flight, then a quiet window of "
        f"{quiet:.0f} s. A separate process polls `GET /health` every 10 ms throughout, over "
        "a keep-alive connection; its latency is an upper bound of the node's event-loop "
        "lag (it includes the HTTP round trip, about half a millisecond). Targets: RSS ≤ "
        f"{TARGET_RSS / 2**20:.0f} MiB with {sessions:,} sessions; loop lag p99 ≤ "
        f"{TARGET_LAG * 1000:.0f} ms.",
        "",
        *common.table(["figure", *(f"maintenance {label}" for _, label in VARIANTS)], rows),
        "",
        f"RSS with {sessions:,} sessions: {rss.fmt(' MiB', 0, mib)} (target ≤ "
        f"{TARGET_RSS / 2**20:.0f} MiB: {common.verdict(rss_met)}). Loop lag p99 (upper "
        f"bound): {lag_during.ms(1)} during the starts, "
        + ", ".join(
            f"{lag_quiet[i].ms(1)} in the quiet window with maintenance {label}"
            for i, label in VARIANTS
        )
        + f" (target ≤ {TARGET_LAG * 1000:.0f} ms: {common.verdict(lag_met)}).",
    ]
    notes = [
        "During the starts the node answers 64 starts at a time besides `/health`: that "
        "`/health` waits behind them is expected; the quiet window shows what the node does "
        "on its own (lease renewal, the maintenance pass over all its sessions, the "
        "one-second limits tick).",
        "The benchmark's client, the poller, Redis and the node share the machine's two "
        "cores with other agents' tests.",
        common.load_note(load_before),
    ]
    gc_count = agg(default, lambda r: len(r.gc_during))
    gc_total = agg(default, lambda r: sum(r.gc_during))
    gc_max = agg(default, lambda r: max(r.gc_during + r.gc_quiet, default=0.0))
    notes.insert(
        0,
        "**The longest stalls are CPython's full garbage collections.** Every start leaves "
        "about 25 long-lived objects behind (the session, its task, coroutines, context "
        "and events), and a full (generation 2) collection walks all of them: it takes "
        "longer the more sessions live. A serving node freezes what its start-up built and "
        "runs a full collection every 100 middle-generation collections instead of "
        "CPython's 10 (`fleet/serve/gc_tuning.py`; docs/operations.md), so they are few. With "
        f"maintenance every 5 s: {gc_count.fmt('', 0)} full collections while starting "
        f"{sessions:,} sessions, {gc_total.fmt(' s')} of pauses in all, the longest "
        f"{gc_max.ms(0)}; all the full collections of a run freed "
        f"{agg(default, lambda r: r.gc_collected).fmt('', 0)} objects. Each one is a "
        "single slow poll: it sets the maximum, not the p99.",
    )
    if refused:
        notes.append(f"Starts refused on the way (retried), all runs: {refused}.")
    summary = (
        f"{sessions:,} idle sessions on one node: RSS {rss.fmt(' MiB', 0, mib)} (target ≤ "
        f"{TARGET_RSS / 2**20:.0f} MiB: {common.verdict(rss_met)}); loop lag p99 ≤ "
        f"{lag_during.ms(1)} during the starts and ≤ {lag_quiet[default].ms(1)} after "
        f"(maintenance every 5 s), ≤ {lag_quiet[VARIANTS[1][0]].ms(1)} with maintenance "
        f"every 1 s (target ≤ {TARGET_LAG * 1000:.0f} ms: {common.verdict(lag_met)})."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
