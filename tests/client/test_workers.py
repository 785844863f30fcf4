"""Named workers and migration through both clients, against nodes on fakeredis and on a
real redis-server: a start, an invoke and a thread send that name their worker, the
refusals of an unknown worker and of bad params (with their field errors), ``workers()``,
and ``migrate`` (refused alone, moving a session between two nodes that share a Redis,
for the admin principal only)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from fleet.api import create_app
from fleet.client import (
    AsyncFleetClient,
    FieldError,
    FleetAPIError,
    FleetClient,
    MigrateAccepted,
    WorkerInfo,
)
from fleet.client.errors import api_error
from fleet.models import SessionInfo, State
from fleet.runtime.node import Node
from tests.client.test_client import Api, serve
from tests.client.test_invoke import stream
from tests.conftest import SettingsFactory, running_node, wait_ready

COUNTER = "counter=fleet.workers.counter:Counter"
VOICE = "voice=tests.workers:Voice"
BOTH = f"{COUNTER},{VOICE}"


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def api(kind: str, make_settings: SettingsFactory, redis: Redis) -> AsyncIterator[Api]:
    """One node, ``n0``, that runs both workers (the counter first: the default)."""
    async with serve(kind, make_settings(node_id="n0", worker=BOTH), redis) as client:
        yield client


async def moved_to(api: Api, call: str, sid: str, node_id: str) -> SessionInfo:
    """The session once it runs on ``node_id``."""
    info: SessionInfo | None = None
    for _ in range(250):
        info = await api("get_session", call, sid)
        if info.node_id == node_id and info.state == State.RUNNING:
            return info
        await asyncio.sleep(0.02)
    raise AssertionError(f"session {sid} did not move to {node_id}: {info}")


# ---- starts that name their worker ----------------------------------------------------------


async def test_a_start_an_invoke_and_a_thread_send_run_the_worker_named(api: Api) -> None:
    plain = await api("start_session", "c")
    assert plain.worker == "counter"  # the fleet's first
    voice = await api("start_session", "c", {"language": "en"}, worker="voice")
    assert voice.worker == "voice" and voice.state == State.RUNNING
    assert (await api("get_session", "c", voice.session_id)).worker == "voice"

    done = await api(
        "invoke", "c", params={"interval": 0.01, "limit": 2}, worker="counter", wait=10
    )
    assert (done.worker, done.end_reason, done.result) == ("counter", "completed", {"n": 2})

    sent = await api("send_to_thread", "t-1", "hi", worker="voice", params={"language": "fr"})
    assert sent.started
    started = await api("get_session", sent.call_id, sent.session_id)
    assert started.worker == "voice" and started.thread_id == "t-1"


async def test_a_stream_runs_the_worker_named(api: Api) -> None:
    events = await stream(api, "c", params={"interval": 0.01, "limit": 1}, worker="counter")
    assert [e.event for e in events] == ["session_started", "tick", "session_ended"]
    with pytest.raises(FleetAPIError) as unknown:
        await stream(api, "c", worker="coder")
    assert unknown.value.code == "unknown_worker"


async def test_an_unknown_worker_and_bad_params_are_refused_with_the_fields(api: Api) -> None:
    with pytest.raises(FleetAPIError) as unknown:
        await api("start_session", "c", worker="coder")
    assert (unknown.value.status, unknown.value.code) == (422, "unknown_worker")
    assert "counter, voice" in unknown.value.detail and unknown.value.errors == []

    with pytest.raises(FleetAPIError) as bad:
        await api("start_session", "c", {"language": "English", "x": 1}, worker="voice")
    assert (bad.value.status, bad.value.code) == (422, "invalid_params")
    assert {e.loc for e in bad.value.errors} == {("params", "language"), ("params", "x")}
    by_field = {e.field: e for e in bad.value.errors}
    assert by_field["params.x"].type == "extra_forbidden" and by_field["params.x"].msg
    assert "params.language" in bad.value.detail  # the sentence names them too

    with pytest.raises(FleetAPIError) as missing:  # the same through a thread's start
        await api("send_to_thread", "t-2", "hi", worker="voice")
    assert missing.value.code == "invalid_params"
    assert [(e.loc, e.type) for e in missing.value.errors] == [(("params", "language"), "missing")]
    assert await api("list_call_sessions", "c") == []  # nothing was started


async def test_workers_lists_each_worker_with_its_schema_and_nodes(api: Api) -> None:
    workers = await api("workers")
    assert all(isinstance(w, WorkerInfo) for w in workers)
    assert [w.name for w in workers] == ["counter", "voice"]
    counter, voice = workers
    assert voice.nodes == counter.nodes == ["n0"]
    assert voice.description.startswith("A worker with a Params model")
    assert voice.resumable and not voice.migratable and voice.inbox == "queue"
    assert voice.params_schema is not None and voice.params_schema["required"] == ["language"]
    assert counter.params_schema is not None
    assert counter.params_schema["properties"]["interval"]["default"] == 1.0
    assert [n.workers for n in await api("nodes")] == [["counter", "voice"]]


# ---- migrate --------------------------------------------------------------------------------


async def test_migrate_refuses_what_cannot_move(api: Api) -> None:
    alone = (await api("start_session", "c")).session_id
    with pytest.raises(FleetAPIError) as no_target:
        await api("migrate", "c", alone)
    assert (no_target.value.status, no_target.value.code) == (409, "no_target")
    pinned = (await api("start_session", "c", resumable=False)).session_id
    with pytest.raises(FleetAPIError) as pinned_down:
        await api("migrate", "c", pinned)
    assert pinned_down.value.code == "not_resumable"
    await api("close_session", "c", alone, wait=5)
    with pytest.raises(FleetAPIError) as ended:
        await api("migrate", "c", alone)
    assert (ended.value.status, ended.value.code) == (409, "session_ended")
    with pytest.raises(FleetAPIError) as missing:
        await api("migrate", "c", "nope")
    assert (missing.value.status, missing.value.code) == (404, "not_found")


async def test_migrate_moves_a_session_to_the_other_node(
    kind: str, make_settings: SettingsFactory, redis: Redis
) -> None:
    """Two nodes on one Redis; the client talks to ``n0`` only."""
    async with running_node(make_settings(node_id="n1", worker=BOTH), redis) as other:
        await wait_ready(other)
        async with serve(kind, make_settings(node_id="n0", worker=BOTH), redis) as api:
            params = {"language": "en", "tick": 0.02}
            info = await api("start_session", "c", params, worker="voice")
            sid = info.session_id
            assert info.node_id == "n0"
            while (await api("get_session", "c", sid)).checkpoint_version < 2:
                await asyncio.sleep(0.02)

            moved = await api("migrate", "c", sid)
            assert moved == MigrateAccepted(node_id="n0")
            assert moved.state == "migrating"
            there = await moved_to(api, "c", sid, "n1")
            assert (there.worker, there.resumed_count, there.epoch) == ("voice", 1, 2)
            assert f"c/{sid}" in other.sessions
            before = (await api("get_checkpoint", "c", sid)).state["n"]
            while (await api("get_checkpoint", "c", sid)).state["n"] <= before:
                await asyncio.sleep(0.02)  # counting on, on n1, from where it was

            back = await api("migrate", "c", sid)  # and back, asked of n0 all the same
            assert back.node_id == "n1"
            assert (await moved_to(api, "c", sid, "n0")).resumed_count == 2
            await api("close_session", "c", sid, wait=5)


async def test_only_the_admin_principal_may_migrate(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    alice_token, admin_token = "alice-token-0123456789", "admin-token-0123456789"
    settings = make_settings(api_keys=f"alice:{alice_token},admin:{admin_token}")
    node = Node(settings, redis=redis)
    app = create_app(settings, node)
    async with app.router.lifespan_context(app):
        await wait_ready(node)
        transport = httpx.ASGITransport(app=app)
        async with (
            AsyncFleetClient("http://fleet", token=alice_token, transport=transport) as alice,
            AsyncFleetClient("http://fleet", token=admin_token, transport=transport) as admin,
        ):
            sid = (await alice.start_session("c")).session_id
            with pytest.raises(FleetAPIError) as refused:
                await alice.migrate("c", sid)
            assert (refused.value.status, refused.value.code) == (403, "forbidden")
            with pytest.raises(FleetAPIError) as alone:
                await admin.migrate("c", sid)
            assert alone.value.code == "no_target"


# ---- what is sent, and how errors read (no node needed) -------------------------------------


STARTED = {
    "session_id": "s1",
    "call_id": "c",
    "call_type": "default",
    "node_id": "n1",
    "state": "running",
    "session_started_at": 1.0,
    "epoch": 1,
    "resumed_count": 0,
    "checkpoint_version": 0,
}


def answering(seen: list[httpx.Request]) -> httpx.MockTransport:
    """Answers every start, stream and thread send; keeps what was sent."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.startswith("/threads/"):
            body = {"message_id": "1-0", "call_id": "c", "session_id": "s1", "started": True}
            return httpx.Response(202, json=body)
        if request.headers.get("accept") == "text/event-stream":
            ended = b'id: 1-0\nevent: session_ended\ndata: {"end_reason": "completed"}\n\n'
            headers = {"content-type": "text/event-stream"}
            return httpx.Response(200, headers=headers, content=ended)
        return httpx.Response(201, json=STARTED)

    return httpx.MockTransport(handle)


