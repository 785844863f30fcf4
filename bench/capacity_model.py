"""The capacity model of docs/capacity.md, with its constants taken from bench/capacity.py's
measurements.

For N nodes, S sessions, each emitting ``r_e``, checkpointing ``r_c``, reporting metrics
``r_r`` and receiving ``r_m`` messages a second, ``λ`` starts (and as many ends) a second,
on K shards:

    commands/s  = S·(k_e·r_e + k_c·r_c + k_r·r_r + k_m·r_m) + N·k_node + λ·k_start(N)
    shard CPU   = b + S·(u_e·r_e + u_c·r_c + u_r·r_r + u_m·r_m) / K      (call slots)
                + P·u_bus·(K − 1)/K, P = S·(p_e·r_e + … + p_m·r_m)      (cluster bus)
    {g} shard  += N·(u_hb·3/TTL + u_pass(N)/I) + λ·(u_place(N) + u_release)
                + D·u_dir(N)
    local placement (the default) with room where a start lands: u_place is O(1), D = 0;
    spread (or nodes full): u_place(N) reads every candidate, D = N·min(1, λ/N) (each
    starting node reads the list of nodes at most once a second)

``k`` are commands per operation, ``u`` shard CPU per operation (µs), ``p`` the classic
``PUBLISH``es per operation (measured: what the other shards of the 3-shard Cluster
received over the bus, over 2) and ``b`` an idle shard's own (crons, cluster-bus pings);
``u`` here leaves out what the bus costs the other shards, which the ``P`` term counts.
Sharded publishes (``SPUBLISH``: stream announcements) stay on their shard and are in
``u``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench.capacity_units import Bus, GlobalCall, Unit

#: A maintenance pass: its close requests (one read on the node's own {n:<node>} slot) and
#: these calls on {g}, whose commands (scripts' insides included) are measured with them.
CLOSE_INDEX_COMMANDS = 1
PLACE = {
    False: "admission with placement (place)",
    True: "admission, spread over the fleet (place)",
}
PASS_CALLS = (
    "maintenance: slot count (SCARD)",
    "maintenance: expired nodes",
    "maintenance: count live nodes",
)
MEASURED_SHARDS = 3  # the unit costs' Cluster: a classic PUBLISH reaches the 2 others
CREATE_COMMANDS = 5  # create_session.lua: the call slot's part of a start
END_SESSION_COMMANDS = 14  # end_session.lua: the call slot's part of an end (then release)


@dataclass(frozen=True)
class Workload:
    name: str
    emit: float  # a session, per second
    checkpoint: float
    report: float  # metrics reports: min(how often they change, 1 / FLEET_METRICS_REPORT_INTERVAL)
    message: float
    lifetime: float = math.inf  # mean seconds a session lives: starts/s = S / lifetime

    @classmethod
    def tick(cls, seconds: float, report_interval: float = 5.0) -> Workload:
        """The counter (or Paced with everything on) ticking every ``seconds``."""
        rate = 1.0 / seconds
        return cls(f"tick {seconds:g} s", rate, rate, min(rate, 1 / report_interval), 0.0)


def fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares a + b·x through (x, y) points."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(points) < 2 or len(set(xs)) < 2:
        return (statistics.fmean(ys) if ys else math.nan), 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


@dataclass
class Costs:
    """The model's constants: medians of the runs."""

    ops: dict[str, Unit]  # emit, checkpoint, metrics report, message: at the fleet's pace
    busy: dict[str, Unit]  # the same on a busy shard
    bus: Bus
    global_calls: dict[int, dict[str, GlobalCall]]  # fleet size -> call -> cost
    background: float = 0.0  # cores: an idle shard's main thread (crons, cluster bus pings)

    def k(self, op: str) -> float:
        return self.ops[op].commands if op in self.ops else math.nan

    def u(self, op: str, busy: bool = False) -> float:
        """Shard CPU (µs) of one operation where it runs, without the bus's share; ``busy``:
        as a busy shard spends it (many commands per wakeup) rather than a mostly idle one
        (a wakeup per command, as the measured fleets ran)."""
        unit = (self.busy if busy else self.ops).get(op)
        if unit is None:
            return math.nan
        return unit.cpu_us - unit.bus * self.bus.receiver_us

    def publishes(self, op: str) -> float:
        """Classic ``PUBLISH``es one operation sends (they cross the bus to every shard)."""
        unit = self.ops.get(op)
        return unit.bus / (MEASURED_SHARDS - 1) if unit is not None else math.nan

    def g(self, call: str, nodes: float) -> float:
        """µs of ``{g}`` shard CPU for one call at a fleet of ``nodes`` (a + b·N fitted
        through the sizes measured; exact at those sizes)."""
        points = [(float(n), c[call].cpu_us) for n, c in self.global_calls.items() if call in c]
        if any(n == nodes for n, _ in points):
            return next(v for n, v in points if n == nodes)
        return _extrapolate(points, nodes)

    def g_commands(self, call: str, nodes: float) -> float:
        points = [(float(n), c[call].commands) for n, c in self.global_calls.items() if call in c]
        return _extrapolate(points, nodes)


def _extrapolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """a + b·x through the points, never below the least of them: a call whose cost does not
    grow with the fleet measures flat with noise, and a slightly falling fit taken far
    beyond the sizes measured would make it free, then negative."""
    a, b = fit(points)
    return max(a + b * x, min((y for _, y in points), default=math.nan))


