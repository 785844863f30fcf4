"""The unit costs behind bench/capacity.py's model, each measured apart.

* **Per session operation** (``units``): on a fresh 3-master Cluster, ``UNIT_NODES`` nodes
  in one process run ``Paced`` sessions that do one kind of work only (an emit, a
  checkpoint, a change of ``ctx.metrics``, or taking messages sent from the next node),
  one phase per kind, each phase on sessions of its own. Each phase's window, minus the
  idle phase's (the same sessions doing nothing), divided by the operations it counted,
  is the cost of one operation: commands, CPU of the shards' main threads, ``PUBLISH``
  messages the cluster bus carried, and CPU of the node process.
* **The cluster bus** (``bus``): ``BUS_MESSAGES`` classic ``PUBLISH``es sent to one shard
  (no subscriber anywhere) cost the other shards this much CPU each; ``SPUBLISH`` for
  comparison.
* **The fleet-wide slot at fleet sizes** (``global_slot``): fleet's own registry calls on
  the ``{g}`` keys (lease renewal, a maintenance pass's reads, admission with placement,
  the live-node directory, reaping) against a single ``redis-server`` holding the
  registry of F nodes × ``SLOTS_PER_NODE`` sessions, F = 10, 100, 1,000: Redis CPU per
  call, from ``INFO cpu`` over many calls.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common
from bench.capacity_scale import Children, Marks, Window, _cluster
from bench.capacity_shards import Sampler, shards_of

UNIT_NODES = 4
UNIT_SESSIONS = 500  # per node
UNIT_INTERVAL = 5.0
UNIT_WINDOW = 20.0
MESSAGE_RATE = 200.0
BUS_MESSAGES = 50_000
FLEET_SIZES: tuple[int, ...] = (10, 100, 1000)
SLOTS_PER_NODE = 1000
OFF = {"emit": False, "checkpoint": False, "metrics": False}
PHASES: dict[str, dict[str, Any]] = {
    "idle": {**OFF, "interval": 3600.0},
    "emit": {**OFF, "emit": True, "interval": UNIT_INTERVAL},
    "checkpoint": {**OFF, "checkpoint": True, "interval": UNIT_INTERVAL},
    "metrics report": {**OFF, "metrics": True, "interval": UNIT_INTERVAL},
    "message": {**OFF, "listen": True, "interval": 3600.0},
}


@dataclass
class Unit:
    """One operation's cost."""

    rate: float = math.nan  # operations a second in the window
    commands: float = math.nan  # commands Redis executed, scripts' insides included
    cpu_us: float = math.nan  # µs of shard main-thread CPU, all shards
    bus: float = math.nan  # PUBLISH messages received over the cluster bus, all shards
    node_cpu_us: float = math.nan  # µs of node-process CPU
    by_command: dict[str, float] = field(default_factory=dict)


def _ops(phase: str, w: Window, idle: Window) -> float:
    """Operations a second in a phase's window, counted from what each one runs once."""
    if phase == "emit":
        return w.command("xadd")
    if phase == "checkpoint" or phase == "message":
        return w.command("lpush")  # a message is consumed by one checkpoint
    if phase == "metrics report":
        return w.command("hset") - idle.command("hset")  # one HSET per session reported
    return math.nan


@dataclass
class Units:
    ops: dict[str, Unit] = field(default_factory=dict)
    background: float = math.nan  # an idle shard's main thread (cores): crons, the bus


def units() -> Units:
    """One run of the per-operation phases."""
    cluster = _cluster()
    logdir = Path(tempfile.mkdtemp(prefix="fleet-capacity-units-"))
    shards = shards_of([s.port for s in cluster.servers])
    children = Children(cluster.url, [UNIT_NODES], logdir)
    out = Units()
    try:
        with Sampler(shards) as sampler:
            marks = Marks(sampler, children)
            children.ready()
            time.sleep(6.0)
            windows: dict[str, Window] = {}
            for phase, params in PHASES.items():
                windows[phase] = _phase(phase, params, marks, children)
            idle = windows["idle"]
            out.background = idle.cpu / len(idle.shards)
            for phase, w in windows.items():
                if phase != "idle":
                    out.ops[phase] = _unit(_ops(phase, w, idle), w, idle)
    finally:
        children.close()
        cluster.stop()
    return out


