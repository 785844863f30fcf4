"""``invoke`` and ``stream`` through both clients against a node (on fakeredis and on a real
redis-server): the result, a wait that runs out, a start on a thread, the events of a
stream, a stream cut short and resumed, and the retries that make both safe."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from fleet.api import create_app
from fleet.client import (
    AsyncFleetClient,
    FleetAPIError,
    FleetClient,
    FleetConnectionError,
    ServerSentEvent,
)
from fleet.client.base import Requests
from fleet.models import SessionInfo, State
from fleet.runtime.node import Node
from tests.client.test_client import Api, serve
from tests.client.test_retries import LoseFirstAnswer, is_start, pauses  # noqa: F401
from tests.conftest import SettingsFactory, uvicorn_node, wait_ready

ANSWER = "tests.workers:Answer"
STEPS = "tests.workers:Steps"
REMEMBER = "tests.workers:Remember"


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def node_of(
    kind: str, make_settings: SettingsFactory, redis: Redis
) -> Callable[[str], contextlib.AbstractAsyncContextManager[Api]]:
    """``async with node_of(worker) as api``: a node running ``worker``, and a client."""
    return lambda worker: serve(kind, make_settings(worker=worker), redis)


async def stream(api: Api, *args: Any, **kw: Any) -> list[ServerSentEvent]:
    if isinstance(api.client, FleetClient):
        sync = api.client
        return await asyncio.to_thread(lambda: list(sync.stream(*args, **kw)))
    return [e async for e in api.client.stream(*args, **kw)]


# ---- invoke -------------------------------------------------------------------------------


async def test_invoke_returns_the_ended_session_with_its_result(node_of: Any) -> None:
    async with node_of(ANSWER) as api:
        info = await api("invoke", "calc", params={"value": [1, "two", None]}, wait=10)
        assert isinstance(info, SessionInfo) and info.call_id == "calc"
        assert info.state == State.ENDED and info.end_reason == "completed"
        assert info.result == [1, "two", None] and info.error is None
        assert (await api("invoke", "calc")).result == {"answer": 42}  # the default wait
        failed = await api("invoke", "calc", params={"object": True}, wait=10)
        assert failed.end_reason == "failed" and failed.error == "invalid_result"
        assert failed.result is None


async def test_an_invoke_whose_wait_runs_out_returns_the_running_session(node_of: Any) -> None:
    async with node_of(ANSWER) as api:
        loop = asyncio.get_running_loop()
        began = loop.time()
        info = await api("invoke", "calc", params={"after": 30}, wait=0.3)
        assert 0.25 <= loop.time() - began < 5
        assert info.state == State.RUNNING and info.result is None and info.end_reason is None
        closed = await api("close_session", "calc", info.session_id, wait=5)
        assert closed.end_reason == "closed" and closed.result == {"answer": 42}


async def test_invoke_and_start_on_a_thread(node_of: Any) -> None:
    async with node_of(REMEMBER) as api:
        first = await api("invoke", "c", thread_id="t1", wait=10)
        second = await api("invoke", "c", thread_id="t1", wait=10)
        assert (first.result, second.result) == (
            {"thread_id": "t1", "n": 1},
            {"thread_id": "t1", "n": 2},
        )
        assert first.thread_id == second.thread_id == "t1"
        held = await api("start_session", "c", {"hold": True}, thread_id="t1")
        assert held.thread_id == "t1"
        with pytest.raises(FleetAPIError) as busy:
            await api("invoke", "c", thread_id="t1", wait=10)
        assert (busy.value.status, busy.value.code) == (409, "thread_busy")
        assert held.session_id in busy.value.detail
        assert (await api("close_session", "c", held.session_id, wait=5)).result["n"] == 3
        assert (await api("thread", "t1")).state == {"n": 3}


async def test_an_invoke_whose_answer_was_lost_waits_for_the_same_session(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """The first attempt starts the session and its answer never comes back (as when its
    node dies mid-request): the retry, with the same key, gets that session's end."""
    settings = make_settings(worker=ANSWER)
    node = Node(settings, redis=redis)
    app = create_app(settings, node)
    async with app.router.lifespan_context(app):
        await wait_ready(node)
        transport = LoseFirstAnswer(httpx.ASGITransport(app=app))
        async with AsyncFleetClient("http://fleet", transport=transport) as client:
            info = await client.invoke("calc", params={"value": "once", "after": 0.2}, wait=10)
            listed = await client.list_call_sessions("calc")
    assert info.state == State.ENDED and info.result == "once"
    assert [s.session_id for s in listed] == [info.session_id]
    first, retry = transport.hits
    assert first.headers["idempotency-key"] == retry.headers["idempotency-key"]
    assert first.url.params["wait"] == retry.url.params["wait"] == "10"


