"""Threads: a conversation that outlives its sessions, per principal. Continuity across
sessions, at most one live session (under races), sends to a thread, another principal's
thread, expiry, deletion, and the repair of a thread left marked busy by a crash. On
fakeredis and on a real redis-server."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from fleet.runtime import threads as runtime_threads
from fleet.store.keys import make_ref
from tests.conftest import SettingsFactory, api_client, api_node

ECHO = "tests.workers:Echo"
REMEMBER = "tests.workers:Remember"
ALICE, BOB = "a" * 32, "b" * 32


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def start(
    client: httpx.AsyncClient, thread: str = "t1", call: str = "c", **kw: Any
) -> httpx.Response:
    return await client.post(f"/calls/{call}/sessions", json={"thread_id": thread, **kw})


async def invoke(client: httpx.AsyncClient, thread: str = "t1", **kw: Any) -> dict[str, Any]:
    resp = await client.post(
        "/calls/c/sessions", params={"wait": 5}, json={"thread_id": thread, **kw}
    )
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def tell(
    client: httpx.AsyncClient, data: Any, thread: str = "t1", **kw: Any
) -> httpx.Response:
    return await client.post(
        f"/threads/{thread}/messages", params={"wait": 5}, json={"data": data, **kw}
    )


async def test_each_session_on_a_thread_starts_from_its_latest_state(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=REMEMBER), redis) as client:
        results = [(await invoke(client))["result"] for _ in range(3)]
        assert results == [{"thread_id": "t1", "n": n} for n in (1, 2, 3)]
        other = await invoke(client, thread="t2")
        assert other["result"] == {"thread_id": "t2", "n": 1}
        assert other["thread_id"] == "t2"
        # A session on no thread starts from nothing, as ever.
        plain = await client.post("/calls/c/sessions", params={"wait": 5})
        assert plain.json()["result"] == {"thread_id": None, "n": 1}

        thread = (await client.get("/threads/t1")).json()
        assert thread["state"] == {"n": 3} and thread["live_session"] is None
        assert thread["checkpoint_version"] == 1
        assert len(thread["sessions"]) == 3 and thread["next_cursor"] is None
        starts = [s["started_at"] for s in thread["sessions"]]
        assert starts == sorted(starts, reverse=True)  # newest first
        assert all(s["state"] == "ended" for s in thread["sessions"])
        assert thread["updated_at"] >= thread["created_at"]
        # Paged.
        page = (await client.get("/threads/t1", params={"limit": 2})).json()
        assert len(page["sessions"]) == 2 and page["next_cursor"] == "2"
        rest = (await client.get("/threads/t1", params={"cursor": "2"})).json()
        assert [s["session_id"] for s in page["sessions"] + rest["sessions"]] == [
            s["session_id"] for s in thread["sessions"]
        ]


async def test_a_chat_on_a_thread_goes_on_across_sessions(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=ECHO), redis) as client:
        first = await tell(client, "hello")
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["started"] is True and body["call_id"] == "t1"
        assert body["reply"] == {"echo": "hello", "count": 1}
        second = (await tell(client, "again")).json()
        assert second["started"] is False and second["session_id"] == body["session_id"]
        assert second["reply"]["count"] == 2
        where = f"/calls/t1/sessions/{body['session_id']}"
        assert (await client.delete(where, params={"wait": 5})).json()["state"] == "ended"
        # A new session on the thread picks the conversation up where it was.
        third = (await tell(client, "next day")).json()
        assert third["started"] is True and third["session_id"] != body["session_id"]
        assert third["reply"] == {"echo": "next day", "count": 3}
        thread = (await client.get("/threads/t1")).json()
        assert thread["state"] == {"heard": ["hello", "again", "next day"]}
        assert thread["live_session"] == {"call_id": "t1", "session_id": third["session_id"]}


async def test_one_live_session_per_thread_even_when_starts_race(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=ECHO), redis) as client:
        answers = await asyncio.gather(*(start(client) for _ in range(12)))
        started = [a for a in answers if a.status_code == 201]
        assert len(started) == 1, [a.text for a in answers]
        live = started[0].json()["session_id"]
        busy = [a.json() for a in answers if a.status_code == 409]
        assert len(busy) == 11 and {b["code"] for b in busy} == {"thread_busy"}
        assert all(live in b["detail"] for b in busy)
        # Once it has ended, the thread takes a new session.
        await client.delete(f"/calls/c/sessions/{live}", params={"wait": 5})
        assert (await start(client)).status_code == 201


async def test_racing_sends_start_one_session_and_both_messages_reach_it(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=ECHO), redis) as client:
        for round in range(3):
            thread = f"race{round}"
            answers = await asyncio.gather(*(tell(client, i, thread=thread) for i in range(4)))
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            bodies = [a.json() for a in answers]
            assert len({b["session_id"] for b in bodies}) == 1
            assert sum(b["started"] for b in bodies) == 1
            thread_info = (await client.get(f"/threads/{thread}")).json()
            heard = thread_info["state"]["heard"]
            # Every message once, in the order of their ids (the order the thread took them).
            by_id = [b["reply"]["echo"] for b in sorted(bodies, key=lambda b: b["message_id"])]
            assert sorted(heard) == [0, 1, 2, 3] and heard == by_id


async def test_another_principals_thread_is_not_found_and_not_shared(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    keys = SecretStr(f"alice:{ALICE},bob:{BOB}")
    settings = make_settings(worker=ECHO, api_keys=keys)
    async with api_client(settings, redis) as client:
        alice, bob = bearer(ALICE), bearer(BOB)
        sent = await client.post(
            "/threads/t1/messages", params={"wait": 5}, json={"data": "secret"}, headers=alice
        )
        assert sent.status_code == 200
        assert (await client.get("/threads/t1", headers=bob)).status_code == 404
        assert (await client.delete("/threads/t1", headers=bob)).status_code == 404
        # Bob's "t1" is his own conversation: it starts from nothing.
        his = await client.post(
            "/threads/t1/messages", params={"wait": 5}, json={"data": "hi"}, headers=bob
        )
        assert his.json()["reply"] == {"echo": "hi", "count": 1}
        assert his.json()["session_id"] != sent.json()["session_id"]
        mine = (await client.get("/threads/t1", headers=alice)).json()
        assert mine["state"] == {"heard": ["secret"]}


async def test_a_thread_expires_its_ttl_after_its_last_update(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=REMEMBER, thread_ttl=1), redis) as client:
        assert (await invoke(client, params={}))["result"]["n"] == 1
        assert (await client.get("/threads/t1")).status_code == 200
        await asyncio.sleep(1.6)
        gone = await client.get("/threads/t1")
        assert gone.status_code == 404 and gone.json()["code"] == "not_found"
        # The name can be used again: a new conversation.
        assert (await invoke(client))["result"]["n"] == 1


async def test_a_thread_lives_while_a_session_runs_on_it(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=REMEMBER, thread_ttl=1), redis) as client:
        sid = (await start(client, params={"hold": True})).json()["session_id"]
        await asyncio.sleep(1.6)
        assert (await client.get("/threads/t1")).json()["live_session"]["session_id"] == sid
        assert (await start(client)).status_code == 409


async def test_delete_is_refused_while_a_session_runs_then_forgets_the_thread(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=ECHO), redis) as client:
        sid = (await start(client)).json()["session_id"]
        refused = await client.delete("/threads/t1")
        assert refused.status_code == 409 and refused.json()["code"] == "thread_busy"
        assert sid in refused.json()["detail"]
        await client.delete(f"/calls/c/sessions/{sid}", params={"wait": 5})
        assert (await client.delete("/threads/t1")).status_code == 204
        assert (await client.get("/threads/t1")).status_code == 404
        assert (await client.delete("/threads/t1")).status_code == 404


async def test_bad_thread_ids_and_bodies_are_refused(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(worker=ECHO), redis) as client:
        assert (await client.get("/threads/a%20b")).status_code == 422
        assert (await start(client, thread="x" * 129)).status_code == 422
        assert (await start(client, thread="a/b")).status_code == 422
        bad = await client.post("/threads/t1/messages", json={"data": 1, "worker_x": 1})
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"
        assert (await client.get("/threads/t1")).status_code == 404  # nothing was started


async def test_a_claim_whose_start_never_happened_is_repaired_by_the_next_request(
    make_settings: SettingsFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that claimed the thread and died before it created the session leaves the
    thread marked busy by a session that does not exist: refused while the start may
    still be under way, released by the next request once START_GRACE has passed."""
    monkeypatch.setattr(runtime_threads, "START_GRACE", 2.0)
    async with api_node(make_settings(worker=REMEMBER), redis) as (client, node):
        ghost = make_ref("c", "never-started")
        assert (await node.registry.claim_thread("anonymous", "t1", ghost)).claimed
        refused = await start(client)
        assert refused.status_code == 409 and "never-started" in refused.json()["detail"]
        await asyncio.sleep(2.1)
        assert (await invoke(client))["result"]["n"] == 1


async def test_a_thread_left_busy_by_an_ended_session_is_repaired(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """The end of a session and the release of its thread are two steps (two slots on
    Cluster): a crash between them leaves the thread marked busy by an ended session. The
    next start, send or delete finds it ended and releases it."""
    async with api_node(make_settings(worker=REMEMBER), redis) as (client, node):
        first = await invoke(client)
        ref = make_ref("c", first["session_id"])
        key = node.registry.keys.thread("anonymous", "t1")
        for request in ("start", "send", "delete"):
            await redis.hset(key, mapping={"live": ref, "live_since": "1"})  # the crash
            if request == "start":
                assert (await invoke(client))["result"]["n"] == 2
            elif request == "send":
                sent = await tell(client, "hi")
                assert sent.status_code in (200, 202, 409), sent.text  # Remember does not read
                assert sent.json().get("code") != "thread_busy", sent.text
            else:
                assert (await client.delete("/threads/t1")).status_code == 204