def _phase(phase: str, params: dict[str, Any], marks: Marks, children: Children) -> Window:
    children.ask(
        {"op": "start", "count": UNIT_SESSIONS, "worker": "paced", "params": params,
         "tag": phase.replace(" ", "-"), "concurrency": 16}
    )  # fmt: skip
    sender: threading.Thread | None = None
    if phase == "message":
        cmd = {"op": "send", "rate": MESSAGE_RATE, "seconds": UNIT_WINDOW + 8.0}
        sender = threading.Thread(target=children.ask, args=(cmd,))
        sender.start()
    time.sleep(6.0)  # a metrics report interval, and phases spread
    a = marks.mark()
    time.sleep(UNIT_WINDOW)
    w = marks.window(a, marks.mark())
    if sender is not None:
        sender.join()
    children.ask({"op": "close"})
    common.progress(
        f"units: {phase}: {w.commands:,.0f} commands/s, shards "
        + ", ".join(f"{s.cpu * 100:.1f}%" for s in w.shards)
        + f", node {w.node_cpu * 100:.1f}%"
    )
    return w


def _unit(rate: float, w: Window, idle: Window) -> Unit:
    if not rate > 0:
        return Unit()
    names = set(w.shards[0].by_command).union(*(s.by_command for s in w.shards))
    by = {n: (w.command(n) - idle.command(n)) / rate for n in names}
    return Unit(
        rate=rate,
        commands=(w.commands - idle.commands) / rate,
        cpu_us=(w.cpu - idle.cpu) / rate * 1e6,
        bus=sum(s.bus_publish_in - i.bus_publish_in for s, i in zip(w.shards, idle.shards,
                                                                   strict=True)) / rate,
        node_cpu_us=(w.node_cpu - idle.node_cpu) / rate * 1e6,
        by_command={n: v for n, v in by.items() if v > 0.05},
    )  # fmt: skip


# -- the cluster bus ------------------------------------------------------------------------
@dataclass
class Bus:
    sender_us: float = math.nan  # CPU on the shard a PUBLISH is sent to
    receiver_us: float = math.nan  # CPU on each other shard, per message it receives
    received: float = math.nan  # messages each other shard received, per PUBLISH
    sharded_received: float = math.nan  # the same for SPUBLISH


def bus() -> Bus:
    """Classic and sharded publishes to one shard of a fresh Cluster, nobody subscribed."""
    cluster = _cluster()
    out = Bus()
    try:
        shards = shards_of([s.port for s in cluster.servers])
        sender, others = shards[0], shards[1:]
        # A channel in a slot the sender holds, for SPUBLISH.
        from redis.crc import key_slot

        channel = next(
            c for c in (f"bus{{{i}}}" for i in range(100_000)) if sender.holds(key_slot(c.encode()))
        )
        for command, name in (("PUBLISH", "classic"), ("SPUBLISH", "sharded")):
            before = [s.read() for s in shards]
            pipe = sender.client.pipeline(transaction=False)
            for i in range(BUS_MESSAGES):
                pipe.execute_command(command, channel, "0123456789")
                if i % 1000 == 999:
                    pipe.execute()
            pipe.execute()
            time.sleep(1.0)
            after = [s.read() for s in shards]
            got = [b.bus_publish_in - a.bus_publish_in for a, b in zip(before, after, strict=True)]
            cpu = [b.cpu - a.cpu for a, b in zip(before, after, strict=True)]
            if name == "classic":
                out.sender_us = cpu[0] / BUS_MESSAGES * 1e6
                out.received = sum(got[1:]) / len(others) / BUS_MESSAGES
                # Each other shard's CPU per message received, less an idle second's.
                out.receiver_us = sum(cpu[1:]) / max(sum(got[1:]), 1) * 1e6
            else:
                out.sharded_received = sum(got[1:]) / len(others) / BUS_MESSAGES
    finally:
        cluster.stop()
    return out


# -- the fleet-wide slot at fleet sizes -----------------------------------------------------
@dataclass
class GlobalCall:
    """One registry call on the ``{g}`` keys at one fleet size."""

    cpu_us: float
    commands: float
    latency_ms: float  # as the caller saw it, one call at a time


GLOBAL_CALLS = (
    "lease renewal (heartbeat)",
    "maintenance: slot count (SCARD)",
    "maintenance: expired nodes",
    "maintenance: count live nodes",
    "live-node directory read",
    "admission with placement (place)",
    "release a slot",
    "reap one session (moved)",
    "reap one session (already gone)",
)


