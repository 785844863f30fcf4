"""lookups: reading one call's sessions with 1,000 and with 100,000 sessions in Redis.

Two fleets of one node each, side by side: one with 1,000 sessions in Redis, one with
100,000; the windows alternate between them, so both sizes see the same machine. In
each, the looked-up call holds 5 sessions started through HTTP. The other sessions
(the background) are written straight into Redis with fleet's own scripts (``admit`` and
``create_session`` writing the record as running, pipelined, as ``Registry`` does), spread
over 1,000 other calls and owned by a made-up node whose lease is held for an hour (so no
node reaps them). Each run is, at each size, a window of 300 ``GET /calls/{c}/sessions``
and 300 ``GET /calls/{c}/sessions/{sid}``, interleaved, one at a time over a keep-alive
connection, after 20 warm-up requests. Per-call indexes answer both: neither should
depend on how many sessions other calls hold.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from bench import common

NAME = "lookups"
TITLE = "lookups: a call's sessions with 1,000 vs 100,000 sessions in Redis"
TARGET = 0.20
REQUESTS = 300
WARMUP = 20
CALL = "lookup"
OWN_SESSIONS = 5
BACKGROUND_CALLS = 1000
BATCH = 1000
FAKE_NODE = "bench-background-node"
SETTINGS = {
    "FLEET_NODE_TTL": "10",
    "FLEET_MAINTENANCE_INTERVAL": "5",
    "FLEET_LOG_LEVEL": "warning",
}


@dataclass
class Window:
    listing: list[float] = field(default_factory=list)
    one: list[float] = field(default_factory=list)


class Background:
    """Writes background sessions into Redis with fleet's scripts, under a made-up node."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio

        from fleet.settings import Settings
        from fleet.store.registry import Registry

        self.settings = Settings(redis_url=url, key_prefix=prefix, node_id=FAKE_NODE, node_ttl=3600)  # type: ignore[arg-type]
        self.redis = redis.asyncio.Redis.from_url(url, decode_responses=True)
        self.registry = Registry(self.redis, self.settings)
        self.count = 0

    async def __aenter__(self) -> Background:
        await self.registry.load()
        # It runs no worker, so placement and failover never pick it; the background
        # sessions are placed on it by name (worker "" = any).
        info = {"host": "bench", "started_at": repr(time.time()), "workers": ""}
        await self.registry.heartbeat(FAKE_NODE, {**info, "version": "bench"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.redis.aclose()

    def _calls(self, i: int) -> list[tuple[str, list[str], list[Any]]]:
        from fleet.models import SessionRecord, State
        from fleet.store.keys import make_ref

        k = self.registry.keys
        call_id, session_id = f"bg-{i % BACKGROUND_CALLS}", secrets.token_hex(16)
        record = SessionRecord(
            session_id=session_id,
            call_id=call_id,
            call_type="default",
            node_id=FAKE_NODE,
            params={"interval": 3600},
            state=State.RUNNING,
            started_at=time.time(),
        )
        admit = (
            "place",  # the keys and arguments of Registry.admit, without limits
            [
                k.nodes(),
                k.call_counts(),
                k.live(),
                k.settling(),
                k.node_loads(),
                k.node_sessions(FAKE_NODE),
                k.node_info(FAKE_NODE),
            ],
            [make_ref(call_id, session_id), call_id, -1, -1, "", "local", FAKE_NODE],
        )
        return [admit, self.registry._create_call(record)]

    async def fill(self, total: int) -> None:
        began = time.monotonic()
        while self.count < total:
            n = min(BATCH, total - self.count)
            calls = [c for i in range(self.count, self.count + n) for c in self._calls(i)]
            results = await self.registry.scripts.run_pipeline(calls)
            bad = [r for r in results[::2] if r[0] != "ok"]  # admit, create: per session
            if bad:
                raise RuntimeError(f"admission refused a background session: {bad[0]}")
            self.count += n
            if self.count % (total // 5 or 1) < BATCH:
                common.progress(f"background sessions: {self.count:,}/{total:,}")
        common.progress(f"{total:,} background sessions in {time.monotonic() - began:.1f}s")


async def prepare(fleet: Any, size: int) -> tuple[list[str], tuple[int, int]]:
    """The looked-up call's sessions (through HTTP) and ``size`` background sessions;
    the session ids, and Redis' key count and ``used_memory``."""
    node = fleet.nodes[0]
    sids = []
    async with common.RawHTTP("127.0.0.1", node.port) as conn:
        for _ in range(OWN_SESSIONS):
            status, body = await conn.request(
                "POST", f"/calls/{CALL}/sessions", {"params": {"interval": 3600}}
            )
            if status != 201:
                raise RuntimeError(f"start answered {status}: {body!r}")
            sids.append(json.loads(body)["session_id"])
    async with Background(fleet.redis.url, fleet.prefix) as background:
        await background.fill(size)
    r = common.redis_client(fleet.redis.url)
    memory = (int(r.dbsize()), int(r.info("memory")["used_memory"]))
    r.close()
    return sids, memory


async def measure(
    fleets: dict[int, Any], runs: int
) -> tuple[dict[int, list[Window]], dict[int, tuple[int, int]]]:
    """Windows at each size, alternating between the fleets (in ABBA order) so both see
    the same machine."""
    results: dict[int, list[Window]] = {size: [] for size in fleets}
    memory: dict[int, tuple[int, int]] = {}
    sids: dict[int, list[str]] = {}
    for size, fleet in fleets.items():
        sids[size], memory[size] = await prepare(fleet, size)
    for i in range(runs):
        order = list(fleets.items())
        for size, fleet in order if i % 2 == 0 else order[::-1]:  # ABBA: no size goes first
            async with common.RawHTTP("127.0.0.1", fleet.nodes[0].port) as conn:
                w = await window(conn, sids[size])
            results[size].append(w)
            common.progress(
                f"{size:,} background sessions, window {i + 1}/{runs}: list p50 "
                f"{common.quantile(w.listing, 0.5) * 1000:.2f} ms, one p50 "
                f"{common.quantile(w.one, 0.5) * 1000:.2f} ms"
            )
    return results, memory


async def window(conn: common.RawHTTP, sids: list[str]) -> Window:
    out = Window()
    for i in range(WARMUP + REQUESTS):
        began = time.perf_counter()
        status, body = await conn.request("GET", f"/calls/{CALL}/sessions")
        listed = time.perf_counter() - began
        if status != 200 or len(json.loads(body)["sessions"]) != OWN_SESSIONS:
            raise RuntimeError(f"list answered {status}: {body[:200]!r}")
        began = time.perf_counter()
        status, body = await conn.request("GET", f"/calls/{CALL}/sessions/{sids[i % len(sids)]}")
        one = time.perf_counter() - began
        if status != 200:
            raise RuntimeError(f"get answered {status}: {body[:200]!r}")
        if i >= WARMUP:
            out.listing.append(listed)
            out.one.append(one)
    return out


def run(opts: common.Options) -> common.Report:
    sizes = [1000, 10_000] if opts.quick else [1000, 100_000]
    load_before = common.load_average()
    with (
        common.local_fleet(1, **SETTINGS) as small,
        common.local_fleet(1, **SETTINGS) as large,
    ):
        fleets = {sizes[0]: small, sizes[1]: large}
        results, memory = asyncio.run(measure(fleets, opts.runs))
    return report(opts, sizes, results, memory, load_before)


def report(
    opts: common.Options,
    sizes: list[int],
    results: dict[int, list[Window]],
    memory: dict[int, tuple[int, int]],
    load_before: str,
) -> common.Report:
    small, large = sizes

    def agg(size: int, what: str, q: float) -> common.Agg:
        return common.Agg.of(common.quantile(getattr(w, what), q) for w in results[size])

    def change(what: str, q: float) -> float:
        a, b = agg(small, what, q).median, agg(large, what, q).median
        return (b - a) / a

    rows = []
    verdicts = []
    for what, label in (("listing", f"GET /calls/{{c}}/sessions ({OWN_SESSIONS} sessions)"),
                        ("one", "GET /calls/{c}/sessions/{sid}")):  # fmt: skip
        for q, qname in ((0.5, "p50"), (0.99, "p99")):
            d = change(what, q)
            ok = abs(d) <= TARGET
            if q == 0.5:
                verdicts.append(ok)
            rows.append(
                [
                    f"{label} {qname}",
                    agg(small, what, q).ms(),
                    agg(large, what, q).ms(),
                    f"{d * 100:+.0f} %",
                    common.verdict(ok) if q == 0.5 else ("within 20 %" if ok else "over 20 %"),
                ]
            )
    met = all(verdicts)
    body = [
        "Two one-node fleets side by side, one per size (`FLEET_NODE_TTL=10`, "
        "`FLEET_MAINTENANCE_INTERVAL=5`, `FLEET_LOG_LEVEL=warning`); the windows alternate "
        "between them, so both sizes see the same machine. The looked-up call has "
        f"{OWN_SESSIONS} live sessions "
        "started through HTTP; the background sessions are written into Redis with fleet's "
        "scripts (`admit`, `create_session`, pipelined) over "
        f"{BACKGROUND_CALLS:,} other calls, owned by a made-up node whose lease is held "
        f"for the run. {opts.runs} windows per size of {REQUESTS} list and {REQUESTS} "
        f"single reads, interleaved, one at a time over a keep-alive connection (after "
        f"{WARMUP} warm-up pairs). Target: the two sizes within {TARGET * 100:.0f} % of each "
        "other (p50; p99 shown too).",
        "",
        *common.table(
            ["request", f"{small:,} in Redis", f"{large:,} in Redis", "change", "target"],
            rows,
        ),
        "",
        f"Both lookups within {TARGET * 100:.0f} % at {small:,} and {large:,} sessions (p50): "
        f"{common.verdict(met)}.",
    ]
    notes = [
        f"Redis held {memory[small][0]:,} keys ({memory[small][1] / 2**20:,.1f} MiB) at "
        f"{small:,} background sessions and {memory[large][0]:,} keys "
        f"({memory[large][1] / 2**20:,.1f} MiB) at {large:,}.",
        "A list is two round trips (the call's live and ended indexes in one pipeline, then "
        "the records in another); a single read is one `HGETALL`. Neither touches a "
        "fleet-wide key.",
        common.load_note(load_before),
    ]
    summary = (
        f"With {large:,} instead of {small:,} sessions in Redis: list p50 "
        f"{agg(small, 'listing', 0.5).ms()} → {agg(large, 'listing', 0.5).ms()}, single read "
        f"p50 {agg(small, 'one', 0.5).ms()} → {agg(large, 'one', 0.5).ms()} (target: within "
        f"{TARGET * 100:.0f} %: {common.verdict(met)})."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
