"""bench/capacity.py's section of docs/benchmarks.md: the figures, the model's constants,
the model beside the measurements, and its prediction for 1,000,000 sessions."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench import capacity_scale, capacity_units, common
from bench.capacity_model import (
    CREATE_COMMANDS,
    PLACE,
    Costs,
    Prediction,
    Workload,
    max_nodes,
    max_starts,
    predict,
    shards_needed,
)
from bench.capacity_scale import ScaleRun, Window
from bench.capacity_shards import Sorted
from bench.capacity_units import PHASES, Bus, GlobalCall, Unit

if TYPE_CHECKING:
    from bench.capacity import Results

Agg = common.Agg
BUDGET = 0.5  # of a shard's main thread: room left for bursts (a mass start, a failover)
TARGET_NODES, TARGET_SESSIONS = 1000, 1_000_000
LIFETIME = 600.0  # seconds a session lives on average, for the churn of the prediction
OPS = [p for p in PHASES if p != "idle"]


def _pct(a: Agg) -> str:
    return a.fmt("%", 1, 100.0)


def _others(w: Window, g: int) -> float:
    return statistics.fmean(s.cpu for i, s in enumerate(w.shards) if i != g)


def _share(sorted_: Sorted | None, tag: str) -> float:
    if sorted_ is None or not sorted_.total:
        return math.nan
    return sorted_.by_tag.get(tag, 0) / sorted_.total


def _hottest_call(sorted_: Sorted | None) -> float:
    """The busiest call slot's share of the commands MONITOR saw."""
    if sorted_ is None or not sorted_.total:
        return math.nan
    calls = [n for slot, n in sorted_.by_slot.items() if "{c:" in sorted_.slot_key.get(slot, "")]
    return max(calls, default=0) / sorted_.total


def _median_unit(runs: list[dict[str, Unit]], op: str) -> Unit:
    units = [r[op] for r in runs if op in r]
    names = {n for u in units for n in u.by_command}
    return Unit(
        rate=statistics.median(u.rate for u in units),
        commands=statistics.median(u.commands for u in units),
        cpu_us=statistics.median(u.cpu_us for u in units),
        bus=statistics.median(u.bus for u in units),
        node_cpu_us=statistics.median(u.node_cpu_us for u in units),
        by_command={n: statistics.median(u.by_command.get(n, 0.0) for u in units) for n in names},
    )


def costs_of(results: Results) -> Costs:
    ops = {op: _median_unit([u.ops for u in results.units], op) for op in OPS}
    busy = {op: _median_unit(results.busy, op) for op in OPS}
    bus = Bus(
        sender_us=statistics.median(b.sender_us for b in results.bus),
        receiver_us=statistics.median(b.receiver_us for b in results.bus),
        received=statistics.median(b.received for b in results.bus),
        sharded_received=statistics.median(b.sharded_received for b in results.bus),
    )
    calls: dict[int, dict[str, GlobalCall]] = {}
    for size in results.global_calls[0]:
        calls[size] = {}
        for call in results.global_calls[0][size]:
            each = [r[size][call] for r in results.global_calls if call in r.get(size, {})]
            calls[size][call] = GlobalCall(
                statistics.median(c.cpu_us for c in each),
                statistics.median(c.commands for c in each),
                statistics.median(c.latency_ms for c in each),
            )
    background = statistics.median(u.background for u in results.units)
    return Costs(ops, busy, bus, calls, background)


class Scale:
    """The runs of one scale."""

    def __init__(self, runs: list[ScaleRun]) -> None:
        self.runs = runs
        self.first = runs[0]

    def steady(self, get: Callable[[ScaleRun, Window], float]) -> Agg:
        """Over every steady window of every run."""
        return Agg.of(get(r, w) for r in self.runs for w in r.steady)

    def each(self, get: Callable[[ScaleRun], float]) -> Agg:
        return Agg.of(get(r) for r in self.runs)


