"""drain_placement: starts through a load balancer while one node drains.

Three nodes (``FLEET_DRAIN_TIMEOUT=30``) behind nginx, configured as ``fleet demo``
configures it (round-robin, no health checks: nginx keeps sending a third of the requests
to the draining node; a POST goes to another node only when it never reached one). Each
run, on a fresh fleet: ``HELD`` counter sessions (``interval`` 1.0, not migratable) are
started on node A, so A's drain lasts its whole timeout; then a paced open-loop client
sends ``RATE`` starts per second through nginx (each in a call of its own, counter with
``interval`` 3600), over ``LANES`` keep-alive connections. ``BEFORE`` seconds in, A gets
SIGTERM; the load goes on until A has exited and ``AFTER`` seconds more.

Every start is counted in the phase in which it was sent: *before* the signal, *drain*
(from the signal to A's exit) and *after*. For each: the answers by status and code, the
latency of the 201s, and, from nginx's access log, which node nginx handed it to against
the node the 201 says runs it. Also: A's held sessions just before the drain timeout ends
(still running on A?) and after A's exit (handed to B or C?), and whether every start
answered 201 runs at the end.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench import common
from bench.failover import log_errors, records, start_on
from bench.front import Front, nginx

NAME = "drain_placement"
TITLE = "drain_placement: no failed starts while a node drains behind a load balancer"
DRAIN_TIMEOUT = 30.0
QUICK_DRAIN_TIMEOUT = 5.0
HELD = 100
RATE = 60.0  # starts per second through nginx
LANES = 8  # keep-alive connections to nginx (at most this many starts in flight)
BEFORE = 3.0
AFTER = 3.0
EXIT_LIMIT = 20.0  # seconds past the drain timeout A may take to exit
PHASES = ("before", "drain", "after")
PARAMS = {"interval": 3600}
A = "node-0"  # the node that drains


def settings(drain_timeout: float) -> dict[str, str]:
    return {
        "FLEET_DRAIN_TIMEOUT": f"{drain_timeout:g}",
        # A long lease: only the drain, never a lapsed lease, moves A's sessions.
        "FLEET_NODE_TTL": "10",
        "FLEET_MAINTENANCE_INTERVAL": "0.5",
        "FLEET_LOG_LEVEL": "warning",
    }


@dataclass
class Attempt:
    path: str
    sent: float  # unix seconds
    latency: float
    status: int  # 0: no answer (transport error)
    code: str  # the error code, or the exception's name
    landed: str = ""  # node_id of a 201
    session_id: str = ""
    asked: str = "?"  # the node nginx handed it to (the last it tried)
    passed_on: bool = False  # nginx tried more than one node

    def outcome(self) -> str:
        return "201" if self.status == 201 else f"{self.status or 'no answer'} {self.code}"


@dataclass
class Run:
    drain_timeout: float
    attempts: list[Attempt] = field(default_factory=list)
    signal_at: float = float("nan")
    exit_at: float = float("nan")
    exit_code: int | None = None
    held_on_a_late: int = -1  # A's held sessions running on A just before its timeout
    held_after: Counter[str] = field(default_factory=Counter)  # "running on X" / "ended: r"
    not_running: Counter[str] = field(default_factory=Counter)  # 201s not running at the end
    failures: list[str] = field(default_factory=list)  # each failed start, described
    nginx_errors: Counter[str] = field(default_factory=Counter)
    log_errors: Counter[str] = field(default_factory=Counter)

    def phase(self, a: Attempt) -> str:
        if a.sent < self.signal_at:
            return "before"
        return "drain" if a.sent < self.exit_at else "after"

    def of(self, phase: str) -> list[Attempt]:
        return [a for a in self.attempts if self.phase(a) == phase]

    def failed(self, phase: str) -> int:
        return sum(1 for a in self.of(phase) if a.status != 201)

    def latencies(self, phase: str, via_a: bool | None = None) -> list[float]:
        """Of the 201s sent in ``phase``: all, or those nginx handed to A (``via_a``) or
        to B or C (``not via_a``)."""
        return [
            a.latency
            for a in self.of(phase)
            if a.status == 201 and (via_a is None or (a.asked == A) == via_a)
        ]

    @property
    def drain_seconds(self) -> float:
        return self.exit_at - self.signal_at


async def _one(conn: common.RawHTTP, path: str) -> Attempt:
    sent = time.time()
    t0 = time.perf_counter()
    try:
        status, raw = await conn.request("POST", path, {"params": PARAMS})
    except Exception as exc:  # counted as a failed start, never raised
        await conn.__aexit__()  # the next request on this lane reconnects
        return Attempt(path, sent, time.perf_counter() - t0, 0, type(exc).__name__)
    latency = time.perf_counter() - t0
    try:
        body: dict[str, Any] = json.loads(raw) if raw else {}
    except ValueError:
        body = {"code": "not JSON"}
    if status == 201:
        landed, sid = str(body.get("node_id")), str(body.get("session_id"))
        return Attempt(path, sent, latency, status, "", landed=landed, session_id=sid)
    return Attempt(path, sent, latency, status, str(body.get("code", "?")))


async def _drive(port: int, tag: str, stop: asyncio.Event) -> list[Attempt]:
    """``RATE`` starts per second to ``port`` until ``stop`` is set (paced from the start
    time; a start waits for a free lane when all ``LANES`` are busy)."""
    free: asyncio.Queue[common.RawHTTP] = asyncio.Queue()
    lanes = [common.RawHTTP("127.0.0.1", port) for _ in range(LANES)]
    for conn in lanes:
        free.put_nowait(conn)
    out: list[Attempt] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, conn: common.RawHTTP) -> None:
        try:
            out.append(await _one(conn, f"/calls/{tag}-{i}/sessions"))
        finally:
            free.put_nowait(conn)

    began = time.monotonic()
    i = 0
    while not stop.is_set():
        delay = began + i / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        conn = await free.get()
        task = asyncio.create_task(one(i, conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    await asyncio.gather(*tasks)
    for conn in lanes:
        await conn.__aexit__()
    return out


def _held_where(r: Any, keys: Any, held: list[tuple[str, str]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for node_id, _, state, end_reason in records(r, keys, held):
        out[f"ended: {end_reason}" if state == "ended" else f"{state} on {node_id}"] += 1
    return out


async def _control(
    fleet: Any, r: Any, keys: Any, held: list[tuple[str, str]], out: Run, stop: asyncio.Event
) -> None:
    """SIGTERM to A after ``BEFORE`` s; A's held sessions just before its drain timeout
    ends; A's exit; ``AFTER`` s more, then stop the load."""
    a = fleet.nodes[0]
    await asyncio.sleep(BEFORE)
    out.signal_at = time.time()
    a.signal(signal.SIGTERM)
    common.progress(f"SIGTERM to {a.name}; drain timeout {out.drain_timeout:g} s")
    checked = False
    deadline = time.monotonic() + out.drain_timeout + EXIT_LIMIT
    while a.alive() and time.monotonic() < deadline:
        if not checked and time.time() > out.signal_at + out.drain_timeout - 1.0:
            checked = True
            where = await asyncio.to_thread(_held_where, r, keys, held)
            out.held_on_a_late = where.get(f"running on {a.name}", 0)
        await asyncio.sleep(0.02)
    out.exit_at = time.time()
    out.exit_code = a.proc.poll() if a.proc is not None else None
    common.progress(
        f"{a.name} exited ({out.exit_code}) {out.exit_at - out.signal_at:.1f} s after SIGTERM"
    )
    await asyncio.sleep(AFTER)
    stop.set()


