"""Messages: sending to a session from any node, replies, the busy policies, limits and
principals. On fakeredis and on a real redis-server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from prometheus_client import REGISTRY
from pydantic import SecretStr
from redis.asyncio import Redis

from fleet.runtime.node import Node
from tests.conftest import SettingsFactory, api_client, api_node

ALICE, BOB = "a" * 32, "b" * 32


class Figures:
    """Changes of this process's metrics since the block began."""

    def __init__(self) -> None:
        self.before = self.now()

    @staticmethod
    def now() -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in REGISTRY.collect():
            if metric.name.startswith(("fleet_messages_sent", "fleet_message_")):
                for sample in metric.samples:
                    key = sample.name + "".join(f"|{v}" for v in sample.labels.values())
                    out[key] = sample.value
        return out

    def delta(self, key: str) -> float:
        return self.now().get(key, 0.0) - self.before.get(key, 0.0)

    def sent(self, outcome: str) -> float:
        return self.delta(f"fleet_messages_sent_total|{outcome}")


async def start(client: httpx.AsyncClient, call: str = "chat", **kw: Any) -> str:
    resp = await client.post(f"/calls/{call}/sessions", json=kw or None, headers=kw.pop("h", {}))
    assert resp.status_code == 201, resp.text
    sid: str = resp.json()["session_id"]
    return sid


async def send(
    client: httpx.AsyncClient, sid: str, data: Any, call: str = "chat", **kw: Any
) -> httpx.Response:
    params = {"wait": kw.pop("wait")} if "wait" in kw else None
    body = {"data": data, **kw}
    return await client.post(f"/calls/{call}/sessions/{sid}/messages", json=body, params=params)


async def test_ask_gets_the_reply_and_the_conversation_is_checkpointed(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker="tests.workers:Echo"), redis) as client:
        sid = await start(client)
        first = await send(client, sid, "hello", wait=5)
        assert first.status_code == 200, first.text
        assert first.json()["reply"] == {"echo": "hello", "count": 1}
        second = await send(client, sid, {"n": 2}, wait=5)
        assert second.json()["reply"] == {"echo": {"n": 2}, "count": 2}
        assert second.json()["message_id"] > first.json()["message_id"]
        checkpoint = (await client.get(f"/calls/chat/sessions/{sid}/checkpoint")).json()
        assert checkpoint["state"] == {"heard": ["hello", {"n": 2}]}
        # Without wait: 202 and an id; the reply still comes, as an event.
        third = await send(client, sid, "three")
        assert third.status_code == 202 and set(third.json()) == {"message_id"}


async def test_a_retry_with_the_same_id_is_not_sent_twice(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker="tests.workers:Echo"), redis) as client:
        sid = await start(client)
        one = await send(client, sid, "once", id="m-1")
        two = await send(client, sid, "once", id="m-1")
        assert one.status_code == two.status_code == 202
        assert one.json() == two.json()
        await send(client, sid, "after", wait=5)
        checkpoint = (await client.get(f"/calls/chat/sessions/{sid}/checkpoint")).json()
        assert checkpoint["state"] == {"heard": ["once", "after"]}


async def test_messages_to_an_ended_or_unknown_session_or_too_large(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(worker="tests.workers:Echo", max_message_bytes=100)
    async with api_client(settings, redis) as client:
        sid = await start(client)
        too_big = await send(client, sid, "x" * 200)
        assert too_big.status_code == 413 and too_big.json()["code"] == "message_too_large"
        missing = await send(client, "nope", "hi")
        assert missing.status_code == 404
        bad = await client.post(f"/calls/chat/sessions/{sid}/messages", json={"dta": 1})
        assert bad.status_code == 422
        await client.delete(f"/calls/chat/sessions/{sid}", params={"wait": 5})
        ended = await send(client, sid, "hi")
        assert ended.status_code == 409 and ended.json()["code"] == "session_ended"


async def test_a_full_inbox_answers_429(make_settings: SettingsFactory, redis: Redis) -> None:
    settings = make_settings(worker="tests.workers:Quiet", inbox_maxlen=3)
    async with api_client(settings, redis) as client:
        sid = await start(client)
        figures = Figures()
        for i in range(3):
            assert (await send(client, sid, i)).status_code == 202
        full = await send(client, sid, 3)
        assert full.status_code == 429 and full.json()["code"] == "inbox_full"
        assert (figures.sent("accepted"), figures.sent("full")) == (3, 1)


async def test_reject_policy_answers_busy_until_consumed(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker="tests.workers:Picky"), redis) as client:
        sid = await start(client)
        figures = Figures()
        assert (await send(client, sid, "first")).status_code == 202
        busy = await send(client, sid, "second")
        assert busy.status_code == 409 and busy.json()["code"] == "busy"
        assert (figures.sent("accepted"), figures.sent("busy")) == (1, 1)
        # Once the worker has consumed the first (its checkpoint), the next is taken.
        for _ in range(40):
            await asyncio.sleep(0.05)
            checkpoint = await client.get(f"/calls/chat/sessions/{sid}/checkpoint")
            if checkpoint.status_code == 200:
                break
        assert checkpoint.json()["state"] == {"last": "first"}
        assert (await send(client, sid, "third")).status_code == 202


