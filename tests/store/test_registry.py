"""Registry scripts on fakeredis and on a real redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from fleet.errors import AdmissionRejected, NotAccepting
from fleet.models import SessionRecord
from fleet.store.keys import make_ref
from fleet.store.registry import Registry
from fleet.store.scripts import (
    FENCED,
    MISSING,
    REPORTED,
    EndResult,
    HeartbeatStatus,
    ReapResult,
)
from tests.conftest import SettingsFactory


async def registry(redis: Redis, make_settings: SettingsFactory, **kw: object) -> Registry:
    reg = Registry(redis, make_settings(**kw))
    await reg.load()
    return reg


def record(call: str, sid: str, node: str, epoch: int = 1) -> SessionRecord:
    return SessionRecord(
        session_id=sid, call_id=call, call_type="default", node_id=node, epoch=epoch,
        started_at=time.time(),
    )  # fmt: skip


async def test_admission_needs_a_held_lease(redis: Redis, make_settings: SettingsFactory) -> None:
    reg = await registry(redis, make_settings)
    with pytest.raises(NotAccepting) as err:
        await reg.admit("n1", "c", "s1")
    assert err.value.code == "not_ready"
    assert await reg.heartbeat("n1", {}) is HeartbeatStatus.NEW
    await reg.admit("n1", "c", "s1")
    assert await reg.heartbeat("n1", {}) is HeartbeatStatus.OK


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        ({"max_sessions_per_call": 3}, "max_sessions_per_call"),
        ({"max_sessions": 3}, "max_sessions"),
        ({"max_sessions_per_node": 3}, "no_capacity"),
    ],
)
async def test_concurrent_admissions_never_exceed_a_limit(
    redis: Redis, make_settings: SettingsFactory, limits: dict[str, int], code: str
) -> None:
    reg = await registry(redis, make_settings, **limits)
    # A node's capacity is what it advertises with its lease (FLEET_MAX_SESSIONS_PER_NODE).
    await reg.heartbeat("n1", {"capacity": str(limits.get("max_sessions_per_node", ""))})

    async def one(i: int) -> str:
        try:
            await reg.admit("n1", "call", f"s{i}")
            return "ok"
        except AdmissionRejected as exc:
            return exc.code

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert results.count("ok") == 3
    assert set(results) == {"ok", code}
    # Releasing one frees exactly one slot; releasing twice frees nothing more.
    admitted = [f"s{i}" for i, r in enumerate(results) if r == "ok"]
    assert await reg.release("n1", "call", admitted[0])
    assert not await reg.release("n1", "call", admitted[0])
    assert (await asyncio.gather(*(one(i) for i in range(100, 110)))).count("ok") == 1


async def test_release_leaves_no_counter_behind(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings)
    await reg.heartbeat("n1", {})
    await reg.admit("n1", "c", "s1")
    await reg.release("n1", "c", "s1")
    k = reg.keys
    assert await redis.hgetall(k.call_counts()) == {}
    assert await redis.zcard(k.live()) == 0 and await redis.scard(k.node_sessions("n1")) == 0


async def test_end_is_fenced_by_owner_and_epoch(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings)
    await reg.heartbeat("n1", {})
    await reg.admit("n1", "c", "s1")
    rec = record("c", "s1", "n1", epoch=1)
    assert await reg.create(rec)
    assert await reg.create_code(rec) == 2  # the same write again: recognised, not redone
    assert not await reg.create(record("c", "s1", "n2", epoch=1))  # never overwrites

    stale = record("c", "s1", "n1", epoch=0)
    assert await reg.end(stale, "closed") is EndResult.FENCED
    stranger = record("c", "s1", "n2", epoch=1)
    assert await reg.end(stranger, "closed") is EndResult.FENCED
    assert await reg.checkpoint(stale, '{"n":1}', 1) == -1

    assert await reg.checkpoint(rec, '{"n":1}', 1) == 1
    assert await reg.end(rec, "completed") is EndResult.ENDED
    assert await reg.end(rec, "completed") is EndResult.ALREADY_ENDED
    assert await reg.checkpoint(rec, '{"n":2}', 1) == -1  # no writes after the end
    got = await reg.get("c", "s1")
    assert got is not None and got.state == "ended" and got.end_reason == "completed"
    assert await redis.ttl(reg.keys.session("c", "s1")) > 0
    assert await redis.scard(reg.keys.node_sessions("n1")) == 0


async def test_metrics_reports_are_fenced_by_owner_and_epoch(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings)
    await reg.heartbeat("n1", {})
    for sid in ("s1", "s2", "s3"):
        await reg.admit("n1", "c", sid)
        assert await reg.create(record("c", sid, "n1"))

    # Both reports in one call: one code each, in order.
    codes = await reg.report_metrics("n1", [("c/s1", 1, '{"turns":3}'), ("c/s2", 1, "{}")], 5.0)
    assert codes == [REPORTED, REPORTED]
    got = await reg.get("c", "s1")
    assert got is not None and got.metrics == {"turns": 3} and got.metrics_reported_at == 5.0
    assert type(got.metrics["turns"]) is int

    # The session moves on (a claim: epoch 2 on n2); the old owner's report is refused.
    assert await reg.claim("c/s1", "n1", "n2", "resume") == 2
    stale = await reg.report_metrics("n1", [("c/s1", 1, '{"turns":99}')], 6.0)
    at_new_epoch_but_not_owner = await reg.report_metrics("n1", [("c/s1", 2, '{"turns":98}')], 6.0)
    assert stale == at_new_epoch_but_not_owner == [FENCED]
    assert await reg.report_metrics("n2", [("c/s1", 2, '{"turns":4}')], 7.0) == [REPORTED]
    got = await reg.get("c", "s1")
    assert got is not None and got.metrics == {"turns": 4} and got.metrics_reported_at == 7.0

    # The same node at an older epoch (the session left it and came back) is refused too.
    assert await reg.claim("c/s3", "n1", "n1", "resume") == 2
    assert await reg.report_metrics("n1", [("c/s3", 1, '{"old":1}')], 6.0) == [FENCED]
    assert await reg.report_metrics("n1", [("c/s3", 2, '{"new":1}')], 6.0) == [REPORTED]
    got = await reg.get("c", "s3")
    assert got is not None and got.metrics == {"new": 1}

    # The end records the final values in the same step; nothing is reported after it.
    new_owner = record("c", "s1", "n2", epoch=2)
    assert await reg.end(new_owner, "closed", metrics='{"turns":5}') is EndResult.ENDED
    assert await reg.report_metrics("n2", [("c/s1", 2, '{"turns":6}')], 9.0) == [FENCED]
    got = await reg.get("c", "s1")
    assert got is not None and got.metrics == {"turns": 5}
    assert got.metrics_reported_at == got.ended_at
    # An end without metrics keeps the last report; a fenced end writes none.
    assert await reg.end(record("c", "s2", "n9"), "closed", metrics='{"x":1}') is EndResult.FENCED
    assert await reg.end(record("c", "s2", "n1"), "closed") is EndResult.ENDED
    got = await reg.get("c", "s2")
    assert got is not None and got.metrics == {} and got.metrics_reported_at == 5.0
    # No record (Redis lost it): MISSING, and nothing is created.
    assert await reg.report_metrics("n1", [("c/gone", 1, '{"a":1}')], 9.0) == [MISSING]
    assert not await redis.exists(reg.keys.session("c", "gone"))


async def _next_message(pubsub: Any) -> Any:
    for _ in range(50):
        message = await pubsub.get_message(timeout=0.1)
        if message:
            return message
    return None


async def test_close_sets_flag_writes_closing_and_publishes_to_owner(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings)
    assert await reg.request_close("c", "nope", "closed", "m") == ("missing", "", None)
    await reg.heartbeat("n1", {})
    await reg.admit("n1", "c", "s1")
    await reg.create(record("c", "s1", "n1"))
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(reg.keys.node_channel("n1"))
    assert await reg.request_close("c", "s1", "closed", "hello", asker="n2") == (
        "closing",
        "n1",
        None,
    )
    message = await _next_message(pubsub)
    assert message is not None and message["data"] == "hello"
    # A second request changes nothing but tells the owner again.
    assert (await reg.request_close("c", "s1", "idle", "again", asker="n2"))[0] == "closing"
    assert (await _next_message(pubsub))["data"] == "again"
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    count, attention = await reg.watch("n1", [(make_ref("c", "s1"), 1)])
    assert count == 1 and attention == [(0, "close", "closed")]
    got = await reg.get("c", "s1")
    assert got is not None and got.state == "closing" and got.close_reason == "closed"
    # session_closing is in the stream once, with the first request's reason.
    events = await reg.read_events("c", "s1", "0-0", None)
    assert [(kind, data) for _, kind, data in events] == [
        ("session_closing", '{"reason":"closed"}')
    ]


async def test_close_asked_by_the_owner_publishes_nothing(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings)
    await reg.create(record("c", "s1", "n1"))
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(reg.keys.node_channel("n1"))
    assert (await reg.request_close("c", "s1", "closed", "m", asker="n1"))[:2] == (
        "closing",
        "n1",
    )
    assert await pubsub.get_message(timeout=0.3) is None
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_close_scoped_to_a_principal_sees_only_its_sessions(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings)
    mine = record("c", "s1", "n1")
    mine.principal = "alice"
    await reg.create(mine)
    assert await reg.request_close("c", "s1", "closed", "m", principal="bob") == (
        "missing",
        "",
        None,
    )
    got = await reg.get("c", "s1")
    assert got is not None and got.state != "closing" and got.close_reason is None
    assert not await reg.read_events("c", "s1", "0-0", None)
    status, owner, _ = await reg.request_close("c", "s1", "closed", "m", principal="alice")
    assert (status, owner) == ("closing", "n1")


async def test_close_of_an_ended_session_returns_its_record(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings)
    await reg.heartbeat("n1", {})
    await reg.admit("n1", "c", "s1")
    rec = record("c", "s1", "n1")
    await reg.create(rec)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(reg.keys.node_channel("n2"), reg.keys.node_channel("n3"))
    assert await reg.end(rec, "closed", notify=("ended!", {"n2", "n3"})) is EndResult.ENDED
    # The nodes waiting for the end are told in the same step.
    got = {(await _next_message(pubsub))["channel"] for _ in range(2)}
    assert got == {reg.keys.node_channel("n2"), reg.keys.node_channel("n3")}
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    status, owner, ended = await reg.request_close("c", "s1", "closed", "m")
    assert (status, owner) == ("ended", "n1")
    assert ended is not None and ended.session_id == "s1" and ended.end_reason == "closed"


async def test_watch_reports_only_what_needs_attention(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings)
    await reg.heartbeat("n1", {})
    sessions = []
    for i in range(1200):  # more than one chunk
        await reg.create(record(f"c{i % 7}", f"s{i}", "n1"))
        sessions.append((make_ref(f"c{i % 7}", f"s{i}"), 1))
    await redis.hset(reg.keys.session("c3", "s10"), "close_reason", "idle")
    await redis.hset(reg.keys.session("c4", "s11"), "epoch", "2")
    await redis.delete(reg.keys.session("c5", "s12"))
    sessions[13] = (sessions[13][0], 5)  # this node runs it under another epoch
    count, attention = await reg.watch("n1", sessions)
    assert count == 0
    assert sorted(attention) == [
        (10, "close", "idle"),
        (11, "moved", ""),
        (12, "missing", ""),
        (13, "moved", ""),
    ]


async def test_concurrent_reapers_take_each_session_once(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings, node_ttl=1.0)
    await reg.heartbeat("dead", {})
    refs = []
    for i in range(20):
        await reg.admit("dead", "c", f"s{i}")
        refs.append(make_ref("c", f"s{i}"))
    assert await reg.reap("dead", refs[0]) is ReapResult.ALIVE
    await asyncio.sleep(1.1)
    assert await reg.expired_nodes() == ["dead"]
    results = await asyncio.gather(*(reg.reap("dead", ref) for ref in refs for _ in range(3)))
    assert results.count(ReapResult.RELEASED) == 20
    assert results.count(ReapResult.GONE) == 40
    assert await reg.forget_node("dead")
    assert not await reg.forget_node("dead")  # forgotten once: a second survivor is told so
    assert await reg.expired_nodes() == []
    assert await redis.hgetall(reg.keys.call_counts()) == {}


async def test_reap_moves_to_a_live_target_with_room(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings, node_ttl=1.0)
    await reg.heartbeat("dead", {})
    await reg.admit("dead", "c", "s1")
    await reg.admit("dead", "c", "s2")
    await asyncio.sleep(1.1)
    await reg.heartbeat("alive", {})
    assert await reg.reap("dead", make_ref("c", "s1"), "alive", 1) is ReapResult.MOVED
    assert await reg.reap("dead", make_ref("c", "s2"), "alive", 1) is ReapResult.NO_ROOM
    assert await reg.node_slots("alive") == {make_ref("c", "s1")}


async def test_heartbeat_reports_a_lapsed_lease(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings, node_ttl=1.0)
    assert await reg.heartbeat("n1", {"host": "h"}) is HeartbeatStatus.NEW
    await asyncio.sleep(1.1)
    assert await reg.heartbeat("n1", {"host": "h"}) is HeartbeatStatus.EXPIRED
    nodes = await reg.live_nodes()
    assert [n.node_id for n in nodes] == ["n1"] and nodes[0].host == "h"


async def test_scripts_survive_a_flushed_script_cache(
    redis: Redis, make_settings: SettingsFactory
) -> None:
    reg = await registry(redis, make_settings)
    await redis.script_flush()
    assert await reg.heartbeat("n1", {}) is HeartbeatStatus.NEW
    await reg.admit("n1", "c", "s1")
    await reg.create(record("c", "s1", "n1"))
    await redis.script_flush()
    assert await reg.end(record("c", "s1", "n1"), "closed") is EndResult.ENDED


async def test_events_are_bounded(redis: Redis, make_settings: SettingsFactory) -> None:
    reg = await registry(redis, make_settings, events_maxlen=10)
    rec = record("c", "s1", "n1")
    for i in range(300):
        await reg.emit(rec, "tick", str(i))
    assert await redis.xlen(reg.keys.events("c", "s1")) < 150


async def test_a_retried_write_is_not_applied_twice(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """A call whose answer was lost is tried again (``fleet.store.command_retry``): the
    checkpoint and the record it wrote the first time are recognised, not written twice."""
    reg = Registry(redis, make_settings())
    rec = record("c", "s1", "n1")
    assert await reg.create(rec)
    assert await reg.create_code(rec) == 2  # the same write again: in place already
    other = record("c", "s1", "n2")
    assert await reg.create_code(other) == 0  # someone else's record: refused
    assert await reg.checkpoint(rec, '{"n":1}', 5) == 1
    assert await reg.checkpoint(rec, '{"n":1}', 5) == 1  # the retry: nothing new
    rec.checkpoint_version = 1
    assert await reg.checkpoint(rec, '{"n":2}', 5) == 2
    kept = [json.loads(e)["version"] for e in await reg.checkpoints("c", "s1")]
    assert kept == [2, 1]


async def test_admission_waits_a_moment_after_redis_lost_its_data(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """The counts of a Redis that lost its data are short of the sessions nodes are still
    writing back: a start admitted then could exceed a limit once they have."""
    reg = Registry(redis, make_settings(node_ttl=1.0))
    assert await reg.heartbeat("n1", {}) is HeartbeatStatus.NEW  # a first start: no wait
    await reg.admit("n1", "c", "s1")
    await reg.heartbeat("n2", {}, held_before=True)  # a node that rejoins: no data lost
    await reg.admit("n2", "c", "s2")
    await redis.flushdb()
    assert await reg.heartbeat("n1", {}, held_before=True) is HeartbeatStatus.NEW
    with pytest.raises(NotAccepting) as refused:
        await reg.admit("n1", "c", "s3")
    assert refused.value.code == "not_ready" and "lost its data" in refused.value.detail
    await asyncio.sleep(1.05)
    await reg.heartbeat("n1", {}, held_before=True)
    await reg.admit("n1", "c", "s3")  # a second later: every node has written back
