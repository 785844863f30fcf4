"""The owner's metrics reports (``fleet/runtime/reports.py``), in one process, on fakeredis
and on a real redis-server: what reaches the record, when, and what never does."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from fleet.runtime.node import Node
from fleet.runtime.reports import MAX_METRICS, reportable
from fleet.store.keys import make_ref
from tests.conftest import SettingsFactory, running_node, wait_ready

METERED = "tests.workers:Metered"


async def raw_metrics(node: Node, call: str, sid: str) -> tuple[str | None, str | None]:
    """The record's metrics fields as Redis holds them (JSON text, reported_at)."""
    key = node.registry.keys.session(call, sid)
    fields = await node.redis.hmget(key, ["metrics", "metrics_reported_at"])
    metrics, at = cast(list[str | None], fields)
    return metrics, at


async def wait_reported(node: Node, call: str, sid: str, timeout: float) -> tuple[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics, at = await raw_metrics(node, call, sid)
        if at is not None:
            assert metrics is not None
            return metrics, float(at)
        assert time.monotonic() < deadline, f"no report within {timeout}s"
        await asyncio.sleep(0.01)


async def test_the_owner_reports_within_the_interval_and_ints_stay_ints(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(worker=METERED, metrics_report_interval=0.2)
    async with running_node(settings, redis) as node:
        await wait_ready(node)
        began = time.time()
        rec = await node.start_session("c", "default", {})
        metrics, at = await wait_reported(node, "c", rec.session_id, timeout=0.2 + 0.3)
        # Written as the worker set them: 3, not 3.0.
        assert metrics == '{"turns":3,"latency_ms":12.5}'
        assert began <= at <= time.time()
        got = await node.registry.get("c", rec.session_id)
        assert got is not None and got.metrics == {"turns": 3, "latency_ms": 12.5}
        assert type(got.metrics["turns"]) is int and type(got.metrics["latency_ms"]) is float


async def test_values_that_are_not_metrics_are_dropped_with_one_warning(
    make_settings: SettingsFactory, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(worker=METERED, metrics_report_interval=0.05)
    caplog.set_level(logging.WARNING, logger="fleet.reports")
    async with running_node(settings, redis) as node:
        await wait_ready(node)
        rec = await node.start_session("c", "default", {"bad": True})
        metrics, _ = await wait_reported(node, "c", rec.session_id, timeout=1.0)
        assert metrics == '{"turns":3,"latency_ms":12.5}'
        session = node.sessions[make_ref("c", rec.session_id)]
        session.ctx.metrics["turns"] = 5  # reported again; the bad values still there
        await asyncio.sleep(0.3)
        assert (await raw_metrics(node, "c", rec.session_id))[0] == (
            '{"turns":5,"latency_ms":12.5}'
        )
        await node.close_session("c", rec.session_id, wait=5)
    warnings = [r for r in caplog.records if r.name == "fleet.reports"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    for dropped in ("flag", "nan", "inf", "text", "huge"):
        assert dropped in message
    assert "and 3 more" in message  # the long name, the empty one and 7


async def test_unchanged_metrics_cost_no_redis_call_and_changes_go_in_one_round_trip(
    make_settings: SettingsFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop is far away: the test runs the reports itself.
    settings = make_settings(worker=METERED, metrics_report_interval=3600)
    async with running_node(settings, redis) as node:
        await wait_ready(node)
        recs = [await node.start_session("c", "default", {}) for _ in range(3)]
        await asyncio.sleep(0.05)  # the workers set their metrics
        pipelines: list[list[str]] = []
        run_pipeline = node.registry.scripts.run_pipeline

        async def counted(calls: list[Any], before: Any = None) -> list[Any]:
            pipelines.append([name for name, _, _ in calls])
            return await run_pipeline(calls, before)

        monkeypatch.setattr(node.registry.scripts, "run_pipeline", counted)
        assert await node.reports.report() == 3
        assert pipelines == [["report_metrics"]]  # three sessions, one script call
        first = [await raw_metrics(node, "c", r.session_id) for r in recs]

        assert await node.reports.report() == 0
        assert await node.reports.report() == 0
        assert len(pipelines) == 1  # nothing changed: no call at all
        assert [await raw_metrics(node, "c", r.session_id) for r in recs] == first

        node.sessions[make_ref("c", recs[1].session_id)].ctx.metrics["turns"] = 3.0
        assert await node.reports.report() == 1  # 3 -> 3.0 is a change: ints stay ints
        assert len(pipelines) == 2
        assert (await raw_metrics(node, "c", recs[1].session_id))[0] == (
            '{"turns":3.0,"latency_ms":12.5}'
        )


async def test_the_end_carries_the_final_metrics(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    # No periodic report could run: only the end can have written the metrics.
    settings = make_settings(worker=METERED, metrics_report_interval=3600)
    async with running_node(settings, redis) as node:
        await wait_ready(node)
        rec = await node.start_session("c", "default", {})
        await asyncio.sleep(0.05)
        assert await raw_metrics(node, "c", rec.session_id) == ("{}", None)
        ended = await node.close_session("c", rec.session_id, wait=5)
        assert ended is not None and ended.ended_at is not None
        got = await node.registry.get("c", rec.session_id)
        assert got is not None and got.state == "ended"
        assert got.metrics == {"turns": 4, "latency_ms": 12.5}  # the worker's last turn
        assert type(got.metrics["turns"]) is int
        assert got.metrics_reported_at == got.ended_at


async def test_a_stale_owner_cannot_overwrite_the_report(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    # No maintenance pass either: it would stop the copy that lost the session.
    settings = make_settings(
        worker=METERED, metrics_report_interval=3600, maintenance_interval=3600
    )
    async with running_node(settings, redis) as node:
        await wait_ready(node)
        rec = await node.start_session("c", "default", {})
        await asyncio.sleep(0.05)
        assert await node.reports.report() == 1
        # Another node took the session over (as a claim does) and reported its own.
        key = node.registry.keys.session("c", rec.session_id)
        await redis.hset(key, mapping={"node_id": "other", "epoch": "2"})
        assert await node.registry.report_metrics(
            "other", [(make_ref("c", rec.session_id), 2, '{"turns":1}')], time.time()
        ) == [1]
        node.sessions[make_ref("c", rec.session_id)].ctx.metrics["turns"] = 99
        assert await node.reports.report() == 0  # refused
        assert (await raw_metrics(node, "c", rec.session_id))[0] == '{"turns":1}'


def test_reportable_keeps_numbers_only_and_bounds_them() -> None:
    assert reportable({"a": 1, "b": 2.5, "c": -0.0}) == ({"a": 1, "b": 2.5, "c": -0.0}, [])
    clean, dropped = reportable({"t": True, "n": math.nan, "i": -math.inf, "s": "1", "o": None})
    assert clean == {} and dropped == ["t", "n", "i", "s", "o"]
    assert reportable({"big": 2**63, "ok": 2**63 - 1}) == ({"ok": 2**63 - 1}, ["big"])
    many = {f"m{i}": i for i in range(MAX_METRICS + 2)}
    clean, dropped = reportable(many)
    assert len(clean) == MAX_METRICS and dropped == [f"m{MAX_METRICS}", f"m{MAX_METRICS + 1}"]
    assert reportable(["turns", 3]) == ({}, ["ctx.metrics is a list, not a dict"])
    assert reportable({("a",): 1, "x" * 65: 1, "x" * 64: 1})[0] == {"x" * 64: 1}