def report(
    title: str, results: Results, runs: int, load_before: str, seconds: float
) -> common.Report:
    costs = costs_of(results)
    scales = {key: Scale(v) for key, v in results.runs.items()}
    body: list[str] = [_intro(results, runs), ""]
    body += ["### Measured at each scale", "", *_measured(results, scales), ""]
    body += ["### What one operation costs", "", *_units(results, costs), ""]
    body += ["### The fleet-wide slot at 10, 100 and 1,000 nodes", "", *_global(costs), ""]
    body += ["### The model beside the measurements", "", *_model_vs(results, costs, scales), ""]
    body += ["### 1,000,000 sessions on 1,000 nodes (extrapolated)", "", *_predict(costs), ""]
    body += ["### As deployed: fleet's own Cluster client", "", *_deployed(results)]
    notes = _notes(results, scales, load_before)
    summary = _summary(results, costs, scales)
    return common.Report("capacity", title, summary, body, notes, seconds)


def _intro(results: Results, runs: int) -> str:
    scale = ", ".join(f"{n} × {m:,}" for n, m in results.scales)
    ttl = next(iter(results.runs.values()))[0].ttl if results.runs else math.nan
    return (
        f"{runs} run(s). Each scale ({scale} nodes × sessions) on a fresh 3-master Cluster "
        "(`tests.topologies.LocalCluster`), the nodes as real `Node` objects without HTTP, "
        "each with its own Cluster client, in processes of at most "
        f"{capacity_scale.PER_PROCESS} nodes. Every session runs `Paced` "
        f"(`bench/capacity_fleet.py`): every {results.tick:g} s (from a random phase) an "
        "emit, a checkpoint and a change of `ctx.metrics`, what the counter does per tick. "
        f"Mass start: {capacity_scale.START_RATE:g} sessions/s for the fleet, "
        f"{capacity_scale.START_CONCURRENCY} in flight per node, the second half under "
        f"`MONITOR`; steady state: {capacity_scale.STEADY} windows of "
        f"{capacity_scale.STEADY_WINDOW:g} s, then {capacity_scale.MONITOR_WINDOW:g} s of "
        "`MONITOR`; failover: SIGKILL of the process holding the largest group of nodes. "
        "Shards are read every second: `INFO commandstats` (scripts' insides included), "
        "the main thread's CPU (`used_cpu_user_main_thread` + `used_cpu_sys_main_thread`), "
        "`cluster_stats_messages_publish_received`. The scale runs use fleet's own Cluster "
        f"client and `FLEET_NODE_TTL={ttl:g}`: every node of a fleet runs on this machine's "
        "two cores, and while the fleet reaps, a node's event loop can lag seconds behind, "
        "which a 10 s lease does not always survive (the as-deployed part runs 10 s). Leases "
        "are renewed every TTL/3, maintenance passes and metrics reports run every 5 s "
        "(fleet's defaults)."
    )


