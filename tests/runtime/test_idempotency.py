"""Idempotent starts on a node, on fakeredis and on a real redis-server: the issue's frozen
node, whose start resumes after its reservation expired and a retry took the key."""

from __future__ import annotations

import asyncio

import pytest

from fleet.errors import IdempotencyInProgress
from fleet.runtime.idempotency import fingerprint
from fleet.runtime.node import Node
from fleet.store.idempotency import Reservation
from fleet.store.scripts import ReserveResult

FINGERPRINT = fingerprint("c", "default", {}, True)


async def reserve(node: Node, key: str, ttl: float = 5.0) -> Reservation:
    once = node.registry.reservation("c", "p", key, FINGERPRINT)
    result, _ = await node.registry.reserve_idempotency_key(once, ttl)
    assert result is ReserveResult.RESERVED
    return once


async def test_a_start_that_lost_its_reservation_creates_nothing(node: Node) -> None:
    frozen = await reserve(node, "k", ttl=0.05)
    await asyncio.sleep(0.1)  # the frozen node's reservation expires...
    retry = await reserve(node, "k")  # ...and a retry takes the key over

    with pytest.raises(IdempotencyInProgress):  # the frozen node wakes up and goes on
        await node.start_session("c", "default", {}, "p", once=frozen)
    assert await node.registry.list_call("c") == []
    assert await node.registry.node_slots(node.node_id) == set()  # its slot was given back

    started = await node.start_session("c", "default", {}, "p", once=retry)
    result, answer = await node.registry.reserve_idempotency_key(frozen, 5.0)
    assert result is ReserveResult.DONE and answer == started.info().model_dump_json()
    assert [r.session_id for r in await node.registry.list_call("c")] == [started.session_id]


async def test_a_late_start_whose_key_nobody_took_still_answers_it(node: Node) -> None:
    late = await reserve(node, "k", ttl=0.05)
    await asyncio.sleep(0.1)
    started = await node.start_session("c", "default", {}, "p", once=late)
    repeat = node.registry.reservation("c", "p", "k", FINGERPRINT)
    result, answer = await node.registry.reserve_idempotency_key(repeat, 5.0)
    assert result is ReserveResult.DONE and answer == started.info().model_dump_json()


async def test_only_the_holder_releases_and_never_an_answer(node: Node) -> None:
    holder = await reserve(node, "k")
    other = node.registry.reservation("c", "p", "k", FINGERPRINT)
    assert not await node.registry.release_idempotency_key(other)
    assert (await node.registry.reserve_idempotency_key(other, 5.0))[0] is ReserveResult.PENDING
    assert await node.registry.release_idempotency_key(holder)
    assert (await node.registry.reserve_idempotency_key(other, 5.0))[0] is ReserveResult.RESERVED

    await node.start_session("c", "default", {}, "p", once=other)
    assert not await node.registry.release_idempotency_key(other)
    assert (await node.registry.reserve_idempotency_key(holder, 5.0))[0] is ReserveResult.DONE


async def test_the_answer_is_kept_for_the_idempotency_ttl(node: Node) -> None:
    once = await reserve(node, "k", ttl=5.0)
    await node.start_session("c", "default", {}, "p", once=once)
    ttl = await node.redis.ttl(once.key)
    assert node.settings.idempotency_ttl - 5 <= ttl <= node.settings.idempotency_ttl