def test_invoke_sends_a_key_a_wait_and_waits_long_enough() -> None:
    seen: list[httpx.Request] = []
    ended = {
        "session_id": "s", "call_id": "c", "call_type": "default", "node_id": "n",
        "state": "ended", "session_started_at": 1.0, "ended_at": 2.0,
        "end_reason": "completed", "epoch": 1, "resumed_count": 0, "checkpoint_version": 0,
        "thread_id": "t", "result": {"ok": True},
    }  # fmt: skip

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json=ended)

    with FleetClient("http://fleet", transport=httpx.MockTransport(handle)) as client:
        assert client.invoke("c", params={"x": 1}, thread_id="t", wait=120).result == {"ok": True}
        client.invoke("c", idempotency_key="order-7")
        client.start_session("c")
    keys = [r.headers["idempotency-key"] for r in seen]
    assert str(uuid.UUID(keys[0])) == keys[0] and keys[1] == "order-7"
    assert seen[0].url.params["wait"] == "120" and seen[1].url.params["wait"] == "60.0"
    assert seen[0].extensions["timeout"]["read"] >= 120
    assert json.loads(seen[0].content) == {
        "call_type": "default", "params": {"x": 1}, "resumable": True, "thread_id": "t",
    }  # fmt: skip
    # No thread, no thread_id in the body (a node that predates threads refuses it), and
    # a plain start does not wait.
    assert "thread_id" not in json.loads(seen[1].content)
    assert "wait" not in seen[2].url.params


# ---- stream -------------------------------------------------------------------------------


async def test_stream_yields_the_new_sessions_events_to_its_end(node_of: Any) -> None:
    async with node_of(STEPS) as api:
        events = await stream(api, "job", params={"steps": 3, "interval": 0.02})
        assert [e.event for e in events] == [
            "session_started", "step", "step", "step", "session_ended",
        ]  # fmt: skip
        assert [e.json() for e in events[1:4]] == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert events[-1].json() == {"end_reason": "completed", "result": {"steps": 3}}
        assert len({e.id for e in events}) == 5
        (info,) = await api("list_call_sessions", "job")
        assert info.state == State.ENDED and info.result == {"steps": 3}


async def test_stream_refusals_raise(node_of: Any) -> None:
    async with node_of(REMEMBER) as api:
        held = await api("start_session", "c", {"hold": True}, thread_id="t")
        with pytest.raises(FleetAPIError) as busy:
            await stream(api, "c", thread_id="t")
        assert busy.value.code == "thread_busy" and held.session_id in busy.value.detail
        with pytest.raises(FleetAPIError) as invalid:
            await stream(api, "c", thread_id="not a thread id")
        assert invalid.value.status == 422
        await api("close_session", "c", held.session_id, wait=5)
        events = await stream(api, "c", thread_id="t")
        assert events[-1].json()["result"] == {"thread_id": "t", "n": 2}


class CutAsync(httpx.AsyncByteStream):
    def __init__(self, part: bytes) -> None:
        self.part = part

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.part
        raise httpx.ReadError("connection reset by peer")