async def _load(
    fleet: Any, front: Front, r: Any, keys: Any, held: list[tuple[str, str]], out: Run, tag: str
) -> None:
    stop = asyncio.Event()
    drive = asyncio.create_task(_drive(front.port, tag, stop))
    await _control(fleet, r, keys, held, out, stop)
    out.attempts = await drive


def _check(fleet: Any, front: Front, r: Any, keys: Any, out: Run) -> None:
    """Which node nginx handed each start to, and whether each 201 runs now."""
    names = {n.port: n.name for n in fleet.nodes}
    tried = front.upstreams()
    for a in out.attempts:
        ports = tried.get(a.path, [])
        a.asked = names.get(ports[-1], "?") if ports else "?"
        a.passed_on = len(ports) > 1
    for a in out.attempts:
        if a.status != 201:
            out.failures.append(
                _describe(fleet, a, [names.get(p, str(p)) for p in tried.get(a.path, [])], out)
            )
    started = [a for a in out.attempts if a.status == 201]
    pipe = r.pipeline(transaction=False)
    for a in started:
        pipe.hmget(keys.session(a.path.split("/")[2], a.session_id), "state", "node_id")
    live = {n.name for n in fleet.nodes if n.alive()}
    for state, node_id in pipe.execute():
        if state != "running" or node_id not in live:
            out.not_running[f"{state} on {node_id}"] += 1
    for line in front.errors():
        # <date> <time> [error] <pid>#<tid>: *<connection> <message>, client: ...
        m = re.search(r"\[(?:error|warn)\] \d+#\d+: (?:\*\d+ )?(.*?)(?:, client: .*)?$", line)
        if m:
            out.nginx_errors[m[1]] += 1


