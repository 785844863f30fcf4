"""What bench/capacity.py reads from the Cluster's masters: a sample of each shard every
second (commands by name, CPU, cluster-bus publishes) and ``MONITOR`` windows whose
commands are sorted by hash tag.

* ``INFO commandstats`` counts every command a shard executed, those run inside scripts
  included; the benchmark's own ``INFO``, ``CLUSTER`` and ``MONITOR`` are left out.
* ``INFO cpu``: ``used_cpu_user_main_thread`` + ``used_cpu_sys_main_thread``, the thread
  that runs every command (the one a shard cannot add more of).
* ``CLUSTER INFO``: ``cluster_stats_messages_publish_received`` counts the ``PUBLISH``
  messages that reached this shard over the cluster bus from the others (a Cluster sends
  every classic ``PUBLISH`` to every shard).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from redis.crc import key_slot

_OWN = frozenset({"info", "cluster|info", "monitor"})  # what this module sends
_KEYLESS = frozenset(
    {"ping", "time", "multi", "exec", "hello", "subscribe", "psubscribe", "client"}
)
_TAG = re.compile(r"\{([^}]*)\}")
_LINE = re.compile(r"^\+(?P<ts>\d+\.\d+) \[\d+ (?P<client>[^\]]+)\] (?P<args>.*)$")
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Reading:
    """One shard at one moment."""

    at: float
    cpu: float  # seconds of the main thread, user + system
    calls: dict[str, int]  # command -> calls so far
    bus_publish_in: int  # PUBLISH messages received over the cluster bus so far
    memory: int  # used_memory, bytes
    connections: int  # connections accepted so far (total_connections_received)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@dataclass(frozen=True)
class Shard:
    port: int
    client: Any  # a redis.Redis to this master only
    slots: tuple[tuple[int, int], ...]

    def holds(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)

    def read(self) -> Reading:
        info = self.client.info("cpu", "commandstats", "memory", "stats")
        calls = {
            k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in info.items()
            if k.startswith("cmdstat_") and k.removeprefix("cmdstat_") not in _OWN
        }
        cluster = self.client.execute_command("CLUSTER", "INFO")
        text = cluster if isinstance(cluster, str) else str(cluster)
        m = re.search(r"cluster_stats_messages_publish_received:(\d+)", text)
        return Reading(
            at=time.monotonic(),
            cpu=float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"]),
            calls=calls,
            bus_publish_in=int(m[1]) if m else 0,
            memory=int(info["used_memory"]),
            connections=int(info["total_connections_received"]),
        )


def shards_of(ports: list[int]) -> list[Shard]:
    """The masters at ``ports`` with the slot ranges each holds (``CLUSTER SLOTS``)."""
    import redis

    first: Any = redis.Redis(port=ports[0], decode_responses=True)
    ranges: dict[int, list[tuple[int, int]]] = {}
    for row in first.execute_command("CLUSTER", "SLOTS"):
        lo, hi, master = int(row[0]), int(row[1]), row[2]
        ranges.setdefault(int(master[1]), []).append((lo, hi))
    first.close()
    return [
        Shard(p, redis.Redis(port=p, decode_responses=True), tuple(ranges.get(p, [])))
        for p in ports
    ]


@dataclass(frozen=True)
class Rates:
    """One shard over a window: per second, and the window's length."""

    seconds: float
    commands: float
    cpu: float  # share of one core, 0..1
    bus_publish_in: float
    by_command: dict[str, float]
    connections: float = 0.0  # new connections a second

    @classmethod
    def between(cls, a: Reading, b: Reading) -> Rates:
        dt = max(b.at - a.at, 1e-9)
        by = {c: (n - a.calls.get(c, 0)) / dt for c, n in b.calls.items()}
        return cls(
            seconds=dt,
            commands=(b.total - a.total) / dt,
            cpu=(b.cpu - a.cpu) / dt,
            bus_publish_in=(b.bus_publish_in - a.bus_publish_in) / dt,
            by_command={c: v for c, v in by.items() if v > 0},
            connections=(b.connections - a.connections) / dt,
        )


class Sampler:
    """Reads every shard every ``period`` seconds in a thread, and keeps the readings."""

    def __init__(self, shards: list[Shard], period: float = 1.0) -> None:
        self.shards = shards
        self.period = period
        self.readings: list[list[Reading]] = []  # per sample, one per shard
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shard sampler", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.sample()
            except Exception:  # a shard killed or busy for a moment: skip this sample
                continue

    def sample(self) -> list[Reading]:
        row = [s.read() for s in self.shards]
        with self._lock:
            self.readings.append(row)
        return row

    def now(self) -> int:
        """A mark: the index of a fresh sample, taken now."""
        self.sample()
        with self._lock:
            return len(self.readings) - 1

    def window(self, a: int, b: int) -> list[Rates]:
        """Per shard, the rates between two marks."""
        with self._lock:
            first, last = self.readings[a], self.readings[b]
        return [Rates.between(x, y) for x, y in zip(first, last, strict=True)]

    def peaks(self, a: int, b: int) -> list[Rates]:
        """Per shard, the busiest (by CPU) interval between consecutive samples from mark a
        to mark b."""
        with self._lock:
            rows = self.readings[a : b + 1]
        out = []
        for i in range(len(self.shards)):
            steps = [Rates.between(r[i], s[i]) for r, s in zip(rows, rows[1:], strict=False)]
            steps = [x for x in steps if x.seconds > 0.3]
            out.append(max(steps, key=lambda x: x.cpu) if steps else Rates(0, 0, 0, 0, {}))
        return out