class CutSync(httpx.SyncByteStream):
    def __init__(self, part: bytes) -> None:
        self.part = part

    def __iter__(self) -> Iterator[bytes]:
        yield self.part
        raise httpx.ReadError("connection reset by peer")


def first_events(body: bytes, n: int) -> bytes:
    """The first ``n`` events of an SSE body (comments included), and nothing after."""
    end = 0
    for _ in range(n):
        end = body.index(b"\n\n", end) + 2
    return body[:end]


class CutStarts(httpx.AsyncBaseTransport, httpx.BaseTransport):
    """Every stream a start opens is cut after its first two events; what else is asked
    goes through. ``seen``: every request."""

    def __init__(self, inner: httpx.AsyncBaseTransport | httpx.BaseTransport) -> None:
        self.inner = inner
        self.seen: list[httpx.Request] = []
        self.location = ""

    def _cut(self, request: httpx.Request, response: httpx.Response, body: bytes) -> bool:
        self.seen.append(request)
        if not is_start(request) or response.status_code != 200:
            return False
        self.location = response.headers["location"]
        return body.count(b"\n\n") > 2

    def close(self) -> None:
        if isinstance(self.inner, httpx.BaseTransport):
            self.inner.close()

    async def aclose(self) -> None:
        if isinstance(self.inner, httpx.AsyncBaseTransport):
            await self.inner.aclose()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(self.inner, httpx.AsyncBaseTransport)
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        if not self._cut(request, response, body):
            return httpx.Response(response.status_code, headers=response.headers, content=body)
        stream = CutAsync(first_events(body, 2))
        return httpx.Response(200, headers=response.headers, stream=stream)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(self.inner, httpx.BaseTransport)
        response = self.inner.handle_request(request)
        body = response.read()
        if not self._cut(request, response, body):
            return httpx.Response(response.status_code, headers=response.headers, content=body)
        return httpx.Response(200, headers=response.headers, stream=CutSync(first_events(body, 2)))


async def test_a_cut_stream_resumes_from_the_sessions_events(
    kind: str, make_settings: SettingsFactory, redis: Redis
) -> None:
    """The start's own stream is cut after ``session_started`` and one step: the rest
    comes from ``GET …/events`` with ``Last-Event-ID``, each event once."""
    settings = make_settings(worker=STEPS)
    params = {"steps": 3, "interval": 0.02}
    node = Node(settings, redis=redis)
    if kind == "sync":
        async with uvicorn_node(node) as url:
            cutter = CutStarts(httpx.HTTPTransport())

            def read() -> list[ServerSentEvent]:
                with FleetClient(url, transport=cutter) as client:
                    return list(client.stream("job", params=params))

            events = await asyncio.to_thread(read)
    else:
        app = create_app(settings, node)
        async with app.router.lifespan_context(app):
            await wait_ready(node)
            cutter = CutStarts(httpx.ASGITransport(app=app))
            async with AsyncFleetClient("http://fleet", transport=cutter) as client:
                events = [e async for e in client.stream("job", params=params)]
    assert [e.event for e in events] == [
        "session_started", "step", "step", "step", "session_ended",
    ]  # fmt: skip
    assert events[-1].json() == {"end_reason": "completed", "result": {"steps": 3}}
    start, resume = cutter.seen
    assert is_start(start) and start.headers["accept"] == "text/event-stream"
    assert resume.method == "GET" and resume.url.path.endswith("/events")
    assert resume.headers["last-event-id"] == events[1].id
    assert resume.url.path == f"{cutter.location}/events"