def _measured(results: Results, scales: dict[tuple[int, int], Scale]) -> list[str]:
    keys = list(scales)
    head = ["", *(f"{n} × {m:,}" for n, m in keys)]
    rows: list[list[str]] = []

    def row(label: str, get: Callable[[Scale], str]) -> None:
        rows.append([label, *(get(scales[k]) for k in keys)])

    row(
        "**steady**: commands/s, all shards", lambda s: s.steady(lambda r, w: w.commands).fmt("", 0)
    )
    row(
        "…checkpoints/s done (expected)",
        lambda s: (
            s.steady(lambda r, w: w.command("lpush")).fmt("", 0)
            + f"; {s.first.sessions / results.tick:,.0f} expected"
        ),
    )
    row("…CPU, the `{g}` shard", lambda s: _pct(s.steady(lambda r, w: w.shards[r.g_shard].cpu)))
    row("…CPU, each other shard", lambda s: _pct(s.steady(lambda r, w: _others(w, r.g_shard))))
    row(
        "…bus `PUBLISH`es received, per shard per s",
        lambda s: s.steady(lambda r, w: statistics.fmean(x.bus_publish_in for x in w.shards)).fmt(
            "", 0
        ),
    )
    row(
        "…`{g}` slot's share of commands (`MONITOR`)",
        lambda s: _pct(s.each(lambda r: _share(r.steady_sorted, "g"))),
    )
    row(
        "…busiest call slot's share",
        lambda s: _pct(s.each(lambda r: _hottest_call(r.steady_sorted))),
    )
    row("…busiest key (its share)", lambda s: _hottest_key(s, lambda r: r.steady_sorted))
    row("…node processes, cores", lambda s: s.steady(lambda r, w: w.node_cpu).fmt("", 2))
    row(
        "…Redis memory per session (steady less idle)",
        lambda s: s.each(lambda r: r.memory / max(r.started, 1)).fmt(" B", 0),
    )
    row(
        "idle nodes: commands/s per node",
        lambda s: s.each(lambda r: r.idle.commands / r.nodes if r.idle else math.nan).fmt("", 2),
    )
    row("**mass start**: sessions/s", lambda s: s.each(lambda r: r.start_rate).fmt("", 0))
    row(
        "…commands per start",
        lambda s: s.each(lambda r: r.start.commands / r.start_rate if r.start else math.nan).fmt(
            "", 1
        ),
    )
    row(
        "…CPU, the `{g}` shard",
        lambda s: _pct(s.each(lambda r: r.start.shards[r.g_shard].cpu if r.start else math.nan)),
    )
    row(
        "…CPU, each other shard",
        lambda s: _pct(s.each(lambda r: _others(r.start, r.g_shard) if r.start else math.nan)),
    )
    row(
        "…`{g}` shard CPU per start, above the others'",
        lambda s: s.each(
            lambda r: (
                (r.start.shards[r.g_shard].cpu - _others(r.start, r.g_shard)) / r.start_rate * 1e6
                if r.start
                else math.nan
            )
        ).fmt(" µs", 0),
    )
    row(
        "…`{g}` slot's share of commands (`MONITOR`)",
        lambda s: _pct(s.each(lambda r: _share(r.start_sorted, "g"))),
    )
    row("…busiest key (its share)", lambda s: _hottest_key(s, lambda r: r.start_sorted))
    row(
        "**failover**: nodes killed, sessions moved",
        lambda s: f"{s.first.failover.killed}, " + s.each(lambda r: r.failover.moved).fmt("", 0),
    )
    row(
        "…the last killed lease lapses (after the kill)",
        lambda s: s.each(lambda r: r.failover.lapse).fmt(" s", 1),
    )
    row(
        "…first / half / all running again",
        lambda s: " / ".join(
            s.each(get).fmt(" s", 1)
            for get in (
                lambda r: r.failover.first,
                lambda r: r.failover.p50,
                lambda r: r.failover.last,
            )
        ),
    )
    row(
        "…no slot left on the dead nodes (after the kill)",
        lambda s: s.each(lambda r: r.failover.slots_moved).fmt(" s", 1),
    )
    row(
        "…moving them, lapse to last",
        lambda s: s.each(lambda r: r.failover.last - r.failover.lapse).fmt(" s", 1),
    )
    row(
        "…sessions moved per second",
        lambda s: s.each(
            lambda r: (
                r.failover.moved / (r.failover.last - r.failover.lapse)
                if r.failover.last > r.failover.lapse
                else math.nan
            )
        ).fmt("", 0),
    )
    row(
        "…`reap` calls per session moved",
        lambda s: s.each(
            lambda r: r.failover.reap_calls / r.failover.moves if r.failover.moves else math.nan
        ).fmt("", 1),
    )
    row(
        "…records read by reapers per session moved",
        lambda s: s.each(
            lambda r: r.failover.record_reads / r.failover.moves if r.failover.moves else math.nan
        ).fmt("", 1),
    )
    row(
        "…CPU, the `{g}` shard (lapse to last)",
        lambda s: _pct(
            s.each(
                lambda r: r.failover.window.shards[r.g_shard].cpu if r.failover.window else math.nan
            )
        ),
    )
    row(
        "…CPU, each other shard",
        lambda s: _pct(
            s.each(
                lambda r: _others(r.failover.window, r.g_shard) if r.failover.window else math.nan
            )
        ),
    )
    row(
        "…busiest second of the `{g}` shard",
        lambda s: _pct(
            s.each(lambda r: r.failover.peak[r.g_shard].cpu if r.failover.peak else math.nan)
        ),
    )
    row(
        "…`{g}` shard CPU per session moved, above the others'",
        lambda s: s.each(_g_per_move).fmt(" µs", 0),
    )
    row(
        "…node CPU per session moved (survivors)",
        lambda s: s.each(_node_cpu_per_move).fmt(" ms", 1),
    )
    row(
        "…sessions that ended (any node)",
        lambda s: s.each(lambda r: float(sum(r.failover.ended_anywhere.values()))).fmt("", 0),
    )
    row("worst event-loop lag: start / steady / failover", _lags)
    row("machine CPU busy, steady (all processes)", lambda s: _pct(s.steady(lambda r, w: w.busy)))
    return common.table(head, rows)  # fmt: skip