# -- MONITOR, sorted by hash tag ------------------------------------------------------------
def tag_of(key: str) -> str:
    """``g``, ``c`` (a call), ``n`` (a node), ``t`` (a thread) or ``-`` (no tag)."""
    m = _TAG.search(key)
    if m is None or not m[1]:
        return "-"
    return m[1].split(":", 1)[0] if ":" in m[1] else m[1]


@dataclass
class Sorted:
    """What ``MONITOR`` saw on every shard in one window: commands (scripts' insides
    included, each counted under the script that ran it) by hash tag, by slot, and by what
    sent them."""

    seconds: float = 0.0
    began: float = 0.0  # time.monotonic() when the window began
    by_tag: Counter[str] = field(default_factory=Counter)
    by_slot: Counter[int] = field(default_factory=Counter)
    by_what: Counter[str] = field(default_factory=Counter)  # "<tag> <command or script>"
    by_key: Counter[str] = field(default_factory=Counter)  # the first key of each command
    slot_key: dict[int, str] = field(default_factory=dict)  # one key seen in each slot

    @property
    def total(self) -> int:
        return sum(self.by_tag.values())


class _Feed:
    """One shard's ``MONITOR`` lines, sorted into ``out``. A script's own commands come
    right after it (Redis feeds the script first), from the client ``lua``: they count
    under the script's tag and slot."""

    def __init__(self, out: Sorted, scripts: dict[str, str]) -> None:
        self.out = out
        self.scripts = scripts
        self.script = ("-", -1, "")  # tag, slot and name of the last script this shard ran

    def line(self, raw: bytes, start: float, end: float) -> bool:
        """Sort one line if Redis ran its command between ``start`` and ``end`` (unix
        seconds, Redis' clock); False once a line is past ``end``."""
        m = _LINE.match(raw.decode("utf-8", "replace").rstrip())
        if m is None:
            return True
        at = float(m["ts"])
        if at > end:
            return False
        tokens = _TOKEN.findall(m["args"][:600])
        if at >= start and tokens:
            self._sort(m["client"], tokens)
        return True

    def _sort(self, client: str, tokens: list[str]) -> None:
        command = tokens[0].lower()
        if command in ("info", "monitor") or (
            command == "cluster" and len(tokens) > 1 and tokens[1].lower() == "info"
        ):
            return
        key = _first_key(command, tokens)
        if client == "lua":
            tag, slot, name = self.script
            self.out.by_what[f"{tag} {name} (inside)"] += 1
        else:
            tag = tag_of(key) if key else "-"
            slot = key_slot(key.encode()) if key else -1
            name = command
            if command in ("evalsha", "eval") and len(tokens) > 1:
                name = self.scripts.get(tokens[1], "script")
                self.script = (tag, slot, name)
            self.out.by_what[f"{tag} {name}"] += 1
            if slot >= 0:
                self.out.slot_key.setdefault(slot, key)
        if key:
            self.out.by_key[key] += 1
        self.out.by_tag[tag] += 1
        if slot >= 0:
            self.out.by_slot[slot] += 1


async def _monitor(
    port: int, window: tuple[float, float], scripts: dict[str, str], out: Sorted
) -> None:
    """Every command the shard ran in ``window`` (unix seconds, the clock Redis stamps
    ``MONITOR`` lines with: this machine's). Lines are read until one is past the window,
    however long that takes: a reader that falls behind a busy shard would otherwise see
    less of it than of the others."""
    start, end = window
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**24)
    feed = _Feed(out, scripts)
    try:
        writer.write(b"MONITOR\r\n")
        await writer.drain()
        if not (await reader.readline()).startswith(b"+OK"):
            raise RuntimeError("MONITOR was refused")
        give_up = time.monotonic() + (end - start) * 20 + 30
        while time.monotonic() < give_up:
            wait = max(end - time.time(), 0.0) + 0.5  # a shard with nothing more to say
            try:
                raw = await asyncio.wait_for(reader.readline(), wait)
            except TimeoutError:
                break
            if not feed.line(raw, start, end):
                break
    finally:
        writer.close()


def _first_key(command: str, tokens: list[str]) -> str:
    if command in ("evalsha", "eval"):
        return tokens[3] if len(tokens) > 3 and tokens[2] != "0" else ""
    if command in _KEYLESS:
        return ""
    return tokens[1] if len(tokens) > 1 else ""


def script_names() -> dict[str, str]:
    """SHA1 -> script name, for every script in fleet/store/lua."""
    from fleet.store.scripts import Scripts, read_script

    return {read_script(name).sha: name for name in Scripts.NAMES}


def monitor(ports: list[int], seconds: float) -> Sorted:
    """``MONITOR`` on every shard at once: the commands run in the next ``seconds``."""
    out = Sorted(seconds=seconds)
    scripts = script_names()

    async def all_of() -> None:
        lead = 0.3  # every MONITOR connection in place before the window opens
        out.began = time.monotonic() + lead
        start = time.time() + lead
        window = (start, start + seconds)
        await asyncio.gather(*(_monitor(p, window, scripts, out) for p in ports))

    asyncio.run(all_of())
    return out
