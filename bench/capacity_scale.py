"""One scale of bench/capacity.py: N nodes × M sessions on a fresh 3-master Cluster.

The nodes run in processes of at most ``PER_PROCESS`` nodes (``bench/capacity_fleet.py``),
each node with its own Cluster client. In order, each sampled every second on every shard
(``bench/capacity_shards.py``):

1. **idle**: the nodes alone (leases and maintenance passes), ``IDLE`` seconds;
2. **mass start**: every node starts its M counters (``interval`` = the tick) at once,
   in two halves: the first measured clean, the second under ``MONITOR`` (by hash tag);
3. **steady**: after one tick, ``STEADY`` windows, then a ``MONITOR`` window;
4. **failover**: SIGKILL of one process (10 nodes, or half the nodes when there are
   fewer than 20): their leases lapse and the live nodes' maintenance passes move their
   sessions. Timed from the kill to each session's ``session_resumed`` event (its stream
   id is Redis' clock); the window from the lease lapse to the last resume is measured
   like the others.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common
from bench.capacity_shards import Rates, Sampler, Shard, Sorted, monitor, shards_of

PER_PROCESS = 10
IDLE = 15.0
STEADY = 3
STEADY_WINDOW = 20.0
MONITOR_WINDOW = 10.0
START_CONCURRENCY = 4
START_RATE = 500.0  # sessions started a second, all nodes together
RESUME_LIMIT = 600.0  # seconds the dead nodes' slots may take to move; then 60 s to resume
SETTLE = 10.0  # seconds between the last start and the first steady window
#: Node settings: fleet's defaults, written out (FLEET_NODE_TTL 10, so a lease is renewed
#: every 3.3 s; a maintenance pass and a metrics report every 5 s).
NODE_SETTINGS: dict[str, Any] = {
    "node_ttl": 10.0,
    "maintenance_interval": 5.0,
    "metrics_report_interval": 5.0,
}


@dataclass
class Window:
    """Every shard over one window, and the node processes' CPU."""

    shards: list[Rates]
    node_cpu: float  # cores
    busy: float = math.nan  # share of the whole machine's CPU that was busy (/proc/stat)

    @property
    def seconds(self) -> float:
        return self.shards[0].seconds if self.shards else math.nan

    @property
    def commands(self) -> float:
        return sum(s.commands for s in self.shards)

    @property
    def cpu(self) -> float:
        return sum(s.cpu for s in self.shards)

    def command(self, name: str) -> float:
        return sum(s.by_command.get(name, 0.0) for s in self.shards)


@dataclass
class Failover:
    killed: int = 0
    moved: int = 0
    lapse: float = math.nan  # seconds after the kill: the last of the killed leases lapses
    first: float = math.nan
    p50: float = math.nan
    last: float = math.nan  # inf when some never came back
    not_back: int = 0
    ended: int = 0
    window: Window | None = None  # from the lapse to the last resume
    ended_anywhere: dict[str, int] = field(default_factory=dict)  # since the kill, by reason
    live_before: int = 0
    live_after: int = 0
    node_cpu: float = math.nan  # CPU seconds the surviving node processes spent, kill to end
    reap_calls: float = 0.0  # reap.lua calls that found the node dead (SISMEMBER), kill to end
    moves: float = 0.0  # of those, slots moved (SMOVE)
    record_reads: float = 0.0  # session records read by reapers (HGETALL without LRANGE)
    seconds: float = math.nan  # from the kill to the end of the wait
    slots_moved: float = math.nan  # seconds after the kill: no slot left on a dead node
    peak: list[Rates] = field(default_factory=list)


@dataclass
class ScaleRun:
    nodes: int
    per_node: int
    tick: float
    layout: list[int]
    pool: int = 0  # connections per shard per node; 0: fleet's client as it is (100)
    ttl: float = 10.0  # FLEET_NODE_TTL
    only_failover: bool = False
    g_shard: int = 0
    idle: Window | None = None
    start: Window | None = None  # the first half, clean
    start_rate: float = math.nan  # sessions started per second, first half
    start_peak: list[Rates] = field(default_factory=list)
    start_sorted: Sorted | None = None  # the second half
    started: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    steady: list[Window] = field(default_factory=list)
    steady_sorted: Sorted | None = None
    failover: Failover = field(default_factory=Failover)
    memory: int = 0  # used_memory of all shards at steady state, less with the nodes idle
    lag: dict[str, float] = field(default_factory=dict)  # phase -> worst event-loop lag (s)
    # What MONITOR saw over what INFO commandstats counted in the same seconds.
    coverage: dict[str, float] = field(default_factory=dict)
    log_problems: dict[str, int] = field(default_factory=dict)

    @property
    def sessions(self) -> int:
        return self.nodes * self.per_node


