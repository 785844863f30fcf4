"""failover: the sessions of a node killed with SIGKILL resume on the other nodes.

Three nodes with ``FLEET_NODE_TTL=3`` (the lease is renewed every second) and
``FLEET_MAINTENANCE_INTERVAL=0.5``. Each run, on a fresh fleet: 1,000 counter sessions
(``interval`` 1.0: they tick, emit and checkpoint every second) are started on node A and
left to checkpoint once; then A gets SIGKILL. The benchmark polls Redis until every
session's record says ``running`` at epoch 2 on another node, and takes the time each one
got there from its ``session_resumed`` event: the stream entry id is Redis' clock (the
machine's clock) at the moment ``mark_running`` wrote the state, so polling does not
blur the figure.

Checks, after every session is back (or 30 s passed):

* lost: sessions that ended (``node_lost`` or anything else) or never came back;
* double owners: per session, exactly one ``session_resumed`` event and epoch exactly 2;
  every slot in exactly one live node's set, the one the record names; A's set gone; and
  the nodes' own ``fleet_sessions_active{state="running"}`` add up to the session count
  (what the processes run, not only what Redis says);
* progress: one second later, no session's checkpointed ``n`` is below what it was before
  the kill (it resumed from its checkpoint, not from zero).
"""

from __future__ import annotations

import math
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench import common

NAME = "failover"
TITLE = "failover: a killed node's sessions resume elsewhere"
SESSIONS = 1000
QUICK_SESSIONS = 200
NODE_TTL = 3.0
TARGET = NODE_TTL + 1.0
SETTINGS = {
    "FLEET_NODE_TTL": "3",
    "FLEET_MAINTENANCE_INTERVAL": "0.5",
    "FLEET_LOG_LEVEL": "warning",
}
WAIT_LIMIT = 30.0
_LOG_ERROR = re.compile(r"(?:WARNING|ERROR)\s+\S+: (.*?(?:Error|failed|lapsed)[^\[]*)")
_RUNNING = re.compile(r'^fleet_sessions_active\{state="running"\} (\S+)$', re.MULTILINE)


@dataclass
class Moved:
    """What one run saw: per session, when it ran again, and the checks."""

    sessions: int = 0
    origin: float = math.nan  # the kill, or the end of the drain timeout (unix seconds)
    signal_at: float = math.nan
    lease_expiry: float = math.nan
    resumed_at: list[float] = field(default_factory=list)
    not_back: int = 0
    ended: Counter[str] = field(default_factory=Counter)
    resumed_many: int = 0  # more than one session_resumed: claimed twice
    epoch_over_two: int = 0
    slot_double: int = 0  # a live session's slot in two nodes' sets
    slot_wrong: int = 0  # ... in no set, or not in its owner's
    origin_slots_left: int = 0
    processes_running: int = 0
    by_node: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    log_errors: Counter[str] = field(default_factory=Counter)
    wait_limit: float = WAIT_LIMIT
    orphans: int = 0  # running under a node that left the registry: never reaped
    regressed: int = 0
    unchecked: int = 0
    notes: list[str] = field(default_factory=list)

    def after(self, q: float) -> float:
        """The q-quantile of (time back - origin) over the sessions that came back."""
        return common.quantile([t - self.origin for t in self.resumed_at], q)

    def all_back(self) -> float:
        """When the last session came back; infinite when some never did."""
        return self.after(1.0) if self.lost == 0 and self.resumed_at else math.inf

    @property
    def live(self) -> int:
        """Sessions Redis says are not ended."""
        return self.sessions - sum(self.ended.values())

    @property
    def double_owners(self) -> int:
        return (
            self.resumed_many
            + self.epoch_over_two
            + self.slot_double
            + max(0, self.processes_running - self.live)
        )

    @property
    def lost(self) -> int:
        """Ended, or live in Redis but not running again (or run by no process)."""
        shortfall = max(0, self.live - self.processes_running)
        return sum(self.ended.values()) + max(self.not_back, shortfall)


def start_on(node: Any, count: int, label: str, refused: Counter[str]) -> list[tuple[str, str]]:
    """Start ``count`` counters on ``node`` (64 in flight), retrying refused starts as a
    load balancer would (up to 5 rounds); what was refused is added to ``refused``."""
    import asyncio
    import json

    async def one(i: int, conn: common.RawHTTP) -> tuple[str, str] | str:
        call = f"{label}-{i % 250}"
        status, body = await conn.request(
            "POST", f"/calls/{call}/sessions", {"params": {"interval": 1.0}}
        )
        if status != 201:
            return f"{status} {json.loads(body).get('code', '?')}"
        return call, str(json.loads(body)["session_id"])

    began = time.monotonic()
    started: list[tuple[str, str]] = []
    for _ in range(5):
        out = asyncio.run(common.fan_out([node.port], count - len(started), 64, one))
        started += [o for o in out if isinstance(o, tuple)]
        refused.update(o if isinstance(o, str) else type(o).__name__ for o in out
                       if not isinstance(o, tuple))  # fmt: skip
        if len(started) == count:
            break
        time.sleep(0.5)
    common.progress(
        f"{len(started):,} started on {node.name} in {time.monotonic() - began:.1f}s"
        + (f"; refused on the way: {dict(refused)}" if refused else "")
    )
    if len(started) != count:
        raise RuntimeError(f"only {len(started)} of {count} sessions started")
    return started


