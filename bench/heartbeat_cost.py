"""heartbeat_cost: what one node asks of Redis per minute, at 10 and at 10,000 sessions.

One node (``FLEET_NODE_TTL=3``: the lease is renewed every second;
``FLEET_MAINTENANCE_INTERVAL=5``) runs idle counters (``interval`` 3600, so no tick falls
in a window). With 10 sessions, then with 10,000 (started through HTTP), it measures
windows in which nothing but the node talks to Redis:

* ``INFO commandstats`` before and after: every command Redis executed, those inside
  scripts included;
* ``MONITOR`` over exactly the same window (it is delimited by the two ``INFO`` calls):
  every command the node sent, each ``EVALSHA`` told apart by its script, and the
  commands each script ran inside Redis.

Commands the node sends are sorted into: lease renewal (the heartbeat script), the
maintenance pass, connection health checks (``PING``), the sessions' own work (emit,
checkpoint, ...), and anything else. A maintenance pass with nothing to do
(``fleet/runtime/maintenance.py``) reads the node's close index and its slot count in one
pipeline (``HGETALL`` + ``SCARD``), then asks for the expired nodes and counts the live ones
(the ``expired_nodes`` script, twice): each pass begins with that ``HGETALL``, which marks
it. Reading the slots (``SMEMBERS``) or every record (``watch``) would show up in the same
category: the pass does either only when something changed.

A pass's own time is measured on the node: a ``sitecustomize`` module put on its
``PYTHONPATH`` wraps ``Maintenance.run_pass`` and writes each pass's wall time and the CPU
time of the node's main thread over it (fleet itself is unchanged). That CPU time is the
pass's loop time, plus whatever else ran while it waited for Redis (little, on an idle
node). Two more views come from ``MONITOR``: a pass's span there (first command to last),
and the interval between passes minus the 5 s the loop sleeps, which also holds how late
the loop woke the pass.
"""

from __future__ import annotations

import asyncio
import collections
import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common

NAME = "heartbeat_cost"
TITLE = "heartbeat_cost: Redis commands per node per minute, 10 vs 10,000 sessions"
WINDOW = 20.0
Get = Callable[["Window"], float]
QUICK_WINDOW = 11.0

LEASE, MAINTENANCE, HEALTH, WORK, OTHER = (
    "lease renewal",
    "maintenance pass",
    "health checks",
    "sessions' own work",
    "other",
)
SCRIPT_CATEGORY = {
    "heartbeat": LEASE,
    "expired_nodes": MAINTENANCE,
    "reap": MAINTENANCE,
    "forget_node": MAINTENANCE,
    "reassert": MAINTENANCE,
    "release": MAINTENANCE,  # a stray slot freed by the pass; a close also releases
    "watch": MAINTENANCE,  # every record, only after Redis lost data
}
COMMAND_CATEGORY = {
    "hgetall": MAINTENANCE,  # the node's close index: the first command of each pass
    "hdel": MAINTENANCE,  # the close requests taken
    "scard": MAINTENANCE,
    "smembers": MAINTENANCE,  # the slots, only when their count is off
    "ping": HEALTH,
    "xadd": WORK,
    "info": LEASE,  # the server's run id, read after each renewal (a failover's sign)
}
#: Seconds the maintenance loop sleeps between two passes (FLEET_MAINTENANCE_INTERVAL).
INTERVAL = 5.0
#: "A handful of commands" per pass, and "well under 10 ms" of loop time at 10,000
#: sessions, taken as at most half of it.
TARGET_COMMANDS = 5
TARGET_PASS = 0.010
WELL_UNDER = TARGET_PASS / 2
SITECUSTOMIZE = """\
import os, time
_path = os.environ.get("BENCH_PASS_LOG")
if _path:
    import fleet.runtime.maintenance as _maintenance

    _out = open(_path, "a", buffering=1)
    _run_pass = _maintenance.Maintenance.run_pass

    async def run_pass(self):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return await _run_pass(self)
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            _out.write(f"{time.time():.6f} {wall:.6f} {cpu:.6f}\\n")

    _maintenance.Maintenance.run_pass = run_pass
"""
_LINE = re.compile(r"^\+(?P<ts>\d+\.\d+) \[\d+ (?P<client>[^\]]+)\] (?P<args>.*)$")
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _script_names() -> dict[str, str]:
    """SHA1 -> script name, for every script in fleet/store/lua."""
    from fleet.store.scripts import Scripts, read_script

    return {read_script(name).sha: name for name in Scripts.NAMES}


