"""Conversations over the WebSocket: ``{"type": "message"}`` frames go through the same send
as ``POST …/messages``, each is acknowledged on the socket, a bad one is an error frame
(the socket stays open), and the ``message``/``reply`` events come back on it. Through
real uvicorn nodes, on fakeredis and on a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import SecretStr
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fleet.api import create_app
from fleet.api.auth import OwnedBy, Principal, send_permission
from fleet.runtime.node import Node
from fleet.settings import Settings
from tests.conftest import SettingsFactory, uvicorn_node

ALICE, BOB, ADMIN = "a" * 32, "b" * 32, "c" * 32


@dataclass
class Served:
    url: str
    node: Node
    app: FastAPI


@asynccontextmanager
async def served(settings: Settings, redis: Redis) -> AsyncIterator[Served]:
    """A node behind a real uvicorn (as ``uvicorn_node``), with its app at hand."""
    node = Node(settings, redis=redis)
    app = create_app(settings, node)
    async with uvicorn_node(node, app) as url:
        yield Served(url, node, app)


def ws_url(url: str, sid: str, call: str = "chat") -> str:
    return f"ws{url.removeprefix('http')}/calls/{call}/sessions/{sid}/ws"


async def start(url: str, headers: dict[str, str] | None = None) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        resp = await http.post("/calls/chat/sessions", headers=headers)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["session_id"])


async def until(ws: ClientConnection, match: Any, timeout: float = 10) -> list[dict[str, Any]]:
    """Everything received up to and including the first frame that ``match`` accepts."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not seen or not match(seen[-1]):
            seen.append(json.loads(await ws.recv()))
    return seen