def _hottest_key(s: Scale, of: Callable[[ScaleRun], Sorted | None]) -> str:
    """The key most commands named (first key; a script's own commands count under theirs),
    in the first run, and its share across runs."""
    seen = of(s.first)
    if seen is None or not seen.by_key:
        return "n/a"
    key = seen.by_key.most_common(1)[0][0]

    def share(r: ScaleRun) -> float:
        x = of(r)
        return x.by_key.get(key, 0) / x.total if x is not None and x.total else math.nan

    return f"`{key}` ({_pct(s.each(share))})"


def _lags(s: Scale) -> str:
    def lag(phase: str) -> Callable[[ScaleRun], float]:
        return lambda r: r.lag.get(phase, math.nan)

    return " / ".join(s.each(lag(p)).fmt(" s", 2) for p in ("mass start", "steady", "failover"))


def _g_per_move(r: ScaleRun) -> float:
    """The {g} shard's CPU above the other shards' over the window, per session moved."""
    f = r.failover
    if f.window is None or not f.moves:
        return math.nan
    extra = f.window.shards[r.g_shard].cpu - _others(f.window, r.g_shard)
    return extra * f.window.seconds / f.moves * 1e6


def _node_cpu_per_move(r: ScaleRun) -> float:
    f = r.failover
    if not f.moves or not r.steady:
        return math.nan
    survivors = 1 - f.killed / r.nodes
    steady = statistics.fmean(w.node_cpu for w in r.steady) * survivors * f.seconds
    return (f.node_cpu - steady) / f.moves * 1000


def _units(results: Results, costs: Costs) -> list[str]:
    rows = []
    for op in OPS:
        u, busy = costs.ops[op], costs.busy[op]
        top = sorted(u.by_command.items(), key=lambda kv: (-kv[1], kv[0]))
        made = ", ".join(f"`{n}` {v:.0f}" for n, v in top if v >= 0.5)
        rows.append([
            op, f"{u.commands:.1f}", made, f"{u.bus:.1f}",
            Agg.of(r.ops[op].cpu_us for r in results.units).fmt(" µs", 0),
            Agg.of(r[op].cpu_us for r in results.busy).fmt(" µs", 0),
            f"{busy.rate:,.0f}/s", f"{u.node_cpu_us:,.0f} µs",
        ])  # fmt: skip
    b = costs.bus
    return [
        "**At the fleet's pace**: "
        f"{capacity_units.UNIT_NODES} nodes in one process, {capacity_units.UNIT_SESSIONS} "
        f"sessions each, a phase per kind of work (sessions of their own, each phase after "
        f"the last one's closed), every {capacity_units.UNIT_INTERVAL:g} s from random "
        f"phases (about {capacity_units.UNIT_NODES * capacity_units.UNIT_SESSIONS / 5:,.0f} "
        f"a second); messages: {capacity_units.MESSAGE_RATE:g}/s, each sent from the node "
        f"before the owner. Each phase's {capacity_units.UNIT_WINDOW:g} s window minus the "
        "idle phase's, divided by the operations counted in it (emits: `XADD`; checkpoints "
        "and messages: `LPUSH`; reports: `HSET`). **On a busy shard**: the same script calls "
        f"through fleet's registry, {capacity_units.BUSY_LANES} at a time back to back, "
        f"{capacity_units.BUSY_CALLS:,} of each. Shard CPU is the main threads' of all "
        "three shards, the bus's share included; median (min–max) of the runs.",
        "",
        *common.table(
            [
                "operation",
                "commands",
                "of which",
                "bus messages",
                "shard CPU at the fleet's pace",
                "shard CPU, busy shard",
                "busy: calls/s",
                "node CPU",
            ],
            rows,
        ),  # fmt: skip
        "",
        "A shard that is mostly idle pays for each command's wakeup, which a busy shard "
        "shares among many (the two CPU columns; when this benchmark was written, one "
        "checkpoint measured 163 µs at 170 calls a second, 21 µs back to back and 10 µs "
        "pipelined). The fleets "
        "measured here ran at the fleet's pace; a shard planned to be half busy is nearer "
        "the busy figures, which the prediction uses.",
        "",
        f"**The cluster bus**: {capacity_units.BUS_MESSAGES:,} `PUBLISH`es sent to one shard "
        f"(nobody subscribed) reached each other shard {b.received:.2f} times each and cost "
        f"each of them {b.receiver_us:.1f} µs of main-thread CPU per message received (the "
        f"shard they were sent to: {b.sender_us:.1f} µs each, pipelined). `SPUBLISH` "
        f"(sharded, Redis 7): {b.sharded_received:.2f} received by the others. fleet "
        "announces stream entries with `SPUBLISH`, so an emit sends "
        f"{costs.publishes('emit'):.2f} classic `PUBLISH`es; a message sends "
        f"{costs.publishes('message'):.2f} (the nudge to its owner's node channel, which is "
        "in no call's slot), and each of those costs every other shard a bus message, "
        "whoever listens.",
    ]


