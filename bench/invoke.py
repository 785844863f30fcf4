"""invoke: a session as a function call, and a message to a thread that starts its session.

Every session runs ``bench.workers:Quick``: with no params it returns ``{"ok": true, "n":
0}`` at once; with ``{"replies": k}`` it answers ``k`` messages at once, then returns.
Per run:

* **sequential**, on a fresh fleet of two nodes (A, B) on one redis-server, one minimal
  keep-alive HTTP/1.1 connection per node, each request after the previous answer:

  - **invoke**: ``POST /calls/{call}/sessions?wait=5`` alternating A and B (a session
    starts on the node asked, so that is "through any node"); the answer must be the 201
    of the ended session, with its ``result``;
  - start without ``?wait`` (the same 201 as soon as the session runs), for comparison;
  - **thread, no live session**: ``POST /threads/{thread}/messages?wait=5`` to a new
    thread each time (params ``{"replies": 1}``), alternating A and B: the node claims
    the thread, starts the session on it, delivers the message first and answers 200 with
    the worker's reply;
  - thread with a live session: one thread whose session (started through A, ``replies``
    unbounded) stays; sends alternate between its owner A and B;
  - floor: ``GET /health`` with the same client, alternating A and B;
  - the nodes' and redis-server's CPU seconds, and Redis commands (``INFO
    commandstats``), over the invokes, per invoke;

* **throughput**, on a fresh fleet of one node: ``wrk -t1 -c16`` POSTs ``?wait=5``
  invokes (over 1,000 call ids) for a fixed time; invokes per second, ``wrk``'s latency
  quantiles, and the CPU seconds of the node, redis-server, ``wrk`` and the machine (as in
  ``start_throughput``).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common
from bench.start_throughput import WRK, WrkResult, run_wrk, wrk_script

NAME = "invoke"
TITLE = "invoke: sessions as calls, and sends that start a thread's session"
WORKER = "bench.workers:Quick"
TARGET_INVOKE_P50 = 0.003
TARGET_INVOKE_P99 = 0.015
TARGET_RATE = 1000.0
TARGET_THREAD_P50 = 0.005
CONNECTIONS = 16
WARMUP = 20
SETTINGS = {
    "FLEET_WORKER": WORKER,
    "FLEET_NODE_TTL": "10",
    "FLEET_MAINTENANCE_INTERVAL": "5",
    "FLEET_LOG_LEVEL": "warning",
}
INVOKE_BODY: dict[str, Any] = {"params": {}}
LUA = wrk_script("an invoke (?wait=5)", "?wait=5", '{"params":{}}')


@dataclass(frozen=True)
class Sizes:
    invokes: int
    starts: int
    cold: int
    warm: int
    health: int
    seconds: int


FULL = Sizes(invokes=1000, starts=500, cold=500, warm=500, health=400, seconds=5)
QUICK = Sizes(invokes=200, starts=100, cold=100, warm=100, health=100, seconds=2)


@dataclass
class Run:
    invoke: list[float] = field(default_factory=list)
    start: list[float] = field(default_factory=list)
    cold: list[float] = field(default_factory=list)
    warm_owner: list[float] = field(default_factory=list)
    warm_other: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    node_cpu: float = float("nan")  # both nodes' CPU seconds per invoke
    redis_cpu: float = float("nan")  # redis-server's CPU seconds per invoke
    commands: float = float("nan")  # Redis commands per invoke
    wrong: dict[str, int] = field(default_factory=dict)  # unexpected answers, by kind
    wrk: WrkResult = field(default_factory=WrkResult)
    rate: float = float("nan")
    wrk_node_cpu: float = float("nan")  # the node's CPU seconds over the wrk run
    wrk_redis_cpu: float = float("nan")
    wrk_machine_cpu: float = float("nan")
    wrk_live: int = 0  # sessions still live after the wrk run (a wait that ran out)

    def count(self, kind: str) -> None:
        self.wrong[kind] = self.wrong.get(kind, 0) + 1


Check = Callable[[int, dict[str, Any]], bool]


async def _loop(
    conns: list[common.RawHTTP],
    n: int,
    request: Callable[[int], tuple[str, str, Any]],
    check: Check,
    kind: str,
    out: Run,
    into: Callable[[int], list[float]],
) -> None:
    """``n`` requests one after the other, the i-th on ``conns[i % len(conns)]``; the
    time of each whose answer passes ``check`` goes into ``into(i)`` (after ``WARMUP``)."""
    for i in range(n + WARMUP):
        method, path, body = request(i)
        t0 = time.perf_counter()
        try:
            status, raw = await conns[i % len(conns)].request(method, path, body)
        except Exception:
            out.count(f"{kind}: transport error")
            continue
        elapsed = time.perf_counter() - t0
        if not check(status, json.loads(raw) if raw else {}):
            out.count(f"{kind}: {status}")
            continue
        if i >= WARMUP:
            into(i).append(elapsed)


def _ended(status: int, body: dict[str, Any]) -> bool:
    return (
        status == 201
        and body.get("state") == "ended"
        and body.get("end_reason") == "completed"
        and body.get("result") == {"ok": True, "n": 0}
    )


def _replied(started: bool) -> Check:
    def check(status: int, body: dict[str, Any]) -> bool:
        reply = body.get("reply")
        return status == 200 and body.get("started") is started and isinstance(reply, dict)

    return check


async def _sequential(fleet: Any, sizes: Sizes, run_no: int, out: Run) -> None:
    a, b = fleet.nodes
    pids = [a.pid, b.pid]
    redis_pid = fleet.redis.proc.pid
    r = common.redis_client(fleet.redis.url)
    async with (
        common.RawHTTP("127.0.0.1", a.port) as conn_a,
        common.RawHTTP("127.0.0.1", b.port) as conn_b,
    ):
        both = [conn_a, conn_b]
        # Invokes, with the CPU and Redis commands they cost.
        before = sum(common.commandstats(r).values())
        node0 = sum(common.cpu_seconds(p) for p in pids)
        redis0 = common.cpu_seconds(redis_pid)
        await _loop(
            both,
            sizes.invokes,
            lambda i: ("POST", f"/calls/inv-{i % 100}/sessions?wait=5", INVOKE_BODY),
            _ended,
            "invoke",
            out,
            lambda i: out.invoke,
        )
        total = sizes.invokes + WARMUP
        out.node_cpu = (sum(common.cpu_seconds(p) for p in pids) - node0) / total
        out.redis_cpu = (common.cpu_seconds(redis_pid) - redis0) / total
        # Less the INFO call itself.
        out.commands = (sum(common.commandstats(r).values()) - before - 1) / total
        r.close()
        await _loop(
            both,
            sizes.starts,
            lambda i: ("POST", f"/calls/start-{i % 100}/sessions", INVOKE_BODY),
            lambda status, body: status == 201,
            "start",
            out,
            lambda i: out.start,
        )
        # A new thread per send: each one starts its session.
        await _loop(
            both,
            sizes.cold,
            lambda i: (
                "POST",
                f"/threads/cold-{run_no}-{i}/messages?wait=5",
                {"data": {"i": i}, "params": {"replies": 1}},
            ),
            _replied(started=True),
            "thread, no live session",
            out,
            lambda i: out.cold,
        )
        # One thread whose session stays, started through A.
        thread = f"/threads/warm-{run_no}/messages?wait=5"
        first = {"data": {"i": -1}, "params": {"replies": 10**9}}
        status, _ = await conn_a.request("POST", thread, first)
        if status != 200:
            out.count(f"thread, live session: first send {status}")
        await _loop(
            both,
            sizes.warm,
            lambda i: ("POST", thread, {"data": {"i": i}}),
            _replied(started=False),
            "thread, live session",
            out,
            lambda i: out.warm_owner if i % 2 == 0 else out.warm_other,
        )
        await _loop(
            both,
            sizes.health,
            lambda i: ("GET", "/health", None),
            lambda status, body: status == 200,
            "health",
            out,
            lambda i: out.health,
        )


async def _warm_up(port: int) -> None:
    async with common.RawHTTP("127.0.0.1", port) as conn:
        for i in range(WARMUP):
            await conn.request("POST", f"/calls/warm-{i}/sessions?wait=5", INVOKE_BODY)


def _throughput(sizes: Sizes, script: Path, out: Run) -> None:
    from fleet.store.keys import Keys

    with common.local_fleet(1, **SETTINGS) as fleet:
        node = fleet.nodes[0]
        asyncio.run(_warm_up(node.port))
        redis_pid = fleet.redis.proc.pid
        node0 = common.cpu_seconds(node.pid)
        redis0 = common.cpu_seconds(redis_pid)
        busy0, _ = common.machine_busy()
        (out.wrk,) = run_wrk([node.url], [CONNECTIONS], sizes.seconds, script)
        out.wrk_machine_cpu = common.machine_busy()[0] - busy0
        out.wrk_node_cpu = common.cpu_seconds(node.pid) - node0
        out.wrk_redis_cpu = common.cpu_seconds(redis_pid) - redis0
        ok = out.wrk.requests - sum(out.wrk.errors.values())
        out.rate = ok / out.wrk.seconds if out.wrk.seconds else float("nan")
        time.sleep(0.5)  # the last requests in flight when wrk stopped end
        r = common.redis_client(fleet.redis.url)
        out.wrk_live = int(r.zcard(Keys(fleet.prefix).live()))
        r.close()


def one_run(sizes: Sizes, run_no: int, script: Path) -> Run:
    out = Run()
    with common.local_fleet(2, **SETTINGS) as fleet:
        asyncio.run(_sequential(fleet, sizes, run_no, out))
    _throughput(sizes, script, out)
    return out


def run(opts: common.Options) -> common.Report:
    if not os.path.exists(WRK):
        raise RuntimeError(f"{WRK} is needed (Debian package wrk)")
    sizes = QUICK if opts.quick else FULL
    load_before = common.load_average()
    runs: list[Run] = []
    q = common.quantile
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "invoke.lua"
        script.write_text(LUA)
        for i in range(opts.runs):
            common.progress(f"run {i + 1}/{opts.runs}")
            r = one_run(sizes, i, script)
            common.progress(
                f"run {i + 1}: invoke p50 {q(r.invoke, 0.5) * 1000:.2f} ms p99 "
                f"{q(r.invoke, 0.99) * 1000:.2f} ms; thread (new) p50 "
                f"{q(r.cold, 0.5) * 1000:.2f} ms; {r.rate:,.0f} invokes/s at {CONNECTIONS} "
                f"connections (p50 {r.wrk.p50 * 1000:.2f} ms, p99 {r.wrk.p99 * 1000:.1f} ms); "
                f"wrong answers {r.wrong or 'none'}"
            )
            runs.append(r)
    return report(opts, sizes, runs, load_before)


def _ms(value: float) -> str:
    return f"{value * 1000:.0f} ms"


def report(opts: common.Options, sizes: Sizes, runs: list[Run], load_before: str) -> common.Report:
    def q(name: str, p: float) -> common.Agg:
        return common.Agg.of(common.quantile(getattr(r, name), p) for r in runs)

    def agg(get: Callable[[Run], float]) -> common.Agg:
        return common.Agg.of(get(r) for r in runs)

    v = common.verdict
    i50, i99 = q("invoke", 0.5), q("invoke", 0.99)
    c50, c99 = q("cold", 0.5), q("cold", 0.99)
    rate = agg(lambda r: r.rate)
    invoke_met = (i50.median <= TARGET_INVOKE_P50, i99.median <= TARGET_INVOKE_P99)
    cold_met = c50.median <= TARGET_THREAD_P50
    rate_met = rate.median >= TARGET_RATE
    rows = [
        ["**invoke**: POST …/sessions?wait=5, A and B alternately (201, ended, with `result`)",
         i50.ms(), i99.ms(),
         f"p50 ≤ {_ms(TARGET_INVOKE_P50)} {v(invoke_met[0])}, "
         f"p99 ≤ {_ms(TARGET_INVOKE_P99)} {v(invoke_met[1])}"],
        ["start without ?wait (201 once it runs), A and B alternately",
         q("start", 0.5).ms(), q("start", 0.99).ms(), ""],
        ["**thread, no live session**: POST /threads/{new}/messages?wait=5 (claim, start, "
         "deliver, reply)", c50.ms(), c99.ms(),
         f"p50 ≤ {_ms(TARGET_THREAD_P50)} {v(cold_met)}"],
        ["thread, live session: the same through its owner (A)",
         q("warm_owner", 0.5).ms(), q("warm_owner", 0.99).ms(), ""],
        ["thread, live session: the same through the other node (B)",
         q("warm_other", 0.5).ms(), q("warm_other", 0.99).ms(), ""],
        ["floor: GET /health, A and B alternately", q("health", 0.5).ms(),
         q("health", 0.99).ms(), ""],
    ]  # fmt: skip
    cost_rows = [
        ["nodes' CPU per invoke (A + B)", agg(lambda r: r.node_cpu).ms()],
        ["redis-server's CPU per invoke", agg(lambda r: r.redis_cpu).ms()],
        [
            "Redis commands executed per invoke (`INFO commandstats`: inside scripts too)",
            agg(lambda r: r.commands).fmt(),
        ],
    ]
    wrk_rows = [
        [f"**invokes/s** at {CONNECTIONS} connections (ended sessions answered)",
         rate.fmt("/s", 0), f"≥ {TARGET_RATE:,.0f}/s {v(rate_met)}"],
        ["p50 under that load (`wrk`)", agg(lambda r: r.wrk.p50).ms(), ""],
        ["p99 under that load (`wrk`)", agg(lambda r: r.wrk.p99).ms(1), ""],
        ["the node's CPU per invoke", agg(lambda r: r.wrk_node_cpu / max(1, r.wrk.requests))
         .ms(), ""],
        ["cores used: node / redis-server / `wrk` / everything else",
         " / ".join(a.fmt("", 2) for a in (
             agg(lambda r: r.wrk_node_cpu / r.wrk.seconds),
             agg(lambda r: r.wrk_redis_cpu / r.wrk.seconds),
             agg(lambda r: r.wrk.cpu / r.wrk.seconds),
             agg(lambda r: (r.wrk_machine_cpu - r.wrk_node_cpu - r.wrk_redis_cpu - r.wrk.cpu)
                 / r.wrk.seconds))), ""],
    ]  # fmt: skip
    wrong: dict[str, int] = {}
    for r in runs:
        for k, n in r.wrong.items():
            wrong[k] = wrong.get(k, 0) + n
        for k, n in r.wrk.errors.items():
            wrong[f"wrk {k}"] = wrong.get(f"wrk {k}", 0) + n
    live = sum(r.wrk_live for r in runs)
    body = [
        f"{opts.runs} runs. Sequential figures: each run on a fresh fleet of two nodes (A, "
        "B) on one redis-server (`FLEET_NODE_TTL=10`, `FLEET_MAINTENANCE_INTERVAL=5`, "
        f"`FLEET_LOG_LEVEL=warning`), worker `{WORKER}` (bench/workers.py: returns "
        '`{"ok": true, "n": 0}` at once, or answers `replies` messages at once and '
        "returns), a minimal keep-alive HTTP/1.1 client with one connection per node, "
        f"each request after the previous answer: {sizes.invokes:,} invokes, "
        f"{sizes.starts} starts, {sizes.cold} sends to new threads, {sizes.warm} sends to "
        f"a thread with a live session and {sizes.health} health checks, each after "
        f"{WARMUP} warm-up requests. Targets: invoke p50 ≤ {_ms(TARGET_INVOKE_P50)}, "
        f"p99 ≤ {_ms(TARGET_INVOKE_P99)} through any node; a send to a thread with no "
        f"live session p50 ≤ {_ms(TARGET_THREAD_P50)}.",
        "",
        *common.table(["figure", "p50", "p99", "target"], rows),
        "",
        "What a sequential invoke costs (both nodes' CPU, over the invoke loop, warm-up included):",
        "",
        *common.table(["figure", "value"], cost_rows),
        "",
        f"Throughput: each run on a fresh fleet of one node (same settings), {WARMUP} "
        f"warm-up invokes, then `wrk -t1 -c{CONNECTIONS}` for {sizes.seconds} s POSTs "
        '`/calls/<call>/sessions?wait=5` (body `{"params": {}}`) over 1,000 call ids. '
        f"Target: ≥ {TARGET_RATE:,.0f} invokes/s on one node at {CONNECTIONS} clients.",
        "",
        *common.table(["figure", "value", "target"], wrk_rows),
        "",
        f"Invoke: p50 {v(invoke_met[0])}, p99 {v(invoke_met[1])}; throughput "
        f"{v(rate_met)}; send to a thread with no live session: p50 {v(cold_met)}.",
        "",
        f"Unexpected answers, all runs (status, or a transport error): {wrong or 'none'}. "
        f"Sessions still live after the `wrk` runs (a wait that ran out): {live}.",
    ]
    notes = [
        "An invoke is a start and a wait in one request: the node admits and creates the "
        "session (`start.lua`), runs the worker as a task, the worker returns, the node "
        "writes the end with the result (`end_session.lua`) and wakes the waiting request, "
        "which answers with the ended record. The *start without ?wait* row is the first "
        "half alone.",
        "A send to a thread with no live session claims the thread (`thread_claim.lua`), "
        "reads the thread's latest state, starts the session on it, appends the message to "
        "its inbox, marks the thread started (`thread_started.lua`) and waits for the "
        "worker's reply; with a live session it is one send to the session's inbox and "
        "the wait for the reply. Either way the owner hears of the message over its Redis "
        "channel (the nudge `send.lua` publishes) and publishes the reply to the node "
        "asked, after appending a `reply` event: through the owner or another node, the "
        "same hops.",
        "`wrk` counts every answer; non-2xx answers are in *unexpected answers* and left "
        "out of the rate. Its latency is from request written to response read.",
        common.load_note(load_before),
    ]
    summary = (
        f"Invoke of a worker that returns at once, A and B alternately: p50 {i50.ms()}, p99 "
        f"{i99.ms()} (targets {_ms(TARGET_INVOKE_P50)} / {_ms(TARGET_INVOKE_P99)}: "
        f"{v(invoke_met[0])} / {v(invoke_met[1])}); one node at {CONNECTIONS} connections: "
        f"{rate.fmt(' invokes/s', 0)} (≥ {TARGET_RATE:,.0f}: {v(rate_met)}); send to a "
        f"thread with no live session: p50 {c50.ms()}, p99 {c99.ms()} (p50 ≤ "
        f"{_ms(TARGET_THREAD_P50)}: {v(cold_met)})."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