def checkpointed(r: Any, keys: Any, refs: list[tuple[str, str]]) -> list[int]:
    """The counter's ``n`` in each session's latest checkpoint (0 when none)."""
    import json

    pipe = r.pipeline(transaction=False)
    for call, sid in refs:
        pipe.lindex(keys.checkpoint(call, sid), 0)
    out = []
    for raw in pipe.execute():
        out.append(int(json.loads(raw)["state"]["n"]) if raw else 0)
    return out


def wait_checkpointed(r: Any, keys: Any, refs: list[tuple[str, str]]) -> list[int]:
    """Wait until every session has saved a checkpoint (up to 10 s); their ``n``."""
    deadline = time.monotonic() + 10
    while True:
        ns = checkpointed(r, keys, refs)
        if min(ns) >= 1 or time.monotonic() > deadline:
            return ns
        time.sleep(0.2)


def records(r: Any, keys: Any, refs: list[tuple[str, str]]) -> list[list[str | None]]:
    pipe = r.pipeline(transaction=False)
    for call, sid in refs:
        pipe.hmget(keys.session(call, sid), "node_id", "epoch", "state", "end_reason")
    return list(pipe.execute())


def wait_moved(
    r: Any, keys: Any, refs: list[tuple[str, str]], origin_node: str, limit: float
) -> list[list[str | None]]:
    """Poll until every session runs at epoch 2 off ``origin_node`` or has ended."""
    deadline = time.monotonic() + limit
    while True:
        recs = records(r, keys, refs)
        pending = sum(
            1
            for node_id, epoch, state, _ in recs
            if state != "ended"
            and not (state == "running" and epoch == "2" and node_id != origin_node)
        )
        if pending == 0 or time.monotonic() > deadline:
            return recs
        time.sleep(0.1)


def log_errors(nodes: list[Any]) -> Counter[str]:
    """Warnings and errors about failures in the nodes' logs, by message."""
    out: Counter[str] = Counter()
    for node in nodes:
        for m in _LOG_ERROR.finditer(node.log()):
            out[re.sub(r"/calls/[^/ ]+/", "/calls/{c}/", m[1].strip())] += 1
    return out


def running_in_processes(fleet: Any, nodes: list[Any]) -> dict[str, int]:
    """``fleet_sessions_active{state="running"}`` of each node, from its ``/metrics``."""
    out = {}
    for node in nodes:
        m = _RUNNING.search(fleet.http.get(f"{node.url}/metrics").text)
        out[node.name] = int(float(m[1])) if m else -1
    return out


def check_slots(
    fleet: Any,
    r: Any,
    keys: Any,
    refs: list[tuple[str, str]],
    recs: list[list[str | None]],
    origin_node: Any,
    out: Moved,
) -> None:
    """Each live session's slot in exactly one node's set: the one its record names."""
    sets = {n.name: r.smembers(keys.node_sessions(n.name)) for n in fleet.nodes}
    out.origin_slots_left = len(sets[origin_node.name])
    for (call, sid), rec in zip(refs, recs, strict=True):
        ref = f"{call}/{sid}"
        holders = [name for name, members in sets.items() if ref in members]
        if rec[2] != "ended" and len(holders) > 1:
            out.slot_double += 1
        elif rec[2] != "ended" and holders != [rec[0]]:
            out.slot_wrong += 1


