"""What every benchmark shares: options, statistics, progress, the machine description,
the results file and a few helpers around a local fleet.

A benchmark is a module ``bench/<name>.py`` with

* ``NAME: str``: the name on the command line and in the markers of ``docs/benchmarks.md``
  (``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``);
* ``TITLE: str``: the section heading;
* ``def run(opts: Options) -> Report``: starts what it needs, measures, and returns the
  report. It does not assert: a missed target is a note, not a failure.

``python -m bench`` finds the modules, runs them and writes one section per benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks.md"
T = TypeVar("T")


# -- options and reports --------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    runs: int = 5
    quick: bool = False
    command: str = "python -m bench"


@dataclass
class Report:
    """What a benchmark hands back: markdown lines for its section."""

    name: str
    title: str
    summary: str
    body: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# -- progress -------------------------------------------------------------------------------
_T0 = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr, with the seconds since the suite started."""
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- statistics -----------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Agg:
    """One figure across runs: the median, and the spread (min and max)."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Agg:
        data = [v for v in values if not math.isnan(v)]
        if not data:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(data), min(data), max(data), len(data))

    def fmt(self, unit: str = "", digits: int = 2, scale: float = 1.0) -> str:
        """``median (min–max)``, values multiplied by ``scale``."""
        if self.n == 0:
            return "n/a"

        def one(x: float) -> str:
            return f"{x * scale:,.{digits}f}"

        if self.n == 1:
            return f"{one(self.median)}{unit}"
        return f"{one(self.median)}{unit} ({one(self.low)}–{one(self.high)})"

    def ms(self, digits: int = 2) -> str:
        return self.fmt(" ms", digits, 1000.0)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


# -- Prometheus histograms ------------------------------------------------------------------
_BUCKET = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)_bucket\{(?P<labels>[^}]*)\} (?P<v>\S+)$")


def histogram_buckets(metrics_text: str, name: str) -> dict[float, float]:
    """Cumulative counts by upper bound of one label-less histogram in Prometheus text."""
    out: dict[float, float] = {}
    for line in metrics_text.splitlines():
        m = _BUCKET.match(line)
        if not m or m["name"] != name:
            continue
        le = re.search(r'le="([^"]+)"', m["labels"])
        if le:
            out[float(le[1])] = out.get(float(le[1]), 0.0) + float(m["v"])
    return out


def bucket_delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: n - before.get(le, 0.0) for le, n in after.items()}


def bucket_quantile(cumulative: dict[float, float], q: float) -> float:
    """Estimate a quantile from cumulative bucket counts, as Prometheus'
    ``histogram_quantile`` does (linear within the bucket)."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return math.nan
    rank = q * cumulative[bounds[-1]]
    prev_le, prev_n = 0.0, 0.0
    for le in bounds:
        n = cumulative[le]
        if n >= rank:
            if math.isinf(le):
                return prev_le
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return bounds[-1]


# -- the machine ----------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def redis_server_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v=(\S+)", out)
    return m[1] if m else out.strip()


def machine() -> dict[str, str]:
    cpuinfo = _read("/proc/cpuinfo")
    m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    cpu = m[1].strip() if m else platform.processor() or "unknown"
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', _read("/etc/os-release"), re.MULTILINE)
    os_name = pretty[1] if pretty else platform.system()
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count() or "?"),
        "memory": f"{int(mem[1]) / 1024 / 1024:.1f} GiB" if mem else "unknown",
        "OS": f"{os_name}, kernel {platform.release()}",
        "Python": platform.python_version(),
        "redis-server": redis_server_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(info: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in info.items())


# -- the results file -----------------------------------------------------------------------
INTRO = """\
# Benchmarks

What fleet costs and how fast it reacts, measured on a real `redis-server` and real
`fleet serve` processes on loopback (the multi-node test harness, `LocalFleet`). Each
benchmark has its own section below, rewritten in place by the suite; the rest of this
file is left alone.

Rerun everything with `python -m bench` (from the repository root, in the project's
virtualenv, with `redis-server` on the `PATH`), or one benchmark with
`python -m bench close_latency`. `--runs N` sets the number of runs (default 5) and
`--quick` runs a small smoke version (its figures are not comparable, and it only prints
them unless `--output FILE` is given). Progress goes to stderr.

How to read the figures: each is the **median across runs** and, in brackets, the
**spread (min–max) across runs**. Latency quantiles (p50, p99) are computed within each
run, then the median of those is shown. These numbers come from a shared, noisy 2-core
virtual machine on which the client, Redis and every node compete for the same two
cores: treat them as orders of magnitude and regressions to look into, not as capacity
figures for a production deployment. Benchmarks report; they do not assert. A missed
target is marked **missed**.
"""


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def render(report: Report, info: dict[str, str], command: str) -> str:
    lines = [
        f"## {report.title}",
        "",
        report.summary,
        "",
        f"Command: `{command}` ({report.seconds:.0f} s)  ",
        f"Machine: {machine_line(info)}",
        "",
        *report.body,
    ]
    if report.notes:
        lines += ["", *(f"- {note}" for note in report.notes)]
    return "\n".join(lines).rstrip() + "\n"