@dataclass
class Window:
    seconds: float = 0.0
    sent: collections.Counter[str] = field(default_factory=collections.Counter)  # category
    inside: collections.Counter[str] = field(default_factory=collections.Counter)  # category
    sent_by_command: collections.Counter[str] = field(default_factory=collections.Counter)
    executed: collections.Counter[str] = field(default_factory=collections.Counter)  # stats
    pass_times: list[float] = field(default_factory=list)  # each pass's HGETALL
    # Each pass's maintenance commands, as (MONITOR time, command), in order.
    pass_commands: list[list[tuple[float, str]]] = field(default_factory=list)
    renewal_times: list[float] = field(default_factory=list)  # each heartbeat call
    other: collections.Counter[str] = field(default_factory=collections.Counter)
    start: float = 0.0  # MONITOR (unix) times of the window's two INFO calls
    end: float = 0.0
    # Each pass the node ran in the window, as it timed it: wall and main-thread CPU seconds.
    pass_wall: list[float] = field(default_factory=list)
    pass_cpu: list[float] = field(default_factory=list)

    @property
    def passes(self) -> int:
        return len(self.pass_times)

    def whole_passes(self) -> list[list[tuple[float, str]]]:
        """The passes that began at least a second before the window closed: the ones
        whose every command is in the window."""
        return [p for p in self.pass_commands if p and p[0][0] <= self.end - 1.0]

    def commands_per_pass(self) -> float:
        whole = self.whole_passes()
        return sum(len(p) for p in whole) / len(whole) if whole else math.nan

    def pass_span(self) -> float:
        """The longest span, first to last command, of a pass in the window (seconds)."""
        return max((p[-1][0] - p[0][0] for p in self.whole_passes()), default=math.nan)

    def pass_interval_excess(self) -> float:
        """The mean interval between passes minus the sleep: the pass's wall time plus how
        late the loop woke it."""
        return 60.0 / self.passes_per_min() - INTERVAL if self.passes > 1 else math.nan

    def pass_cpu_max(self) -> float:
        """The longest main-thread CPU time of a pass in the window (seconds)."""
        return max(self.pass_cpu, default=math.nan)

    def pass_wall_max(self) -> float:
        return max(self.pass_wall, default=math.nan)

    def per_min(self, n: float) -> float:
        return n * 60.0 / self.seconds if self.seconds > 0 else float("nan")

    def passes_per_min(self) -> float:
        """From the mean interval between passes: a window holds a whole number of passes,
        which would make a count jump (3 or 4 passes in 20 s)."""
        if self.passes < 2:
            return self.per_min(self.passes)
        return 60.0 * (self.passes - 1) / (self.pass_times[-1] - self.pass_times[0])

    def per_pass_per_min(self, n: float) -> float:
        """Maintenance commands per minute: per pass, times passes per minute."""
        if self.passes == 0:
            return self.per_min(n)
        return n / self.passes * self.passes_per_min()

    def longest_renewal_gap(self) -> float:
        times = self.renewal_times
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=math.nan)