def check_moves(
    fleet: Any,
    r: Any,
    keys: Any,
    refs: list[tuple[str, str]],
    origin_node: Any,
    before_n: list[int],
    out: Moved,
    limit: float = WAIT_LIMIT,
) -> None:
    """Fill ``out`` with when each session came back (waiting up to ``limit`` seconds for
    them) and with the checks."""
    others = [n for n in fleet.nodes if n is not origin_node]
    out.wait_limit = limit
    recs = wait_moved(r, keys, refs, origin_node.name, limit)
    for node_id, epoch, state, end_reason in recs:
        if state == "ended":
            out.ended[end_reason or "?"] += 1
        elif not (state == "running" and epoch == "2" and node_id != origin_node.name):
            out.not_back += 1
        if epoch and int(epoch) > 2:
            out.epoch_over_two += 1
        if node_id:
            out.by_node[node_id] += 1
    # When each came back, and how many times: the session_resumed events.
    pipe = r.pipeline(transaction=False)
    for call, sid in refs:
        pipe.xrange(keys.events(call, sid))
    for entries in pipe.execute():
        resumed = [eid for eid, f in entries if f.get("type") == "session_resumed"]
        if len(resumed) > 1:
            out.resumed_many += 1
        if resumed:
            out.resumed_at.append(int(resumed[0].split("-")[0]) / 1000)
    check_slots(fleet, r, keys, refs, recs, origin_node, out)
    out.processes_running = sum(running_in_processes(fleet, others).values())
    # Progress: resumed from the checkpoint, so n never goes back.
    time.sleep(1.2)
    after_n = checkpointed(r, keys, refs)
    out.regressed = sum(1 for a, b in zip(after_n, before_n, strict=True) if a < b)
    out.unchecked = sum(1 for b in before_n if b < 1)
    out.log_errors = log_errors(fleet.nodes)


def one_run(sessions: int) -> Moved:
    from fleet.store.keys import Keys

    out = Moved(sessions=sessions)
    with common.local_fleet(3, **SETTINGS) as fleet:
        keys = Keys(fleet.prefix)
        r = common.redis_client(fleet.redis.url)
        a = fleet.nodes[0]
        refs = start_on(a, sessions, "fo", out.refused)
        before_n = wait_checkpointed(r, keys, refs)
        expiry_ms = r.zscore(keys.nodes(), a.name)
        out.origin = out.signal_at = time.time()
        a.signal(signal.SIGKILL)
        a.wait(10)
        out.lease_expiry = float(expiry_ms) / 1000 if expiry_ms else math.nan
        common.progress(f"killed {a.name}; waiting for {sessions:,} sessions to resume")
        check_moves(fleet, r, keys, refs, a, before_n, out)
        r.close()
    return out


def run(opts: common.Options) -> common.Report:
    sessions = QUICK_SESSIONS if opts.quick else SESSIONS
    load_before = common.load_average()
    runs: list[Moved] = []
    for i in range(opts.runs):
        m = one_run(sessions)
        common.progress(
            f"run {i + 1}/{opts.runs}: all back {m.all_back():.2f}s after the kill (lease "
            f"lapsed after {m.lease_expiry - m.origin:.2f}s); lost {m.lost}, double owners "
            f"{m.double_owners}"
        )
        runs.append(m)
    return report(opts, sessions, runs, load_before)


def moved_rows(runs: list[Moved]) -> list[list[str]]:
    def agg(get: Any) -> common.Agg:
        return common.Agg.of(get(m) for m in runs)

    return [
        ["first session running again", agg(lambda m: m.after(0.0)).fmt(" s")],
        ["half of them (p50)", agg(lambda m: m.after(0.5)).fmt(" s")],
        ["p99 of them", agg(lambda m: m.after(0.99)).fmt(" s")],
        ["last of those that came back", agg(lambda m: m.after(1.0)).fmt(" s")],
        ["**all of them** (∞ when some never came back)", agg(Moved.all_back).fmt(" s")],
        ["sessions that came back", agg(lambda m: len(m.resumed_at)).fmt("", 0)],
        [
            "first to last (moving them all)",
            agg(lambda m: m.after(1.0) - m.after(0.0)).fmt(" s"),
        ],
        [
            "sessions moved per second, first to last",
            agg(
                lambda m: (
                    (len(m.resumed_at) - 1) / (m.after(1.0) - m.after(0.0))
                    if m.after(1.0) > m.after(0.0)
                    else math.nan
                )
            ).fmt("", 0),
        ],
    ]