def _global(costs: Costs) -> list[str]:
    sizes = sorted(costs.global_calls)
    calls = list(costs.global_calls[sizes[0]])
    rows = [
        [call, *(f"{costs.global_calls[n][call].cpu_us:,.0f} µs "
                 f"({costs.global_calls[n][call].commands:,.0f})" for n in sizes)]
        for call in calls
    ]  # fmt: skip
    return [
        "fleet's own registry calls (its Cluster client, one call at a time, back to back) "
        "on the shard of a fresh 3-master Cluster that holds the `{g}` keys of a fleet of N "
        f"live nodes with {capacity_units.SLOTS_PER_NODE:,} admission slots each: that "
        "shard's main-thread CPU per call (`INFO cpu` over 1,000 calls; fewer where a call "
        "grows with N) and, in brackets, the commands it runs. Medians of the runs.",
        "",
        *common.table(["call", *(f"N = {n:,}" for n in sizes)], rows),
        "",
        "A start placed where it lands (`FLEET_PLACEMENT=local`, the node asked has room) "
        "names that node alone and reads no list of nodes: the same commands at any N. A "
        "start spread over the fleet (`spread`, or the node asked is full) names every "
        "live node that runs the worker and reads three commands for each (lease, "
        "drain/workers/capacity, slot count): O(N); so does the list of live nodes such a "
        "start reads (at most once a second per node), in four commands whose answer "
        "holds one entry per node. Lease renewal, a maintenance pass (the live nodes are "
        "counted with `ZCOUNT`), releasing a slot and reaping one session cost the same at "
        "any N.",
    ]


