"""round_trips: Redis round trips per session start, read and close; Redis memory per
live session.

Two nodes, A and B, with ``FLEET_NODE_TTL=60`` and ``FLEET_MAINTENANCE_INTERVAL=600`` so
that background work stays out of the way. Each node talks to Redis through its own small
counting proxy (in the benchmark process) that reads the Redis protocol both ways: a
**round trip** is a batch of commands a connection sends while it has no reply
outstanding, up to the replies to all of them (a pipeline is one round trip; a script
call is one command, whatever it runs inside). The proxy names each command (``EVALSHA``
by its script, from ``fleet/store/lua``) so every round trip is listed with what it carried.
Alongside, ``INFO commandstats`` (every command Redis executed, those inside scripts
included) and ``INFO stats`` ``total_commands_processed`` are read before and after.

Each figure is per operation: K operations one after another through HTTP (a minimal
keep-alive client), the counts of the window divided by K; the same counts over an idle
window of the same length are subtracted. Lease renewals and connection health checks
(``PING``) are also recognised by content and left out, so they cannot leak in.

Memory: ``INFO memory`` ``used_memory`` before and after starting 10,000 more idle
sessions on A (each on its own call, as one session per phone call would be), divided by
10,000; ``MEMORY USAGE`` of one session's keys shows where it goes. A quiet session has no
event stream (``session_started`` is not stored); what its first event adds is measured
too, by appending one tick-sized entry to each of their streams, with Redis' default
``stream-node-max-bytes`` (4096) and again with 1024.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bench import common

NAME = "round_trips"
TITLE = "round_trips: Redis round trips per operation, and memory per session"
K = 20
QUICK_K = 5
MEMORY_SESSIONS = 10_000
QUICK_MEMORY_SESSIONS = 1_000
TARGET_START = 4
TARGET_CLOSE = 2
TARGET_BYTES = 1.5 * 1024
SETTINGS = {
    "FLEET_NODE_TTL": "60",
    "FLEET_MAINTENANCE_INTERVAL": "600",
    "FLEET_LOG_LEVEL": "warning",
}
BACKGROUND = {"evalsha heartbeat", "ping"}


# -- the Redis protocol ---------------------------------------------------------------------
class Incomplete(Exception):
    pass


def _line(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Incomplete
    return buf[pos:end], end + 2


def parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP value (RESP2 and the RESP3 types) from ``buf`` at ``pos``; raises
    ``Incomplete`` when the buffer does not hold all of it yet."""
    if pos >= len(buf):
        raise Incomplete
    kind = buf[pos : pos + 1]
    line, pos = _line(buf, pos + 1)
    if kind in (b"$", b"=", b"!"):
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise Incomplete
        return buf[pos : pos + n], pos + n + 2
    if kind in (b"*", b"~", b">", b"%", b"|"):
        n = int(line)
        n = n * 2 if kind in (b"%", b"|") else n
        items = []
        for _ in range(max(0, n)):
            item, pos = parse(buf, pos)
            items.append(item)
        if kind == b"|":  # attributes come before the reply they describe
            return parse(buf, pos)
        return items, pos
    return line, pos  # + - : _ , # (


@dataclass
class Trip:
    node: str
    commands: list[str]
    at: float

    @property
    def label(self) -> str:
        return " + ".join(f"`{c}`" for c in self.commands)

    @property
    def background(self) -> bool:
        return all(c in BACKGROUND for c in self.commands)