@dataclass
class Prediction:
    commands: float = 0.0  # all shards, a second
    g_commands: float = 0.0  # of which on the {g} slot
    call_cpu: float = 0.0  # cores, all shards, the sessions' own work (no bus)
    bus_cpu: float = 0.0  # cores, on each shard, receiving other shards' PUBLISHes
    shard_cpu: float = 0.0  # cores, an ordinary shard
    g_nodes_cpu: float = 0.0  # cores, the {g} slot: leases and maintenance passes
    g_starts_cpu: float = 0.0  # cores, the {g} slot: admission and release
    g_directory_cpu: float = 0.0  # cores, the {g} slot: live-node directory reads
    publishes: float = 0.0  # classic PUBLISHes a second, fleet-wide

    @property
    def g_cpu(self) -> float:
        return self.g_nodes_cpu + self.g_starts_cpu + self.g_directory_cpu

    @property
    def g_shard_cpu(self) -> float:
        return self.shard_cpu + self.g_cpu


def predict(
    costs: Costs,
    w: Workload,
    nodes: int,
    sessions: int,
    shards: int,
    *,
    ttl: float = 10.0,
    interval: float = 5.0,
    sharded_publish: bool = False,
    busy: bool = False,
    spread: bool = False,
) -> Prediction:
    """What the model says for one fleet (see the module's doc); ``spread``: starts are
    placed by room over the fleet (``FLEET_PLACEMENT=spread``, or the nodes asked are
    full), not where they land."""
    p = Prediction()
    s = float(sessions)
    ops = (("emit", w.emit), ("checkpoint", w.checkpoint), ("metrics report", w.report),
           ("message", w.message))  # fmt: skip
    g_per_node = (
        costs.g_commands("lease renewal (heartbeat)", nodes) * 3 / ttl
        + sum(costs.g_commands(c, nodes) for c in PASS_CALLS) / interval
    )
    starts = s / w.lifetime if math.isfinite(w.lifetime) else 0.0
    place = costs.g_commands(PLACE[spread], nodes)
    release = costs.g_commands("release a slot", nodes)
    directory = nodes * min(1.0, starts / nodes) if starts and spread else 0.0
    dir_commands = costs.g_commands("live-node directory read", nodes)
    p.g_commands = nodes * g_per_node + starts * (place + release) + directory * dir_commands
    p.commands = (
        s * sum(costs.k(op) * r for op, r in ops if r)
        + nodes * CLOSE_INDEX_COMMANDS / interval
        + starts * (CREATE_COMMANDS + END_SESSION_COMMANDS)
        + p.g_commands
    )
    p.call_cpu = s * sum(costs.u(op, busy) * r for op, r in ops if r) / 1e6
    p.publishes = s * sum(costs.publishes(op) * r for op, r in ops if r)
    if not sharded_publish:
        p.bus_cpu = p.publishes * costs.bus.receiver_us * (shards - 1) / shards / 1e6
    p.shard_cpu = costs.background + p.call_cpu / shards + p.bus_cpu
    heartbeat = costs.g("lease renewal (heartbeat)", nodes)
    one_pass = sum(costs.g(c, nodes) for c in PASS_CALLS)
    p.g_nodes_cpu = nodes * (heartbeat * 3 / ttl + one_pass / interval) / 1e6
    p.g_starts_cpu = (
        starts * (costs.g(PLACE[spread], nodes) + costs.g("release a slot", nodes)) / 1e6
    )
    p.g_directory_cpu = directory * costs.g("live-node directory read", nodes) / 1e6
    return p


def shards_needed(
    costs: Costs, w: Workload, nodes: int, sessions: int, budget: float, *, sharded: bool
) -> float:
    """The fewest shards that keep an ordinary shard's main thread under ``budget`` (a share
    of one core), at busy-shard costs; infinite when the bus alone takes more."""
    for k in range(2, 100_001):
        p = predict(costs, w, nodes, sessions, k, sharded_publish=sharded, busy=True)
        if p.shard_cpu <= budget:
            return float(k)
        if p.bus_cpu >= budget:
            return math.inf
    return math.inf


def max_starts(
    costs: Costs, nodes: int, budget: float, ttl: float = 10.0, *, spread: bool = False
) -> float:
    """Starts a second the ``{g}`` slot can take within ``budget`` cores at ``nodes`` nodes,
    counting its leases and passes, admission and release per start and, with ``spread``,
    the list of nodes each node that starts sessions reads (at most once a second)."""
    base = predict(costs, Workload("idle", 0, 0, 0, 0), nodes, 0, 3, ttl=ttl).g_nodes_cpu
    each = costs.g(PLACE[spread], nodes) + costs.g("release a slot", nodes)
    read = costs.g("live-node directory read", nodes) if spread else 0.0

    def load(rate: float) -> float:
        return base + (rate * each + min(float(nodes), rate) * read) / 1e6

    if load(0.0) >= budget or not each > 0:
        return 0.0
    lo, hi = 0.0, 1e7
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if load(mid) <= budget else (lo, mid)
    return lo


def max_nodes(costs: Costs, budget: float, ttl: float = 10.0, interval: float = 5.0) -> float:
    """The fleet size at which the nodes' leases and maintenance passes alone take
    ``budget`` cores of the ``{g}`` shard (the live-node count of each pass grows with N,
    so this load grows as N²). Beyond the sizes measured: a + b·N fits."""
    idle = Workload("idle", 0, 0, 0, 0)

    def load(n: float) -> float:
        return predict(costs, idle, max(1, int(n)), 0, 3, ttl=ttl, interval=interval).g_nodes_cpu

    lo, hi = 1.0, 1e6
    if load(hi) <= budget:
        return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if load(mid) <= budget else (lo, mid)
    return lo
