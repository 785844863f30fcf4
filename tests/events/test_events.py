"""Live events (SSE and WebSocket) on one node, on fakeredis and on a real redis-server.

The node runs behind a real uvicorn on a loopback port (httpx's in-process transport
buffers whole responses, so it cannot test streaming or disconnects)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fleet import metrics
from fleet.api import streams
from fleet.events.dispatcher import EventDispatcher
from fleet.events.listener import Listener
from fleet.runtime.node import Node
from tests.conftest import SettingsFactory, uvicorn_node
from tests.sse import SSE, read_sse, ticks


@dataclass
class Served:
    url: str
    node: Node
    http: httpx.AsyncClient

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")

    async def start(self, **params: Any) -> str:
        resp = await self.http.post("/calls/demo/sessions", json={"params": params})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["session_id"])


@asynccontextmanager
async def serve(settings: Any, redis: Redis) -> AsyncIterator[Served]:
    node = Node(settings, redis=redis)
    async with uvicorn_node(node) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield Served(url, node, http)


@pytest.fixture
async def served(make_settings: SettingsFactory, redis: Redis) -> AsyncIterator[Served]:
    async with serve(make_settings(), redis) as s:
        yield s


async def sse(http: httpx.AsyncClient, path: str, **kw: Any) -> list[SSE]:
    return await read_sse(http, path, timeout=15, **kw)


def order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def listeners() -> float:
    return float(metrics.EVENT_LISTENERS._value.get())


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- Server-Sent Events ------------------------------------------------------------------
async def test_sse_replays_follows_and_ends(served: Served) -> None:
    sid = await served.start(interval=0.05, limit=3)
    path = f"/calls/demo/sessions/{sid}/events"
    async with served.http.stream("GET", path) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        assert resp.headers["x-accel-buffering"] == "no"
        raw = (await resp.aread()).decode()
    frame = raw.split("\n\n")[0].split("\n")
    assert frame[0].startswith("id: ") and frame[1] == "event: session_started"
    assert frame[2].startswith("data: ")
    events = await sse(served.http, path)
    assert [e["event"] for e in events] == [
        "session_started",
        "tick",
        "tick",
        "tick",
        "session_ended",
    ]
    assert ticks(events) == [1, 2, 3]
    assert json.loads(events[-1]["data"]) == {"end_reason": "completed", "result": {"n": 3}}
    ids = [order(e["id"]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_last_event_id_gets_exactly_the_missed_events(served: Served) -> None:
    sid = await served.start(interval=0.03, limit=15)
    path = f"/calls/demo/sessions/{sid}/events"
    first = await sse(served.http, path, upto=4)  # started + 3 ticks, then hang up
    await asyncio.sleep(0.1)  # events go on meanwhile
    rest = await sse(served.http, path, headers={"Last-Event-ID": first[-1]["id"]})
    assert ticks(first + rest) == list(range(1, 16))
    assert rest[-1]["event"] == "session_ended"
    everything = await sse(served.http, path)
    assert first + rest == everything

    # ?after= does the same; Last-Event-ID (an EventSource reconnect) wins over it.
    cut = everything[6]["id"]
    assert await sse(served.http, path, params={"after": cut}) == everything[7:]
    both = await sse(
        served.http, path, params={"after": cut}, headers={"Last-Event-ID": everything[9]["id"]}
    )
    assert both == everything[10:]


async def test_a_quiet_session_has_no_stream_but_listeners_get_session_started(
    served: Served,
) -> None:
    sid = await served.start(interval=3600)
    key = served.node.registry.keys.events("demo", sid)
    assert await served.node.redis.exists(key) == 0  # no stream: no memory for it
    path = f"/calls/demo/sessions/{sid}/events"
    [started] = await sse(served.http, path, upto=1)
    info = (await served.http.get(f"/calls/demo/sessions/{sid}")).json()
    assert started["id"] == "0-1" and started["event"] == "session_started"
    assert json.loads(started["data"]) == {"started_at": info["session_started_at"]}
    # It sorts before every stored event, and resuming after it skips it.
    await served.http.delete(f"/calls/demo/sessions/{sid}", params={"wait": 5})
    rest = await sse(served.http, path, headers={"Last-Event-ID": "0-1"})
    assert [e["event"] for e in rest] == ["session_closing", "session_ended"]
    assert all(order(e["id"]) > (0, 1) for e in rest)
    assert await sse(served.http, path) == [started, *rest]


async def test_ended_session_replays_what_is_left_then_ends(served: Served) -> None:
    sid = await served.start(interval=0.01, limit=2)
    path = f"/calls/demo/sessions/{sid}/events"
    deadline = time.monotonic() + 5
    while (await served.http.get(f"/calls/demo/sessions/{sid}")).json()["state"] != "ended":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    events = await sse(served.http, path)
    assert [e["event"] for e in events][-1] == "session_ended" and ticks(events) == [1, 2]
    assert await sse(served.http, path, headers={"Last-Event-ID": events[-1]["id"]}) == []
    assert await sse(served.http, path, params={"after": events[-2]["id"]}) == events[-1:]


async def test_unknown_session_is_404_and_bad_ids_are_422(served: Served) -> None:
    missing = await served.http.get("/calls/demo/sessions/nope/events")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    sid = await served.start(interval=10)
    path = f"/calls/demo/sessions/{sid}/events"
    for bad in ("abc", "1-2-3", "-1", "12", "1-x"):
        resp = await served.http.get(path, params={"after": bad})
        assert resp.status_code == 422, bad
        resp = await served.http.get(path, headers={"Last-Event-ID": bad})
        assert resp.status_code == 422 and resp.json()["code"] == "invalid_request", bad
    assert (await served.http.get("/calls/demo/sessions/bad id/events")).status_code == 422


async def test_openapi_documents_the_event_stream(served: Served) -> None:
    spec = (await served.http.get("/openapi.json")).json()
    route = spec["paths"]["/calls/{call_id}/sessions/{session_id}/events"]["get"]
    assert "text/event-stream" in route["responses"]["200"]["content"]
    assert {"404", "422"} <= set(route["responses"])


async def test_keep_alive_comment_on_idle_streams(
    make_settings: SettingsFactory, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "KEEPALIVE_SECONDS", 0.1)
    async with serve(make_settings(worker="tests.workers:Quiet"), redis) as served:
        sid = await served.start()
        comments: list[str] = []
        path = f"/calls/demo/sessions/{sid}/events"
        got = await sse(served.http, path, upto=1, comments=comments)
        assert got[0]["event"] == "session_started"
        began = time.monotonic()
        async with served.http.stream("GET", path) as resp:
            async for line in resp.aiter_lines():
                if line == ": keep-alive":
                    break
        assert time.monotonic() - began < 2.0


# -- WebSocket ---------------------------------------------------------------------------
async def ws_messages(ws: ClientConnection) -> tuple[list[dict[str, Any]], int | None]:
    """Every message until the server closes; and the close code."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(15):
        try:
            while True:
                out.append(json.loads(await ws.recv()))
        except ConnectionClosed as exc:
            return out, exc.rcvd.code if exc.rcvd else None