def layout_of(nodes: int) -> list[int]:
    """Nodes per process: processes of ``PER_PROCESS``, the last one smaller; with fewer
    than two full processes, two halves (so that one can be killed)."""
    if nodes < 2 * PER_PROCESS:
        return [nodes // 2, nodes - nodes // 2]
    out = [PER_PROCESS] * (nodes // PER_PROCESS)
    if nodes % PER_PROCESS:
        out.append(nodes % PER_PROCESS)
    return out


class Children:
    """The node processes, driven one JSON line at a time."""

    def __init__(
        self, url: str, layout: list[int], logdir: Path, pool: int = 0, ttl: float = 10.0
    ) -> None:
        settings = {**NODE_SETTINGS, "node_ttl": ttl}
        self.logdir = logdir
        self.procs: list[subprocess.Popen[str]] = []
        self.first: list[int] = []
        self.cpu_last: dict[int, float] = {}
        first = 0
        for i, count in enumerate(layout):
            log = (logdir / f"nodes-{i}.log").open("w")
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable, "-m", "bench.capacity_fleet", "--url", url,
                        "--prefix", "fleet", "--nodes", str(count), "--first", str(first),
                        "--settings", json.dumps(settings), "--pool", str(pool),
                    ],
                    cwd=common.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=log, text=True,
                )
            )  # fmt: skip
            self.first.append(first)
            first += count
        self.alive = set(range(len(self.procs)))

    def _read(self, i: int) -> dict[str, Any]:
        out = self.procs[i].stdout
        assert out is not None
        line = out.readline()
        if not line:
            raise RuntimeError(f"node process {i} ended; see {self.logdir}/nodes-{i}.log")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"node process {i}: {answer['error']}")
        return answer

    def ready(self) -> None:
        for i in sorted(self.alive):
            self._read(i)

    def ask(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        """Send ``cmd`` to every live process at once; their answers."""
        for i in sorted(self.alive):
            stdin = self.procs[i].stdin
            assert stdin is not None
            stdin.write(json.dumps(cmd) + "\n")
            stdin.flush()
        return [self._read(i) for i in sorted(self.alive)]

    def cpu(self) -> float:
        """CPU seconds of the live processes so far (the killed ones' last reading kept
        aside: a window over a kill counts only the survivors)."""
        total = 0.0
        for i in sorted(self.alive):
            value = common.cpu_seconds(self.procs[i].pid)
            if not math.isnan(value):
                self.cpu_last[i] = value
            total += self.cpu_last.get(i, 0.0)
        return total

    def kill(self, i: int) -> None:
        os.kill(self.procs[i].pid, signal.SIGKILL)
        self.alive.discard(i)
        self.procs[i].wait()

    def close(self) -> None:
        for i in sorted(self.alive):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.procs[i].pid, signal.SIGKILL)
            self.procs[i].wait()
        self.alive.clear()


class Marks:
    """Sampler marks with the node processes' CPU at the same moment."""

    def __init__(self, sampler: Sampler, children: Children) -> None:
        self.sampler = sampler
        self.children = children

    def mark(self) -> Mark:
        busy, total = common.machine_busy()
        return Mark(self.sampler.now(), self.children.cpu(), time.monotonic(), busy, total)

    def window(self, a: Mark, b: Mark) -> Window:
        busy = (b.busy - a.busy) / max(b.total - a.total, 1e-9)
        return Window(self.sampler.window(a.index, b.index), (b.cpu - a.cpu) / b.since(a), busy)


@dataclass(frozen=True)
class Mark:
    index: int  # of the sampler's reading
    cpu: float  # node processes' CPU seconds
    at: float  # monotonic
    busy: float  # the machine's busy and total CPU seconds (/proc/stat)
    total: float

    def since(self, a: Mark) -> float:
        return max(self.at - a.at, 1e-9)


def _cluster() -> Any:
    """A fresh 3-master Cluster, every master of it whole (``LocalCluster.start``)."""
    common._harness()  # the repository root on sys.path
    from tests.topologies import LocalCluster

    return LocalCluster().start()


