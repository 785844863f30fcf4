"""Named workers, placement and migration through the API of in-process nodes that share
one Redis (fakeredis and a real redis-server). Real processes: tests/multinode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from fleet.models import SessionRecord, State
from fleet.runtime import placement
from fleet.runtime.node import Node
from tests.conftest import SettingsFactory, api_node

COUNTER = "counter=fleet.workers.counter:Counter"
VOICE = "voice=tests.workers:Voice"


@asynccontextmanager
async def nodes(
    make_settings: SettingsFactory, redis: Redis, *workers: str, **settings: Any
) -> AsyncIterator[list[tuple[httpx.AsyncClient, Node]]]:
    """One node per worker setting, each with its own app."""
    async with AsyncExitStack() as stack:
        out = []
        for i, worker in enumerate(workers):
            node_settings = make_settings(node_id=f"n{i}", worker=worker, **settings)
            out.append(await stack.enter_async_context(api_node(node_settings, redis)))
        yield out


async def start(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/calls/c/sessions", json=body)


async def test_workers_are_listed_with_their_schema_and_nodes(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with nodes(make_settings, redis, COUNTER, f"{COUNTER},{VOICE}") as [(a, _), _b]:
        listed = (await a.get("/workers")).json()["workers"]
        by_name = {w["name"]: w for w in listed}
        assert list(by_name) == ["counter", "voice"]  # the asked node's own first
        assert by_name["counter"]["nodes"] == ["n0", "n1"]
        assert by_name["voice"]["nodes"] == ["n1"]  # described by n1, read through n0
        voice = by_name["voice"]
        assert voice["description"].startswith("A worker with a Params model")
        assert voice["resumable"] is True and voice["inbox"] == "queue"
        assert voice["params_schema"]["required"] == ["language"]
        assert by_name["counter"]["params_schema"]["properties"]["interval"]["default"] == 1.0
        node_list = (await a.get("/nodes")).json()["nodes"]
        assert {n["node_id"]: n["workers"] for n in node_list} == {
            "n0": ["counter"],
            "n1": ["counter", "voice"],
        }


async def test_a_start_names_its_worker_and_bad_names_and_params_are_refused(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with nodes(make_settings, redis, f"{COUNTER},{VOICE}") as [(client, _)]:
        plain = await start(client)
        assert plain.status_code == 201 and plain.json()["worker"] == "counter"
        voice = await start(client, worker="voice", params={"language": "en"})
        assert voice.status_code == 201, voice.text
        sid = voice.json()["session_id"]
        assert (await client.get(f"/calls/c/sessions/{sid}")).json()["worker"] == "voice"

        unknown = await start(client, worker="coder")
        assert unknown.status_code == 422 and unknown.json()["code"] == "unknown_worker"
        assert "counter, voice" in unknown.json()["detail"]

        bad = await start(client, worker="voice", params={"language": "English", "x": 1})
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_params"
        fields = {tuple(e["loc"]) for e in bad.json()["errors"]}
        assert fields == {("params", "language"), ("params", "x")}
        malformed = await start(client, worker="no spaces")
        assert malformed.status_code == 422 and malformed.json()["code"] == "invalid_request"


async def test_a_start_goes_to_a_node_that_runs_its_worker(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with nodes(make_settings, redis, COUNTER, f"{COUNTER},{VOICE}") as [(a, _), (_, b)]:
        answer = await start(a, worker="voice", params={"language": "fr"})
        assert answer.status_code == 201, answer.text
        info = answer.json()
        assert info["node_id"] == "n1" and info["state"] == "running"
        assert f"c/{info['session_id']}" in b.sessions
        # Params are validated by the node that runs the worker, and its field errors
        # come back through the node asked.
        bad = await start(a, worker="voice", params={"speed": 9})
        assert bad.status_code == 422, bad.text
        assert {tuple(e["loc"]) for e in bad.json()["errors"]} == {
            ("params", "language"),
            ("params", "speed"),
        }
        assert len(b.sessions) == 1  # the refused start's slot was given back
        assert await b.registry.node_slots("n1") == {f"c/{info['session_id']}"}


async def test_a_full_node_places_elsewhere_and_a_full_fleet_is_429(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with nodes(make_settings, redis, COUNTER, COUNTER, max_sessions_per_node=2) as pair:
        (a, node_a), (_, node_b) = pair
        placed = [await start(a) for _ in range(4)]
        assert [r.status_code for r in placed] == [201] * 4
        assert [r.json()["node_id"] for r in placed] == ["n0", "n0", "n1", "n1"]
        full = await start(a)
        assert full.status_code == 429 and full.json()["code"] == "no_capacity"
        assert len(node_a.sessions) == len(node_b.sessions) == 2


async def test_spread_placement_picks_the_node_with_most_room(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with nodes(
        make_settings, redis, COUNTER, COUNTER, max_sessions_per_node=10, placement="spread"
    ) as [(a, _), _b]:
        where = [(await start(a)).json()["node_id"] for _ in range(6)]
        assert where.count("n0") == where.count("n1") == 3


async def test_a_draining_node_places_starts_on_the_node_with_most_room(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with nodes(make_settings, redis, COUNTER, COUNTER, COUNTER, drain_timeout=30) as trio:
        (a, node_a), (b, _), _ = trio
        await start(a, params={"interval": 0.05})  # keeps n0's drain from ending at once
        for _ in range(2):
            assert (await start(b)).json()["node_id"] == "n1"
        assert (await a.get("/ready")).headers.get("connection") is None
        node_a.begin_drain()
        assert (await a.get("/ready")).status_code == 503
        placed = [await start(a) for _ in range(2)]
        assert [p.status_code for p in placed] == [201, 201], placed[0].text
        # Not the first other node that has room: the one with the most (n1 holds two).
        assert [p.json()["node_id"] for p in placed] == ["n2", "n2"]
        # Its answers tell a proxy to stop reusing connections to it before it exits.
        assert placed[0].headers["connection"] == "close"
        for info in (await b.get("/calls/c/sessions")).json()["sessions"]:  # a quick exit
            await b.delete(f"/calls/c/sessions/{info['session_id']}", params={"wait": 5})


async def test_a_forward_that_is_not_answered_in_time_is_given_up_for_good(
    make_settings: SettingsFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(placement, "FORWARD_WAIT", 0.3)
    async with nodes(make_settings, redis, COUNTER, f"{COUNTER},{VOICE}") as [(a, _), (_, b)]:
        held = asyncio.Event()
        go_on = asyncio.Event()

        async def frozen(record: SessionRecord) -> None:
            held.set()
            await go_on.wait()

        b.starts.before_create = frozen
        run_here = b.starts.run_here
        ran: list[bool] = []

        async def recording(*args: Any) -> bool:
            ran.append(await run_here(*args))
            return ran[-1]

        b.starts.run_here = recording  # type: ignore[method-assign,assignment]
        answer = await start(a, worker="voice", params={"language": "de"})
        assert answer.status_code == 503 and answer.json()["code"] == "start_failed"
        assert held.is_set()
        go_on.set()  # the target wakes up: it must not start what the client was told failed
        for _ in range(100):
            if ran:
                break
            await asyncio.sleep(0.02)
        assert ran == [False]  # the record given up is there: it never ran
        for _ in range(100):  # it finds the record written ended and frees its slot
            if not (slots := await b.registry.node_slots("n1")):
                break
            await asyncio.sleep(0.02)
        assert slots == set() and b.sessions == {}
        listed = (await a.get("/calls/c/sessions")).json()["sessions"]
        assert [(s["state"], s["end_reason"], s["error"]) for s in listed] == [
            ("ended", "failed", "not_started")
        ]


async def test_a_forward_answered_late_waits_for_the_session_that_was_created(
    make_settings: SettingsFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(placement, "FORWARD_WAIT", 0.2)
    async with nodes(make_settings, redis, COUNTER, f"{COUNTER},{VOICE}") as [(a, _), (_, b)]:
        original = b.starts.run_here

        async def slow_answer(*args: Any) -> bool:
            created = await original(*args)
            await asyncio.sleep(0.5)  # created and running, but the answer comes late
            return created

        b.starts.run_here = slow_answer  # type: ignore[method-assign,assignment]
        answer = await start(a, worker="voice", params={"language": "it"})
        assert answer.status_code == 201, answer.text
        assert answer.json()["node_id"] == "n1" and answer.json()["state"] == "running"
        assert len(b.sessions) == 1


async def test_migrate_moves_a_session_and_it_resumes_from_its_checkpoint(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with nodes(make_settings, redis, COUNTER, COUNTER) as [(a, node_a), (_, node_b)]:
        sid = (await start(a, params={"interval": 0.02})).json()["session_id"]
        path = f"/calls/c/sessions/{sid}"
        while (await a.get(f"{path}/checkpoint")).status_code != 200:
            await asyncio.sleep(0.02)
        moved = await a.post(f"{path}/migrate")
        assert moved.status_code == 202 and moved.json() == {"state": "migrating", "node_id": "n0"}
        info: dict[str, Any] = {}
        for _ in range(250):
            info = (await a.get(path)).json()
            if info["node_id"] == "n1" and info["state"] == "running":
                break
            await asyncio.sleep(0.02)
        assert info["node_id"] == "n1" and info["resumed_count"] == 1, info
        assert f"c/{sid}" in node_b.sessions and f"c/{sid}" not in node_a.sessions
        before = (await a.get(f"{path}/checkpoint")).json()["state"]["n"]
        await asyncio.sleep(0.2)
        after = (await a.get(f"{path}/checkpoint")).json()["state"]["n"]
        assert after > before > 0  # counting on from where it was, on n1


async def test_migrate_refuses_what_cannot_move(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with nodes(make_settings, redis, COUNTER) as [(client, _)]:
        alone = (await start(client)).json()["session_id"]
        answer = await client.post(f"/calls/c/sessions/{alone}/migrate")
        assert answer.status_code == 409 and answer.json()["code"] == "no_target"
        pinned = (await start(client, resumable=False)).json()["session_id"]
        answer = await client.post(f"/calls/c/sessions/{pinned}/migrate")
        assert answer.status_code == 409 and answer.json()["code"] == "not_resumable"
        answer = await client.post("/calls/c/sessions/nope/migrate")
        assert answer.status_code == 404


async def test_only_admin_may_migrate(make_settings: SettingsFactory, redis: Redis) -> None:
    keys = "admin:" + "a" * 16 + ",alice:" + "b" * 16
    async with nodes(make_settings, redis, COUNTER, api_keys=keys) as [(client, _)]:
        alice = {"Authorization": "Bearer " + "b" * 16}
        started = await client.post("/calls/c/sessions", headers=alice)
        sid = started.json()["session_id"]
        refused = await client.post(f"/calls/c/sessions/{sid}/migrate", headers=alice)
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
        admin = {"Authorization": "Bearer " + "a" * 16}
        answer = await client.post(f"/calls/c/sessions/{sid}/migrate", headers=admin)
        assert answer.status_code == 409 and answer.json()["code"] == "no_target"


async def test_a_migration_that_loses_its_target_resumes_where_it_was(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with nodes(make_settings, redis, COUNTER, COUNTER) as [(a, node_a), (_, node_b)]:
        sid = (await start(a, params={"interval": 0.02})).json()["session_id"]
        node_b.begin_drain()  # after the check that found it, before the hand-off
        await node_a.directory.nodes(fresh=True)
        session = node_a.sessions[f"c/{sid}"]
        session.migrate()
        record: SessionRecord | None = None
        for _ in range(250):
            record = await node_a.registry.get("c", sid)
            if record is not None and record.resumed_count == 1 and record.state == State.RUNNING:
                break
            await asyncio.sleep(0.02)
        assert record is not None and record.node_id == "n0" and record.resumed_count == 1
        assert record.state == State.RUNNING
