"""Principals, tokens, isolation, permission hooks and input limits."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from fleet.api import create_app
from fleet.api.auth import (
    Principal,
    PrincipalDep,
    RecordCheck,
    TokenTable,
    close_permission,
    owns,
    view_permission,
)
from fleet.models import SessionRecord
from fleet.runtime.node import Node
from tests.api.test_sessions import wait_state
from tests.conftest import SettingsFactory, api_client, wait_ready

ALICE, BOB, ADMIN = "a" * 32, "b" * 32, "c" * 32
KEYS = SecretStr(f"alice:{ALICE},bob:{BOB},admin:{ADMIN},alice:{'d' * 32}")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def secured(make_settings: SettingsFactory, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(make_settings(api_keys=KEYS), redis) as client:
        yield client


async def _start(client: httpx.AsyncClient, token: str, call: str = "c", **body: Any) -> str:
    resp = await client.post(f"/calls/{call}/sessions", headers=auth(token), json=body or None)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["session_id"])


async def test_every_route_but_probes_needs_a_valid_token(secured: httpx.AsyncClient) -> None:
    sid = await _start(secured, ALICE)
    routes = [
        ("POST", "/calls/c/sessions"),
        ("GET", "/calls/c/sessions"),
        ("GET", f"/calls/c/sessions/{sid}"),
        ("DELETE", f"/calls/c/sessions/{sid}"),
        ("POST", f"/calls/c/sessions/{sid}/close"),
        ("GET", f"/calls/c/sessions/{sid}/metrics"),
        ("GET", f"/calls/c/sessions/{sid}/checkpoint"),
        ("GET", f"/calls/c/sessions/{sid}/events"),
        ("GET", "/sessions"),
        ("GET", "/nodes"),
    ]
    for method, path in routes:
        for headers in (
            {},
            auth("wrong" * 8),
            {"Authorization": ALICE},
            {"Authorization": "Bearer"},
        ):
            resp = await secured.request(method, path, headers=headers)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert resp.json()["code"] == "unauthorized"
            assert resp.headers["www-authenticate"] == "Bearer"
    for path in ("/health", "/ready", "/metrics"):
        assert (await secured.get(path)).status_code == 200
    # Nothing was closed by the refused requests.
    got = await secured.get(f"/calls/c/sessions/{sid}", headers=auth(ALICE))
    assert got.json()["state"] == "running"


async def test_principals_only_see_their_own_sessions(secured: httpx.AsyncClient) -> None:
    mine = await _start(secured, ALICE)
    also_mine = await _start(secured, "d" * 32)  # a second token of alice's (rotation)
    theirs = await _start(secured, BOB)
    for method, path in [
        ("GET", f"/calls/c/sessions/{mine}"),
        ("GET", f"/calls/c/sessions/{mine}/metrics"),
        ("GET", f"/calls/c/sessions/{mine}/checkpoint"),
        ("GET", f"/calls/c/sessions/{mine}/events"),
        ("DELETE", f"/calls/c/sessions/{mine}"),
        ("POST", f"/calls/c/sessions/{mine}/close"),
    ]:
        resp = await secured.request(method, path, headers=auth(BOB))
        assert resp.status_code == 404, (method, path, resp.text)
        unknown = await secured.request(method, path.replace(mine, "nope"), headers=auth(BOB))
        assert resp.json()["code"] == unknown.json()["code"] == "not_found"  # no difference
    listed = (await secured.get("/calls/c/sessions", headers=auth(BOB))).json()["sessions"]
    assert [s["session_id"] for s in listed] == [theirs]
    fleet_wide = (await secured.get("/sessions", headers=auth(ALICE))).json()["sessions"]
    assert {s["session_id"] for s in fleet_wide} == {mine, also_mine}
    everything = (await secured.get("/sessions", headers=auth(ADMIN))).json()["sessions"]
    assert {s["session_id"] for s in everything} == {mine, also_mine, theirs}
    # Still running: bob's attempts closed nothing. The admin may close anyone's.
    assert (await secured.get(f"/calls/c/sessions/{mine}", headers=auth(ALICE))).json()[
        "state"
    ] == "running"
    closed = await secured.delete(
        f"/calls/c/sessions/{theirs}", headers=auth(ADMIN), params={"wait": 5}
    )
    assert closed.json()["end_reason"] == "closed"


async def test_events_accept_a_query_token(secured: httpx.AsyncClient) -> None:
    sid = await _start(secured, ALICE, params={"interval": 0.01, "limit": 2})
    await wait_state(secured.__class__(transport=secured._transport, base_url=secured.base_url,
                                       headers=auth(ALICE)), "c", sid, "ended")  # fmt: skip
    resp = await secured.get(f"/calls/c/sessions/{sid}/events", params={"access_token": ALICE})
    assert resp.status_code == 200 and "session_ended" in resp.text
    refused = await secured.get(f"/calls/c/sessions/{sid}", params={"access_token": ALICE})
    assert refused.status_code == 401  # only the events route takes it


def test_token_table_matches_in_constant_shape() -> None:
    table = TokenTable([("alice", ALICE), ("bob", BOB), ("admin", ADMIN)])
    assert table.lookup(ALICE) == Principal("alice")
    assert table.lookup(ADMIN) == Principal("admin", admin=True)
    assert table.lookup(ALICE[:-1]) is None and table.lookup("") is None
    assert ALICE not in repr(table.__dict__).replace("'", "")


async def test_permission_hooks_can_be_replaced(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(api_keys=KEYS)
    node = Node(settings, redis=redis)
    app = create_app(settings, node)

    async def nobody_sees_anything() -> RecordCheck:
        def check(record: SessionRecord) -> bool:
            return False

        return check

    app.dependency_overrides[view_permission] = nobody_sees_anything
    async with app.router.lifespan_context(app):
        await wait_ready(node)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
            sid = await _start(client, ALICE)
            resp = await client.get(f"/calls/c/sessions/{sid}", headers=auth(ALICE))
            assert resp.status_code == 404


async def test_a_custom_close_hook_decides_on_the_record(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """A hook of one's own is not the built-in rule: the record is read and the hook's
    function decides, before anything is closed."""
    settings = make_settings(api_keys=KEYS)
    node = Node(settings, redis=redis)
    app = create_app(settings, node)

    async def bob_closes_calls_named_support(principal: PrincipalDep) -> RecordCheck:
        def check(record: SessionRecord) -> bool:
            return owns(principal, record) or (
                principal.name == "bob" and record.call_id == "support"
            )

        return check

    app.dependency_overrides[close_permission] = bob_closes_calls_named_support
    async with app.router.lifespan_context(app):
        await wait_ready(node)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
            other = await _start(client, ALICE, call="c")
            support = await _start(client, ALICE, call="support")
            refused = await client.delete(f"/calls/c/sessions/{other}", headers=auth(BOB))
            assert refused.status_code == 404
            state = await client.get(f"/calls/c/sessions/{other}", headers=auth(ALICE))
            assert state.json()["state"] == "running"
            closed = await client.delete(
                f"/calls/support/sessions/{support}", headers=auth(BOB), params={"wait": 5}
            )
            assert closed.status_code == 200 and closed.json()["end_reason"] == "closed"


async def test_params_limits(client: httpx.AsyncClient) -> None:
    deep: dict[str, Any] = {}
    cursor = deep
    for _ in range(40):
        cursor["x"] = {}
        cursor = cursor["x"]
    for params, words in [
        ({"interval": 1, "blob": "x" * 20_000}, "bytes of JSON"),
        (deep, "nests deeper"),
    ]:
        resp = await client.post("/calls/c/sessions", json={"params": params})
        assert resp.status_code == 422 and resp.json()["code"] == "invalid_params"
        assert words in resp.json()["detail"]


async def test_cors_is_off_by_default_and_follows_settings(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
    }
    async with api_client(make_settings(), redis) as client:
        resp = await client.options("/calls/c/sessions", headers=preflight)
        assert "access-control-allow-origin" not in resp.headers
    async with api_client(make_settings(cors_origins="https://app.example"), redis) as client:
        resp = await client.options("/calls/c/sessions", headers=preflight)
        assert resp.headers["access-control-allow-origin"] == "https://app.example"


def test_open_bind_without_keys_is_refused() -> None:
    cmd = [sys.executable, "-m", "fleet", "serve", "--host", "0.0.0.0", "--port", "0"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "refusing" in line]
    assert len(lines) == 1 and "FLEET_API_KEYS" in lines[0]