class Monitor:
    """Reads ``MONITOR`` between two ``INFO commandstats`` calls and sorts what it sees."""

    def __init__(self, port: int, scripts: dict[str, str], pass_key: str) -> None:
        """``pass_key``: the node's close index, whose ``HGETALL`` opens each pass."""
        self.port = port
        self.scripts = scripts
        self.pass_key = pass_key

    async def window(self, redis: Any, seconds: float) -> Window:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=2**24)
        out = Window()
        try:
            writer.write(b"MONITOR\r\n")
            await writer.drain()
            if not (await reader.readline()).startswith(b"+OK"):
                raise RuntimeError("MONITOR was refused")
            read = asyncio.create_task(self._read(reader, out))
            before = await redis.info("commandstats")
            await asyncio.sleep(seconds)
            after = await redis.info("commandstats")
            await asyncio.wait_for(read, 30)
        finally:
            writer.close()
        for key, value in after.items():
            name = key.removeprefix("cmdstat_")
            prev = before.get(key, {}).get("calls", 0)
            if name not in ("info", "monitor") and value["calls"] > prev:
                out.executed[name] = int(value["calls"]) - int(prev)
        return out

    async def _read(self, reader: asyncio.StreamReader, out: Window) -> None:
        marks: list[float] = []
        category = OTHER  # of the last script a client called: its inside commands follow
        while len(marks) < 2:
            m = _LINE.match((await reader.readline()).decode("utf-8", "replace").rstrip())
            if m is None:
                continue
            tokens = _TOKEN.findall(m["args"][:400])
            if not tokens:
                continue
            command = tokens[0].lower()
            if command == "info" and tokens[1:2] == ["commandstats"]:
                marks.append(float(m["ts"]))  # this benchmark's own: the window's bounds
                continue
            if not marks:
                continue
            if m["client"] == "lua":
                out.inside[category] += 1
                continue
            out.sent_by_command[command] += 1
            category = self._category(command, tokens, out)
            out.sent[category] += 1
            ts = float(m["ts"])
            if category == LEASE:
                out.renewal_times.append(ts)
            if command == "hgetall" and len(tokens) > 1 and tokens[1] == self.pass_key:
                out.pass_times.append(ts)
                out.pass_commands.append([])
            if category == MAINTENANCE and out.pass_commands:
                label = command if command != "evalsha" else f"evalsha {self._script(tokens)}"
                out.pass_commands[-1].append((ts, label))
        out.seconds = marks[1] - marks[0]
        out.start, out.end = marks

    def _script(self, tokens: list[str]) -> str:
        return self.scripts.get(tokens[1], "unknown script") if len(tokens) > 1 else "?"

    def _category(self, command: str, tokens: list[str], out: Window) -> str:
        if command in ("evalsha", "eval") and len(tokens) > 1:
            script = self._script(tokens)
            out.sent_by_command[command] -= 1
            out.sent_by_command[f"evalsha {script}"] += 1
            category = SCRIPT_CATEGORY.get(script, WORK)
        else:
            category = COMMAND_CATEGORY.get(command, OTHER)
        if category == OTHER:
            out.other[command] += 1
        return category


def _call_names(size: int) -> Callable[[int], str]:
    return lambda i: f"hb-{size}-{i % 1000}"


async def _measure(
    fleet: Any, sizes: list[int], runs: int, seconds: float
) -> dict[int, list[Window]]:
    import redis.asyncio

    from fleet.store.keys import Keys

    node = fleet.nodes[0]
    monitor = Monitor(fleet.redis.port, _script_names(), Keys(fleet.prefix).node_closes(node.name))
    client = redis.asyncio.Redis.from_url(fleet.redis.url, decode_responses=True)
    results: dict[int, list[Window]] = {}
    running = 0
    try:
        for size in sizes:
            began = time.monotonic()
            started = await common.start_sessions(
                [node.port],
                size - running,
                {"interval": 3600},
                _call_names(size),
                concurrency=64,
                label=f"starting sessions to reach {size:,}",
            )
            running += len(started)
            common.progress(
                f"{running:,} sessions running ({len(started):,} started in "
                f"{time.monotonic() - began:.1f}s); letting a maintenance pass go by"
            )
            await asyncio.sleep(6.0)
            results[size] = []
            for i in range(runs):
                w = await monitor.window(client, seconds)
                common.progress(
                    f"{size:,} sessions, window {i + 1}/{runs} ({w.seconds:.1f}s): "
                    + ", ".join(f"{k} {w.per_min(v):,.0f}/min" for k, v in sorted(w.sent.items()))
                )
                results[size].append(w)
    finally:
        await client.aclose()
    return results


def run(opts: common.Options) -> common.Report:
    sizes = [10, 500] if opts.quick else [10, 10_000]
    seconds = QUICK_WINDOW if opts.quick else WINDOW
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        passes = Path(tmp) / "passes.txt"
        with common.local_fleet(
            1,
            FLEET_NODE_TTL="3",
            FLEET_MAINTENANCE_INTERVAL="5",
            FLEET_LOG_LEVEL="warning",
            PYTHONPATH=tmp,
            BENCH_PASS_LOG=str(passes),
        ) as fleet:
            results = asyncio.run(_measure(fleet, sizes, opts.runs, seconds))
        timed = [tuple(map(float, line.split())) for line in passes.read_text().splitlines()]
    for windows in results.values():
        for w in windows:
            for at, wall, cpu in timed:
                if w.start <= at <= w.end:
                    w.pass_wall.append(wall)
                    w.pass_cpu.append(cpu)
    return _report(opts, sizes, seconds, results)