class CountingProxy:
    """A TCP proxy to Redis that records every round trip of every connection."""

    def __init__(self, node: str, upstream: int, scripts: dict[str, str]) -> None:
        self.node = node
        self.upstream = upstream
        self.scripts = scripts
        self.port = 0
        self.trips: list[Trip] = []
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"proxy {node}")
        self._server: asyncio.Server | None = None

    def start(self) -> CountingProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def snapshot(self) -> int:
        with self.lock:
            return len(self.trips)

    def since(self, mark: int) -> list[Trip]:
        with self.lock:
            return list(self.trips[mark:])

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    def _name(self, args: list[bytes]) -> str:
        name = args[0].decode(errors="replace").lower()
        if name in ("evalsha", "eval") and len(args) > 1:
            return f"evalsha {self.scripts.get(args[1].decode(errors='replace'), '?')}"
        if name in ("script", "client", "config") and len(args) > 1:
            return f"{name} {args[1].decode(errors='replace').lower()}"
        return name

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        state = {"outstanding": 0}
        current: list[Trip] = []

        async def client_to_server() -> None:
            buf = b""
            while data := await reader.read(65536):
                up_writer.write(data)
                buf += data
                pos = 0
                while True:
                    try:
                        value, pos = parse(buf, pos)
                    except Incomplete:
                        break
                    if not isinstance(value, list) or not value:
                        continue
                    name = self._name(value)
                    with self.lock:
                        if state["outstanding"] == 0 or not current:
                            trip = Trip(self.node, [name], time.monotonic())
                            current[:] = [trip]
                            self.trips.append(trip)
                        else:
                            current[0].commands.append(name)
                        state["outstanding"] += 1
                buf = buf[pos:]
                await up_writer.drain()
            up_writer.close()

        async def server_to_client() -> None:
            buf = b""
            while data := await up_reader.read(65536):
                writer.write(data)
                buf += data
                pos = 0
                while True:
                    try:
                        _, pos = parse(buf, pos)
                    except Incomplete:
                        break
                    with self.lock:
                        state["outstanding"] = max(0, state["outstanding"] - 1)
                buf = buf[pos:]
                await writer.drain()
            writer.close()

        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.gather(client_to_server(), server_to_client())


# -- measuring ------------------------------------------------------------------------------
@dataclass
class Op:
    """One operation's counts over a window, per operation."""

    trips: dict[str, float] = field(default_factory=dict)  # node -> round trips per op
    kinds: dict[str, Counter[str]] = field(default_factory=dict)  # node -> trip label -> n
    sent: dict[str, float] = field(default_factory=dict)  # node -> commands sent per op
    executed: Counter[str] = field(default_factory=Counter)  # Redis command -> calls per op
    total_executed: float = 0.0
    background: int = 0  # lease renewals and PINGs seen (left out)


class Meter:
    def __init__(self, fleet: Any, proxies: dict[str, CountingProxy], redis: Any) -> None:
        self.fleet = fleet
        self.proxies = proxies
        self.redis = redis

    def _stats(self) -> tuple[dict[str, int], int]:
        stats = common.commandstats(self.redis)
        total = int(self.redis.info("stats")["total_commands_processed"])
        return stats, total

    @contextlib.contextmanager
    def window(self, count: int, out: Op) -> Iterator[None]:
        marks = {name: p.snapshot() for name, p in self.proxies.items()}
        stats0, total0 = self._stats()
        yield
        time.sleep(0.3)  # work a node spawned (the closing event, the ended notice)
        stats1, total1 = self._stats()
        own = {"info"}
        for name, proxy in self.proxies.items():
            trips = proxy.since(marks[name])
            counted = [t for t in trips if not t.background]
            out.background += len(trips) - len(counted)
            out.trips[name] = len(counted) / count
            out.sent[name] = sum(len(t.commands) for t in counted) / count
            out.kinds[name] = Counter(t.label for t in counted)
        for cmd, calls in stats1.items():
            if cmd not in own and calls > stats0.get(cmd, 0):
                out.executed[cmd] = calls - stats0.get(cmd, 0)
        # total_commands_processed counts two of this window's INFO calls: the first
        # INFO stats and the last INFO commandstats (a command counts once it is done).
        out.total_executed = total1 - total0 - 2


async def _requests(port: int, calls: list[tuple[str, str, Any]]) -> list[tuple[int, bytes]]:
    out = []
    async with common.RawHTTP("127.0.0.1", port) as conn:
        for method, path, body in calls:
            out.append(await conn.request(method, path, body))
    return out


def http(port: int, calls: list[tuple[str, str, Any]]) -> list[tuple[int, bytes]]:
    return asyncio.run(_requests(port, calls))