def sync_starts(transport: httpx.MockTransport, worker: str | None) -> None:
    with FleetClient("http://fleet", transport=transport) as client:
        client.start_session("c", worker=worker)
        client.invoke("c", worker=worker)
        list(client.stream("c", worker=worker))
        client.send_to_thread("t", "hi", worker=worker)


async def async_starts(transport: httpx.MockTransport, worker: str | None) -> None:
    async with AsyncFleetClient("http://fleet", transport=transport) as client:
        await client.start_session("c", worker=worker)
        await client.invoke("c", worker=worker)
        _ = [e async for e in client.stream("c", worker=worker)]
        await client.send_to_thread("t", "hi", worker=worker)


async def test_each_call_that_may_start_a_session_sends_its_worker_only_when_named(
    kind: str,
) -> None:
    seen: list[httpx.Request] = []
    for worker in ("voice", None):
        if kind == "sync":
            await asyncio.to_thread(sync_starts, answering(seen), worker)
        else:
            await async_starts(answering(seen), worker)
    bodies = [json.loads(r.content) for r in seen]
    assert [b.get("worker") for b in bodies] == ["voice"] * 4 + [None] * 4
    assert all("worker" not in b for b in bodies[4:])  # older nodes refuse unknown fields


def test_field_errors_are_read_leniently() -> None:
    body = {
        "detail": "params.language: Field required",
        "code": "invalid_params",
        "errors": [
            {"loc": ["params", "language"], "msg": "Field required", "type": "missing"},
            {"loc": ["params", "items", 0], "msg": "bad"},
            "not an error",
            {"msg": "no loc"},
        ],
    }
    error = api_error(httpx.Response(422, json=body))
    assert error.errors == [
        FieldError(("params", "language"), "Field required", "missing"),
        FieldError(("params", "items", 0), "bad", ""),
    ]
    assert error.errors[1].field == "params.items.0"
    assert str(error) == "422 invalid_params: params.language: Field required"
    odd = api_error(httpx.Response(422, json={"detail": "x", "code": "y", "errors": {"a": 1}}))
    assert odd.errors == []
    assert api_error(httpx.Response(404, json={"detail": "x", "code": "not_found"})).errors == []
