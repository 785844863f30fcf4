"""idle_sessions: one node holding 10,000 concurrent idle sessions.

One node; 10,000 counter sessions with ``interval`` 60 (so none ticks within the run: each
run ends well under a minute after its first start) are started through HTTP with 64 in
flight. Per run, on a fresh fleet:

* RSS (``VmRSS`` of the node's ``/proc/<pid>/status``) before the starts and after them
  (at the end of the quiet window), and the peak (``VmHWM``);
* the time to start all 10,000;
* event-loop lag, as the node measures it: ``fleet_event_loop_lag_seconds``, a 100 ms
  timer's lateness, is scraped from ``/metrics`` before and after each window (the starts;
  a quiet window of 15 s after them), and its p99 estimated from the buckets' differences
  (as Prometheus' ``histogram_quantile`` does), with the share of probes later than 50 ms
  (a bucket bound: exact);
* the longest gap between two lease renewals, ``fleet_node_lease_renewal_gap_max_seconds``
  (the largest since the node started), read at the same times: with ``FLEET_NODE_TTL=3``
  renewals are due every second, so a stall of a fifth of a second shows;
* event-loop lag from outside, too: a separate process sends ``GET /health`` every 10 ms
  over a keep-alive connection throughout and records each answer's latency. ``/health``
  does nothing but answer, so its latency is an upper bound of how long the loop was busy
  with something else (it includes the HTTP round trip itself, about half a millisecond
  here).

Two variants: the default maintenance interval (5 s) and ``FLEET_MAINTENANCE_INTERVAL=1``,
to see what maintenance passes with 10,000 sessions cost the loop.

To tell the causes of long stalls apart, the node also records its full (generation 2)
garbage collections: a ``sitecustomize`` module put on the node's ``PYTHONPATH`` adds a
``gc.callbacks`` hook that writes when each one ran and how long it took, and on
``SIGUSR1`` writes how many objects the collector tracks (before and after the starts: the
objects each session keeps alive). fleet itself is unchanged; the hook costs two clock
reads per collection.
"""

from __future__ import annotations

import asyncio
import math
import re
import signal
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
#: The lease is renewed every FLEET_NODE_TTL / 3 seconds: 1 s here.
NODE_TTL = 3.0
RENEWAL = NODE_TTL / 3
TARGET_GAP = 1.2 * RENEWAL
LAG = "fleet_event_loop_lag_seconds"
_GAP = re.compile(r"^fleet_node_lease_renewal_gap_max_seconds(?:\{[^}]*\})? (\S+)$", re.M)
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

    def _count(signum, frame):
        _out.write(f"objects {time.monotonic():.6f} {len(gc.get_objects())}\\n")

    import signal
    signal.signal(signal.SIGUSR1, _count)
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
    # The node's own figures, from /metrics: loop-lag buckets over each window, and the
    # longest renewal gap so far after the start-up, the starts and the quiet window.
    lag_during: dict[float, float] = field(default_factory=dict)
    lag_quiet: dict[float, float] = field(default_factory=dict)
    gap_before: float = math.nan
    gap_during: float = math.nan
    gap_after: float = math.nan
    objects: list[int] = field(default_factory=list)  # tracked before / after the starts
    gc_during: list[float] = field(default_factory=list)  # full collections' pauses (s)
    gc_quiet: list[float] = field(default_factory=list)
    gc_collected: int = 0
    began: float = 0.0
    ended: float = 0.0
    stop: float = 0.0