def _describe(fleet: Any, a: Attempt, tried: list[str], out: Run) -> str:
    """A failed start: when it was sent, where nginx sent it, and whether its call holds a
    session now (the node may have started it although the client saw a failure)."""
    call = a.path.split("/")[2]
    live = next(n for n in fleet.nodes if n.alive())
    listed = fleet.http.get(f"{live.url}/calls/{call}/sessions").json().get("sessions", [])
    return (
        f"{a.outcome()} after {a.latency * 1000:.0f} ms, sent in the {out.phase(a)} phase "
        f"{(a.sent - out.exit_at) * 1000:+.0f} ms from A's exit (as the bench saw it), "
        f"nginx tried {tried or '?'}; sessions in its call afterwards: {len(listed)}"
    )


def one_run(drain_timeout: float, run_no: int) -> Run:
    from fleet.store.keys import Keys

    out = Run(drain_timeout)
    with common.local_fleet(3, **settings(drain_timeout)) as fleet:
        keys = Keys(fleet.prefix)
        r = common.redis_client(fleet.redis.url)
        refused: Counter[str] = Counter()
        held = start_on(fleet.nodes[0], HELD, "held", refused)
        with nginx([n.port for n in fleet.nodes]) as front:
            asyncio.run(_load(fleet, front, r, keys, held, out, f"dp{run_no}"))
            time.sleep(0.5)  # the hand-offs the exit waited for are written
            out.held_after = _held_where(r, keys, held)
            _check(fleet, front, r, keys, out)
        out.log_errors = log_errors(fleet.nodes)
        r.close()
    return out


def run(opts: common.Options) -> common.Report:
    drain_timeout = QUICK_DRAIN_TIMEOUT if opts.quick else DRAIN_TIMEOUT
    load_before = common.load_average()
    runs: list[Run] = []
    for i in range(opts.runs):
        common.progress(f"run {i + 1}/{opts.runs}")
        r = one_run(drain_timeout, i)
        common.progress(
            f"run {i + 1}: {len(r.of('drain'))} starts during the {r.drain_seconds:.1f} s "
            f"drain, {r.failed('drain')} failed; before {r.failed('before')}, after "
            f"{r.failed('after')} failed; A's held sessions late in the drain on A: "
            f"{r.held_on_a_late}, after: {dict(r.held_after)}; not running: "
            f"{dict(r.not_running) or 0}"
        )
        runs.append(r)
    return report(opts, drain_timeout, runs, load_before)


def _outcomes(runs: list[Run], phase: str) -> str:
    seen: Counter[str] = Counter(a.outcome() for r in runs for a in r.of(phase))
    return ", ".join(f"{k}: {n:,}" for k, n in sorted(seen.items())) or "none"


def _matrix(runs: list[Run], phase: str) -> list[list[str]]:
    """nginx handed it to (rows) x the 201 says it runs on (columns), all runs."""
    names = [f"node-{i}" for i in range(3)]
    seen: Counter[tuple[str, str]] = Counter()
    failed: Counter[str] = Counter()
    for r in runs:
        for a in r.of(phase):
            if a.status == 201:
                seen[(a.asked, a.landed)] += 1
            else:
                failed[a.asked] += 1
    rows = []
    for asked in [*names, "?"]:
        total = sum(n for (x, _), n in seen.items() if x == asked) + failed[asked]
        if not total:
            continue
        label = asked + (" (A, draining)" if asked == A else "")
        if asked == "?":
            label = "not in nginx's log"
        rows.append(
            [label, *(f"{seen[(asked, n)]:,}" for n in names), f"{failed[asked]:,}", f"{total:,}"]
        )
    return rows