async def test_websocket_events_close_request_and_after(served: Served) -> None:
    sid = await served.start(interval=0.05)
    url = f"{served.ws_url}/calls/demo/sessions/{sid}/ws"
    async with connect(url) as ws:
        first = json.loads(await ws.recv())
        assert first["event"] == "session_started" and set(first) == {"id", "event", "data"}
        assert json.loads(await ws.recv())["data"] == {"n": 1}
        await ws.send("not json")
        await ws.send(b"\x00\x01")
        await ws.send(json.dumps({"type": "dance"}))
        await ws.send(json.dumps({"type": "close"}))
        rest, code = await ws_messages(ws)
    assert code == 1000
    errors = [m["code"] for m in rest if m.get("type") == "error"]
    assert errors == ["invalid_message", "invalid_message", "unknown_message"]
    assert {"type": "closing"} in rest
    events = [first, *(m for m in rest if "event" in m)]
    assert events[-1]["event"] == "session_ended"
    ended = events[-1]["data"]
    assert ended["end_reason"] == "closed" and ended["result"]["n"] >= 1  # ticks on to the close
    assert "session_closing" in [e["event"] for e in events]

    async with connect(f"{url}?after={events[1]['id']}") as ws:
        replay, code = await ws_messages(ws)
    assert code == 1000 and replay == events[2:]


async def test_websocket_unknown_session_and_bad_after(served: Served) -> None:
    async with connect(f"{served.ws_url}/calls/demo/sessions/nope/ws") as ws:
        assert await ws_messages(ws) == ([], 4404)
    sid = await served.start(interval=10)
    async with connect(f"{served.ws_url}/calls/demo/sessions/{sid}/ws?after=x") as ws:
        assert await ws_messages(ws) == ([], 4422)