def _model_vs(results: Results, costs: Costs, scales: dict[tuple[int, int], Scale]) -> list[str]:
    rows = []
    w = Workload.tick(results.tick)
    for (nodes, per_node), s in scales.items():
        sessions = nodes * per_node
        p = predict(costs, w, nodes, sessions, 3, ttl=s.first.ttl)
        hot = predict(costs, w, nodes, sessions, 3, ttl=s.first.ttl, busy=True)
        g_share = p.g_commands / p.commands if p.commands else math.nan
        rate = s.each(lambda r: r.start_rate).median
        # Each node starts sessions on itself, with room: local placement reads no list.
        start_cmd = costs.g_commands("admission with placement (place)", nodes) + CREATE_COMMANDS
        # While MONITOR watches (the second half's first seconds) about half the sessions
        # run already: their ticks, and the nodes' own background, share the window.
        ticks = (
            sessions
            / 2
            / results.tick
            * sum(costs.k(op) for op in ("emit", "checkpoint", "metrics report"))
        )
        idle = Workload("idle", 0, 0, 0, 0)
        background = predict(costs, idle, nodes, 0, 3, ttl=s.first.ttl).commands
        start_g = (start_cmd - CREATE_COMMANDS) * rate
        start_share = start_g / (start_cmd * rate + ticks + background)
        start_cpu = costs.g("admission with placement (place)", nodes)
        rows += [
            [f"{nodes} × {per_node:,}", "steady commands/s", f"{p.commands:,.0f}",
             s.steady(lambda r, w: w.commands).fmt("", 0)],
            ["", "steady CPU, an ordinary shard",
             f"{p.shard_cpu * 100:.1f}% ({hot.shard_cpu * 100:.1f}%)",
             _pct(s.steady(lambda r, w: _others(w, r.g_shard)))],
            ["", "steady CPU, the `{g}` shard",
             f"{p.g_shard_cpu * 100:.1f}% ({hot.g_shard_cpu * 100:.1f}%)",
             _pct(s.steady(lambda r, w: w.shards[r.g_shard].cpu))],
            ["", "steady `{g}` share of commands", f"{g_share * 100:.1f}%",
             _pct(s.each(lambda r: _share(r.steady_sorted, "g")))],
            ["", "commands per start (place, create)", f"{start_cmd:,.1f}",
             s.each(lambda r: _start_only(r, costs, results.tick)).fmt("", 1)],
            ["", "`{g}` share of commands during a mass start", f"{start_share:.1%}",
             _pct(s.each(lambda r: _share(r.start_sorted, "g")))],
            ["", "`{g}` shard CPU per start", f"{start_cpu:,.0f} µs",
             s.each(lambda r: (r.start.shards[r.g_shard].cpu - _others(r.start, r.g_shard))
                    / r.start_rate * 1e6 if r.start else math.nan).fmt(" µs", 0)],
        ]  # fmt: skip
    return [
        f"The model (docs/capacity.md) with the constants above, for each scale's fleet and "
        f"workload (a tick every {results.tick:g} s: an emit, a checkpoint and a metrics "
        "report per session per tick; no churn at steady state): CPU at the fleet's pace "
        "and, in brackets, at busy-shard costs. Measured: medians (min–max) as in the first "
        "table. Commands per start, measured, leave out what the sessions already started "
        "did meanwhile (their ticks, from the unit costs) and the idle nodes' own. The "
        "`{g}` calls were measured back to back, as a busy shard runs them; a mass start at "
        f"{capacity_scale.START_RATE:g} a second leaves the shard mostly idle, and pays "
        "more per call.",
        "",
        *common.table(["scale", "figure", "model", "measured"], rows),
    ]


def _start_only(r: ScaleRun, costs: Costs, tick: float) -> float:
    """Commands per start in the first half of a mass start, less the ticks of the
    sessions already running (on average half of those started by the end of it) and the
    nodes' own background."""
    if r.start is None or not r.start_rate:
        return math.nan
    running = r.start_rate * r.start.seconds / 2
    ticks = running / tick * sum(costs.k(op) for op in ("emit", "checkpoint", "metrics report"))
    background = r.idle.commands if r.idle else 0.0
    return (r.start.commands - ticks - background) / r.start_rate