def update_section(path: Path, name: str, content: str) -> None:
    """Replace the section between the markers of ``name``, or append it."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else INTRO
    block = f"{begin}\n{content.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- a local fleet --------------------------------------------------------------------------
def _harness() -> Any:
    """``tests.multinode.harness`` (the repository root must be importable)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.multinode import harness

    return harness


@contextlib.contextmanager
def local_fleet(nodes: int, **settings: str) -> Iterator[Any]:
    """A ``LocalFleet``: a fresh redis-server and ``nodes`` ``fleet serve`` processes."""
    harness = _harness()
    fleet = harness.LocalFleet(nodes, **settings)
    progress(f"starting redis-server and {nodes} node(s) ({fleet.prefix})")
    try:
        fleet.__enter__()
    except BaseException:
        # LocalFleet.__enter__ leaves Redis and the started nodes running when a node
        # fails to get ready: stop them here.
        fleet.__exit__(None, None, None)
        raise
    try:
        yield fleet
    finally:
        fleet.__exit__(None, None, None)


def async_client(concurrency: int = 64, timeout: float = 30.0) -> httpx.AsyncClient:
    """A keep-alive client with room for ``concurrency`` requests in flight."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


async def bounded(
    count: int, concurrency: int, make: Callable[[int], Awaitable[T]]
) -> list[T | BaseException]:
    """Run ``make(i)`` for i in range(count) with at most ``concurrency`` in flight; results
    (or the exception raised) in order."""
    results: list[T | BaseException] = [RuntimeError("not run")] * count
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < count:
            i = next_i
            next_i += 1
            try:
                results[i] = await make(i)
            except Exception as exc:  # reported by the caller, never raised
                results[i] = exc

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return results


async def fan_out(
    ports: Sequence[int],
    count: int,
    concurrency: int,
    make: Callable[[int, RawHTTP], Awaitable[T]],
) -> list[T | BaseException]:
    """Run ``make(i, conn)`` for i in range(count), at most ``concurrency`` at a time, where
    ``conn`` is a keep-alive connection to ``ports[i % len(ports)]`` (round-robin over the
    nodes). Each of the ``concurrency`` lanes holds one connection per port, so the client
    does no pool bookkeeping per request (httpx's pool costs several ms of CPU per request
    with hundreds of connections). Results, or the exception raised, in order."""
    results: list[T | BaseException] = [RuntimeError("not run")] * count
    next_i = 0

    async def lane() -> None:
        nonlocal next_i
        conns: dict[int, RawHTTP] = {}
        try:
            while next_i < count:
                i = next_i
                next_i += 1
                port = ports[i % len(ports)]
                try:
                    if port not in conns:
                        conns[port] = await RawHTTP("127.0.0.1", port).__aenter__()
                    results[i] = await make(i, conns[port])
                except Exception as exc:  # reported by the caller, never raised
                    results[i] = exc
                    broken = conns.pop(port, None)
                    if broken is not None:
                        await broken.__aexit__()
        finally:
            for conn in conns.values():
                await conn.__aexit__()

    await asyncio.gather(*(lane() for _ in range(min(concurrency, count))))
    return results


async def start_sessions(
    ports: Sequence[int],
    count: int,
    params: dict[str, Any],
    call: Callable[[int], str],
    concurrency: int = 32,
    label: str = "starting sessions",
) -> list[tuple[str, str]]:
    """Start ``count`` sessions round-robin over the nodes at ``ports``; (call_id,
    session_id) of each 201, in order. Shows progress every 10%."""
    step = max(1, count // 10)
    done = 0

    async def one(i: int, conn: RawHTTP) -> tuple[str, str] | None:
        nonlocal done
        call_id = call(i)
        status, body = await conn.request("POST", f"/calls/{call_id}/sessions", {"params": params})
        done += 1
        if done % step == 0:
            progress(f"{label}: {done:,}/{count:,}")
        if status != 201:
            return None
        return call_id, str(json.loads(body)["session_id"])

    out = await fan_out(ports, count, concurrency, one)
    return [r for r in out if isinstance(r, tuple)]


async def start_idle(
    port: int, count: int, call_prefix: str, interval: float, refused: dict[str, int]
) -> int:
    """Start ``count`` idle counters on one node (64 in flight, calls ``<prefix>-0`` to
    ``<prefix>-999``), retrying refusals up to 5 times. Counts refusals by status and code
    in ``refused``; returns how many started."""

    async def one(i: int, conn: RawHTTP) -> bool:
        status, body = await conn.request(
            "POST", f"/calls/{call_prefix}-{i % 1000}/sessions", {"params": {"interval": interval}}
        )
        if status != 201:
            code = f"{status} {json.loads(body).get('code', '?')}"
            refused[code] = refused.get(code, 0) + 1
        return status == 201

    started = 0
    for _ in range(5):
        out = await fan_out([port], count - started, 64, one)
        started += sum(1 for o in out if o is True)
        if started >= count:
            break
        await asyncio.sleep(0.5)
    return started


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive client on one connection, one request at a time.

    For sequential latency loops: httpx adds about a millisecond of its own per request on
    this kind of machine, which would hide what the server does. Bodies must come with a
    Content-Length (every fleet response does).

    Like httpx, it does not reuse a connection that sat idle for ``KEEPALIVE_EXPIRY``
    seconds: uvicorn closes idle keep-alive connections after 5 s, and a request sent as
    it does so would fail without having reached the server."""

    KEEPALIVE_EXPIRY = 4.0

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_used = 0.0

    async def __aenter__(self) -> RawHTTP:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._disconnect()

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._last_used = time.monotonic()

    async def _disconnect(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """Send one request (``body``: JSON-able, or None) and read the whole answer
        (30 s at most)."""
        return await asyncio.wait_for(self._request(method, path, body), 30.0)

    async def _request(self, method: str, path: str, body: Any) -> tuple[int, bytes]:
        if self._writer is None or time.monotonic() - self._last_used > self.KEEPALIVE_EXPIRY:
            await self._disconnect()
            await self._connect()
        assert self._reader is not None and self._writer is not None
        payload = b"" if body is None else json.dumps(body).encode()
        kind = "Content-Type: application/json\r\n" if body is not None else ""
        self._writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{kind}"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await self._writer.drain()
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await self._reader.readexactly(length) if length else b""
        self._last_used = time.monotonic()
        return status, body


def redis_client(url: str) -> Any:
    """A synchronous redis-py client (decoded replies) for reading the truth."""
    import redis

    return redis.Redis.from_url(url, decode_responses=True)


def commandstats(client: Any) -> dict[str, int]:
    """Calls per command, from ``INFO commandstats``."""
    raw: dict[str, Any] = client.info("commandstats")
    out: dict[str, int] = {}
    for key, value in raw.items():
        name = key.removeprefix("cmdstat_")
        out[name] = int(value["calls"]) if isinstance(value, dict) else 0
    return out


# -- processes ------------------------------------------------------------------------------
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads), from /proc."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return math.nan
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (``VmRSS``), in bytes; 0 if unknown."""
    m = re.search(r"^VmRSS:\s*(\d+) kB", _read(f"/proc/{pid}/status"), re.MULTILINE)
    return int(m[1]) * 1024 if m else 0


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat: the
    difference of two readings says how loaded the machine was in between."""
    line = _read("/proc/stat").split("\n", 1)[0].split()
    values = [int(v) / _CLOCK_TICKS for v in line[1:]]
    if len(values) < 5:
        return math.nan, math.nan
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, for notes on how busy the machine was."""
    parts = _read("/proc/loadavg").split()
    return " / ".join(parts[:3]) if len(parts) >= 3 else "unknown"


def load_note(before: str) -> str:
    """The notes' line on how busy the machine was: ``before`` is ``load_average()`` taken
    when the benchmark began; the load now is read here."""
    return (
        f"Load average (1/5/15 min) before: {before}; after: {load_average()}. "
        "Other agents' tests share the machine's two cores."
    )
