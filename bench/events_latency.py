"""events_latency: live events of sessions on node A, read through node B.

Two nodes on a real redis-server. Sessions of the ``Pinger`` worker (below, loaded by the
nodes as ``bench.events_latency:Pinger``) run on node A and emit ``{"t": <wall clock>}``
at a fixed total rate of 50 events/s. L Server-Sent Events listeners on node B (L = 1, 100,
1,000) follow them, spread evenly over the sessions (one session for L = 1, ten
otherwise), each from the stream's current end (``?after=``). A minimal asyncio client
reads the streams (httpx would cost more per event than the server does); the latency of
an event is its arrival time minus ``t`` (one machine, one clock), for every event whose
``t`` falls in the measurement window, at every listener.

Redis round trips per emit come from ``INFO commandstats`` over the window: ``evalsha``
(an emit is one call of the fenced emit script; the Pinger never checkpoints), ``xadd``
(the XADD that script runs, counted by Redis too), ``xread`` (node B's dispatcher: one
blocked read per wake-up, shared by all its listeners), and every command but the
benchmark's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from bench import common
from fleet.worker import SessionContext

NAME = "events_latency"
TITLE = "events_latency: live events from another node"
TARGET_P50 = 0.003
TARGET_P99 = 0.020
TARGET_LISTENERS = 100
LISTENERS = (1, 100, 1000)
EMITS_PER_SECOND = 50
SETTINGS = {
    "FLEET_WORKER": "bench.events_latency:Pinger",
    # Few housekeeping commands inside the window: they would blur the per-emit counts.
    "FLEET_NODE_TTL": "30",
    "FLEET_MAINTENANCE_INTERVAL": "60",
    "FLEET_LOG_LEVEL": "warning",
}
OWN_COMMANDS = ("info", "xrevrange", "client|list")


class Pinger:
    """Emits ``ping`` ``{"t": time.time(), "i": n}`` every ``params.interval`` seconds on a
    fixed schedule (no drift), until closed. Never checkpoints."""

    resumable = False

    @staticmethod
    def validate_params(params: dict[str, Any]) -> None:
        interval = params.get("interval", 0.1)
        if not isinstance(interval, int | float) or not 0 < interval <= 60:
            raise ValueError("params.interval must be a number of seconds in (0, 60]")

    async def run(self, ctx: SessionContext) -> None:
        interval = float(ctx.params.get("interval", 0.1))
        loop = asyncio.get_running_loop()
        due = loop.time()
        n = 0
        while True:
            due += interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - loop.time())):
                    await ctx.closing.wait()
                    return
            n += 1
            await ctx.emit("ping", {"t": time.time(), "i": n})


@dataclass
class Window:
    """The measurement window, and how many listeners have received an event yet."""

    start: float = math.inf
    end: float = math.inf
    live: int = 0


@dataclass
class Result:
    listeners: int
    sessions: int
    latencies: list[float] = field(default_factory=list)
    emits: int = 0
    commands: dict[str, int] = field(default_factory=dict)
    extra_connections: int = 0
    failed_listeners: int = 0

    def per_emit(self, *names: str) -> float:
        if not self.emits:
            return math.nan
        return sum(self.commands.get(n, 0) for n in names) / self.emits

    def all_per_emit(self) -> float:
        if not self.emits:
            return math.nan
        total = sum(v for k, v in self.commands.items() if k not in OWN_COMMANDS)
        return total / self.emits


# -- the client ----------------------------------------------------------------------------
async def _listen(port: int, path: str, window: Window, out: list[float]) -> None:
    """Read one SSE response (chunked) and note the latency of each ping in the window."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(head.decode(errors="replace"))
        seen = False
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                return
            chunk = await reader.readexactly(size + 2)
            now = time.time()
            if not seen:
                seen = True
                window.live += 1
            for frame in chunk[:-2].split(b"\n\n"):
                at = frame.find(b"\ndata: ")
                if at < 0:
                    continue  # a keep-alive comment
                data = json.loads(frame[at + 7 :])
                if "t" not in data:
                    continue  # not a ping: session_started, say
                t = float(data["t"])
                if window.start <= t < window.end:
                    out.append(now - t)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _connections(r: Any) -> int:
    return len(await asyncio.to_thread(r.client_list))