def _split(run: Run) -> str:
    landed = Counter(a.landed for a in run.of("drain") if a.asked == A and a.status == 201)
    return f"{landed['node-1']}/{landed['node-2']}"


def _lopsided(run: Run) -> bool:
    """One of B and C took under half as many of the starts handed to A as the other,
    though both have unlimited room and about as many sessions of their own."""
    landed = Counter(a.landed for a in run.of("drain") if a.asked == A and a.status == 201)
    b, c = landed["node-1"], landed["node-2"]
    return min(b, c) < 0.5 * max(b, c)


def _placement_note(runs: list[Run]) -> str:
    if not any(_lopsided(r) for r in runs):
        return (
            "Starts through the draining node went to node-1 and node-2 about evenly (the "
            "node with most room: with no capacity set, the one with fewer sessions)."
        )
    return (
        "**Placement through a draining node does not take the node with most room**: the "
        "split of the starts handed to A above follows neither room nor the other nodes' "
        "counts but whichever node comes first in A's list of live nodes (ordered by lease "
        "expiry, which changes as the nodes renew their leases). In the code: with the node "
        "asked draining, `Admission.place` passes `place.lua` only the other nodes, and the "
        "script's `local` rule (take candidate 1 if it has room, meant for the node asked) "
        "takes the first of them. No start fails for it; the fleet ends up unbalanced (A's "
        "held sessions then all go to the less loaded node when they are handed off)."
    )