@dataclass
class RunResult:
    ops: dict[str, Op] = field(default_factory=dict)
    idle: Op = field(default_factory=Op)
    statuses: Counter[str] = field(default_factory=Counter)


OPERATIONS = (
    ("start", "A", "start a session (POST via A)"),
    ("read_a", "A", "read one session (GET via A, its owner)"),
    ("read_b", "B", "read one session (GET via B)"),
    ("close_owner", "A", "close via the owner A (DELETE, no wait)"),
    ("close_owner_wait", "A", "close via the owner A (DELETE `?wait=5`)"),
    ("close_other", "B", "close via B, owner A (DELETE, no wait)"),
    ("close_other_wait", "B", "close via B, owner A (DELETE `?wait=5`)"),
)


def one_run(meter: Meter, a: Any, b: Any, k: int, run_index: int) -> RunResult:
    out = RunResult()
    body = {"params": {"interval": 3600}}
    # Warm up: Redis' script cache (fleet loads a script on its first NOSCRIPT) and both
    # nodes' connection pools, with one of each operation.
    warm = [
        (c, json.loads(raw)["session_id"])
        for c, (_, raw) in (
            (f"warm-{run_index}-{i}", one)
            for i, one in enumerate(
                http(
                    a.port,
                    [("POST", f"/calls/warm-{run_index}-{i}/sessions", body) for i in range(4)],
                )  # fmt: skip
            )
        )
    ]
    http(a.port, [("DELETE", f"/calls/{c}/sessions/{s}?wait=5", None) for c, s in warm[:2]])
    http(b.port, [("DELETE", f"/calls/{c}/sessions/{s}?wait=5", None) for c, s in warm[2:]])
    time.sleep(0.3)

    starts = [("POST", f"/calls/rt-{run_index}-{i}/sessions", body) for i in range(5 * k)]
    op = Op()
    began = time.monotonic()
    with meter.window(5 * k, op):
        answers = http(a.port, starts)
    out.ops["start"] = op
    window = time.monotonic() - began
    refs = []
    for (_, path, _), (status, raw) in zip(starts, answers, strict=True):
        out.statuses[f"start {status}"] += 1
        if status == 201:
            refs.append((path.split("/")[2], json.loads(raw)["session_id"]))
    if len(refs) < 5 * k:
        raise RuntimeError(f"only {len(refs)} of {5 * k} starts succeeded")
    groups = [refs[i * k : (i + 1) * k] for i in range(5)]

    def read(node: Any, name: str) -> None:
        op = Op()
        calls = [("GET", f"/calls/{c}/sessions/{s}", None) for c, s in groups[0]]
        with meter.window(k, op):
            for status, _ in http(node.port, calls):
                out.statuses[f"{name} {status}"] += 1
        out.ops[name] = op

    read(a, "read_a")
    read(b, "read_b")
    for name, node, group, wait in (
        ("close_owner", a, groups[1], ""),
        ("close_owner_wait", a, groups[2], "?wait=5"),
        ("close_other", b, groups[3], ""),
        ("close_other_wait", b, groups[4], "?wait=5"),
    ):
        op = Op()
        calls = [("DELETE", f"/calls/{c}/sessions/{s}{wait}", None) for c, s in group]
        with meter.window(k, op):
            for status, _ in http(node.port, calls):
                out.statuses[f"{name} {status}"] += 1
            if not wait:
                time.sleep(0.5)  # let the owner finish the closes it was asked for
        out.ops[name] = op
    # An idle window as long as the start window (the longest), for the background.
    with meter.window(1, out.idle):
        time.sleep(window)
    return out