def global_slot() -> dict[int, dict[str, GlobalCall]]:
    """Per fleet size, per call: the cost of fleet's ``{g}`` operations on the Cluster
    shard that holds ``{g}`` (nothing else runs on the Cluster meanwhile)."""
    from redis.crc import key_slot

    cluster = _cluster()
    try:
        shards = shards_of([s.port for s in cluster.servers])
        g = next(s for s in shards if s.holds(key_slot(b"fleet:{g}:nodes")))
        return asyncio.run(_global_slot(cluster.url, g.client))
    finally:
        cluster.stop()


async def _global_slot(url: str, stats: Any) -> dict[int, dict[str, GlobalCall]]:
    from pydantic import SecretStr

    from fleet.settings import Settings
    from fleet.store.connect import connect
    from fleet.store.registry import Registry

    settings = Settings(redis_url=SecretStr(url), node_id="probe", log_level="warning")
    client = connect(settings)
    registry = Registry(client, settings)
    await registry.load()
    out: dict[int, dict[str, GlobalCall]] = {}
    try:
        for size in FLEET_SIZES:
            prefix = f"f{size}"
            registry = Registry(client, settings.model_copy(update={"key_prefix": prefix}))
            nodes = [f"n{i}" for i in range(size)]
            await _populate(registry, nodes)
            out[size] = await _calls(registry, stats, nodes)
            common.progress(
                f"{{g}} at {size:,} nodes: "
                + ", ".join(f"{k.split(' (')[0]} {v.cpu_us:,.0f} µs" for k, v in out[size].items())
            )
    finally:
        await client.aclose()
    return out


async def _populate(registry: Any, nodes: list[str]) -> None:
    """F live nodes, each running the counter, each holding SLOTS_PER_NODE slots."""
    info = {"host": "h", "capacity": "", "draining": "0", "version": "x", "workers": "counter"}
    for node in nodes:
        await registry.heartbeat(node, info)
    pipe = registry.redis.pipeline(transaction=False)
    for node in nodes:
        refs = [f"c{node}-{j}/s" for j in range(SLOTS_PER_NODE)]
        pipe.sadd(registry.keys.node_sessions(node), *refs)
    await pipe.execute()


def _cpu(stats: Any) -> tuple[float, int]:
    info = stats.info("cpu", "stats")
    cpu = float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])
    return cpu, int(info["total_commands_processed"])


