"""``fleet.client``: the sync and async clients against a node, on fakeredis and on a real
redis-server, plus error mapping, the token's handling and the SSE parser.

The async client talks to the app in-process (httpx's ASGI transport); the sync client
talks to the same app served by uvicorn on a loopback port, its blocking calls run in a
thread so the node keeps running on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
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
    SSEDecoder,
)
from fleet.client.base import DEFAULT_TIMEOUT, Requests
from fleet.errors import FleetError
from fleet.models import Checkpoint, CloseAccepted, NodeInfo, SessionInfo, SessionPage, State
from fleet.runtime.node import Node
from fleet.settings import Settings
from tests.conftest import SettingsFactory, uvicorn_node, wait_ready
from tests.redis_server import free_port

FAST = {"interval": 0.02, "limit": 3}
TOKEN = "client-test-token-0123456789"


class Api:
    """One face for both clients: ``await api("method", ...)`` whichever it is."""

    def __init__(self, client: FleetClient | AsyncFleetClient) -> None:
        self.client = client

    async def __call__(self, name: str, *args: Any, **kw: Any) -> Any:
        method = getattr(self.client, name)
        if isinstance(self.client, FleetClient):
            return await asyncio.to_thread(method, *args, **kw)
        return await method(*args, **kw)

    async def events(self, *args: Any, **kw: Any) -> list[ServerSentEvent]:
        if isinstance(self.client, FleetClient):
            sync = self.client
            return await asyncio.to_thread(lambda: list(sync.events(*args, **kw)))
        return [e async for e in self.client.events(*args, **kw)]

    async def all_sessions(self, **kw: Any) -> list[SessionInfo]:
        if isinstance(self.client, FleetClient):
            sync = self.client
            return await asyncio.to_thread(lambda: list(sync.iter_sessions(**kw)))
        return [s async for s in self.client.iter_sessions(**kw)]

    async def wait_state(self, call: str, sid: str, state: State) -> SessionInfo:
        for _ in range(250):
            info: SessionInfo = await self("get_session", call, sid)
            if info.state == state:
                return info
            await asyncio.sleep(0.02)
        raise AssertionError(f"session {sid} is {info.state}, not {state}")


@asynccontextmanager
async def serve(kind: str, settings: Settings, redis: Redis) -> AsyncIterator[Api]:
    """A node and a client of it: the blocking one over a port, or the async one
    in-process."""
    node = Node(settings, redis=redis)
    if kind == "sync":
        async with uvicorn_node(node) as url:
            with FleetClient(url) as sync:
                yield Api(sync)
        return
    app = create_app(settings, node)
    async with app.router.lifespan_context(app):
        await wait_ready(node)
        transport = httpx.ASGITransport(app=app)
        async with AsyncFleetClient("http://fleet", transport=transport) as client:
            yield Api(client)


@pytest.fixture(params=["sync", "async"])
async def api(
    request: pytest.FixtureRequest, make_settings: SettingsFactory, redis: Redis
) -> AsyncIterator[Api]:
    async with serve(request.param, make_settings(), redis) as client:
        yield client


# ---- the API, through both clients ---------------------------------------------------------


async def test_session_lifecycle(api: Api) -> None:
    info = await api("start_session", "room", {"interval": 0.02}, call_type="voice")
    assert isinstance(info, SessionInfo)
    assert info.call_id == "room" and info.call_type == "voice" and info.state == State.RUNNING
    sid = info.session_id

    assert (await api("get_session", "room", sid)).session_id == sid
    assert [s.session_id for s in await api("list_call_sessions", "room")] == [sid]
    await api.wait_state("room", sid, State.RUNNING)
    for _ in range(100):  # the first tick saves the first checkpoint
        if (await api("get_session", "room", sid)).checkpoint_version:
            break
        await asyncio.sleep(0.02)
    checkpoint = await api("get_checkpoint", "room", sid)
    assert isinstance(checkpoint, Checkpoint) and checkpoint.state["n"] >= 1
    metrics = await api("session_metrics", "room", sid)
    assert metrics.session_id == sid and metrics.duration_seconds >= 0

    ended = await api("close_session", "room", sid, wait=5)
    assert isinstance(ended, SessionInfo)
    assert ended.state == State.ENDED and ended.end_reason == "closed"


async def test_close_without_wait_is_accepted(api: Api) -> None:
    sid = (await api("start_session", "demo")).session_id
    assert isinstance(await api("close_session", "demo", sid), CloseAccepted)
    assert (await api.wait_state("demo", sid, State.ENDED)).end_reason == "closed"


async def test_listing_pages_and_iterates(api: Api) -> None:
    sids = {(await api("start_session", f"call-{i}")).session_id for i in range(5)}
    page = await api("list_sessions", limit=2)
    assert isinstance(page, SessionPage) and len(page.sessions) == 2
    assert page.next_cursor is not None
    listed = await api.all_sessions(page_size=2)
    assert {s.session_id for s in listed} == sids and len(listed) == 5
    running = await api.all_sessions(state=State.RUNNING, page_size=3)
    assert {s.session_id for s in running} == sids
    assert await api.all_sessions(state="ended") == []


async def test_nodes_health_ready(api: Api) -> None:
    nodes = await api("nodes")
    assert len(nodes) == 1 and isinstance(nodes[0], NodeInfo)
    assert (await api("health")).status == "ok"
    ready = await api("ready")
    assert ready.ready and ready.reason is None


async def test_api_errors_carry_status_code_and_detail(api: Api) -> None:
    with pytest.raises(FleetAPIError) as missing:
        await api("get_session", "demo", "nope")
    assert missing.value.status == 404 and missing.value.code == "not_found"
    assert missing.value.detail and isinstance(missing.value, FleetError)
    with pytest.raises(FleetAPIError) as invalid:
        await api("get_session", "demo", "not an id")
    assert invalid.value.status == 422 and invalid.value.code == "invalid_request"
    with pytest.raises(FleetAPIError) as bad_params:
        await api("start_session", "demo", {"interval": -1})
    assert bad_params.value.code == "invalid_params"
    sid = (await api("start_session", "demo", {"interval": 5})).session_id
    with pytest.raises(FleetAPIError) as no_version:
        await api("get_checkpoint", "demo", sid, version=7)
    assert no_version.value.status == 404


async def test_events_replay_resume_and_end(api: Api) -> None:
    sid = (await api("start_session", "demo", FAST)).session_id
    events = await api.events("demo", sid)
    kinds = [e.event for e in events]
    assert kinds == ["session_started", "tick", "tick", "tick", "session_ended"]
    assert [e.json()["n"] for e in events if e.event == "tick"] == [1, 2, 3]
    assert all(e.id for e in events) and len({e.id for e in events}) == 5
    rest = await api.events("demo", sid, last_event_id=events[1].id)
    assert rest == events[2:]
    assert await api.events("demo", sid, last_event_id=events[-1].id) == []
    with pytest.raises(FleetAPIError) as missing:
        await api.events("demo", "nope")
    assert missing.value.status == 404


async def test_events_follow_live_and_stop_early(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """Both clients, on a real server: a live stream, left before its end."""
    node = Node(make_settings(), redis=redis)
    async with uvicorn_node(node) as url, AsyncFleetClient(url) as client:
        sid = (await client.start_session("demo", {"interval": 0.02})).session_id
        async with contextlib.aclosing(client.events("demo", sid)) as stream:
            got = []
            async for event in stream:
                got.append(event)
                if len(got) == 4:
                    break
        assert [e.event for e in got] == ["session_started", "tick", "tick", "tick"]

        def sync_read() -> list[ServerSentEvent]:
            with FleetClient(url) as sync, contextlib.closing(sync.events("demo", sid)) as it:
                return [next(it), next(it)]

        assert [e.event for e in await asyncio.to_thread(sync_read)] == ["session_started", "tick"]
        await client.close_session("demo", sid, wait=5)


# ---- configuration, token, error mapping (no node needed) ----------------------------------


def recorder(responses: list[httpx.Response], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return responses.pop(0) if responses else httpx.Response(200, json={"status": "ok"})

    return httpx.MockTransport(handle)


async def test_token_is_sent_but_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_URL", "http://fleet.example:9000/")
    monkeypatch.setenv("FLEET_TOKEN", TOKEN)
    seen: list[httpx.Request] = []
    with FleetClient(transport=recorder([], seen)) as sync:
        sync.health()
        assert TOKEN not in repr(sync) and "'***'" in repr(sync)
        assert repr(sync) == "FleetClient(url='http://fleet.example:9000', token='***')"
        assert TOKEN not in repr(sync._http.headers)
    async with AsyncFleetClient(token="other-token-0123456789", transport=recorder([], seen)) as c:
        await c.health()
        assert "other-token" not in repr(c)
    assert [r.headers["authorization"] for r in seen] == [
        f"Bearer {TOKEN}",
        "Bearer other-token-0123456789",
    ]
    assert str(seen[0].url) == "http://fleet.example:9000/health"

    monkeypatch.delenv("FLEET_TOKEN")
    monkeypatch.delenv("FLEET_URL")
    with FleetClient(transport=recorder([], seen)) as anonymous:
        anonymous.health()
        assert repr(anonymous) == "FleetClient(url='http://127.0.0.1:8000', token=None)"
    assert "authorization" not in seen[-1].headers


def test_bad_url_is_a_fleet_error() -> None:
    with pytest.raises(FleetError, match="http:// or https://"):
        FleetClient("127.0.0.1:8000")


@pytest.mark.parametrize(
    ("response", "status", "code", "detail"),
    [
        (httpx.Response(401, json={"detail": "bad token", "code": "unauthorized"}),
         401, "unauthorized", "bad token"),
        (httpx.Response(429, json={"detail": "full", "code": "max_sessions"}),
         429, "max_sessions", "full"),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), 502, "http_502", "HTTP Bad Gateway"),
        (httpx.Response(200, text="<html>not fleet</html>"), 200, "invalid_response",
         "the answer is not fleet's (wrong URL?)"),
        (httpx.Response(503, text="no server is available"), 503, "http_503",
         "HTTP Service Unavailable"),
    ],
)  # fmt: skip
def test_error_mapping(response: httpx.Response, status: int, code: str, detail: str) -> None:
    with FleetClient("http://fleet", transport=recorder([response], [])) as client:
        with pytest.raises(FleetAPIError) as caught:
            client.ready() if status == 503 else client.nodes()
    assert (caught.value.status, caught.value.code, caught.value.detail) == (status, code, detail)
    assert str(caught.value) == f"{status} {code}: {detail}"


async def test_unreachable_node_is_a_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with FleetClient(url, timeout=2) as sync, pytest.raises(FleetConnectionError) as caught:
        sync.nodes()
    assert caught.value.detail.startswith(f"cannot reach {url}")
    async with AsyncFleetClient(url, timeout=2) as client:
        with pytest.raises(FleetConnectionError):
            await client.health()
        with pytest.raises(FleetConnectionError):
            [e async for e in client.events("demo", "s", reconnect=False)]


def test_ready_503_is_an_answer() -> None:
    answer = httpx.Response(503, json={"status": "not_ready", "reason": "draining"})
    with FleetClient("http://fleet", transport=recorder([answer], [])) as client:
        ready = client.ready()
    assert not ready.ready and ready.reason == "draining"


def test_close_wait_reads_longer_than_the_wait() -> None:
    request = Requests.close_session("c", "s", 30, DEFAULT_TIMEOUT)
    assert request.timeout is not None and request.timeout.read == 40
    assert request.params == {"wait": 30}
    assert Requests.close_session("c", "s", None, DEFAULT_TIMEOUT).timeout == DEFAULT_TIMEOUT


def test_ids_are_quoted_into_paths() -> None:
    assert Requests.get_session("a/b", "../x").path == "/calls/a%2Fb/sessions/..%2Fx"


# ---- Server-Sent Events -------------------------------------------------------------------


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def test_sse_parsing_follows_the_spec() -> None:
    stream = (
        b"\xef\xbb\xbf: a comment\n"
        b'id: 1-0\nevent: tick\ndata: {"n": 1}\n\n'
        b"data: two\r\ndata:lines\r\n\r\n"  # CRLF; no space after the colon
        b"id: 2-0\revent: x\rdata\r\r"  # CR alone; a field with no colon
        b"retry: 250\nid: 3-0\n\n"  # no data: nothing dispatched, but id and retry stick
        b"retry: soon\nid: bad\x00id\ndata: last\n\n"  # ignored retry and id
        b"data: unfinished"
    )
    expected = [
        ServerSentEvent("tick", '{"n": 1}', "1-0"),
        ServerSentEvent("message", "two\nlines", "1-0"),
        ServerSentEvent("x", "", "2-0"),
        ServerSentEvent("message", "last", "3-0", 250),
    ]
    assert decode(stream) == expected
    # The same bytes, one at a time: a CR and its LF may arrive apart.
    assert decode(*(stream[i : i + 1] for i in range(len(stream)))) == expected
    assert expected[0].json() == {"n": 1}


class Cut(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that breaks off with a network error after its chunks."""

    def __init__(self, *chunks: bytes, cut: bool) -> None:
        self.chunks = chunks
        self.cut = cut

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.cut:
            raise httpx.ReadError("connection reset")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.cut:
            raise httpx.ReadError("connection reset")