def report(
    opts: common.Options, drain_timeout: float, runs: list[Run], load_before: str
) -> common.Report:
    v = common.verdict

    def agg(get: Any) -> common.Agg:
        return common.Agg.of(get(r) for r in runs)

    def lat(phase: str, via_a: bool | None = None) -> list[str]:
        return [
            agg(lambda r: common.quantile(r.latencies(phase, via_a), 0.5)).ms(),
            agg(lambda r: common.quantile(r.latencies(phase, via_a), 0.99)).ms(),
            agg(lambda r: len(r.latencies(phase, via_a))).fmt("", 0),
        ]

    failed = sum(r.failed("drain") for r in runs)
    met = failed == 0
    sent = agg(lambda r: len(r.of("drain")))
    drain_s = agg(lambda r: r.drain_seconds)
    phase_rows = [
        [
            {"before": "before the signal", "drain": "**drain** (signal to A's exit)",
             "after": "after A's exit"}[p],
            agg(lambda r, p=p: len(r.of(p))).fmt("", 0),
            f"{sum(r.failed(p) for r in runs):,}",
            _outcomes(runs, p),
            f"{sum(1 for r in runs for a in r.of(p) if a.passed_on):,}",
        ]
        for p in PHASES
    ]  # fmt: skip
    latency_rows = [
        ["before the signal, any node", *lat("before")],
        ["drain: handed to A (draining: placed on B or C, forwarded)", *lat("drain", True)],
        ["drain: handed to B or C", *lat("drain", False)],
        ["after A's exit (B and C)", *lat("after")],
    ]
    held_after: Counter[str] = Counter()
    for r in runs:
        held_after.update(r.held_after)
    not_running: Counter[str] = Counter()
    for r in runs:
        not_running.update(r.not_running)
    nginx_errors: Counter[str] = Counter()
    node_errors: Counter[str] = Counter()
    for r in runs:
        nginx_errors.update(r.nginx_errors)
        node_errors.update(r.log_errors)
    body = [
        f"{opts.runs} runs, each on a fresh fleet of 3 nodes (`FLEET_DRAIN_TIMEOUT="
        f"{drain_timeout:g}`; `FLEET_NODE_TTL=10`, so only the drain moves A's sessions; "
        "`FLEET_MAINTENANCE_INTERVAL=0.5`; `FLEET_LOG_LEVEL=warning`) behind nginx with "
        "`fleet demo`'s configuration (round-robin, keep-alive to the nodes, no health "
        "checks; `proxy_next_upstream error timeout http_502 http_503`, which passes a "
        f"POST on only when it never reached a node). Per run: {HELD} counter sessions "
        "(`interval` 1.0, not migratable) started on A (node-0), so that A's drain lasts "
        f"its whole timeout; then {RATE:g} starts per second through nginx (paced, at most "
        f"{LANES} in flight over {LANES} keep-alive connections; each in a new call; counter "
        f"with `interval` 3600); {BEFORE:g} s in, SIGTERM to A; the load runs on until A "
        f"has exited and {AFTER:g} s more. A start counts in the phase it was sent in. "
        "Target: 0 failed starts (any answer but 201) during the drain.",
        "",
        *common.table(
            [
                "phase",
                "starts sent (per run)",
                "failed (all runs)",
                "answers (all runs)",
                "passed on by nginx (all runs)",
            ],
            phase_rows,
        ),  # fmt: skip
        "",
        f"Failed starts during the drain: {failed} of "
        f"{sum(len(r.of('drain')) for r in runs):,} ({v(met)}). A's drain (SIGTERM to exit): "
        f"{drain_s.fmt(' s')}; A's exit status per run: {[r.exit_code for r in runs]}.",
        "",
        "Where the drain's starts went, all runs: the node nginx handed each start to "
        "(rows, from nginx's access log) against the node its 201 says runs it (columns):",
        "",
        *common.table(
            ["handed to", "runs on node-0", "runs on node-1", "runs on node-2", "failed", "total"],
            _matrix(runs, "drain"),
        ),  # fmt: skip
        "",
        "Starts handed to A during the drain, by the node that runs them (node-1/node-2), "
        f"per run: {', '.join(_split(r) for r in runs)}.",
        "",
        "Latency of the 201s, as the client saw it through nginx:",
        "",
        *common.table(["starts", "p50", "p99", "samples per run"], latency_rows),
        "",
        f"A's {HELD} held sessions: running on A one second before the drain timeout "
        f"ended, per run: {[r.held_on_a_late for r in runs]}; after A's exit, all runs: "
        f"{dict(held_after)}. Starts answered 201 that do not run on a live node at the "
        f"end, all runs: {sum(not_running.values())}"
        + (f" ({dict(not_running)})" if not_running else "")
        + ".",
        *(
            [
                "",
                "Each failed start, all runs:",
                "",
                *(f"{i}. {f}" for i, f in enumerate((f for r in runs for f in r.failures), 1)),
            ]
            if any(r.failures for r in runs)
            else []
        ),
    ]
    notes = [
        "A draining node answers `/ready` with 503 but keeps serving: a start sent to it "
        "is placed on another live, non-draining node (`place.lua` leaves the draining "
        "node out) and forwarded there over that node's Redis channel, so a "
        "load balancer that goes on sending it starts does no harm. nginx here has no "
        "health checks (open-source nginx has only passive ones), the harder case: a "
        "third of the starts reach A until it exits.",
        _placement_note(runs),
        "When A exits, its listening socket closes: nginx's connection to it is refused "
        "and nginx passes the request on (*passed on*; `max_fails=1 fail_timeout=2s` then "
        "keeps A out for 2 s at a time).",
        "nginx's error log, all runs: "
        + (", ".join(f"{k} ×{n}" for k, n in nginx_errors.most_common(5)) or "nothing")
        + ". Warnings and errors about failures in the nodes' logs: "
        + (", ".join(f"{k} ×{n}" for k, n in node_errors.most_common(5)) or "none")
        + ".",
        common.load_note(load_before),
    ]
    summary = (
        f"{RATE:g} starts/s round-robin through nginx to 3 nodes while one drains "
        f"({drain_timeout:g} s, {HELD} sessions kept running on it): {failed} failed of "
        f"{sum(len(r.of('drain')) for r in runs):,} sent during the drains, {sent.fmt('', 0)} "
        f"per run (target 0: {v(met)}); a start handed to the draining node p50 "
        f"{lat('drain', True)[0]}."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
