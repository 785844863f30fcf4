"""docs/embedding.md's host app (examples/embedding/host_app.py): its own routes still work,
fleet's answer under /agents for whoever the host's sign-in says, an unauthenticated
request is refused by the host's dependency, and two users cannot see each other's
sessions, over every kind of route (header, stream, beacon, WebSocket). On the embedded
Redis and on a real redis-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from examples.embedding.host_app import build_app
from fleet.settings import Settings
from tests.conftest import SettingsFactory
from tests.embedding.conftest import until_ready
from tests.redis_server import free_port

SESSIONS = "/agents/calls/c/sessions"


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.ASGITransport]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://acme") as probe:
            await until_ready(probe, "/agents")
        yield transport


@asynccontextmanager
async def signed_in(
    transport: httpx.ASGITransport, user: str | None
) -> AsyncIterator[httpx.AsyncClient]:
    """A browser of ``user`` (``None``: nobody signed in): its cookie rides along."""
    async with httpx.AsyncClient(transport=transport, base_url="http://acme") as client:
        if user is not None:
            resp = await client.post("/login", json={"user": user})
            assert resp.status_code == 200, resp.text
        yield client


async def test_the_hosts_routes_and_fleets_side_by_side(settings: Settings) -> None:
    app = build_app(settings)
    async with (
        running(app) as transport,
        signed_in(transport, "alice") as alice,
        signed_in(transport, "bob") as bob,
        signed_in(transport, None) as nobody,
    ):
        # The host's own routes, and its own auth.
        assert (await alice.get("/me")).json() == {"user": "alice"}
        assert (await nobody.get("/me")).status_code == 401
        # Fleet's routes, under the prefix, act for the signed-in user.
        resp = await alice.post(SESSIONS, json={"params": {"interval": 0.01}})
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        assert (await alice.get(f"{SESSIONS}/{sid}")).json()["state"] == "running"
        # Refused by the host's dependency, in the host's words.
        for method, path in [
            ("POST", SESSIONS),
            ("GET", f"{SESSIONS}/{sid}"),
            ("GET", f"{SESSIONS}/{sid}/events"),
            ("POST", f"{SESSIONS}/{sid}/close"),
            ("GET", "/agents/nodes"),
        ]:
            refused = await nobody.request(method, path)
            assert refused.status_code == 401, (method, path)
            assert refused.json() == {"detail": "sign in first"}
        # Probes need nobody.
        assert (await nobody.get("/agents/health")).status_code == 200
        # Bob cannot see, follow, message or close Alice's session: 404, as for none.
        for method, path in [
            ("GET", f"{SESSIONS}/{sid}"),
            ("GET", f"{SESSIONS}/{sid}/events"),
            ("GET", f"{SESSIONS}/{sid}/checkpoint"),
            ("DELETE", f"{SESSIONS}/{sid}"),
            ("POST", f"{SESSIONS}/{sid}/close"),
        ]:
            hidden = await bob.request(method, path)
            assert hidden.status_code == 404, (method, path, hidden.text)
            assert hidden.json()["code"] == "not_found"
        message = await bob.post(f"{SESSIONS}/{sid}/messages", json={"data": "hi"})
        assert message.status_code == 404
        assert (await bob.get(SESSIONS)).json() == {"sessions": []}
        assert [s["session_id"] for s in (await alice.get(SESSIONS)).json()["sessions"]] == [sid]
        # Still running: Bob's close did nothing. Alice's does.
        closed = await alice.delete(f"{SESSIONS}/{sid}", params={"wait": 5})
        assert closed.status_code == 200, closed.text
        assert closed.json()["end_reason"] == "closed"


async def test_the_event_stream_acts_for_the_signed_in_user(make_settings: SettingsFactory) -> None:
    app = build_app(make_settings())
    async with running(app) as transport, signed_in(transport, "alice") as alice:
        resp = await alice.post(SESSIONS, json={"params": {"limit": 2, "interval": 0.01}})
        sid = resp.json()["session_id"]
        events = await alice.get(f"{SESSIONS}/{sid}/events")
        assert events.status_code == 200
        kinds = [line.removeprefix("event: ") for line in events.text.splitlines()]
        assert [k for k in kinds if k in ("tick", "session_ended")] == [
            "tick",
            "tick",
            "session_ended",
        ]


async def test_the_websocket_acts_for_the_signed_in_user(make_settings: SettingsFactory) -> None:
    """Through a real server: the WebSocket takes the host's cookie like any route."""
    app = build_app(make_settings())
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{config.port}"
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not serving.done(), "uvicorn did not start"
                await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=url) as alice:
            await until_ready(alice, "/agents")
            cookie = (await alice.post("/login", json={"user": "alice"})).cookies["session"]
            params = {"limit": 2, "interval": 0.05}
            sid = (await alice.post(SESSIONS, json={"params": params})).json()["session_id"]
        ws_url = f"ws{url.removeprefix('http')}{SESSIONS}/{sid}/ws"
        async with connect(ws_url, additional_headers={"Cookie": f"session={cookie}"}) as ws:
            async with asyncio.timeout(10):
                seen = [json.loads(frame)["event"] async for frame in ws]
        assert seen[-1] == "session_ended" and seen.count("tick") == 2
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url):
                pass
        assert refused.value.response.status_code == 401
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
