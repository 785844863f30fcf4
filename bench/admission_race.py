"""admission_race: many racing starts against a limit, across three nodes.

Two scenarios, each on its own fleet of three nodes, reused across its runs:

* ``max_sessions``: ``FLEET_MAX_SESSIONS=100``; every start names its own call;
* ``per_call``: ``FLEET_MAX_SESSIONS_PER_CALL=1``; every start names the same call.

A run fires 10,000 starts (256 in flight, round-robin over the nodes) of an idle counter,
counts the 201s and reads the Redis truth (the live zset; for ``per_call`` also the call's
count and live index) while the race runs and after it. Then it closes every admitted
session and checks that no slot leaked: the call-counts hash, the live zset and every
node's session set are empty.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bench import common

NAME = "admission_race"
TITLE = "admission_race: racing starts against the admission limits"
CONCURRENCY = 256
RACE_CALL = "race-one-call"


@dataclass(frozen=True)
class Scenario:
    name: str
    limit: int
    settings: dict[str, str]
    same_call: bool
    what: str


SCENARIOS = (
    Scenario(
        "max_sessions",
        100,
        {"FLEET_MAX_SESSIONS": "100"},
        False,
        "`FLEET_MAX_SESSIONS=100`, every start on its own call",
    ),
    Scenario(
        "per_call",
        1,
        {"FLEET_MAX_SESSIONS_PER_CALL": "1"},
        True,
        "`FLEET_MAX_SESSIONS_PER_CALL=1`, every start on the same call",
    ),
)


@dataclass
class Run:
    created: int = 0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    redis_peak: int = 0  # the largest live count seen in Redis during the race
    redis_after: int = 0  # the live count in Redis once the race is over
    seconds: float = 0.0
    close_failures: int = 0
    leaked: dict[str, int] = field(default_factory=dict)

    def over(self, limit: int) -> int:
        return max(0, self.created - limit)

    def redis_over(self, limit: int) -> int:
        return max(0, self.redis_peak - limit, self.redis_after - limit)

    @property
    def leaked_total(self) -> int:
        return sum(self.leaked.values())


class Truth:
    """Reads what Redis holds, for a scenario."""

    def __init__(self, fleet: Any, scenario: Scenario) -> None:
        from fleet.store.keys import Keys

        self.keys = Keys(fleet.prefix)
        self.redis = common.redis_client(fleet.redis.url)
        self.node_ids = [n.name for n in fleet.nodes]
        self.scenario = scenario

    def live(self) -> int:
        """The admitted sessions by Redis' own books (for ``per_call``: the call's)."""
        k = self.keys
        if self.scenario.same_call:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcard(k.live())
            pipe.hget(k.call_counts(), RACE_CALL)
            pipe.zcard(k.call_live(RACE_CALL))
            total, count, call_live = pipe.execute()
            return max(int(total), int(count or 0), int(call_live))
        return int(self.redis.zcard(k.live()))

    def leaks(self) -> dict[str, int]:
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(k.call_counts())
        pipe.zcard(k.live())
        for node_id in self.node_ids:
            pipe.scard(k.node_sessions(node_id))
        counts, live, *sets = pipe.execute()
        return {
            "call_counts": sum(int(v) for v in counts.values()) + len(counts),
            "live_zset": int(live),
            "node_sessions": sum(int(n) for n in sets),
        }

    def close(self) -> None:
        self.redis.close()


async def _race(fleet: Any, scenario: Scenario, truth: Truth, starts: int, tag: str) -> Run:
    ports = [n.port for n in fleet.nodes]
    out = Run()
    admitted: list[tuple[str, str]] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            out.redis_peak = max(out.redis_peak, await asyncio.to_thread(truth.live))
            await asyncio.sleep(0.01)

    async def start(i: int, conn: common.RawHTTP) -> None:
        call_id = RACE_CALL if scenario.same_call else f"race-{tag}-{i}"
        status, body = await conn.request(
            "POST", f"/calls/{call_id}/sessions", {"params": {"interval": 3600}}
        )
        if status == 201:
            admitted.append((call_id, str(json.loads(body)["session_id"])))
            out.statuses["201"] += 1
        else:
            try:
                code = str(json.loads(body).get("code", ""))
            except ValueError:
                code = ""
            out.statuses[f"{status} {code}".strip()] += 1

    watcher = asyncio.create_task(watch())
    t0 = time.perf_counter()
    results = await common.fan_out(ports, starts, CONCURRENCY, start)
    out.seconds = time.perf_counter() - t0
    done.set()
    await watcher
    for r in results:
        if isinstance(r, BaseException):
            out.statuses[f"error {type(r).__name__}"] += 1
    out.created = len(admitted)
    out.redis_after = await asyncio.to_thread(truth.live)

    async def close(i: int, conn: common.RawHTTP) -> None:
        call_id, session_id = admitted[i]
        status, body = await conn.request(
            "DELETE", f"/calls/{call_id}/sessions/{session_id}?wait=10"
        )
        if status != 200 or json.loads(body).get("state") != "ended":
            out.close_failures += 1

    closes = await common.fan_out(ports, len(admitted), 32, close)
    out.close_failures += sum(isinstance(r, BaseException) for r in closes)
    out.leaked = await asyncio.to_thread(truth.leaks)
    return out


def _scenario(opts: common.Options, scenario: Scenario, starts: int) -> list[Run]:
    runs: list[Run] = []
    with common.local_fleet(3, FLEET_MAINTENANCE_INTERVAL="5", **scenario.settings) as fleet:
        truth = Truth(fleet, scenario)
        try:
            for i in range(opts.runs):
                common.progress(
                    f"{scenario.name} run {i + 1}/{opts.runs}: {starts:,} racing starts, "
                    f"{CONCURRENCY} in flight"
                )
                one = asyncio.run(_race(fleet, scenario, truth, starts, f"{i}"))
                common.progress(
                    f"{scenario.name} run {i + 1}: {one.created} created (limit "
                    f"{scenario.limit}), Redis peak {one.redis_peak}, "
                    f"{starts / one.seconds:,.0f} starts/s, statuses {dict(one.statuses)}, "
                    f"leaked {one.leaked}"
                )
                runs.append(one)
        finally:
            truth.close()
    return runs


def run(opts: common.Options) -> common.Report:
    starts = 1000 if opts.quick else 10_000
    results = {s.name: _scenario(opts, s, starts) for s in SCENARIOS}
    return _report(opts, starts, results)


def _report(opts: common.Options, starts: int, results: dict[str, list[Run]]) -> common.Report:
    rows = []
    notes = []
    worst_over = 0
    worst_leak = 0
    for scenario in SCENARIOS:
        runs = results[scenario.name]
        over = sum(r.over(scenario.limit) for r in runs)
        redis_over = sum(r.redis_over(scenario.limit) for r in runs)
        leaked = sum(r.leaked_total for r in runs)
        worst_over = max(worst_over, over, redis_over)
        worst_leak = max(worst_leak, leaked)
        statuses: collections.Counter[str] = collections.Counter()
        for r in runs:
            statuses.update(r.statuses)
        rows.append(
            [
                scenario.what,
                common.Agg.of(r.created for r in runs).fmt(digits=0),
                f"{over} / {redis_over}",
                str(leaked),
                common.Agg.of(starts / r.seconds for r in runs).fmt(digits=0),
                ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())),
            ]
        )
        close_failures = sum(r.close_failures for r in runs)
        if close_failures:
            notes.append(
                f"{scenario.name}: {close_failures} closes did not answer 200 ended within 10 s."
            )
        refused = {k: v for k, v in statuses.items() if k.startswith("503")}
        if refused:
            decided = sum(v for k, v in statuses.items() if k[:3] in ("201", "429"))
            notes.append(
                f"{scenario.name}: **{sum(refused.values()):,} starts were refused with 503** "
                f"({', '.join(f'{k}: {v:,}' for k, v in sorted(refused.items()))}); "
                f"{decided:,} of {starts * len(runs):,} reached the admission check. A 503 "
                "is not an admission decision, and a healthy fleet should not answer it "
                "under this load."
                + (
                    " A Redis call that fails on a node (`redis_unavailable`) marks it not "
                    "ready until its next lease renewal, so the starts it gets meanwhile are "
                    "refused as `not_ready`."
                    if "503 redis_unavailable" in refused and "503 not_ready" in refused
                    else ""
                )
            )
        if over or redis_over or leaked:
            notes.append(
                f"{scenario.name}: **target missed**: per run created "
                f"{[r.created for r in runs]}, Redis peak {[r.redis_peak for r in runs]}, "
                f"leaks {[r.leaked for r in runs]}."
            )
    body = [
        f"Per scenario, one fleet of 3 nodes and {opts.runs} runs; each run fires "
        f"{starts:,} starts of an idle counter (`interval` 3600) with {CONCURRENCY} in flight, "
        "round-robin over the nodes, then closes every admitted session "
        "(`DELETE ...?wait=10`) and reads Redis for leaked slots. "
        f"Target: 0 over-admissions in {starts:,} racing starts; 0 leaked slots.",
        "",
        *common.table(
            [
                "scenario",
                "201s per run",
                f"over-admissions, all runs: 201s / Redis ({'target 0'})",
                "leaked slots, all runs (target 0)",
                "starts/s",
                "answers, all runs",
            ],
            rows,
        ),
        "",
        f"Over-admissions: {common.verdict(worst_over == 0)}; leaked slots: "
        f"{common.verdict(worst_leak == 0)}.",
    ]
    notes += [
        "*201s / Redis*: over-admissions counted from the 201 answers "
        "(max(0, 201s − limit) per run), and from Redis' own books: the live zset "
        "(`ZCARD`; for the per-call scenario also the call's count and live index), polled "
        "every 10 ms during the race and read once after it.",
        "*leaked slots*: after closing every admitted session, the sum of what is left in "
        "the call-counts hash (entries and counts), the live zset and the three nodes' "
        "session sets.",
        "The sessions idle, so the limit fills within the first few hundred starts and "
        "every later start races against a full limit; starts racing closes (churn) are "
        "not part of this benchmark.",
        "The client is a minimal HTTP/1.1 one (one keep-alive connection per lane and node): "
        "with 256 requests in flight, httpx's connection pool spends several ms of CPU per "
        "request and would be the bottleneck.",
        "*starts/s* is the rate of the whole race, refusals included, with the client, "
        "Redis and three nodes sharing two cores; it is not a capacity figure.",
    ]
    summary = (
        f"Whether any number of racing starts can exceed a limit. {opts.runs} × {starts:,} "
        f"racing starts per scenario: {worst_over} over-admissions, {worst_leak} leaked "
        "slots."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