def _sent_total(w: Window) -> float:
    """Per minute: maintenance at its per-pass rate, the rest as counted."""
    maintenance = w.sent[MAINTENANCE]
    return w.per_min(sum(w.sent.values()) - maintenance) + w.per_pass_per_min(maintenance)


def _executed_total(w: Window) -> float:
    maintenance = w.sent[MAINTENANCE] + w.inside[MAINTENANCE]
    return w.per_min(sum(w.executed.values()) - maintenance) + w.per_pass_per_min(maintenance)


class _Table:
    """Figures across the windows of the two sizes."""

    def __init__(self, sizes: list[int], results: dict[int, list[Window]]) -> None:
        self.small, self.large = sizes
        self.results = results

    def each(self, size: int, rate: Get) -> common.Agg:
        return common.Agg.of(rate(w) for w in self.results[size])

    def per_min(self, size: int, count: Get) -> common.Agg:
        return self.each(size, lambda w: w.per_min(count(w)))

    def rate_row(self, label: str, rate: Get, unit: str = "", digits: int = 1) -> list[str]:
        return [
            label,
            self.each(self.small, rate).fmt(unit, digits),
            self.each(self.large, rate).fmt(unit, digits),
        ]

    def row(self, label: str, count: Get) -> list[str]:
        return self.rate_row(label, lambda w: w.per_min(count(w)))

    def head(self, first: str) -> list[str]:
        return [first, f"{self.small:,} sessions", f"{self.large:,} sessions"]

    def main(self) -> list[str]:
        rows = [
            self.row("**lease renewal** (the heartbeat script, then `INFO` for the run id)",
                     lambda w: w.sent[LEASE]),
            self.row("…commands the heartbeat script runs inside Redis",
                     lambda w: w.inside[LEASE]),
            self.row("connection health checks (`PING`)", lambda w: w.sent[HEALTH]),
            self.rate_row("maintenance passes", lambda w: w.passes_per_min()),
            self.rate_row("maintenance commands (`HGETALL`, `SCARD`, expired-nodes script "
                          "×2)", lambda w: w.per_pass_per_min(w.sent[MAINTENANCE])),
            self.rate_row("…commands maintenance scripts run inside Redis",
                          lambda w: w.per_pass_per_min(w.inside[MAINTENANCE])),
            self.row("sessions' own work (emit, checkpoint, …)", lambda w: w.sent[WORK]),
            self.row("other", lambda w: w.sent[OTHER]),
            self.rate_row("**total sent by the node**", _sent_total),
            self.rate_row("total executed by Redis (`INFO commandstats`, scripts' insides "
                          "included)", _executed_total),
        ]  # fmt: skip
        return common.table(self.head("per minute"), rows)

    def timings(self) -> list[str]:
        rows = [
            self.rate_row(
                "longest gap between two renewals (interval: 1 s)",
                lambda w: w.longest_renewal_gap(),
                " s",
            ),
            self.rate_row(
                "maintenance pass interval (5 s + the pass itself)",
                lambda w: 60.0 / w.passes_per_min() if w.passes > 1 else math.nan,
                " s",
                3,
            ),
            self.ms_row("**a pass's loop time**: the node's main-thread CPU over it (the "
                        "longest of the window)", Window.pass_cpu_max),
            self.ms_row("a pass's wall time, on the node (the longest of the window)",
                        Window.pass_wall_max),
            self.ms_row("a pass's span in `MONITOR`, first command to last (the longest of "
                        "the window)", Window.pass_span),
            self.ms_row("the interval minus 5 s (the pass and how late the loop woke it)",
                        Window.pass_interval_excess),
        ]  # fmt: skip
        return common.table(self.head("timing"), rows)

    def ms_row(self, label: str, get: Get) -> list[str]:
        return [label, self.each(self.small, get).ms(1), self.each(self.large, get).ms(1)]

    def per_pass(self) -> list[str]:
        """What one pass sends, command by command (means over the window's passes)."""

        def count(label: str) -> Get:
            def get(w: Window) -> float:
                whole = w.whole_passes()
                n = sum(1 for p in whole for _, c in p if c == label)
                return n / len(whole) if whole else math.nan

            return get

        labels = sorted(
            {c for size in (self.small, self.large) for w in self.results[size]
             for p in w.whole_passes() for _, c in p}
        )  # fmt: skip
        rows = [self.rate_row(f"`{c}`", count(c), digits=2) for c in labels]
        rows.append(self.rate_row("**commands per pass**", Window.commands_per_pass, digits=2))
        return common.table(self.head("one pass sends"), rows)

    def breakdown(self, counts: Callable[[Window], collections.Counter[str]]) -> list[str]:
        names = {
            c for size in (self.small, self.large) for w in self.results[size] for c, n in
            counts(w).items() if n
        }  # fmt: skip

        def get(c: str) -> Get:
            return lambda w: counts(w)[c]

        ordered = sorted(names, key=lambda c: (-self.per_min(self.large, get(c)).median, c))
        return common.table(self.head("command"), [self.row(f"`{c}`", get(c)) for c in ordered])


