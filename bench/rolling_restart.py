"""rolling_restart: every node of a fleet replaced in turn, its sessions running throughout.

Three nodes run ``tests.workers:Migratable`` (the counter with ``migratable = True``: a
draining node hands its sessions off at once instead of waiting out
``FLEET_DRAIN_TIMEOUT``, here 30 s). Each run, on a fresh fleet: 300 sessions (``interval``
1.0: a tick, an emit and a checkpoint per second each) are started round-robin, 100 per
node, and left to checkpoint once. Then the rolling restart, as an orchestrator does it:
for each node in turn, SIGTERM, wait for the process to exit, start its replacement and
wait until it answers ``/ready``, then the next node. The replacement gets a new node id
(``new id``, as a Deployment's new pod) or the same id and port (``same id``, as a
StatefulSet's); each run does both, each on a fresh fleet.

Figures: the whole restart (first SIGTERM to the last replacement ready), and per node:
its drain (SIGTERM to exit), the sessions it held, and its replacement's start-up. Then
the benchmark waits until every session runs on a live node and checks: none ended, every
one ``running`` on a live node, the live nodes' processes run exactly 300 sessions
(``fleet_sessions_active{state="running"}``), every slot in exactly its owner's set, no
checkpointed ``n`` went back; how many sessions moved, and how many times
(``resumed_count``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench import common
from bench.failover import checkpointed, log_errors, running_in_processes, wait_checkpointed

NAME = "rolling_restart"
TITLE = "rolling_restart: every node replaced in turn, with migratable sessions"
WORKER = "tests.workers:Migratable"
NODES = 3
SESSIONS = 300
QUICK_SESSIONS = 60
TARGET_TOTAL = 10.0
MODES = ("new id", "same id")
EXIT_LIMIT = 45.0  # the drain timeout and its graces, and some
SETTLE_LIMIT = 20.0  # seconds after the last replacement is ready for every session to run
SETTINGS = {
    "FLEET_WORKER": WORKER,
    "FLEET_DRAIN_TIMEOUT": "30",
    # A long lease: only the hand-offs, never a lapsed lease, move the sessions.
    "FLEET_NODE_TTL": "10",
    "FLEET_MAINTENANCE_INTERVAL": "0.5",
    "FLEET_LOG_LEVEL": "warning",
    # The worker is imported from the repository's tests package, wherever the bench runs.
    "PYTHONPATH": os.pathsep.join(p for p in (str(common.ROOT), os.environ.get("PYTHONPATH")) if p),
}


@dataclass
class Step:
    """One node replaced."""

    node: str
    replacement: str
    held: int = 0  # sessions in its slot set at SIGTERM
    signal_at: float = float("nan")  # unix seconds
    drain: float = float("nan")  # SIGTERM -> exit
    start: float = float("nan")  # replacement started -> ready
    exit_code: int | None = None
    resuming: int = 0  # sessions not running on a live node when the replacement was ready


@dataclass
class Run:
    mode: str
    sessions: int
    steps: list[Step] = field(default_factory=list)
    total: float = float("nan")  # first SIGTERM -> last replacement ready
    settled: float = float("nan")  # last replacement ready -> every session running
    ended: Counter[str] = field(default_factory=Counter)
    not_running: Counter[str] = field(default_factory=Counter)  # live, but not running live
    processes: int = 0  # fleet_sessions_active{state="running"}, live nodes summed
    slot_wrong: int = 0  # a live session's slot not in exactly its owner's set
    stray_slots: int = 0  # slots in the live nodes' sets beyond the sessions
    regressed: int = 0
    resumed: Counter[int] = field(default_factory=Counter)  # resumed_count -> sessions
    by_node: Counter[str] = field(default_factory=Counter)  # where they run at the end
    # Per move: its session_resumed (Redis' clock) less the SIGTERM of the node it left.
    back_after: list[float] = field(default_factory=list)
    log_errors: Counter[str] = field(default_factory=Counter)

    @property
    def moved(self) -> int:
        return sum(n for count, n in self.resumed.items() if count > 0)

    @property
    def lost(self) -> int:
        return sum(self.ended.values()) + sum(self.not_running.values())


def _records(r: Any, keys: Any, refs: list[tuple[str, str]]) -> list[list[str | None]]:
    pipe = r.pipeline(transaction=False)
    for call, sid in refs:
        pipe.hmget(keys.session(call, sid), "node_id", "state", "end_reason", "resumed_count")
    return list(pipe.execute())


def _not_running(recs: list[list[str | None]], live: set[str]) -> int:
    return sum(1 for node_id, state, _, _ in recs if state != "running" or node_id not in live)


def _replace(
    fleet: Any, index: int, mode: str, run_no: int, retired: list[Any]
) -> tuple[Any, float]:
    """Start the replacement of ``fleet.nodes[index]`` (which has exited); it and the
    seconds until it answered ready. A node replaced by another goes to ``retired``."""
    old = fleet.nodes[index]
    began = time.monotonic()
    if mode == "same id":
        old.start()
        fleet.wait_ready([old])
        return old, time.monotonic() - began
    new = fleet.add_node(f"node-{index}-r{run_no}")  # appended; waits until ready
    fleet.nodes.remove(new)
    fleet.nodes[index] = new
    retired.append(old)
    return new, time.monotonic() - began


def _restart(
    fleet: Any,
    r: Any,
    keys: Any,
    refs: list[tuple[str, str]],
    out: Run,
    run_no: int,
    retired: list[Any],
) -> None:
    began = time.monotonic()
    for index in range(NODES):
        node = fleet.nodes[index]
        step = Step(node.name, node.name)
        step.held = int(r.scard(keys.node_sessions(node.name)))
        t0 = time.monotonic()
        step.signal_at = time.time()
        node.signal(signal.SIGTERM)
        try:
            step.exit_code = node.wait(EXIT_LIMIT)
        except Exception:
            step.exit_code = None
            common.progress(f"{node.name} had not exited {EXIT_LIMIT:.0f} s after SIGTERM")
        step.drain = time.monotonic() - t0
        new, step.start = _replace(fleet, index, out.mode, run_no, retired)
        step.replacement = new.name
        live = {n.name for n in fleet.nodes if n.alive()}
        step.resuming = _not_running(_records(r, keys, refs), live)
        common.progress(
            f"{node.name}: {step.held} sessions, drained in {step.drain:.2f} s (exit "
            f"{step.exit_code}); {new.name} ready in {step.start:.2f} s; {step.resuming} "
            "sessions not running on a live node then"
        )
        out.steps.append(step)
    out.total = time.monotonic() - began


def _settle(
    fleet: Any, r: Any, keys: Any, refs: list[tuple[str, str]], out: Run
) -> list[list[str | None]]:
    """Wait until every session runs on a live node (or has ended), up to SETTLE_LIMIT."""
    live = {n.name for n in fleet.nodes if n.alive()}
    began = time.monotonic()
    while True:
        recs = _records(r, keys, refs)
        pending = sum(
            1
            for node_id, state, _, _ in recs
            if state != "ended" and (state != "running" or node_id not in live)
        )
        if pending == 0 or time.monotonic() - began > SETTLE_LIMIT:
            out.settled = time.monotonic() - began
            return recs
        time.sleep(0.05)


def _check(
    fleet: Any,
    r: Any,
    keys: Any,
    refs: list[tuple[str, str]],
    recs: list[list[str | None]],
    before: list[int],
    out: Run,
    retired: list[Any],
) -> None:
    live_nodes = [n for n in fleet.nodes if n.alive()]
    live = {n.name for n in live_nodes}
    for node_id, state, end_reason, resumed in recs:
        if state == "ended":
            out.ended[end_reason or "?"] += 1
        elif state != "running" or node_id not in live:
            out.not_running[f"{state} on {node_id}"] += 1
        else:
            out.by_node[str(node_id)] += 1
        out.resumed[int(resumed or 0)] += 1
    sets = {n.name: r.smembers(keys.node_sessions(n.name)) for n in live_nodes}
    for (call, sid), (node_id, state, _, _) in zip(refs, recs, strict=True):
        ref = f"{call}/{sid}"
        holders = [name for name, members in sets.items() if ref in members]
        if state != "ended" and holders != [node_id]:
            out.slot_wrong += 1
    out.stray_slots = sum(len(m) for m in sets.values()) - (len(refs) - sum(out.ended.values()))
    out.processes = sum(running_in_processes(fleet, live_nodes).values())
    pipe = r.pipeline(transaction=False)
    for call, sid in refs:
        pipe.xrange(keys.events(call, sid))
    signals = sorted(s.signal_at for s in out.steps)
    for entries in pipe.execute():
        for eid, fields in entries:
            if fields.get("type") == "session_resumed":
                at = int(eid.split("-")[0]) / 1000
                before_it = [t for t in signals if t <= at]
                if before_it:
                    out.back_after.append(at - before_it[-1])
    time.sleep(1.2)  # a tick more: no session went back
    after = checkpointed(r, keys, refs)
    out.regressed = sum(1 for a, b in zip(after, before, strict=True) if a < b)
    out.log_errors = log_errors([*fleet.nodes, *retired])


def one_run(mode: str, sessions: int, run_no: int) -> Run:
    from fleet.store.keys import Keys

    out = Run(mode, sessions)
    with common.local_fleet(NODES, **SETTINGS) as fleet:
        retired: list[Any] = []  # the nodes replaced by others (their logs are read too)
        keys = Keys(fleet.prefix)
        r = common.redis_client(fleet.redis.url)
        ports = [n.port for n in fleet.nodes]
        refs = asyncio.run(
            common.start_sessions(
                ports, sessions, {"interval": 1.0}, lambda i: f"rr-{i % 100}", label="starting"
            )
        )
        if len(refs) != sessions:
            raise RuntimeError(f"only {len(refs)} of {sessions} sessions started")
        before = wait_checkpointed(r, keys, refs)
        _restart(fleet, r, keys, refs, out, run_no, retired)
        recs = _settle(fleet, r, keys, refs, out)
        _check(fleet, r, keys, refs, recs, before, out, retired)
        r.close()
    return out


def run(opts: common.Options) -> common.Report:
    sessions = QUICK_SESSIONS if opts.quick else SESSIONS
    load_before = common.load_average()
    runs: list[Run] = []
    for i in range(opts.runs):
        for mode in MODES:
            common.progress(f"run {i + 1}/{opts.runs}, {mode}")
            r = one_run(mode, sessions, i)
            common.progress(
                f"run {i + 1}, {mode}: {r.total:.2f} s in all; drains "
                f"{[round(s.drain, 2) for s in r.steps]} s; ended {dict(r.ended) or 0}, not "
                f"running {dict(r.not_running) or 0}; moved {r.moved}, resumed_count "
                f"{dict(sorted(r.resumed.items()))}; processes run {r.processes}; at the end "
                f"{dict(sorted(r.by_node.items()))}"
            )
            runs.append(r)
    return report(opts, sessions, runs, load_before)


def _counter(c: Counter[Any]) -> str:
    return ", ".join(f"{k}: {n:,}" for k, n in sorted(c.items())) or "none"


def _share(figure: str) -> Any:
    """The share of a run's whole restart spent in each step's ``figure``."""
    return lambda r: sum(getattr(s, figure) for s in r.steps) / r.total


def _split_note(runs: list[Run], sessions: int) -> str:
    """How the first node's sessions were shared between the other two, which held as
    many sessions each: the least loaded rule would split them evenly."""
    each = sessions // NODES
    splits = [(r.steps[1].held - each, 2 * each - r.steps[1].held) for r in runs]
    uneven = any(abs(a - b) > each // 5 for a, b in splits)
    text = (
        f"The first node's {each} sessions went to node-1/node-2, per run: "
        + ", ".join(f"{a}/{b}" for a, b in splits)
        + f" (both held {each} then)."
    )
    if not uneven:
        return text
    return (
        text + " Not the even split that handing each to the least loaded node would give. "
        "The likely cause, from reading `fleet/runtime/drain.py`: in a drain of migratable "
        "sessions every session stops at once, before the "
        "drain has read its list of target nodes (`Drain._targets`, read after the drain "
        "timeout otherwise), so each concurrent hand-off reads the nodes' counts itself "
        "and picks by a snapshot that the others' moves soon outdate. No session is lost "
        "for it."
    )


def report(opts: common.Options, sessions: int, runs: list[Run], load_before: str) -> common.Report:
    v = common.verdict
    by_mode = {m: [r for r in runs if r.mode == m] for m in MODES}

    def agg(rs: list[Run], get: Any) -> common.Agg:
        return common.Agg.of(get(r) for r in rs)

    totals = {m: agg(rs, lambda r: r.total) for m, rs in by_mode.items()}
    met = all(t.median <= TARGET_TOTAL for t in totals.values())
    lost = sum(r.lost for r in runs)
    ended: Counter[str] = Counter()
    not_running: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in runs:
        ended.update(r.ended)
        not_running.update(r.not_running)
        errors.update(r.log_errors)
    total_rows = []
    step_rows = []
    for m, rs in by_mode.items():
        total_rows += [
            [
                m,
                f"{totals[m].fmt(' s')}",
                agg(rs, lambda r: r.settled).fmt(" s"),
                agg(rs, lambda r: r.moved).fmt("", 0),
                " / ".join(
                    f"{k}: " + agg(rs, lambda r, k=k: r.resumed.get(k, 0)).fmt("", 0)
                    for k in sorted({k for r in rs for k in r.resumed})
                ),
                f"{sum(r.lost for r in rs)}",
                f"≤ {TARGET_TOTAL:.0f} s {v(totals[m].median <= TARGET_TOTAL)}",
            ]
        ]
        for i in range(NODES):
            step_rows.append(
                [
                    m,
                    f"node-{i} ({'1st' if i == 0 else '2nd' if i == 1 else '3rd'})",
                    agg(rs, lambda r, i=i: r.steps[i].held).fmt("", 0),
                    agg(rs, lambda r, i=i: r.steps[i].drain).fmt(" s"),
                    agg(rs, lambda r, i=i: r.steps[i].start).fmt(" s"),
                    agg(rs, lambda r, i=i: r.steps[i].resuming).fmt("", 0),
                ]
            )
    exits = Counter(str(s.exit_code) for r in runs for s in r.steps)
    end_nodes = [
        f"{m}: "
        + "; ".join("/".join(str(n) for n in sorted(r.by_node.values(), reverse=True)) for r in rs)
        for m, rs in by_mode.items()
    ]
    shares = [
        f"{m}: start-ups {agg(rs, _share('start')).fmt(' %', 0, 100)}, drains "
        f"{agg(rs, _share('drain')).fmt(' %', 0, 100)}"
        for m, rs in by_mode.items()
    ]
    body = [
        f"{opts.runs} runs per mode, each on a fresh fleet of {NODES} nodes running "
        f"`{WORKER}` (the counter with `migratable = True`), `FLEET_DRAIN_TIMEOUT=30`, "
        "`FLEET_NODE_TTL=10` (no lease lapses during a run: only the hand-offs move "
        "sessions), `FLEET_MAINTENANCE_INTERVAL=0.5`, `FLEET_LOG_LEVEL=warning`. Per run: "
        f"{sessions} sessions (`interval` 1.0) started round-robin, {sessions // NODES} per "
        "node, and left to checkpoint once; then, for each node in turn: SIGTERM, wait for "
        "the process to exit, start the replacement (a new node id, or the same id and "
        "port) and wait until it answers `/ready`, then the next. Afterwards the benchmark "
        "waits until every session runs on a live node and checks them. Targets: the "
        f"whole restart ≤ {TARGET_TOTAL:.0f} s; no session ends; every one `running` at the "
        "end.",
        "",
        *common.table(
            [
                "replacement",
                "**whole restart** (1st SIGTERM to last ready)",
                "then until every session runs",
                "sessions moved",
                "sessions by `resumed_count`",
                "lost (all runs)",
                "target",
            ],
            total_rows,
        ),
        "",
        "Each move, from the SIGTERM of the node the session left to the session "
        "written `running` on its new node (its `session_resumed` event's stream id, "
        "Redis' clock on the same machine); quantiles over the moves of each run:",
        "",
        *common.table(
            ["replacement", "moves per run", "p50", "p99", "slowest"],
            [
                [
                    m,
                    agg(rs, lambda r: len(r.back_after)).fmt("", 0),
                    agg(rs, lambda r: common.quantile(r.back_after, 0.5)).ms(0),
                    agg(rs, lambda r: common.quantile(r.back_after, 0.99)).ms(0),
                    agg(rs, lambda r: max(r.back_after, default=float("nan"))).ms(0),
                ]
                for m, rs in by_mode.items()
            ],
        ),
        "",
        "Per node, in the order restarted:",
        "",
        *common.table(
            [
                "replacement",
                "node",
                "sessions it held at SIGTERM",
                "drain (SIGTERM to exit)",
                "replacement start-up (to ready)",
                "sessions not yet running again when it was ready",
            ],
            step_rows,
        ),
        "",
        f"Whole restart ≤ {TARGET_TOTAL:.0f} s: {v(met)}. Sessions that ended, all runs "
        f"(target 0): **{sum(ended.values())}** ({_counter(ended)}); live but not running "
        f"on a live node at the end: **{sum(not_running.values())}** "
        f"({_counter(not_running)}). Every session `running` at the end: {v(lost == 0)}.",
        "",
        "Checks, all runs: sessions the live nodes' processes ran at the end, per run: "
        f"{[r.processes for r in runs]} ({sessions} expected); sessions whose slot is not "
        "in exactly its owner's set: "
        f"{sum(r.slot_wrong for r in runs)}; slots beyond the live sessions: "
        f"{sum(r.stray_slots for r in runs)}; sessions whose checkpointed `n` went back: "
        f"{sum(r.regressed for r in runs)}. Nodes' exit statuses: {_counter(exits)}. "
        "Sessions per node at the end (each run): " + "; ".join(end_nodes) + ".",
    ]
    notes = [
        "A draining node asks every migratable session to close with `close_reason = "
        '"handoff"` at once; the counter returns at once (its last tick is already '
        "checkpointed), and the node hands each one to the least loaded other node "
        "(`handoff`, then `claim`, which bumps the epoch and tells the new owner to resume "
        "it from its checkpoint). The node exits once no session is left, without "
        "waiting out the 30 s drain timeout.",
        "Where the whole restart goes (its share, median over the runs and range): "
        + "; ".join(shares)
        + " (the rest: the benchmark reading the records between steps). A replacement's "
        "start-up is a new Python process importing fleet and its worker, registering "
        "and subscribing, CPU-bound: it is what grows when the machine is busy.",
        "A session can move more than once: those handed to a node restarted later move "
        "again. The last node restarted hands its sessions to the two replacements "
        "already up; its own replacement starts empty (nothing rebalances sessions).",
        _split_note(runs, sessions),
        "Warnings and errors about failures in the nodes' logs, all runs: "
        + (", ".join(f"{k} ×{n}" for k, n in errors.most_common(6)) or "none")
        + ".",
        common.load_note(load_before),
    ]
    summary = (
        f"Rolling restart of 3 nodes holding {sessions} migratable sessions: "
        + "; ".join(f"{m} {totals[m].fmt(' s')}" for m in MODES)
        + f" (target ≤ {TARGET_TOTAL:.0f} s: {v(met)}); sessions ended "
        f"{sum(ended.values())}, not running at the end {sum(not_running.values())} "
        f"({v(lost == 0)})."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