def check_lines(runs: list[Moved]) -> tuple[int, int, list[str]]:
    lost = sum(m.lost for m in runs)
    double = sum(m.double_owners for m in runs)
    ended: Counter[str] = Counter()
    by_node: Counter[str] = Counter()
    for m in runs:
        ended.update(m.ended)
        by_node.update(m.by_node)
    total = sum(m.sessions for m in runs)
    lines = [
        f"Lost, all runs (target 0): **{lost}** of {total:,} "
        f"(ended: {dict(ended) or 'none'}; not running again within {runs[0].wait_limit:.0f} s: "
        f"{sum(m.not_back for m in runs)}; live in Redis but run by no process: "
        f"{sum(max(0, m.live - m.processes_running) for m in runs)}; live sessions whose "
        f"slot is in no set or not in their owner's: {sum(m.slot_wrong for m in runs)}; "
        f"slots left on the old node: {sum(m.origin_slots_left for m in runs)}).",
        f"Double owners, all runs (target 0): **{double}** (sessions with more than one "
        f"`session_resumed`: {sum(m.resumed_many for m in runs)}; epoch above 2: "
        f"{sum(m.epoch_over_two for m in runs)}; slot in two nodes' sets: "
        f"{sum(m.slot_double for m in runs)}; sessions run by B and C beyond the live "
        f"ones: {sum(max(0, m.processes_running - m.live) for m in runs)}).",
        f"Progress: sessions whose checkpointed `n` went back after the move: "
        f"{sum(m.regressed for m in runs)} (sessions without a checkpoint before the "
        f"move: {sum(m.unchecked for m in runs)}). Where they went, all runs: "
        f"{dict(sorted(by_node.items()))}.",
    ]
    refused: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for m in runs:
        refused.update(m.refused)
        errors.update(m.log_errors)
    if refused:
        lines.append(
            f"Starts refused while the sessions were being started (retried, all runs): "
            f"{dict(refused)}."
        )
    if errors:
        lines.append(f"Failures in the nodes' logs, all runs: {dict(errors.most_common(8))}.")
    return lost, double, lines


def report(
    opts: common.Options, sessions: int, runs: list[Moved], load_before: str
) -> common.Report:
    all_back = common.Agg.of(m.all_back() for m in runs)
    lapse = common.Agg.of(m.lease_expiry - m.origin for m in runs)
    after_lapse = common.Agg.of(m.after(0.0) - (m.lease_expiry - m.origin) for m in runs)
    within = sum(1 for m in runs if m.all_back() <= TARGET)
    met = all_back.median <= TARGET
    lost, double, checks = check_lines(runs)
    rows = [
        ["A's lease lapses (its last renewal + 3 s)", lapse.fmt(" s")],
        *moved_rows(runs),
    ]
    body = [
        f"{opts.runs} runs, each on a fresh fleet of 3 nodes (`FLEET_NODE_TTL=3`, so the "
        "lease is renewed every second; `FLEET_MAINTENANCE_INTERVAL=0.5`; "
        f"`FLEET_LOG_LEVEL=warning`). Per run, {sessions:,} counter sessions (`interval` "
        "1.0: a tick, an emit and a checkpoint per second each) are started on node A "
        "through HTTP and left to checkpoint once; then A gets SIGKILL. Times are from "
        "the kill to the moment each session was written `running` at epoch 2 on B or C "
        "(its `session_resumed` event's stream id, Redis' clock on the same machine); "
        "the benchmark polls the records until every one is back. "
        f"Target: all of them within `FLEET_NODE_TTL` + 1 s = {TARGET:.0f} s; 0 lost; 0 "
        "double owners.",
        "",
        *common.table(["after the kill", "time"], rows),
        "",
        f"All {sessions:,} running again within {TARGET:.0f} s (median of the runs): "
        f"{common.verdict(met)} ({all_back.fmt(' s')}; {within} of {len(runs)} runs within "
        f"the target). Lost: {common.verdict(lost == 0)}. "
        f"Double owners: {common.verdict(double == 0)}.",
        "",
        *checks,
    ]
    failed = sum(m.ended.get("failed", 0) for m in runs)
    notes = [
        *(
            [
                f"**{failed} sessions ended `failed` after the move**: their new owner's "
                "`mark_running` (or another Redis call of the resume) got "
                "`MaxConnectionsError`: 500 sessions resume on a node at once while the "
                "others tick, and the node's Redis pool (redis-py's asyncio default, 100 "
                "connections) refuses at once instead of waiting; the session runtime "
                "counts the error as the worker failing."
            ]
            if failed
            else []
        ),
        "The time splits in two: waiting for A's lease to lapse (between 2 and 3 s "
        "after the kill, by when A last renewed), then the next maintenance pass of B "
        "or C finds it expired and moves the sessions: the first one is running again "
        f"{after_lapse.fmt(' s')} after the lapse. Moving one session is three round trips "
        "for the reaper (read the record, `reap`, `claim`), up to 32 at a time, and three "
        "for the new owner (read the record, read the checkpoint, `mark_running`).",
        "Double owners are checked in Redis (events, epochs, slot sets) and in the "
        'processes (`fleet_sessions_active{state="running"}` of B and C adds up to the '
        "session count).",
        common.load_note(load_before),
    ]
    summary = (
        f"SIGKILL of a node running {sessions:,} sessions: all running again elsewhere "
        f"{all_back.fmt(' s')} after the kill (target ≤ {TARGET:.0f} s: "
        f"{common.verdict(met)}); {lost} lost, {double} double owners."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