def measure(
    nodes: int,
    per_node: int,
    tick: float,
    tag: str,
    *,
    pool: int = 0,
    ttl: float = 10.0,
    only_failover: bool = False,
) -> ScaleRun:
    """One scale, on a fresh Cluster. ``pool``: see ``bench.capacity_fleet.wide_client``;
    ``ttl``: ``FLEET_NODE_TTL``; ``only_failover``: the mass start and the failover only."""
    import redis.cluster
    from redis.crc import key_slot

    run = ScaleRun(nodes, per_node, tick, layout_of(nodes), pool, ttl, only_failover)
    cluster = _cluster()
    logdir = Path(tempfile.mkdtemp(prefix=f"fleet-capacity-{tag}-"))
    ports = [s.port for s in cluster.servers]
    shards = shards_of(ports)
    g_slot = key_slot(b"fleet:{g}:nodes")
    run.g_shard = next(i for i, s in enumerate(shards) if s.holds(g_slot))
    reader = redis.cluster.RedisCluster(host="127.0.0.1", port=ports[0], decode_responses=True)
    children = Children(cluster.url, run.layout, logdir, pool, ttl)
    try:
        with Sampler(shards) as sampler:
            marks = Marks(sampler, children)
            children.ready()
            common.progress(f"{tag}: {nodes} nodes up in {len(run.layout)} processes")
            _phases(run, marks, children, shards, reader, tag)
    finally:
        children.close()
        reader.close()
        cluster.stop()
    run.log_problems = _log_problems(logdir)
    return run


def _phases(
    run: ScaleRun, marks: Marks, children: Children, shards: list[Shard], reader: Any, tag: str
) -> None:
    ports = [s.port for s in shards]
    time.sleep(6.0)  # every node's first maintenance pass
    idle_memory = sum(r.memory for r in marks.sampler.readings[-1])
    if not run.only_failover:
        a = marks.mark()
        time.sleep(IDLE)
        run.idle = marks.window(a, marks.mark())
    _mass_start(run, marks, children, ports, tag)
    time.sleep(SETTLE)
    for i in range(0 if run.only_failover else STEADY):
        a = marks.mark()
        time.sleep(STEADY_WINDOW)
        w = marks.window(a, marks.mark())
        run.steady.append(w)
        lag = max(x["lag"] for x in children.ask({"op": "count"}))
        run.lag["steady"] = max(run.lag.get("steady", 0.0), lag)
        common.progress(
            f"{tag}: steady {i + 1}/{STEADY}: {w.commands:,.0f} commands/s, shard CPU "
            + ", ".join(f"{s.cpu * 100:.1f}%" for s in w.shards)
            + f", checkpoints {w.command('lpush'):,.0f}/s (expected "
            f"{run.sessions / run.tick:,.0f}), nodes {w.node_cpu:.2f} cores, "
            f"loop lag ≤ {lag:.2f}s"
        )
    run.memory = sum(r.memory for r in marks.sampler.readings[-1]) - idle_memory
    if not run.only_failover:
        run.steady_sorted = monitor(ports, MONITOR_WINDOW)
        marks.mark()  # a reading after the window, to count what it ran
        run.coverage["steady"] = _coverage(marks.sampler, run.steady_sorted)
    _failover(run, marks, children, reader, tag)


def _mass_start(
    run: ScaleRun, marks: Marks, children: Children, ports: list[int], tag: str
) -> None:
    """Every node starts its sessions, paced to ``START_RATE`` for the fleet; the first half
    measured clean, the second under ``MONITOR``."""
    half = run.per_node // 2
    params = {"interval": run.tick, "emit": True, "checkpoint": True, "metrics": True}
    cmd = {"op": "start", "worker": "paced", "params": params,
           "concurrency": START_CONCURRENCY, "rate": START_RATE / run.nodes}  # fmt: skip
    a = marks.mark()
    answers = children.ask({**cmd, "count": half, "tag": "h1"})
    b = marks.mark()
    run.start = marks.window(a, b)
    run.start_peak = marks.sampler.peaks(a.index, b.index)
    first_half = sum(x["started"] for x in answers)
    run.start_rate = first_half / b.since(a)
    common.progress(
        f"{tag}: first half, {first_half:,} sessions in {b.since(a):.1f}s "
        f"({run.start_rate:,.0f}/s); the second half"
        + ("" if run.only_failover else " under MONITOR")
    )
    seen: list[Sorted] = []
    spy = threading.Thread(
        target=lambda: seen.append(monitor(ports, min(MONITOR_WINDOW, 0.8 * b.since(a))))
    )
    if not run.only_failover:
        spy.start()
    answers += children.ask({**cmd, "count": run.per_node - half, "tag": "h2"})
    if not run.only_failover:
        spy.join()
    run.start_sorted = seen[0] if seen else None
    if run.start_sorted is not None:
        run.coverage["mass start"] = _coverage(marks.sampler, run.start_sorted)
    run.lag["mass start"] = max(x["lag"] for x in answers)
    run.started = sum(x["started"] for x in answers)
    for x in answers:
        for code, n in x["refused"].items():
            run.refused[code] = run.refused.get(code, 0) + n
    common.progress(f"{tag}: {run.started:,} sessions running")