def _predict(costs: Costs) -> list[str]:
    n, s = TARGET_NODES, TARGET_SESSIONS
    rows = []
    for seconds in (1.0, 10.0):
        w = Workload.tick(seconds)
        w = Workload(w.name, w.emit, w.checkpoint, w.report, w.message, LIFETIME)
        today = shards_needed(costs, w, n, s, BUDGET, sharded=False)
        k = int(today) if math.isfinite(today) else 3
        p = predict(costs, w, n, s, k, busy=True)
        spread = predict(costs, w, n, s, k, busy=True, spread=True)
        rows.append([
            f"a tick every {seconds:g} s", f"{p.commands / 1e6:,.2f} M",
            f"{p.call_cpu:,.1f}", f"{p.publishes / 1e3:,.1f} k",
            f"{p.bus_cpu:,.3f}",
            "none suffices" if math.isinf(today) else f"{today:,.0f}",
            _g_cores(p), _g_cores(spread),
        ])  # fmt: skip
    local = max_starts(costs, n, BUDGET)
    spread_most = max_starts(costs, n, BUDGET, spread=True)
    node_tick = sum(costs.ops[op].node_cpu_us for op in ("emit", "checkpoint"))
    node_tick += costs.ops["metrics report"].node_cpu_us / 5
    return [
        f"The model's figures for {s:,} sessions on {n:,} nodes ({s // n:,} each), each "
        "doing per tick what the counter does (an emit, a checkpoint; a metrics report every "
        f"5 s at most), sessions living {LIFETIME / 60:g} minutes on average (so "
        f"{s / LIFETIME:,.0f} starts and as many ends a second), fleet defaults "
        "(`FLEET_NODE_TTL` 10, passes every 5 s). Shards are sized so that no main thread "
        f"is busier than {BUDGET * 100:.0f}%, leaving room for mass starts and failovers, at "
        "busy-shard costs; the bus column is what the remaining classic `PUBLISH`es cost "
        "each of those shards. **Extrapolated**: per-operation costs are this machine's, "
        "measured on one 3-shard Cluster; the `{g}` calls were measured at 1,000 nodes.",
        "",
        *common.table(
            [
                "workload",
                "commands/s",
                "shard CPU, sessions' work (cores)",
                "classic PUBLISH/s",
                "bus CPU per shard (cores)",
                "shards needed",
                "`{g}`: nodes + starts + list reads (cores), local",
                "the same, spread",
            ],
            rows,
        ),  # fmt: skip
        "",
        f"The `{{g}}` slot at {n:,} nodes takes at most **{local:,.0f} starts/s** within "
        f"{BUDGET * 100:.0f}% of its shard's thread with local placement and room where "
        f"starts land (a start costs {costs.g(PLACE[False], n):,.0f} µs there), "
        f"{s / max(local, 1e-9) / 60:,.1f} minutes to start {s:,} sessions; "
        f"{s / LIFETIME:,.0f} starts/s of churn is {(s / LIFETIME) / max(local, 1e-9):.2f}× "
        f"that. Spread over the fleet it takes **{spread_most:,.0f} starts/s** (a start "
        f"costs {costs.g(PLACE[True], n):,.0f} µs, and every node that starts sessions reads "
        f"the list of nodes once a second, {costs.g('live-node directory read', n):,.0f} µs "
        "each). With no starts at all, the nodes' leases and passes alone would fill that "
        f"budget at about {max_nodes(costs, BUDGET):,.0f} nodes (extrapolated from 10, 100 "
        "and 1,000). Node "
        f"side: a tick costs the node about {node_tick:,.0f} µs of CPU (emit, checkpoint, a "
        f"fifth of a report), so {s // n:,} sessions ticking every second keep "
        f"{node_tick * (s // n) / 1e6:.2f} cores of a node busy.",
    ]


def _g_cores(p: Prediction) -> str:
    return f"{p.g_nodes_cpu:.2f} + {p.g_starts_cpu:.2f} + {p.g_directory_cpu:.2f} = {p.g_cpu:.2f}"


def _deployed(results: Results) -> list[str]:
    rows = []
    for r in results.deployed:
        f = r.failover
        ended = ", ".join(f"{k}: {v:,}" for k, v in sorted(f.ended_anywhere.items())) or "none"
        rows.append([
            f"{r.nodes} × {r.per_node:,}, {f.killed} killed", f"{f.moved:,}",
            f"{f.moved - f.not_back - f.ended:,}", f"{f.live_before:,} → {f.live_after:,}",
            ended, f"{r.lag.get('failover', math.nan):.2f} s",
        ])  # fmt: skip
    pools = []
    for default, wide in results.pools:
        for check in (default, wide):
            pools.append([
                "fleet's (100)" if not check.pool else f"{check.pool:,}",
                _errors(check.burst_errors, check.burst * 3),
                _errors(check.bystander_errors, check.bystander_calls),
                f"{check.channel_errors}",
            ])  # fmt: skip
    problems: dict[str, int] = {}
    for r in results.deployed:
        for k, v in r.log_problems.items():
            problems[k] = problems.get(k, 0) + v
    top = sorted(problems.items(), key=lambda kv: -kv[1])[:8]
    return [
        "fleet's own client (`connect()`: redis-py's `RedisCluster`, 100 connections per "
        "shard that wait when all are busy: `fleet/store/cluster_pool.py`) and "
        "`FLEET_NODE_TTL=10`; the mass start and the failover only.",
        "",
        *common.table(
            [
                "fleet",
                "sessions moved",
                "running again",
                "live sessions, before → after",
                "ended since the kill (reason, error)",
                "worst loop lag",
            ],
            rows,
        ),  # fmt: skip
        "",
        "A burst of 128 commands (fleet's `REAP_CONCURRENCY`) to the `{g}` shard through one "
        "client, one in ten a pipeline, three times, while 40 loops read call slots through "
        "the same client and it holds a subscription:",
        "",
        *common.table(
            [
                "connections per shard",
                "burst: errors",
                "meanwhile, other calls: errors",
                "subscription errors",
            ],
            pools,
        ),  # fmt: skip
        "",
        "What the as-deployed nodes logged, most frequent first: "
        + "; ".join(f"{k!r} × {v:,}" for k, v in top)
        + ".",
    ]