async def _calls(registry: Any, stats: Any, nodes: list[str]) -> dict[str, GlobalCall]:
    info = {"host": "h", "capacity": "", "draining": "0", "version": "x", "workers": "counter"}
    size = len(nodes)
    dead, live = nodes[-1], nodes[:-1]
    refs = sorted(await registry.node_slots(dead))

    async def renew() -> None:
        """Every node but the dead one holds its lease (untimed, before each kind)."""
        for i in range(0, len(live), 50):  # under the client's 100 connections per shard
            chunk = live[i : i + 50]
            await asyncio.gather(*(registry.heartbeat(n, info, held_before=True) for n in chunk))

    async def reap(i: int) -> None:
        await registry.reap(dead, refs[i], live[i % len(live)], None)

    few = max(20, 2000 // size)  # where each call is O(nodes)
    plan: list[tuple[str, int, Any]] = [
        ("lease renewal (heartbeat)", 1000,
         lambda i: registry.heartbeat(live[i % len(live)], info, held_before=True)),
        ("maintenance: slot count (SCARD)", 1000,
         lambda i: registry.redis.scard(registry.keys.node_sessions(nodes[i % size]))),
        ("maintenance: expired nodes", 1000, lambda i: registry.expired_nodes()),
        ("maintenance: count live nodes", 10 * few, lambda i: registry.count_live_nodes()),
        ("live-node directory read", few, lambda i: registry.live_nodes()),
        ("admission with placement (place)", 5 * few,
         lambda i: registry.place_here(nodes[0], f"p{i}", "s", "counter")),
        ("release a slot", 5 * few, lambda i: registry.release(nodes[0], f"p{i}", "s")),
        ("admission, spread over the fleet (place)", few,
         lambda i: registry.place(nodes[0], f"q{i}", "s", "counter", live, "spread")),
    ]  # fmt: skip
    out: dict[str, GlobalCall] = {}
    for name, count, call in plan:
        await renew()
        out[name] = await _time(stats, count, call)
    # Reaping: the dead node's lease lapses (its score set in the past), then each of its
    # slots moves to a live node; a second reap of the same slot finds it gone.
    await renew()
    await registry.redis.zadd(registry.keys.nodes(), {dead: 1})
    count = min(len(refs), 1000)
    out["reap one session (moved)"] = await _time(stats, count, reap)
    out["reap one session (already gone)"] = await _time(stats, count, reap)
    return out


async def _time(stats: Any, count: int, call: Any) -> GlobalCall:
    cpu0, n0 = _cpu(stats)
    t0 = time.perf_counter()
    for i in range(count):
        await call(i)
    elapsed = time.perf_counter() - t0
    cpu1, n1 = _cpu(stats)
    # One INFO between the two readings is counted too: take it off.
    return GlobalCall(
        cpu_us=(cpu1 - cpu0) / count * 1e6,
        commands=(n1 - n0 - 1) / count,
        latency_ms=elapsed / count * 1000,
    )


# -- a burst on one shard -------------------------------------------------------------------
@dataclass
class PoolCheck:
    """What a burst of commands to one shard does to fleet's Cluster client."""

    pool: int  # connections per shard (0: fleet's client as it is)
    burst: int = 0  # commands in flight at once (fleet's REAP_CONCURRENCY)
    burst_errors: dict[str, int] = field(default_factory=dict)
    bystander_errors: dict[str, int] = field(default_factory=dict)
    bystander_calls: int = 0
    channel_errors: int = 0


def pool_check(pool: int = 0, rounds: int = 3) -> PoolCheck:
    """On a fresh Cluster, one node's client runs 40 loops of single-key reads on call
    slots (sessions' writes stand-in) and a subscription (its control channel), while
    ``rounds`` bursts of ``REAP_CONCURRENCY`` commands go to the ``{g}`` shard at once,
    one in ten a two-command pipeline (as a maintenance pass's or a resume's reads are),
    as a reaping node sends them. Counts the errors each part saw."""
    from fleet.runtime.moves import REAP_CONCURRENCY

    cluster = _cluster()
    try:
        return asyncio.run(_pool_check(cluster.url, pool, rounds, REAP_CONCURRENCY))
    finally:
        cluster.stop()


async def _pool_check(url: str, pool: int, rounds: int, burst: int) -> PoolCheck:
    from pydantic import SecretStr

    from bench.capacity_fleet import wide_client
    from fleet.settings import Settings
    from fleet.store.connect import connect

    settings = Settings(redis_url=SecretStr(url), node_id="probe", log_level="warning")
    client = connect(settings) if not pool else wide_client(url, settings, pool)
    out = PoolCheck(pool, burst)
    stop = asyncio.Event()

    def count(into: dict[str, int], exc: BaseException) -> None:
        name = type(exc).__name__
        into[name] = into.get(name, 0) + 1

    async def bystander(i: int) -> None:
        while not stop.is_set():
            out.bystander_calls += 1
            try:
                await client.get(f"fleet:{{c:call-{i}}}:x")
            except Exception as exc:
                count(out.bystander_errors, exc)
            await asyncio.sleep(0.01)

    async def listener() -> None:
        pubsub = client.pubsub()
        await pubsub.subscribe("fleet:chan:node:probe")
        while not stop.is_set():
            try:
                await pubsub.get_message(timeout=0.5)
            except Exception:
                out.channel_errors += 1
                await asyncio.sleep(0.1)

    async def one(i: int) -> None:
        try:
            if i % 10 == 0:
                pipe = client.pipeline(transaction=False)
                pipe.hgetall(f"fleet:{{g}}:node-info:n{i}")
                pipe.scard(f"fleet:{{g}}:node-sessions:n{i}")
                await pipe.execute()
            else:
                await client.hgetall(f"fleet:{{g}}:node-info:n{i}")
        except Exception as exc:
            count(out.burst_errors, exc)

    await client.ping()
    tasks = [asyncio.create_task(bystander(i)) for i in range(40)]
    tasks.append(asyncio.create_task(listener()))
    await asyncio.sleep(0.5)
    for _ in range(rounds):
        await asyncio.gather(*(one(i) for i in range(burst)))
        await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()
    return out


# -- the same operations on a busy shard ----------------------------------------------------
BUSY_SESSIONS = 640
BUSY_LANES = 64
BUSY_CALLS = 6400


def busy_units() -> dict[str, Unit]:
    """Each operation's script calls, as fleet's registry makes them, ``BUSY_LANES`` at a time
    back to back (sessions in calls of their own, spread over the shards, one lane per
    session): what an operation costs a shard that is busy, where the per-wakeup cost of a
    mostly idle shard (the units above) is shared by many commands."""
    cluster = _cluster()
    try:
        shards = shards_of([s.port for s in cluster.servers])
        return asyncio.run(_busy(cluster.url, shards))
    finally:
        cluster.stop()


async def _busy(url: str, shards: list[Any]) -> dict[str, Unit]:
    from pydantic import SecretStr

    from fleet.models import SessionRecord
    from fleet.runtime.control import Message
    from fleet.settings import Settings
    from fleet.store.connect import connect
    from fleet.store.keys import make_ref
    from fleet.store.registry import Registry

    settings = Settings(redis_url=SecretStr(url), node_id="busy", log_level="warning")
    client = connect(settings)
    registry = Registry(client, settings)
    await registry.load()
    records = [
        SessionRecord(
            session_id="s", call_id=f"busy-{i}", call_type="default", node_id="busy",
            params={}, worker="paced", started_at=time.time(),
        )
        for i in range(BUSY_SESSIONS)
    ]  # fmt: skip
    for record in records:
        await registry.create_running(record)
    inbox = {make_ref(r.call_id, r.session_id): ("0-0", 0) for r in records}

    async def checkpoint(r: SessionRecord) -> None:
        r.checkpoint_version = await registry.checkpoint(r, '{"n":1,"m":0}', 1)

    async def message(r: SessionRecord) -> None:
        ref = make_ref(r.call_id, r.session_id)
        nudge = Message("inbox", ref).encode()
        await registry.send(r.call_id, r.session_id, "message", '{"x":1}', client_id="",
                            nudge=nudge)  # fmt: skip
        pos, count = inbox[ref]
        rows = await registry.read_inbox(r.call_id, r.session_id, pos, 100)
        if rows:
            inbox[ref] = (rows[-1].id, count + len(rows))
        version = await registry.checkpoint(r, '{"n":1,"m":1}', 1, inbox[ref])
        r.checkpoint_version = version

    async def report(r: SessionRecord) -> None:
        ref = make_ref(r.call_id, r.session_id)
        await registry.report_metrics("busy", [(ref, r.epoch, '{"ticks":1}')], time.time())

    async def emit(r: SessionRecord) -> None:
        await registry.emit(r, "tick", '{"n":1}')

    out: dict[str, Unit] = {}
    try:
        ops = (("emit", emit), ("checkpoint", checkpoint), ("metrics report", report),
               ("message", message))  # fmt: skip
        for name, op in ops:
            out[name] = await _drive(shards, records, op)
    finally:
        await client.aclose()
    return out


async def _drive(shards: list[Any], records: list[Any], op: Any) -> Unit:
    per_lane = BUSY_CALLS // BUSY_LANES

    async def lane(i: int) -> None:
        mine = records[i::BUSY_LANES]
        for j in range(per_lane):
            await op(mine[j % len(mine)])

    before = [s.read() for s in shards]
    t0 = time.perf_counter()
    await asyncio.gather(*(lane(i) for i in range(BUSY_LANES)))
    elapsed = time.perf_counter() - t0
    after = [s.read() for s in shards]
    n = per_lane * BUSY_LANES
    calls = [b.total - a.total for a, b in zip(before, after, strict=True)]
    cpu = [b.cpu - a.cpu for a, b in zip(before, after, strict=True)]
    bus = [b.bus_publish_in - a.bus_publish_in for a, b in zip(before, after, strict=True)]
    by: dict[str, float] = {}
    for a, b in zip(before, after, strict=True):
        for name, count in b.calls.items():
            by[name] = by.get(name, 0.0) + (count - a.calls.get(name, 0)) / n
    return Unit(
        rate=n / elapsed,
        commands=sum(calls) / n,
        cpu_us=sum(cpu) / n * 1e6,
        bus=sum(bus) / n,
        node_cpu_us=math.nan,
        by_command={k: v for k, v in by.items() if v > 0.05},
    )