async def _last_ping(r: Any, keys: list[str]) -> int:
    """The sum over sessions of the last ping number in their streams."""

    def read() -> int:
        pipe = r.pipeline(transaction=False)
        for key in keys:
            pipe.xrevrange(key, count=1)
        total = 0
        for rows in pipe.execute():
            if rows:
                data = json.loads(rows[0][1].get("data", "{}"))
                total += int(data.get("i", 0)) if isinstance(data, dict) else 0
        return total

    return await asyncio.to_thread(read)


async def _scenario(fleet: Any, listeners: int, seconds: float) -> Result:
    from fleet.store.keys import Keys

    a, b = fleet.nodes
    sessions = 1 if listeners == 1 else 10
    result = Result(listeners, sessions)
    keys = Keys(fleet.prefix)
    r = common.redis_client(fleet.redis.url)
    async with common.async_client(32) as client:
        started = []
        for _ in range(sessions):
            resp = await client.post(
                f"{a.url}/calls/ping/sessions",
                json={"params": {"interval": sessions / EMITS_PER_SECOND}},
            )
            resp.raise_for_status()
            started.append(("ping", str(resp.json()["session_id"])))
        streams = [keys.events(call, sid) for call, sid in started]
        tails = [(await asyncio.to_thread(r.xrevrange, key, "+", "-", 1)) for key in streams]
        after = [rows[0][0] if rows else "0-0" for rows in tails]
        window = Window()
        before_connections = await _connections(r)
        tasks = []
        for j in range(listeners):
            call, sid = started[j % sessions]
            path = f"/calls/{call}/sessions/{sid}/events?after={after[j % sessions]}"
            tasks.append(asyncio.create_task(_listen(b.port, path, window, result.latencies)))
            if j % 100 == 99:
                await asyncio.sleep(0.05)  # let the accept queue drain
        deadline = time.monotonic() + 60
        while window.live < listeners and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # until every listener is connected and live
        await asyncio.sleep(1.0)  # warm
        result.extra_connections = await _connections(r) - before_connections
        stats0 = await asyncio.to_thread(common.commandstats, r)
        pings0 = await _last_ping(r, streams)
        window.start = time.time()
        await asyncio.sleep(seconds)
        window.end = time.time()
        stats1 = await asyncio.to_thread(common.commandstats, r)
        pings1 = await _last_ping(r, streams)
        await asyncio.sleep(0.5)  # the window's last events arrive
        failed = [t for t in tasks if t.done()]
        result.failed_listeners = len(failed)
        for task in failed[:3]:
            common.progress(f"a listener stopped early: {task.exception()!r}")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for call, sid in started:
            await client.delete(f"{a.url}/calls/{call}/sessions/{sid}")
    r.close()
    result.emits = pings1 - pings0
    result.commands = {k: v - stats0.get(k, 0) for k, v in stats1.items() if v != stats0.get(k)}
    return result


def run(opts: common.Options) -> common.Report:
    seconds = 2.0 if opts.quick else 5.0
    results: dict[int, list[Result]] = {n: [] for n in LISTENERS}
    for i in range(opts.runs):
        with common.local_fleet(2, **SETTINGS) as fleet:
            for n in LISTENERS:
                common.progress(f"run {i + 1}/{opts.runs}: {n} listener(s) on B")
                one = asyncio.run(_scenario(fleet, n, seconds))
                common.progress(
                    f"run {i + 1}: {n} listeners: p50 "
                    f"{common.quantile(one.latencies, 0.5) * 1000:.2f} ms, p99 "
                    f"{common.quantile(one.latencies, 0.99) * 1000:.2f} ms over "
                    f"{len(one.latencies)} events; {one.emits} emits; xadd/emit "
                    f"{one.per_emit('xadd'):.2f}; xread/emit {one.per_emit('xread'):.2f}"
                )
                results[n].append(one)
    return _report(opts, seconds, results)