def _errors(errors: dict[str, int], calls: int) -> str:
    if not errors:
        return f"none of {calls:,}"
    return ", ".join(f"{k} {v:,}" for k, v in sorted(errors.items())) + f" (of {calls:,})"


def _summary(results: Results, costs: Costs, scales: dict[tuple[int, int], Scale]) -> str:
    big = scales[max(scales)]
    steady = big.steady(lambda r, w: w.commands).median
    share = big.each(lambda r: _share(r.start_sorted, "g")).median
    lost = sum(sum(r.failover.ended_anywhere.values()) for r in results.deployed)
    moved = sum(r.failover.moved for r in results.deployed)
    w = Workload.tick(1.0)
    w = Workload(w.name, w.emit, w.checkpoint, w.report, w.message, LIFETIME)
    today = shards_needed(costs, w, TARGET_NODES, TARGET_SESSIONS, BUDGET, sharded=False)
    n, m = max(scales)
    return (
        f"At {n} × {m:,} sessions (a tick every {results.tick:g} s): "
        f"{steady:,.0f} commands/s in steady state; during a mass start the `{{g}}` slot "
        f"takes {share * 100:.0f}% of all commands. Per tick a session costs "
        f"{sum(costs.k(o) for o in ('emit', 'checkpoint', 'metrics report')):.0f} commands. "
        f"Model for 1,000,000 sessions ticking every second on 1,000 nodes: "
        + (f"{today:,.0f} shards" if math.isfinite(today) else "no number of shards")
        + " keep each below half a core; the `{g}` slot admits at most "
        f"{max_starts(costs, TARGET_NODES, BUDGET):,.0f} starts/s at 1,000 nodes. As "
        f"deployed (fleet's own Cluster client), a failover ended {lost:,} sessions of the "
        f"fleet ({moved:,} were moved)."
    )


def _notes(results: Results, scales: dict[tuple[int, int], Scale], load_before: str) -> list[str]:
    out = [
        "CPU per operation depends on how busy this shared 2-core machine is: the same "
        "checkpoint call measured 24–40 µs of shard CPU on a quiet machine and 85–140 µs "
        "while other agents' tests saturated both cores. Command counts are exact; CPU "
        "figures are this machine's, under the load the last row of the first table "
        "shows. A dedicated Redis host will spend less per command; the model's shape "
        "(what grows with what) does not depend on it.",
        "Node processes hold up to 10 nodes each and every node of a fleet runs on these "
        "two cores: the node-side figures (CPU, event-loop lag) are what one process of many "
        "nodes saw, not what a node with a core of its own would.",
        "Failover times include waiting for the killed leases to lapse: with "
        "`FLEET_NODE_TTL=30` that is up to 30 s after the kill; the lapse-to-last row is "
        "the part the fleet's work decides.",
    ]
    seen = [v for s in scales.values() for r in s.runs for v in r.coverage.values()]
    if seen:
        out.append(
            f"`MONITOR` windows saw {Agg.of(seen).fmt('%', 1, 100.0)} of the commands "
            "`INFO commandstats` counted over the same seconds (all windows, all scales): "
            "the shares above are of every command, not of a sample that favours the "
            "quieter shards."
        )
    problems: dict[str, int] = {}
    for s in scales.values():
        for r in s.runs:
            for k, v in r.log_problems.items():
                problems[k] = problems.get(k, 0) + v
    if problems:
        top = sorted(problems.items(), key=lambda kv: -kv[1])[:6]
        out.append(
            "Logged by the scale runs' nodes (all runs): "
            + "; ".join(f"{k!r} × {v:,}" for k, v in top)
        )
    out.append(common.load_note(load_before))
    return out
