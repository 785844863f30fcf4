"""``Idempotency-Key`` on ``POST /calls/{call_id}/sessions``, on fakeredis and on a real
redis-server: one session per key and principal, the first answer to every repeat."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
from pydantic import SecretStr
from redis.asyncio import Redis

from fleet.client.base import DEFAULT_TIMEOUT
from fleet.runtime.idempotency import IdempotentStarts, fingerprint
from fleet.runtime.node import Node
from fleet.store.scripts import ReserveResult
from tests.conftest import SettingsFactory, api_client, api_node

ALICE, BOB, ADMIN = "a" * 32, "b" * 32, "c" * 32
KEYS = SecretStr(f"alice:{ALICE},bob:{BOB},admin:{ADMIN}")


def headers(key: str, token: str | None = None) -> dict[str, str]:
    out = {"Idempotency-Key": key}
    if token:
        out["Authorization"] = f"Bearer {token}"
    return out


async def post(
    client: httpx.AsyncClient, key: str, call: str = "demo", token: str | None = None, **body: Any
) -> httpx.Response:
    return await client.post(
        f"/calls/{call}/sessions", headers=headers(key, token), json=body or None
    )


async def call_sessions(client: httpx.AsyncClient, call: str = "demo") -> list[str]:
    listed = (await client.get(f"/calls/{call}/sessions")).json()["sessions"]
    return [s["session_id"] for s in listed]


async def test_a_repeat_gets_the_first_answer(client: httpx.AsyncClient) -> None:
    first = await post(client, "order-1", params={"interval": 5, "limit": 100})
    assert first.status_code == 201, first.text
    sid = first.json()["session_id"]
    # The same start, spelled otherwise: defaults written out, keys in another order.
    again = await post(
        client, "order-1", resumable=True, params={"limit": 100, "interval": 5}, call_type="default"
    )
    assert again.status_code == 201
    assert again.json() == first.json()
    assert await call_sessions(client) == [sid]

    # The answer is the first one as it was, not the session's state now.
    await client.delete(f"/calls/demo/sessions/{sid}", params={"wait": 5})
    late = await post(client, "order-1", params={"interval": 5, "limit": 100})
    assert late.status_code == 201 and late.json() == first.json()
    assert late.json()["state"] == "running"
    assert (await client.get(f"/calls/demo/sessions/{sid}")).json()["state"] == "ended"
    assert await call_sessions(client) == [sid]


async def test_a_repeat_with_another_body_is_refused(client: httpx.AsyncClient) -> None:
    sid = (await post(client, "k", params={"interval": 5})).json()["session_id"]
    for body in (
        {"params": {"interval": 6}},
        {"params": {"interval": 5}, "call_type": "voice"},
        {"params": {"interval": 5}, "resumable": False},
        {},
    ):
        resp = await post(client, "k", **body)
        assert resp.status_code == 422, (body, resp.text)
        assert resp.json()["code"] == "idempotency_mismatch" and resp.json()["detail"]
    assert await call_sessions(client) == [sid]


async def test_a_key_belongs_to_its_call(client: httpx.AsyncClient) -> None:
    here = (await post(client, "k", call="here")).json()["session_id"]
    there = (await post(client, "k", call="there")).json()["session_id"]
    assert here != there
    assert await call_sessions(client, "here") == [here]
    assert await call_sessions(client, "there") == [there]


def slow_admission(node: Node, seconds: float) -> None:
    """Admission takes ``seconds`` longer: the start that holds the key holds it that long.
    (A node takes its own starts with ``place_here``; ``place`` is for the others.)"""
    for name in ("place_here", "place"):
        original = getattr(node.registry, name)

        async def slow(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            await asyncio.sleep(seconds)
            return await _original(*args, **kwargs)

        setattr(node.registry, name, slow)


async def test_concurrent_repeats_start_one_session(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_node(make_settings(), redis) as (client, node):
        # Slower than the burst takes to arrive, so every repeat finds the first in progress
        # (without it, a fresh connection pool lines the requests up one after the other).
        slow_admission(node, 0.2)
        answers = await asyncio.gather(*(post(client, "burst") for _ in range(20)))
        assert [r.status_code for r in answers] == [201] * 20, [r.text for r in answers]
        assert len({r.text for r in answers}) == 1
        assert await call_sessions(client) == [answers[0].json()["session_id"]]


async def test_a_repeat_waits_for_the_first_start_to_answer(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_node(make_settings(), redis) as (client, node):
        slow_admission(node, 0.3)  # the first start holds the key meanwhile
        first = asyncio.create_task(post(client, "slow"))
        await asyncio.sleep(0.1)
        began = time.monotonic()
        repeat = await post(client, "slow")
        assert repeat.status_code == 201, repeat.text
        assert time.monotonic() - began >= 0.1  # it waited for the answer
        assert (await first).json() == repeat.json()
        assert await call_sessions(client) == [repeat.json()["session_id"]]


async def test_a_start_that_never_answers_does_not_hold_the_key_forever(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """A request that reserved the key and died (its node with it): repeats are 409
    ``idempotency_in_progress`` after a bounded wait, then start once the reservation
    expires."""
    async with api_node(make_settings(), redis) as (client, node):
        node.idempotent.wait = 0.2
        dead = node.registry.reservation(
            "demo", "anonymous", "stuck", fingerprint("demo", "default", {}, True)
        )
        held, _ = await node.registry.reserve_idempotency_key(dead, pending_ttl=1.0)
        assert held is ReserveResult.RESERVED

        began = time.monotonic()
        busy = await post(client, "stuck")
        assert busy.status_code == 409, busy.text
        assert busy.json()["code"] == "idempotency_in_progress"
        assert busy.headers["retry-after"] == "1"
        assert 0.2 <= time.monotonic() - began < 1.0
        assert await call_sessions(client) == []

        await asyncio.sleep(1.0)
        started = await post(client, "stuck")
        assert started.status_code == 201, started.text
        assert (await post(client, "stuck")).json() == started.json()
        assert await call_sessions(client) == [started.json()["session_id"]]


async def test_a_failed_start_does_not_poison_the_key(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(max_sessions_per_call=1), redis) as client:
        blocker = (await client.post("/calls/demo/sessions")).json()["session_id"]
        refused = await post(client, "retry-me")
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == "max_sessions_per_call"
        bad = await post(client, "retry-me", params={"interval": -1})
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_params"

        await client.delete(f"/calls/demo/sessions/{blocker}", params={"wait": 5})
        started = await post(client, "retry-me")
        assert started.status_code == 201, started.text
        sid = started.json()["session_id"]
        assert sid != blocker
        assert (await post(client, "retry-me")).json() == started.json()
        assert await call_sessions(client) == [sid, blocker]  # live first


async def test_principals_have_keys_of_their_own(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(api_keys=KEYS), redis) as client:
        alice = await post(client, "shared", token=ALICE, params={"interval": 5})
        bob = await post(client, "shared", token=BOB, params={"interval": 7})  # no mismatch
        assert alice.status_code == bob.status_code == 201, (alice.text, bob.text)
        assert alice.json()["session_id"] != bob.json()["session_id"]
        again = await post(client, "shared", token=ALICE, params={"interval": 5})
        assert again.json() == alice.json()
        assert (await post(client, "shared", token=BOB, params={"interval": 7})).json() == (
            bob.json()
        )
        admin = await post(client, "shared", token=ADMIN, params={"interval": 5})
        assert admin.json()["session_id"] not in {
            alice.json()["session_id"],
            bob.json()["session_id"],
        }

        def listed(token: str) -> Any:
            return client.get("/calls/demo/sessions", headers={"Authorization": f"Bearer {token}"})

        mine = (await listed(ALICE)).json()["sessions"]
        assert [s["session_id"] for s in mine] == [alice.json()["session_id"]]
        assert len((await listed(ADMIN)).json()["sessions"]) == 3


async def test_a_malformed_key_is_refused_before_anything_starts(
    client: httpx.AsyncClient,
) -> None:
    for key in ("", " ", "has space", "a/b", "{tag}", "x" * 129, "caf\u00e9", "a*b", "a\tb"):
        resp = await client.post("/calls/demo/sessions", headers={b"Idempotency-Key": key.encode()})
        assert resp.status_code == 422, (key, resp.text)
        assert resp.json()["code"] == "invalid_request"
        assert "Idempotency-Key" in resp.json()["detail"]
    assert await call_sessions(client) == []
    for key in (str(uuid.uuid4()), "x" * 128, "order:2024-05-01.7_b"):
        assert (await post(client, key)).status_code == 201, key
    assert len(await call_sessions(client)) == 3


def test_a_repeat_gives_up_waiting_before_the_client_does() -> None:
    """A repeat that waits for another request's answer answers 409 before fleet's own
    client stops waiting for it (its read timeout), and a dead holder's reservation
    outlives one such wait, not many."""
    assert 0 < IdempotentStarts.wait < (DEFAULT_TIMEOUT.read or 0)
    assert IdempotentStarts.wait < IdempotentStarts.pending_ttl <= 60