async def test_stream_close_on_disconnect_closes_a_session_left_early(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    node = Node(make_settings(worker=STEPS), redis=redis)
    async with uvicorn_node(node) as url, AsyncFleetClient(url) as client:
        slow = {"steps": 1000, "interval": 0.05}
        async with contextlib.aclosing(client.stream("job", params=slow)) as events:
            async for _ in events:
                break  # left at session_started: the session runs on
        async with contextlib.aclosing(
            client.stream("job", params=slow, close_on_disconnect=True)
        ) as events:
            async for event in events:
                assert event.event == "session_started"
                break
        for _ in range(250):
            states = {s.state for s in await client.list_call_sessions("job")}
            if State.ENDED in states:
                break
            await asyncio.sleep(0.02)
        listed = await client.list_call_sessions("job")
        assert sorted(s.state for s in listed) == [State.ENDED, State.RUNNING]
        assert {s.end_reason for s in listed} == {None, "closed"}


SSE = b'id: 0-1\nevent: session_started\ndata: {"started_at": 1.0}\n\n'
ENDED = b'id: 5-0\nevent: session_ended\ndata: {"end_reason": "completed"}\n\n'


def scripted_stream(
    answers: list[httpx.Response | Exception], seen: list[httpx.Request]
) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handle)


def opened(body: bytes, location: str | None = "/calls/c/sessions/s1") -> httpx.Response:
    headers = {"content-type": "text/event-stream"}
    if location is not None:
        headers["location"] = location
    return httpx.Response(200, headers=headers, content=body)


@pytest.mark.usefixtures("pauses")
def test_a_stream_is_retried_until_it_opens_with_one_key() -> None:
    seen: list[httpx.Request] = []
    answers: list[httpx.Response | Exception] = [
        httpx.ConnectError("refused"),
        httpx.Response(503, json={"detail": "draining", "code": "draining"}),
        opened(SSE + ENDED),
    ]
    with FleetClient("http://fleet", transport=scripted_stream(answers, seen)) as client:
        events = list(client.stream("c", params={"a": 1}, close_on_disconnect=True))
    assert [e.event for e in events] == ["session_started", "session_ended"]
    assert len(seen) == 3 and len({r.headers["idempotency-key"] for r in seen}) == 1
    assert json.loads(seen[0].content) == {
        "call_type": "default", "params": {"a": 1}, "resumable": True,
        "close_on_disconnect": True,
    }  # fmt: skip


@pytest.mark.usefixtures("pauses")
def test_stream_refusals_are_not_retried_and_a_stream_without_location_is_not_resumed() -> None:
    seen: list[httpx.Request] = []
    refused = httpx.Response(429, json={"detail": "full", "code": "max_sessions"})
    with FleetClient("http://fleet", transport=scripted_stream([refused], seen)) as client:
        with pytest.raises(FleetAPIError) as raised:
            list(client.stream("c"))
    assert raised.value.code == "max_sessions" and len(seen) == 1
    assert "close_on_disconnect" not in json.loads(seen[0].content)

    async def cut_without_location() -> list[ServerSentEvent]:
        headers = {"content-type": "text/event-stream"}
        transport = scripted_stream(
            [httpx.Response(200, headers=headers, stream=CutAsync(SSE))], seen
        )
        async with AsyncFleetClient("http://fleet", transport=transport) as client:
            return [e async for e in client.stream("c")]

    with pytest.raises(FleetConnectionError):
        asyncio.run(cut_without_location())
    assert len(seen) == 2  # not resumed: nothing says where


def test_the_events_path_comes_from_location() -> None:
    req = Requests.stream_session(
        "my call", None, "default", True, None, 0, thread_id=None, close_on_disconnect=False
    )
    assert req.parse(opened(b"", "/calls/my%20call/sessions/abc")) == (
        "/calls/my%20call/sessions/abc/events"
    )
    assert req.parse(opened(b"", "http://node-2:8000/calls/c/sessions/abc")) == (
        "/calls/my%20call/sessions/abc/events"
    )
    assert req.parse(opened(b"", None)) is None
    assert req.parse(opened(b"", "/elsewhere")) is None