async def test_interrupt_policy_sets_ctx_interrupt(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker="tests.workers:Listener"), redis) as client:
        sid = await start(client)
        answer = await send(client, sid, "stop", wait=5)
        assert answer.status_code == 200 and answer.json()["reply"] == "listening"


async def test_sends_replies_and_latencies_are_counted(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(worker="tests.workers:Echo", max_message_bytes=100)
    async with api_client(settings, redis) as client:
        sid = await start(client)
        figures = Figures()
        assert (await send(client, sid, "no wait", id="m-1")).status_code == 202
        assert (await send(client, sid, "no wait", id="m-1")).status_code == 202
        assert (await send(client, sid, "asked", wait=5)).status_code == 200
        assert (await send(client, sid, "x" * 200)).status_code == 413
        assert (await send(client, "nope", "hi")).status_code == 404
        await client.delete(f"/calls/chat/sessions/{sid}", params={"wait": 5})
        assert (await send(client, sid, "late")).status_code == 409
        outcomes = ("accepted", "duplicate", "too_large", "not_found", "ended", "busy", "full")
        assert [figures.sent(o) for o in outcomes] == [2, 1, 1, 1, 1, 0, 0]
        # One reply went back to a waiting sender, one was an event only.
        assert figures.delta("fleet_message_replies_total|sender") == 1
        assert figures.delta("fleet_message_replies_total|event") == 1
        # Both messages reached the worker; one ask was answered.
        assert figures.delta("fleet_message_delivery_seconds_count") == 2
        assert 0 <= figures.delta("fleet_message_delivery_seconds_sum") < 5
        assert figures.delta("fleet_message_ask_seconds_count") == 1
        assert 0 < figures.delta("fleet_message_ask_seconds_sum") < 5


async def test_another_principals_session_is_404(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    keys = SecretStr(f"alice:{ALICE},bob:{BOB}")
    settings = make_settings(worker="tests.workers:Echo", api_keys=keys)
    async with api_client(settings, redis) as client:
        alice = {"Authorization": f"Bearer {ALICE}"}
        bob = {"Authorization": f"Bearer {BOB}"}
        resp = await client.post("/calls/chat/sessions", headers=alice)
        sid = resp.json()["session_id"]
        url = f"/calls/chat/sessions/{sid}/messages"
        theirs = await client.post(url, json={"data": "hi"}, headers=bob)
        assert theirs.status_code == 404
        mine = await client.post(url, json={"data": "hi"}, headers=alice, params={"wait": 5})
        assert mine.status_code == 200


async def test_a_send_through_another_node_reaches_the_owner(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """Two nodes on one Redis: the send goes through B, the worker runs on A, the reply
    comes back to B over B's channel."""
    worker = "tests.workers:Echo"
    async with (
        api_node(make_settings(worker=worker), redis) as (a, node_a),
        api_node(make_settings(worker=worker), redis) as (b, _),
    ):
        sid = await start(a)
        assert any(s.endswith(sid) for s in node_a.sessions)
        answer = await send(b, sid, "via b", wait=5)
        assert answer.status_code == 200 and answer.json()["reply"]["echo"] == "via b"


async def test_followers_see_both_sides(make_settings: SettingsFactory, redis: Redis) -> None:
    async with api_node(make_settings(worker="tests.workers:Echo"), redis) as (client, node):
        sid = await start(client)
        await send(client, sid, "hi", wait=5)
        events = await _events(node, "chat", sid, want=2)
        kinds = [(e.type, json.loads(e.data)) for e in events]
        assert kinds[0][0] == "message" and kinds[0][1]["data"] == "hi", kinds
        assert kinds[1][0] == "reply" and kinds[1][1]["data"]["echo"] == "hi"
        assert kinds[0][1]["message_id"] == kinds[1][1]["message_id"]


async def _events(node: Node, call: str, sid: str, want: int) -> list[Any]:
    out: list[Any] = []
    with node.events.listen(call, sid) as listener:
        for _ in range(want * 2):
            event = await asyncio.wait_for(listener.next(2), 3)
            if event is not None:
                out.append(event)
            if len(out) == want:
                break
    return out


async def test_a_long_queue_is_read_to_the_end(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """More messages than one inbox read takes (100) queue up before the worker reads:
    every one is delivered, without another message to nudge the owner."""
    async with api_client(make_settings(worker="tests.workers:LateEcho"), redis) as client:
        sid = await start(client)
        for i in range(250):
            assert (await send(client, sid, i)).status_code == 202
        for _ in range(100):
            await asyncio.sleep(0.05)
            checkpoint = await client.get(f"/calls/chat/sessions/{sid}/checkpoint")
            if checkpoint.status_code == 200 and len(checkpoint.json()["state"]["heard"]) == 250:
                break
        assert checkpoint.json()["state"]["heard"] == list(range(250))