def cut_then_resumed(seen: list[httpx.Request]) -> httpx.MockTransport:
    bodies: list[Cut | httpx.Response] = [
        Cut(
            b"retry: 10\nid: 1-0\nevent: session_started\ndata: {}\n\n",
            b"id: 2-0\nevent: tick\ndata: {}\n\n",
            b"id: 9-0\ndata: cut short",  # never finished: neither yielded nor resumed after
            cut=True,
        ),
        Cut(b"", cut=True),  # a failed attempt: nothing arrives
        httpx.Response(503, json={"detail": "draining", "code": "draining"}),
        Cut(b"id: 3-0\nevent: session_ended\ndata: {}\n\n", b": never read\n", cut=False),
    ]

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = bodies.pop(0)
        if isinstance(body, httpx.Response):
            return body
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)

    return httpx.MockTransport(handle)


async def test_events_resume_after_a_cut_with_last_event_id() -> None:
    for kind in ("sync", "async"):
        seen: list[httpx.Request] = []
        transport = cut_then_resumed(seen)
        if kind == "sync":
            with FleetClient("http://fleet", transport=transport) as sync:
                events = list(sync.events("c", "s"))
        else:
            async with AsyncFleetClient("http://fleet", transport=transport) as client:
                events = [e async for e in client.events("c", "s")]
        assert [e.event for e in events] == ["session_started", "tick", "session_ended"], kind
        assert [r.headers.get("last-event-id") for r in seen] == [None, "2-0", "2-0", "2-0"]
        assert seen[0].url.path == "/calls/c/sessions/s/events"