def _failover(run: ScaleRun, marks: Marks, children: Children, reader: Any, tag: str) -> None:
    from fleet.store.keys import Keys

    keys = Keys("fleet")
    victim = next(i for i, n in enumerate(run.layout) if n == max(run.layout))
    dead = [f"cap-{children.first[victim] + j}" for j in range(run.layout[victim])]
    refs: list[str] = []
    for node in dead:
        refs += sorted(reader.smembers(keys.node_sessions(node)))
    f = run.failover
    f.killed, f.moved = len(dead), len(refs)
    f.live_before = int(reader.zcard(keys.live()))
    # The leases as they stand just before the kill: the last of them lapses then.
    expiry = max(float(reader.zscore(keys.nodes(), node) or 0) / 1000 for node in dead)
    before = marks.mark()
    survivors = sum(v for i, v in children.cpu_last.items() if i != victim)
    killed_at = time.time()
    children.kill(victim)
    f.lapse = expiry - killed_at
    common.progress(f"{tag}: killed {len(dead)} nodes holding {len(refs):,} sessions")
    live = {f"cap-{children.first[i] + j}" for i in children.alive for j in range(run.layout[i])}
    back = _wait_back(f, refs, dead, live, reader)
    after = marks.mark()
    f.node_cpu, f.seconds = after.cpu - survivors, after.since(before)
    run.lag["failover"] = max(x["lag"] for x in children.ask({"op": "count"}))
    f.not_back = len(refs) - len(back) - f.ended
    _ended_since(f, reader, killed_at)
    times = _resume_times(back, reader, killed_at)
    if times:
        f.first, f.p50 = times[0], common.quantile(times, 0.5)
        f.last = times[-1] if f.not_back == 0 else math.inf
    whole = marks.window(before, after)
    span = whole.seconds
    f.reap_calls, f.moves = whole.command("sismember") * span, whole.command("smove") * span
    f.record_reads = (whole.command("hgetall") - whole.command("lrange")) * span
    # The window from the lapse to the last resume, from the per-second readings.
    end = before.at + (times[-1] if times else f.lapse) + 1.0
    lo, hi = _around(marks.sampler, before.at + f.lapse, end, before.index, after.index)
    f.window = Window(marks.sampler.window(lo, hi), math.nan)
    f.peak = marks.sampler.peaks(before.index, after.index)
    common.progress(
        f"{tag}: {len(back):,}/{len(refs):,} back, last {f.last:.2f}s after the kill "
        f"(lapse {f.lapse:.2f}s); window {f.window.commands:,.0f} commands/s, shard CPU "
        + ", ".join(f"{s.cpu * 100:.1f}%" for s in f.window.shards)
        + f" ({f.window.seconds:.0f}s); ended since the kill: {f.ended_anywhere or 'none'}"
    )