def _report(
    opts: common.Options, sizes: list[int], seconds: float, results: dict[int, list[Window]]
) -> common.Report:
    t = _Table(sizes, results)
    small, large = sizes
    renew_small = t.per_min(small, lambda w: w.sent[LEASE])
    renew_large = t.per_min(large, lambda w: w.sent[LEASE])
    with_ping_small = t.per_min(small, lambda w: w.sent[LEASE] + w.sent[HEALTH])
    with_ping_large = t.per_min(large, lambda w: w.sent[LEASE] + w.sent[HEALTH])
    # The target: the renewal cost does not grow with the session count.
    same = renew_large.median <= renew_small.median + max(1.0, 0.03 * renew_small.median)
    late = renew_large.median < renew_small.median - max(1.0, 0.03 * renew_small.median)
    gap_large = t.each(large, lambda w: w.longest_renewal_gap())
    per_pass = {size: t.each(size, Window.commands_per_pass) for size in sizes}
    duration = {size: t.each(size, Window.pass_cpu_max) for size in sizes}
    wall = t.each(large, Window.pass_wall_max)
    woke = {size: t.each(size, Window.pass_interval_excess) for size in sizes}
    flat = per_pass[large].median <= per_pass[small].median + 0.5
    handful = per_pass[large].median <= TARGET_COMMANDS and flat
    quick = duration[large].median <= WELL_UNDER
    body = [
        f"One node, `FLEET_NODE_TTL=3` (lease renewed every second), "
        f"`FLEET_MAINTENANCE_INTERVAL=5`, `FLEET_LOG_LEVEL=warning`; idle counters "
        f"(`interval` 3600). {opts.runs} windows of {seconds:.0f} s at each size, scaled to "
        "one minute; the sessions are started once per size (through HTTP, 64 in flight) "
        "and the node then runs undisturbed. A window is delimited by two "
        "`INFO commandstats` calls; `MONITOR` over the same window tells the node's "
        "commands apart. Targets: the lease renewal costs the same per minute at "
        f"{small:,} and at {large:,} sessions; at {large:,} sessions a maintenance pass "
        f"sends a handful of commands (at most {TARGET_COMMANDS}, as many as at {small:,}) "
        f"and takes well under {TARGET_PASS * 1000:.0f} ms of loop time (taken as ≤ "
        f"{WELL_UNDER * 1000:.0f} ms).",
        "",
        *t.main(),
        "",
        *t.per_pass(),
        "",
        *t.timings(),
        "",
        f"Lease renewal: {renew_small.fmt(digits=1)} at {small:,} sessions vs "
        f"{renew_large.fmt(digits=1)} at {large:,}: {common.verdict(same)} (no more renewals "
        "at the larger size, within 3%). "
        f"With the health-check `PING`s: {with_ping_small.fmt(digits=1)} vs "
        f"{with_ping_large.fmt(digits=1)}.",
        "",
        f"The maintenance pass costs what changed, not what runs: "
        f"{per_pass[large].fmt(digits=1)} commands per pass at {large:,} sessions, "
        f"{per_pass[small].fmt(digits=1)} at {small:,} (target ≤ {TARGET_COMMANDS}, the same "
        f"at both sizes: {common.verdict(handful)}), in three round trips: the node's close "
        "index and slot count in one pipeline, then the expired nodes and the live-node "
        "count. It reads the slots only when their count differs from the sessions the node "
        "runs, and every record only after Redis lost data. A pass's loop time (the "
        f"node's CPU over it, the longest of a window) is {duration[large].ms(1)} at "
        f"{large:,} sessions and {duration[small].ms(1)} at {small:,} (target: well under "
        f"{TARGET_PASS * 1000:.0f} ms, ≤ {WELL_UNDER * 1000:.0f} ms: {common.verdict(quick)}); "
        "its wall time "
        f"{wall.ms(1)}, most of it waiting for Redis. The pass walks no session: it "
        "compares the slot count with the count of live sessions the node keeps as they "
        "start and end (`Maintenance.check_own_sessions`), and the loop time it holds is "
        "mostly whatever else ran while it waited (see the notes). The interval between "
        f"passes runs {woke[large].ms(1)} over 5 s at {large:,} sessions "
        f"({woke[small].ms(1)} at {small:,}): the pass's wall time plus how late the loop "
        "woke it, behind other work that falls due at the same time (the metrics report, "
        "also every 5 s, looks at every session's metrics in memory: "
        "`fleet/runtime/reports.py`).",
        "",
        "<details><summary>Commands sent by the node, per minute (MONITOR)</summary>",
        "",
        *t.breakdown(lambda w: w.sent_by_command),
        "",
        "</details>",
        "",
        "<details><summary>Commands executed by Redis, per minute (INFO commandstats, "
        "including those run inside scripts)</summary>",
        "",
        *t.breakdown(lambda w: w.executed),
        "",
        "</details>",
    ]
    notes = [
        "Maintenance rows are per pass times passes per minute (from the mean interval "
        f"between the window's passes): a {seconds:.0f} s window holds a whole number of "
        "passes, and a plain count would jump between two values. The totals use these "
        "rates too; the command tables are plain counts, scaled. *One pass sends* counts "
        "the commands from one pass's `HGETALL` to the next, over the passes that began "
        "at least a second before the window closed.",
        "A pass's loop time is the node's main-thread CPU from the pass's start to its end: "
        "it also holds whatever else ran while the pass waited for Redis (a lease renewal, "
        "a loop-lag probe), so it is an upper bound.",
        "The lease loop sleeps `FLEET_NODE_TTL / 3` between renewals, so a renewal's own "
        "duration and event-loop delays can make it slightly under 60 per minute.",
        "Health checks are redis-py's: a `PING` before using a connection idle for longer "
        "than `max(1, FLEET_NODE_TTL)` seconds, and on the pub/sub connection.",
        "`MONITOR` costs Redis some CPU but does not change what the node sends; the "
        "`INFO commandstats` figures leave out the benchmark's own `INFO` calls.",
    ]
    others: collections.Counter[str] = collections.Counter()
    for size in sizes:
        for w in results[size]:
            others.update(w.other)
    if others:
        notes.append(f"*other* were: {dict(others)} (all windows together).")
    if not same:
        notes.append("The node renews its lease more often at the larger size: target missed.")
    if late:
        notes.append(
            f"**Renewals come late at {large:,} sessions**: fewer than one a second, with up "
            f"to {gap_large.fmt(' s')} between two (the lease lives 3 s): the node's event "
            "loop is held up."
        )
    summary = (
        f"Lease renewal: {renew_small.fmt(digits=1)} commands/min at {small:,} sessions, "
        f"{renew_large.fmt(digits=1)} at {large:,} ({common.verdict(same)}). A maintenance "
        f"pass sends {per_pass[large].fmt(digits=1)} commands at {large:,} sessions "
        f"({per_pass[small].fmt(digits=1)} at {small:,}; target ≤ {TARGET_COMMANDS}: "
        f"{common.verdict(handful)}) and takes {duration[large].ms(1)} of loop time (target: "
        f"well under {TARGET_PASS * 1000:.0f} ms, ≤ {WELL_UNDER * 1000:.0f} ms: "
        f"{common.verdict(quick)})."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