def status_bytes(pid: int, field_name: str) -> int:
    m = re.search(rf"^{field_name}:\s*(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m[1]) * 1024 if m else 0


def renewal_gap(text: str) -> float:
    """``fleet_node_lease_renewal_gap_max_seconds`` from /metrics text."""
    m = _GAP.search(text)
    return float(m[1]) if m else math.nan


def lag_p99(buckets: dict[float, float]) -> float:
    return common.bucket_quantile(buckets, 0.99)


def probes(buckets: dict[float, float]) -> float:
    """How many probes a window's buckets hold."""
    return buckets.get(math.inf, 0.0) or math.nan


def lag_over(buckets: dict[float, float], bound: float = TARGET_LAG) -> float:
    """The share of probes later than ``bound`` (a bucket bound)."""
    total = buckets.get(math.inf, 0.0)
    return (total - buckets.get(bound, 0.0)) / total if total else math.nan


def one_run(interval: str, sessions: int, quiet: float) -> Run:
    out = Run()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        gc_file = Path(tmp) / "gc.txt"
        settings = {
            "FLEET_NODE_TTL": f"{NODE_TTL:g}",
            "FLEET_MAINTENANCE_INTERVAL": interval,
            "FLEET_LOG_LEVEL": "warning",
            "PYTHONPATH": tmp,
            "BENCH_GC_LOG": str(gc_file),
        }
        with common.local_fleet(1, **settings) as fleet:
            measure_node(fleet, tmp, sessions, quiet, out)
        if gc_file.exists():
            for line in gc_file.read_text().splitlines():
                if line.startswith("objects"):
                    out.objects.append(int(line.split()[2]))
                    continue
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

    def scrape() -> str:
        return str(fleet.http.get(f"{node.url}/metrics").text)

    def count_objects() -> None:
        node.signal(signal.SIGUSR1)
        time.sleep(0.5)

    count_objects()
    m0 = scrape()
    out.began = began = time.monotonic()
    out.started = asyncio.run(common.start_idle(node.port, sessions, "idle", 60, out.refused))
    out.ended = ended = time.monotonic()
    m1 = scrape()
    out.start_seconds = ended - began
    common.progress(
        f"{out.started:,} sessions started in {out.start_seconds:.1f}s; quiet window {quiet:.0f}s"
    )
    time.sleep(quiet)
    out.stop = stop = time.monotonic()
    m2 = scrape()
    out.rss_after = common.rss_bytes(node.pid)
    out.rss_peak = status_bytes(node.pid, "VmHWM")
    count_objects()
    lag = [common.histogram_buckets(m, LAG) for m in (m0, m1, m2)]
    out.lag_during = common.bucket_delta(lag[1], lag[0])
    out.lag_quiet = common.bucket_delta(lag[2], lag[1])
    out.gap_before, out.gap_during, out.gap_after = (renewal_gap(m) for m in (m0, m1, m2))
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
                f"{r.rss_before / 2**20:.0f} -> {r.rss_after / 2**20:.0f} MiB; loop lag p99 "
                f"during {lag_p99(r.lag_during) * 1000:.1f} ms, after "
                f"{lag_p99(r.lag_quiet) * 1000:.1f} ms; /health p99 during "
                f"{common.quantile(r.during, 0.99) * 1000:.1f} ms, after "
                f"{common.quantile(r.quiet, 0.99) * 1000:.1f} ms; longest renewal gap "
                f"{r.gap_after:.2f} s"
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
    q = f"quiet {quiet:.0f} s after"
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
        ("objects the collector tracks, per session",
         lambda r: (r.objects[1] - r.objects[0]) / r.started if len(r.objects) == 2
         else math.nan, "", 1, 1.0),
        ("**loop lag p99 during the starts** (the node's histogram)",
         lambda r: lag_p99(r.lag_during), " ms", 1, 1000.0),
        ("…probes in the window", lambda r: probes(r.lag_during), "", 0, 1.0),
        ("…probes later than 50 ms", lambda r: lag_over(r.lag_during), " %", 1, 100.0),
        (f"**loop lag p99, {q}**", lambda r: lag_p99(r.lag_quiet), " ms", 1, 1000.0),
        ("…probes later than 50 ms", lambda r: lag_over(r.lag_quiet), " %", 1, 100.0),
        ("longest renewal gap: start-up", lambda r: r.gap_before, " s", 2, 1.0),
        ("longest renewal gap: through the starts", lambda r: r.gap_during, " s", 2, 1.0),
        (f"**longest renewal gap: through the {q.removesuffix(' after')} window**",
         lambda r: r.gap_after, " s", 2, 1.0),
        ("`/health` p50 during the starts", lambda r: common.quantile(r.during, 0.5), " ms", 2,
         1000.0),
        ("`/health` p99 during the starts", lambda r: common.quantile(r.during, 0.99),
         " ms", 1, 1000.0),
        ("`/health` max during the starts", lambda r: max(r.during), " ms", 1, 1000.0),
        (f"`/health` p50, {q}", lambda r: common.quantile(r.quiet, 0.5), " ms", 2, 1000.0),
        (f"`/health` p99, {q}", lambda r: common.quantile(r.quiet, 0.99), " ms", 1, 1000.0),
        (f"`/health` max, {q}", lambda r: max(r.quiet), " ms", 1, 1000.0),
        ("`/health` polls over 50 ms, quiet window", lambda r: sum(x > 0.05 for x in r.quiet),
         "", 0, 1.0),
        ("full GCs during the starts", lambda r: len(r.gc_during), "", 0, 1.0),
        ("…their total pause", lambda r: sum(r.gc_during), " s", 2, 1.0),
        ("…the longest", lambda r: max(r.gc_during, default=0.0), " ms", 0, 1000.0),
        (f"full GCs, {q}", lambda r: len(r.gc_quiet), "", 0, 1.0),
        ("…the longest", lambda r: max(r.gc_quiet, default=0.0), " ms", 0, 1000.0),
    ]  # fmt: skip
    for label, get, unit, digits, scale in figures:
        rows.append([label, *(agg(i, get).fmt(unit, digits, scale) for i, _ in VARIANTS)])
    default = VARIANTS[0][0]
    names = [i for i, _ in VARIANTS]
    rss = agg(default, lambda r: r.rss_after)
    rss_met = all(agg(i, lambda r: r.rss_after).median <= TARGET_RSS for i in names)
    during = {i: agg(i, lambda r: lag_p99(r.lag_during)) for i in names}
    after = {i: agg(i, lambda r: lag_p99(r.lag_quiet)) for i in names}
    gap = {i: agg(i, lambda r: r.gap_after) for i in names}
    lag_met = all(a.median <= TARGET_LAG for a in (*during.values(), *after.values()))
    gap_met = all(g.median <= TARGET_GAP for g in gap.values())
    refused: dict[str, int] = {}
    for rs in results.values():
        for r in rs:
            for k, v in r.refused.items():
                refused[k] = refused.get(k, 0) + v
    body = [
        f"{runs} runs per variant, each on a fresh one-node fleet (`FLEET_NODE_TTL="
        f"{NODE_TTL:g}`: a renewal every {RENEWAL:g} s; `FLEET_LOG_LEVEL=warning`): "
        f"{sessions:,} counters with `interval` 60 (none ticks within a run), started "
        f"through HTTP with 64 in flight, then a quiet window of {quiet:.0f} s. Loop lag is "
        "the node's own `fleet_event_loop_lag_seconds` (a 100 ms timer's lateness), "
        "scraped before and after each window, its p99 estimated from the buckets' "
        "differences; the renewal gap is `fleet_node_lease_renewal_gap_max_seconds`, the "
        "longest since the node started. A separate process also polls `GET /health` "
        "every 10 ms throughout, over a keep-alive connection: its latency is an upper "
        "bound of the loop's lag seen from outside (with the HTTP round trip, about half a "
        f"millisecond). Targets: RSS ≤ {TARGET_RSS / 2**20:.0f} MiB with {sessions:,} "
        f"sessions; loop lag p99 ≤ {TARGET_LAG * 1000:.0f} ms during the starts and after "
        f"them; the longest renewal gap ≤ 1.2 × the renewal interval "
        f"({TARGET_GAP:.1f} s) throughout.",
        "",
        *common.table(["figure", *(f"maintenance {label}" for _, label in VARIANTS)], rows),
        "",
        f"RSS with {sessions:,} sessions: {rss.fmt(' MiB', 0, mib)} (target ≤ "
        f"{TARGET_RSS / 2**20:.0f} MiB: {common.verdict(rss_met)}). Loop lag p99: "
        + ", ".join(
            f"{during[i].ms(1)} during the starts and {after[i].ms(1)} after them with "
            f"maintenance {label}"
            for i, label in VARIANTS
        )
        + f" (target ≤ {TARGET_LAG * 1000:.0f} ms: {common.verdict(lag_met)}). Longest "
        "renewal gap: "
        + ", ".join(f"{gap[i].fmt(' s')} with maintenance {label}" for i, label in VARIANTS)
        + f" (target ≤ {TARGET_GAP:.1f} s: {common.verdict(gap_met)}).",
    ]
    notes = [
        "The histogram's buckets are 1, 2.5, 5, 10, 25, 50, 100 ms, …: a p99 within a bucket "
        "is interpolated, as `histogram_quantile` does, while the share of probes later "
        "than 50 ms is exact. Probes come every 100 ms, so a window of a few seconds holds "
        "a few dozen: its p99 is close to its worst probe.",
        "During the starts the node answers 64 starts at a time besides `/health`: that "
        "`/health` waits behind them is expected; the quiet window shows what the node does "
        "on its own (lease renewal, the maintenance pass, the one-second limits tick).",
        "The benchmark's client, the poller, Redis and the node share the machine's two "
        "cores with other agents' tests.",
        common.load_note(load_before),
    ]
    gc_count = agg(default, lambda r: len(r.gc_during))
    gc_total = agg(default, lambda r: sum(r.gc_during))
    gc_max = agg(default, lambda r: max(r.gc_during + r.gc_quiet, default=0.0))
    one_probe = agg(default, lambda r: 100 / probes(r.lag_during))
    per_session = agg(
        default,
        lambda r: (r.objects[1] - r.objects[0]) / r.started if len(r.objects) == 2 else math.nan,
    )
    notes.insert(
        0,
        "**The longest stalls are CPython's full garbage collections.** Every session keeps "
        f"about {per_session.fmt('', 0)} objects the collector tracks alive (the session, "
        "its task and coroutines, its context and events), and a full (generation 2) "
        "collection walks all of them: it takes longer the more sessions live. A serving "
        "node freezes what its start-up built and runs a full collection every 100 "
        "middle-generation collections instead of CPython's 10 (`fleet/serve/gc_tuning.py`; "
        "docs/operations.md), so they are few. With maintenance every 5 s: "
        f"{gc_count.fmt('', 0)} full collections while starting {sessions:,} sessions, "
        f"{gc_total.fmt(' s')} of pauses in all, the longest {gc_max.ms(0)}; all the full "
        f"collections of a run freed {agg(default, lambda r: r.gc_collected).fmt('', 0)} "
        "objects. A full collection makes one probe late by its whole pause, and during "
        f"the starts one probe is {one_probe.fmt('', 1)} % "
        "of them: one full collection there puts the loop lag's p99 over 50 ms by itself "
        "(the `/health` poller, 10 times as many samples, sees it at its maximum instead). "
        "Not collecting sessions in full would take it away: CPython 3.14's incremental "
        "collector, or `gc.freeze()` after a burst of starts once an ended session leaves "
        "no cyclic garbage (today about 18 objects each, measured by ending 2,000 sessions "
        "with the collector off: frozen, those would never be freed). Fewer objects per "
        "session only shorten it.",
    )
    if refused:
        notes.append(f"Starts refused on the way (retried), all runs: {refused}.")
    summary = (
        f"{sessions:,} idle sessions on one node: RSS {rss.fmt(' MiB', 0, mib)} (target ≤ "
        f"{TARGET_RSS / 2**20:.0f} MiB: {common.verdict(rss_met)}); the node's loop lag p99 "
        f"{during[default].ms(1)} during the starts (64 in flight) and {after[default].ms(1)} "
        f"after them (maintenance every 5 s; {after[names[1]].ms(1)} with maintenance every "
        f"1 s; target ≤ {TARGET_LAG * 1000:.0f} ms: {common.verdict(lag_met)}); longest "
        f"renewal gap {gap[default].fmt(' s')} (target ≤ {TARGET_GAP:.1f} s: "
        f"{common.verdict(gap_met)})."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