def memory(fleet: Any, a: Any, count: int) -> dict[str, Any]:
    """``used_memory`` per live session, and where one session's bytes go."""
    from fleet.store.keys import Keys

    r = common.redis_client(fleet.redis.url)
    keys = Keys(fleet.prefix)
    with contextlib.suppress(Exception):
        r.memory_purge()
    time.sleep(0.5)
    before = int(r.info("memory")["used_memory"])
    keys_before = int(r.dbsize())
    began = time.monotonic()
    started = asyncio.run(
        common.start_sessions(
            [a.port], count, {"interval": 3600}, lambda i: f"mem-{i}", concurrency=64,
            label="starting sessions for the memory figure",
        )
    )  # fmt: skip
    seconds = time.monotonic() - began
    time.sleep(1.0)
    after = int(r.info("memory")["used_memory"])
    keys_after = int(r.dbsize())
    call, sid = started[0]
    usage = {
        "session record (HASH)": r.memory_usage(keys.session(call, sid), samples=0),
        "event stream (none until the first event)": (
            r.memory_usage(keys.events(call, sid), samples=0) or 0
        ),
        "the call's live index, 1 entry (ZSET)": r.memory_usage(keys.call_live(call), samples=0),
    }
    first_event = {size: _first_event_bytes(r, keys, started, size) for size in (4096, 1024)}
    globals_ = {
        "node's slot set (SET)": keys.node_sessions(a.name),
        "fleet-wide live index (ZSET)": keys.live(),
        "per-call counts (HASH)": keys.call_counts(),
    }
    global_bytes = {label: r.memory_usage(key, samples=0) or 0 for label, key in globals_.items()}
    r.close()
    return {
        "started": len(started),
        "seconds": seconds,
        "per_session": (after - before) / max(1, len(started)),
        "keys_per_session": (keys_after - keys_before) / max(1, len(started)),
        "usage": usage,
        "global": global_bytes,
        "global_total": sum(global_bytes.values()),
        "first_event": first_event,
    }


def _first_event_bytes(r: Any, keys: Any, started: list[tuple[str, str]], node_bytes: int) -> float:
    """``used_memory`` per session that one tick-sized event adds (its stream's first
    entry) with ``stream-node-max-bytes`` at ``node_bytes``; the streams are then dropped and
    the setting put back."""
    default = r.config_get("stream-node-max-bytes")["stream-node-max-bytes"]
    streams = [keys.events(call, sid) for call, sid in started]
    r.config_set("stream-node-max-bytes", node_bytes)
    try:
        before = int(r.info("memory")["used_memory"])
        for chunk in range(0, len(streams), 1000):
            pipe = r.pipeline(transaction=False)
            for key in streams[chunk : chunk + 1000]:
                pipe.xadd(key, {"type": "tick", "data": '{"n":1}'}, maxlen=1000, approximate=True)
            pipe.execute()
        after = int(r.info("memory")["used_memory"])
        for chunk in range(0, len(streams), 1000):
            r.delete(*streams[chunk : chunk + 1000])
    finally:
        r.config_set("stream-node-max-bytes", default)
    return (after - before) / max(1, len(streams))


def run(opts: common.Options) -> common.Report:
    from fleet.store.scripts import Scripts, read_script

    k = QUICK_K if opts.quick else K
    count = QUICK_MEMORY_SESSIONS if opts.quick else MEMORY_SESSIONS
    load_before = common.load_average()
    harness = common._harness()
    fleet = harness.LocalFleet(2, **SETTINGS)
    scripts = {read_script(name).sha: name for name in Scripts.NAMES}
    proxies = {
        node.name: CountingProxy(label, fleet.redis.port, scripts).start()
        for node, label in zip(fleet.nodes, ("A", "B"), strict=True)
    }
    names = dict(zip((n.name for n in fleet.nodes), ("A", "B"), strict=True))
    for node in fleet.nodes:
        node.env["FLEET_REDIS_URL"] = proxies[node.name].url
    common.progress(f"starting redis-server and 2 nodes behind counting proxies ({fleet.prefix})")
    results: list[RunResult] = []
    try:
        fleet.__enter__()
        a, b = fleet.nodes
        r = common.redis_client(fleet.redis.url)
        meter = Meter(fleet, {names[n]: p for n, p in proxies.items()}, r)
        for i in range(opts.runs):
            results.append(one_run(meter, a, b, k, i))
            starts = results[-1].ops["start"]
            common.progress(
                f"run {i + 1}/{opts.runs}: start {starts.trips.get('A', 0):.2f} round trips; "
                + ", ".join(
                    f"{name} {sum(o.trips.values()):.2f}"
                    for name, o in results[-1].ops.items()
                    if name != "start"
                )
            )
        r.close()
        mem = memory(fleet, a, count)
    finally:
        fleet.__exit__(None, None, None)
        for proxy in proxies.values():
            proxy.stop()
    return report(opts, k, results, mem, load_before)