# -- auth ----------------------------------------------------------------------------------
ALICE, BOB = "a" * 32, "b" * 32


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_events_need_a_token_and_show_only_the_owners_sessions(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    keys = SecretStr(f"alice:{ALICE},bob:{BOB}")
    async with serve(make_settings(api_keys=keys), redis) as served:
        resp = await served.http.post(
            "/calls/demo/sessions",
            json={"params": {"interval": 0.02, "limit": 2}},
            headers=bearer(ALICE),
        )
        sid = resp.json()["session_id"]
        path = f"/calls/demo/sessions/{sid}/events"
        refused = await served.http.get(path)
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
        assert (await served.http.get(path, headers=bearer(BOB))).status_code == 404
        events = await sse(served.http, path, headers=bearer(ALICE))
        assert ticks(events) == [1, 2]
        # EventSource cannot set headers: the token may come in the query.
        assert await sse(served.http, path, params={"access_token": ALICE}) == events

        url = f"{served.ws_url}/calls/demo/sessions/{sid}/ws"
        async with connect(url) as ws:
            assert await ws_messages(ws) == ([], 4401)
        async with connect(url, additional_headers=bearer(BOB)) as ws:
            assert await ws_messages(ws) == ([], 4404)
        async with connect(f"{url}?access_token={ALICE}") as ws:
            got, code = await ws_messages(ws)
        assert code == 1000 and [m["id"] for m in got] == [e["id"] for e in events]


# -- many listeners ----------------------------------------------------------------------
async def drain(listener: Listener) -> list[tuple[str, str, float]]:
    out: list[tuple[str, str, float]] = []
    async with asyncio.timeout(15):
        while not listener.done:
            event = await listener.next(5.0)
            if event is not None:
                out.append((event.id, event.type, time.monotonic()))
    return out


async def test_slow_listener_does_not_delay_others_and_misses_nothing(served: Served) -> None:
    node = served.node
    node.events.buffer_size = 4  # overflows at once
    sid = await served.start(interval=0.01, limit=60)
    with (
        node.events.listen("demo", sid) as fast,
        node.events.listen("demo", sid) as slow,
    ):
        assert await slow.next(5.0) is not None  # joined the fan-out, then stalls
        fast_events = await drain(fast)
        ended_at = fast_events[-1][2]
        await asyncio.sleep(0.1)
        slow_events = await drain(slow)
    assert fast.lagged == 0 and slow.lagged >= 1
    assert [e[:2] for e in slow_events] == [e[:2] for e in fast_events[1:]]
    assert [t for _, t, _ in fast_events].count("tick") == 60
    assert slow_events[0][2] > ended_at  # the slow one really was behind


async def test_listeners_on_many_sessions_and_gauge_back_to_zero(served: Served) -> None:
    node = served.node
    assert listeners() == 0
    sids = [await served.start(interval=0.02, limit=10) for _ in range(12)]
    got = await asyncio.gather(
        *(sse(served.http, f"/calls/demo/sessions/{sid}/events") for sid in sids)
    )
    for events in got:
        assert ticks(events) == list(range(1, 11)) and events[-1]["event"] == "session_ended"

    live = await served.start(interval=0.05)
    path = f"/calls/demo/sessions/{live}/events"
    async with (
        served.http.stream("GET", path) as resp,
        connect(f"{served.ws_url}/calls/demo/sessions/{live}/ws") as ws,
    ):
        await ws.recv()
        await resp.aiter_lines().__anext__()
        assert listeners() == 2 and node.events.listeners == 2
    await until(lambda: listeners() == 0 and node.events.listeners == 0)
    await until(lambda: node.events.streams == 0 and not node.events.holds_connection)


async def test_without_client_unblock_a_short_block_still_delivers(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(self: EventDispatcher, conn: object) -> None:
        return None

    monkeypatch.setattr(EventDispatcher, "_probe_unblock", refuse)
    for _ in range(3):  # each one adds a stream while the dispatcher reads
        sid = await served.start(interval=0.02, limit=5)
        events = await sse(served.http, f"/calls/demo/sessions/{sid}/events")
        assert ticks(events) == [1, 2, 3, 4, 5]
    assert served.node.events.can_unblock is False


def test_sse_frames_split_lines_only_where_sse_does() -> None:
    from fleet.events.listener import Event

    event = Event(id="1-0", type="say", data='{"text":"a\u2028b\u0085c"}')
    frame = event.sse.decode()
    assert frame == 'id: 1-0\nevent: say\ndata: {"text":"a\u2028b\u0085c"}\n\n'
    multi = Event(id="2-0", type="x", data="one\r\ntwo\nthree").sse.decode()
    assert multi == "id: 2-0\nevent: x\ndata: one\ndata: two\ndata: three\n\n"