def _report(
    opts: common.Options, seconds: float, results: dict[int, list[Result]]
) -> common.Report:
    rows = []
    verdicts: dict[int, tuple[common.Agg, common.Agg]] = {}
    for n, runs in results.items():
        p50 = common.Agg.of(common.quantile(r.latencies, 0.5) for r in runs)
        p99 = common.Agg.of(common.quantile(r.latencies, 0.99) for r in runs)
        verdicts[n] = (p50, p99)
        target = (
            f"p50 {common.verdict(p50.median <= TARGET_P50)}, "
            f"p99 {common.verdict(p99.median <= TARGET_P99)}"
            if n == TARGET_LISTENERS
            else ""
        )
        rows.append(
            [
                f"{n:,} on B ({runs[0].sessions} session{'s' if runs[0].sessions > 1 else ''})",
                common.Agg.of(len(r.latencies) for r in runs).fmt(digits=0),
                p50.ms(),
                p99.ms(),
                common.Agg.of(max(r.latencies, default=math.nan) for r in runs).ms(1),
                common.Agg.of(r.per_emit("xadd") for r in runs).fmt(digits=2),
                common.Agg.of(r.per_emit("evalsha") for r in runs).fmt(digits=2),
                common.Agg.of(r.per_emit("xread") for r in runs).fmt(digits=2),
                common.Agg.of(r.all_per_emit() for r in runs).fmt(digits=2),
                common.Agg.of(r.extra_connections for r in runs).fmt(digits=0),
                target,
            ]
        )
    header = [
        "listeners",
        "events timed",
        "p50",
        "p99",
        "max",
        "xadd / emit",
        "evalsha / emit",
        "xread / emit",
        "all commands / emit",
        "Redis connections added",
        "target",
    ]
    failed = sum(r.failed_listeners for runs in results.values() for r in runs)
    body = [
        f"{opts.runs} runs, each on a fresh fleet of 2 nodes; per run, one scenario per "
        f"listener count. Pinger sessions on node A emit {EMITS_PER_SECOND} events/s in "
        "total; the listeners on node B are spread evenly over the sessions and time every "
        f"event emitted in a {seconds:.0f} s window (after a warm-up). Latency = arrival at "
        "the client − the wall-clock time the worker stamped just before `ctx.emit`. "
        f"Target with {TARGET_LISTENERS} listeners: p50 ≤ 3 ms, p99 ≤ 20 ms; one Redis "
        "round trip per emit.",
        "",
        *common.table(header, rows),
        "",
        f"Listeners whose stream ended early or failed: {failed}.",
    ]
    p50, p99 = verdicts[TARGET_LISTENERS]
    notes = [
        "*evalsha / emit* and *xadd / emit*: an emit is one EVALSHA of the fenced emit "
        "script, and Redis counts the XADD it runs as well: 1.00 and 1.00 mean one round "
        "trip per emit. *xread / emit* is node B's dispatcher: one blocked XREAD over every "
        "watched stream returns per wake-up, whatever the number of listeners (below 1 "
        "when one read brings several sessions' events).",
        "*all commands / emit* counts what scripts run inside too (the emit script reads "
        "the session record before its XADD) and every node's housekeeping in the window "
        "(lease renewals), but not the benchmark's own INFO and XREVRANGE.",
        "*Redis connections added* is the connection count on Redis with the listeners "
        "open minus before they connected: node B's dedicated dispatcher connection, plus "
        "any pool connection its backlog reads needed (at most 4 in flight).",
        "The client, both nodes and Redis share the machine's cores; with 1,000 listeners "
        f"the client alone parses {EMITS_PER_SECOND * 100:,} events/s at the same time as "
        "node B writes them, so that row measures this machine as much as fleet.",
    ]
    summary = (
        f"Emit on node A to arrival at an SSE client of node B, with {TARGET_LISTENERS} "
        f"listeners: p50 {p50.ms()}, p99 {p99.ms()}; one Redis round trip per emit, and "
        "one shared XREAD per wake-up on the listening node."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