# -- the report -----------------------------------------------------------------------------
def _kinds(results: list[RunResult], name: str, node: str, per: int) -> str:
    total: Counter[str] = Counter()
    for r in results:
        total.update(r.ops[name].kinds.get(node, Counter()))
    n = len(results) * per
    parts = [
        (f"{v / n:.2f}× " if abs(v / n - 1) > 0.01 else "") + label
        for label, v in total.most_common()
        if v / n >= 0.05
    ]
    return "; ".join(parts) or "none"


def _agg(results: list[RunResult], get: Callable[[RunResult], float]) -> common.Agg:
    return common.Agg.of(get(r) for r in results)


def _per_node(results: list[RunResult], name: str, node: str, what: str) -> common.Agg:
    return common.Agg.of(getattr(r.ops[name], what).get(node, 0.0) for r in results)


def report(
    opts: common.Options,
    k: int,
    results: list[RunResult],
    mem: dict[str, Any],
    load_before: str,
) -> common.Report:
    per = {name: (5 * k if name == "start" else k) for name, _, _ in OPERATIONS}
    rows = []
    for name, asked, label in OPERATIONS:
        for node in (asked, "B" if asked == "A" else "A"):
            trips = _per_node(results, name, node, "trips")
            if trips.median < 0.05 and node != asked:
                continue
            sent = _per_node(results, name, node, "sent")
            role = "asked" if node == asked else "owner"
            rows.append(
                [
                    label if node == asked else "",
                    f"{node} ({role})",
                    trips.fmt("", 2),
                    sent.fmt("", 2),
                    _kinds(results, name, node, per[name]),
                ]
            )
    executed_rows = []
    for name, _, label in OPERATIONS:
        total = common.Agg.of(r.ops[name].total_executed / per[name] for r in results)
        counts: Counter[str] = Counter()
        for r in results:
            counts.update(r.ops[name].executed)
        top = ", ".join(
            f"`{c}` {v / len(results) / per[name]:.1f}"
            for c, v in counts.most_common(12)
            if v / len(results) / per[name] >= 0.05
        )
        executed_rows.append([label, total.fmt("", 1), top])

    def trips_of(name: str, node: str) -> common.Agg:
        return _agg(results, lambda r: r.ops[name].trips.get(node, 0.0))

    def both(name: str) -> common.Agg:
        return _agg(results, lambda r: sum(r.ops[name].trips.values()))

    start = trips_of("start", "A")
    close_asked = trips_of("close_other", "B")
    close_total = both("close_other")
    start_met = start.median <= TARGET_START
    close_met = close_asked.median <= TARGET_CLOSE
    close_total_met = close_total.median <= TARGET_CLOSE
    bytes_met = mem["per_session"] <= TARGET_BYTES
    idle = _agg(results, lambda r: sum(r.idle.trips.values()))
    background = sum(r.idle.background + sum(o.background for o in r.ops.values()) for r in results)
    usage_rows = [[label, f"{(v or 0):,} B"] for label, v in mem["usage"].items()]
    usage_rows.append(
        [
            "fleet-wide indexes, per session (slot set, live index, call counts, "
            f"{mem['started']:,} sessions)",
            f"{mem['global_total'] / max(1, mem['started']):,.0f} B",
        ]
    )
    body = [
        f"Two nodes, A and B (`FLEET_NODE_TTL=60`, `FLEET_MAINTENANCE_INTERVAL=600`, "
        f"`FLEET_LOG_LEVEL=warning`), each talking to Redis through its own counting proxy. "
        f"{opts.runs} runs; per run, {5 * k} starts on A, then {k} of each other operation, "
        "one at a time over a keep-alive HTTP connection, each kind in its own window. A "
        "round trip is a batch of commands a connection sends while no reply is "
        "outstanding (a pipeline is one; a script call is one command). Figures are per "
        f"operation. Targets: ≤ {TARGET_START} round trips to start, ≤ {TARGET_CLOSE} to "
        f"close, ≤ {TARGET_BYTES / 1024:.1f} KiB of Redis memory per live session.",
        "",
        *common.table(
            ["operation", "node", "round trips", "commands sent", "what each round trip carried"],
            rows,
        ),
        "",
        f"Start: {start.fmt('', 2)} round trips (target ≤ {TARGET_START}: "
        f"{common.verdict(start_met)}). Close through another node: {close_asked.fmt('', 2)} "
        f"on the node asked (target ≤ {TARGET_CLOSE}: {common.verdict(close_met)}), "
        f"{close_total.fmt('', 2)} with the owner's part (≤ {TARGET_CLOSE}: "
        f"{common.verdict(close_total_met)}).",
        "",
        "<details><summary>Commands Redis executed per operation (INFO commandstats, inside "
        "scripts included)</summary>",
        "",
        *common.table(["operation", "total", "by command"], executed_rows),
        "",
        "</details>",
        "",
        f"**Memory**: {mem['per_session']:,.0f} B of `used_memory` per live idle session "
        f"(target ≤ {TARGET_BYTES:,.0f} B: {common.verdict(bytes_met)}), measured over "
        f"{mem['started']:,} sessions started on A, each on its own call "
        f"({mem['keys_per_session']:.1f} keys per session; started in "
        f"{mem['seconds']:.1f} s through the proxy). One session's keys (`MEMORY USAGE`):",
        "",
        *common.table(["key", "bytes"], usage_rows),
        "",
        "The first event a session emits creates its stream: "
        + "; ".join(
            f"{per:,.0f} B more per session with `stream-node-max-bytes {size}`"
            + (" (Redis' default)" if size == 4096 else "")
            for size, per in mem["first_event"].items()
        )
        + ". Redis preallocates a new stream's first node up to that size (at most 4 KB); "
        "see docs/redis.md.",
    ]
    notes = [
        "Round trips are counted on each node's own connections, so a node's share is "
        "separate from the other's; *asked* is the node that got the HTTP request, *owner* "
        "the node that runs the session. The node asked writes the close flag and "
        "`session_closing` and tells the owner in one script; the owner's part "
        "(`end_session` + `release` in one pipeline, `end_session` publishing the 'ended' "
        "notice to the asking node) runs after the asking node has answered 202, unless "
        "the request waits.",
        f"Left out as background: lease renewals and health-check `PING`s ({background} "
        f"round trips over all windows). Round trips in the idle windows, all nodes: "
        f"{idle.fmt('', 1)}.",
        "*total* executed per operation is `total_commands_processed` over the window "
        "(without the benchmark's own `INFO` calls), divided by the operations; it "
        "includes every command a script ran.",
        "A counter that ticks adds a checkpoint (a LIST) and keeps up to "
        "`FLEET_EVENTS_MAXLEN` (1,000) events in its stream: a ticking session costs far "
        "more than the idle one measured here.",
        common.load_note(load_before),
    ]
    statuses: Counter[str] = Counter()
    for r in results:
        statuses.update(r.statuses)
    odd = {s: n for s, n in statuses.items() if not s.endswith((" 200", " 201", " 202"))}
    if odd:
        notes.append(f"Unexpected answers: {odd}.")
    summary = (
        f"Start: {start.fmt('', 1)} round trips (target ≤ {TARGET_START}: "
        f"{common.verdict(start_met)}); close through another node: "
        f"{close_asked.fmt('', 1)} on the node asked (≤ {TARGET_CLOSE}: "
        f"{common.verdict(close_met)}), {close_total.fmt('', 1)} with the owner's; Redis "
        f"memory {mem['per_session']:,.0f} B per live idle session (≤ "
        f"{TARGET_BYTES:,.0f} B: {common.verdict(bytes_met)})."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