def _wait_back(
    f: Failover, refs: list[str], dead: list[str], live: set[str], reader: Any
) -> dict[str, float]:
    """Wait until every session in ``refs`` runs on a live node (or ended, or
    ``RESUME_LIMIT``); the ones back, with NaN times (see ``_resume_times``). The dead nodes'
    slot sets are polled first, as they are cheap: reading every record each second would
    add to the load measured."""
    from fleet.store.keys import Keys, split_ref

    keys = Keys("fleet")
    began = time.monotonic()
    deadline, said = began + RESUME_LIMIT, began
    while time.monotonic() < deadline:
        time.sleep(0.5)
        pipe = reader.pipeline()
        for node in dead:
            pipe.scard(keys.node_sessions(node))
        left = sum(pipe.execute())
        if not left:
            f.slots_moved = time.monotonic() - began
            break
        if time.monotonic() - said > 30:
            said = time.monotonic()
            common.progress(f"{left:,} slots still on the dead nodes after {said - began:.0f}s")
    time.sleep(2.0)
    deadline = time.monotonic() + 60.0
    back: dict[str, float] = {}
    while time.monotonic() < deadline and len(back) + f.ended < len(refs):
        pending = [r for r in refs if r not in back]
        pipe = reader.pipeline()
        for ref in pending:
            pipe.hmget(keys.session(*split_ref(ref)), "node_id", "state")
        f.ended = 0
        for ref, (owner, state) in zip(pending, pipe.execute(), strict=True):
            if state == "running" and owner in live:
                back[ref] = math.nan
            elif state == "ended":
                f.ended += 1
        if len(back) + f.ended < len(refs):
            time.sleep(1.0)
    return back


def _resume_times(back: dict[str, float], reader: Any, killed_at: float) -> list[float]:
    """Seconds from the kill to each session's ``session_resumed`` event (its stream id is
    Redis' clock, on this machine), sorted."""
    from fleet.store.keys import Keys, split_ref

    keys = Keys("fleet")
    pipe = reader.pipeline()
    for ref in back:
        pipe.xrange(keys.events(*split_ref(ref)), min=f"{int(killed_at * 1000)}-0", count=4)
    for ref, entries in zip(list(back), pipe.execute(), strict=True):
        for entry_id, fields in entries:
            if fields.get("type") == "session_resumed":
                back[ref] = int(entry_id.split("-")[0]) / 1000 - killed_at
                break
    return sorted(t for t in back.values() if not math.isnan(t))


def _ended_since(f: Failover, reader: Any, since: float) -> None:
    """Every session of the fleet (moved or not) that ended after the kill, by end reason
    and error: a failover should end none."""
    from fleet.store.keys import Keys, split_ref

    keys = Keys("fleet")
    f.live_after = int(reader.zcard(keys.live()))
    refs = reader.zrangebyscore(keys.ended(), int(since * 1000), "+inf")
    pipe = reader.pipeline()
    for ref in refs:
        pipe.hmget(keys.session(*split_ref(ref)), "end_reason", "error")
    for reason, error in pipe.execute():
        key = f"{reason}" + (f" ({error})" if error else "")
        f.ended_anywhere[key] = f.ended_anywhere.get(key, 0) + 1


def _coverage(sampler: Sampler, seen: Sorted) -> float:
    """The commands MONITOR saw in its window over those ``INFO commandstats`` counted in
    the same seconds (cumulative counts interpolated between the sampler's readings)."""
    rows = list(sampler.readings)
    at = [row[0].at for row in rows]
    totals = [sum(r.total for r in row) for row in rows]

    def count(t: float) -> float:
        for i in range(1, len(at)):
            if at[i] >= t:
                share = (t - at[i - 1]) / max(at[i] - at[i - 1], 1e-9)
                return totals[i - 1] + share * (totals[i] - totals[i - 1])
        return math.nan

    executed = count(seen.began + seen.seconds) - count(seen.began)
    return seen.total / executed if executed > 0 else math.nan


def _around(sampler: Sampler, start: float, end: float, a: int, b: int) -> tuple[int, int]:
    """The readings (indexes between marks a and b) closest to ``start`` and ``end``, at
    least one interval apart."""
    at = [row[0].at for row in sampler.readings[: b + 1]]
    lo = min(range(a, b + 1), key=lambda i: abs(at[i] - start))
    hi = min(range(a, b + 1), key=lambda i: abs(at[i] - end))
    return min(lo, b - 1), max(hi, min(lo, b - 1) + 1)


def _log_problems(logdir: Path) -> dict[str, int]:
    """Warnings and errors the node processes logged, by their first words."""
    out: dict[str, int] = {}
    for path in sorted(logdir.glob("nodes-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if " WARNING " in line or " ERROR " in line or " CRITICAL " in line:
                message = line.split(": ", 1)[-1].split(" [", 1)[0]
                key = re.sub(r"\d+", "N", " ".join(message.split(" ")[:8]))
                out[key] = out.get(key, 0) + 1
    return out