def test_events_give_up_after_bounded_attempts() -> None:
    attempts: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        return httpx.Response(200, stream=Cut(b"retry: 1\n", cut=True))

    with FleetClient("http://fleet", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(FleetConnectionError):
            list(client.events("c", "s"))
    assert len(attempts) == 6  # the first connection and five more


async def test_token_authenticates_against_a_node_with_api_keys(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """On a node with ``FLEET_API_KEYS``: no token is 401, a principal sees only its own
    sessions (404 otherwise), ``admin`` sees all; probes need no token."""
    settings = make_settings(api_keys=f"alice:{TOKEN},admin:admin-{TOKEN}")
    node = Node(settings, redis=redis)
    app = create_app(settings, node)
    async with app.router.lifespan_context(app):
        await wait_ready(node)
        transport = httpx.ASGITransport(app=app)

        def client(token: str | None) -> AsyncFleetClient:
            return AsyncFleetClient("http://fleet", token=token or "", transport=transport)

        async with client(None) as anonymous, client(TOKEN) as alice:
            assert (await anonymous.ready()).ready and (await anonymous.health()).status == "ok"
            with pytest.raises(FleetAPIError) as refused:
                await anonymous.nodes()
            assert (refused.value.status, refused.value.code) == (401, "unauthorized")
            sid = (await alice.start_session("private", {"interval": 5})).session_id
            assert (await alice.get_session("private", sid)).session_id == sid
        async with client(f"admin-{TOKEN}") as admin, client("not-a-valid-token-at-all") as bad:
            assert (await admin.get_session("private", sid)).session_id == sid
            with pytest.raises(FleetAPIError) as invalid:
                await bad.get_session("private", sid)
            assert invalid.value.status == 401
            await admin.close_session("private", sid, wait=5)