async def until_all(
    ws: ClientConnection, *matches: Any, timeout: float = 10
) -> list[dict[str, Any]]:
    """Everything received until each of ``matches`` has accepted a frame: the socket's
    ack and the events it causes race, so a test must not expect them in one order."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not all(any(match(frame) for frame in seen) for match in matches):
            seen.append(json.loads(await ws.recv()))
    return seen


def first(frames: list[dict[str, Any]], match: Any) -> dict[str, Any]:
    return next(frame for frame in frames if match(frame))


def is_type(kind: str) -> Any:
    return lambda frame: frame.get("type") == kind


def is_event(kind: str) -> Any:
    return lambda frame: frame.get("event") == kind


async def test_a_socket_is_a_whole_chat_and_resumes_with_after(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with served(make_settings(worker="tests.workers:Echo"), redis) as srv:
        url = srv.url
        sid = await start(url)
        async with connect(ws_url(url, sid)) as ws:
            await ws.send(json.dumps({"type": "message", "data": "hi", "id": "c-1"}))
            seen = await until_all(ws, is_type("ack"), is_event("reply"))
            ack = first(seen, is_type("ack"))
            assert ack["id"] == "c-1" and ack["message_id"]
            message = first(seen, is_event("message"))
            assert message["data"] == {
                "message_id": ack["message_id"],
                "type": "message",
                "data": "hi",
            }
            assert first(seen, is_event("reply"))["data"] == {
                "message_id": ack["message_id"],
                "data": {"echo": "hi", "count": 1},
            }
            # A frame without an id is acknowledged with id null; message_type is passed on.
            await ws.send(json.dumps({"type": "message", "data": {"n": 2}, "message_type": "ask"}))
            seen = await until_all(ws, is_type("ack"), is_event("reply"))
            second = first(seen, is_type("ack"))
            assert second["id"] is None and second["message_id"] > ack["message_id"]
            asked = first(seen, is_event("message"))
            assert asked["data"]["type"] == "ask"
            last_reply = first(seen, is_event("reply"))["id"]

        # A retry of a frame (same client id) on a new socket is not sent twice; the
        # socket resumes strictly after the last event handled.
        async with connect(f"{ws_url(url, sid)}?after={last_reply}") as ws:
            await ws.send(json.dumps({"type": "message", "data": "hi", "id": "c-1"}))
            again = (await until(ws, is_type("ack")))[-1]
            assert again == ack
            await ws.send(json.dumps({"type": "message", "data": "three", "id": "c-3"}))
            seen = await until_all(ws, is_type("ack"), is_event("reply"))
        events = [f for f in seen if "event" in f]
        assert [e["event"] for e in events] == ["message", "reply"], events
        assert events[1]["data"]["data"] == {"echo": "three", "count": 3}


async def test_bad_frames_get_error_frames_and_the_socket_stays_open(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(worker="tests.workers:Echo", max_message_bytes=100)
    async with served(settings, redis) as srv:
        url = srv.url
        sid = await start(url)
        deep: Any = "x"
        for _ in range(settings.max_params_depth + 2):
            deep = [deep]
        bad = [
            ({"type": "message", "data": "x" * 200, "id": "big"}, "message_too_large"),
            ({"type": "message", "data": deep, "id": "deep"}, "invalid_request"),
            ({"type": "message", "data": 1, "id": "no spaces"}, "invalid_message"),
            ({"type": "message", "data": 1, "message_type": "a b"}, "invalid_message"),
            ({"type": "message", "data": 1, "dta": 2}, "invalid_message"),
        ]
        async with connect(ws_url(url, sid)) as ws:
            for frame, code in bad:
                await ws.send(json.dumps(frame))
                error = (await until(ws, is_type("error")))[-1]
                assert error["code"] == code, (frame, error)
                assert error["id"] == frame.get("id") and error["detail"]
            await ws.send("x" * (settings.max_body_bytes + 1))
            assert (await until(ws, is_type("error")))[-1]["code"] == "message_too_large"
            # Still open, and still a chat.
            await ws.send(json.dumps({"type": "message", "data": "ok", "id": "ok"}))
            assert (await until(ws, is_type("ack")))[-1]["id"] == "ok"
            await ws.send(json.dumps({"type": "close"}))
            await until(ws, is_event("session_ended"))
        # Nothing but "ok" reached the worker.
        async with httpx.AsyncClient(base_url=url) as http:
            checkpoint = await http.get(f"/calls/chat/sessions/{sid}/checkpoint")
        assert checkpoint.json()["state"] == {"heard": ["ok"]}
        # The session has ended: a frame on a socket opened before the end is refused.
        async with connect(ws_url(url, sid)) as ws:
            await ws.send(json.dumps({"type": "message", "data": "late", "id": "late"}))
            frames: list[dict[str, Any]] = []
            async with asyncio.timeout(10):
                async for text in ws:
                    frames.append(json.loads(text))
        # The socket of an ended session may close before it answers the frame; if it
        # answers, it is session_ended.
        errors = [(f["code"], f["id"]) for f in frames if f.get("type") == "error"]
        assert errors in ([], [("session_ended", "late")]), frames


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_only_the_sessions_principal_and_admin_may_send(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    keys = SecretStr(f"alice:{ALICE},bob:{BOB},admin:{ADMIN}")
    settings = make_settings(worker="tests.workers:Echo", api_keys=keys)
    async with served(settings, redis) as srv:
        url = srv.url
        sid = await start(url, bearer(ALICE))
        async with connect(ws_url(url, sid), additional_headers=bearer(BOB)) as ws:
            with contextlib.suppress(ConnectionClosed):  # closed before or after the send
                await ws.send(json.dumps({"type": "message", "data": "from bob"}))
                assert await ws.recv() is None, "a frame for bob"
            assert ws.close_code == 4404
        async with connect(f"{ws_url(url, sid)}?access_token={ALICE}") as ws:
            await ws.send(json.dumps({"type": "message", "data": "from alice", "id": "a"}))
            seen = await until_all(ws, is_type("ack"), is_event("reply"))
            assert first(seen, is_type("ack"))["id"] == "a"
        async with connect(ws_url(url, sid), additional_headers=bearer(ADMIN)) as ws:
            await ws.send(json.dumps({"type": "message", "data": "from admin", "id": "b"}))
            seen = await until_all(
                ws,
                is_type("ack"),
                lambda f: is_event("reply")(f) and f["data"]["data"]["count"] == 2,
            )
            assert first(seen, is_type("ack"))["id"] == "b"
        async with httpx.AsyncClient(base_url=url, headers=bearer(ALICE)) as http:
            checkpoint = await http.get(f"/calls/chat/sessions/{sid}/checkpoint")
        assert checkpoint.json()["state"] == {"heard": ["from alice", "from admin"]}

        # A replaced send_permission hook cannot run on a socket: its frames are refused,
        # not let through under the built-in rule.
        async def nobody() -> OwnedBy:
            return OwnedBy(Principal("nobody"))

        srv.app.dependency_overrides[send_permission] = nobody
        async with connect(ws_url(url, sid), additional_headers=bearer(ALICE)) as ws:
            await ws.send(json.dumps({"type": "message", "data": "hook", "id": "h"}))
            error = (await until(ws, is_type("error")))[-1]
            assert error["code"] == "forbidden" and error["id"] == "h"


async def test_a_socket_through_a_node_that_does_not_own_the_session(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """Two nodes on one Redis: the worker runs on A, the socket is on B; the frame goes
    through B's send, the worker's reply comes back through the event stream to B."""
    worker = "tests.workers:Echo"
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(served(make_settings(worker=worker), redis))
        b = await stack.enter_async_context(served(make_settings(worker=worker), redis))
        sid = await start(a.url)
        assert any(ref.endswith(sid) for ref in a.node.sessions)
        assert not any(ref.endswith(sid) for ref in b.node.sessions)
        async with connect(ws_url(b.url, sid)) as ws:
            await ws.send(json.dumps({"type": "message", "data": "via b", "id": "v"}))
            seen = await until_all(ws, is_type("ack"), is_event("reply"))
        reply = first(seen, is_event("reply"))
        assert {"type": "ack", "id": "v", "message_id": reply["data"]["message_id"]} in seen
        assert reply["data"]["data"] == {"echo": "via b", "count": 1}
