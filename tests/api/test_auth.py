"""Principals, tokens, isolation, permission hooks and input limits."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError
from redis.asyncio import Redis

from fleet.api import create_app
from fleet.api.auth import (
    Principal,
    PrincipalDep,
    RecordCheck,
    TokenTable,
    beacon_close_permission,
    close_permission,
    owns,
    view_permission,
)
from fleet.errors import ConfigError
from fleet.models import SessionRecord
from fleet.runtime.node import Node
from fleet.settings import Settings, load_settings
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


def _beacon_token(form: str, token: str) -> dict[str, Any]:
    """Request arguments carrying ``token`` the way ``navigator.sendBeacon`` can."""
    if form == "query":
        return {"params": {"access_token": token}}
    if form == "urlencoded":  # a URLSearchParams body
        return {"data": {"access_token": token}}
    if form == "multipart":  # a FormData body
        return {"files": {"access_token": (None, token)}}
    # A string body: text/plain holding a URL-encoded form.
    return {
        "content": f"access_token={token}",
        "headers": {"Content-Type": "text/plain;charset=UTF-8"},
    }


@pytest.mark.parametrize("form", ["query", "urlencoded", "multipart", "text"])
async def test_the_beacon_close_takes_the_token_as_a_beacon_can_send_it(
    secured: httpx.AsyncClient, form: str
) -> None:
    """A beacon cannot send ``Authorization``: without another way in, a page could never
    close its session with keys set."""
    sid = await _start(secured, ALICE)
    path = f"/calls/c/sessions/{sid}/close"
    for token, status in [("wrong" * 8, 401), ("", 401), (BOB, 404)]:
        refused = await secured.post(path, **_beacon_token(form, token))
        assert refused.status_code == status, (token, refused.text)
    # Only the beacon route reads these: DELETE and the other routes keep the header.
    denied = await secured.request(
        "DELETE", f"/calls/c/sessions/{sid}", **_beacon_token(form, ALICE)
    )
    assert denied.status_code == 401
    got = await secured.get(f"/calls/c/sessions/{sid}", headers=auth(ALICE))
    assert got.json()["state"] == "running"
    closed = await secured.post(path, **_merge(_beacon_token(form, ALICE)))
    assert closed.status_code == 200, closed.text
    assert closed.json()["end_reason"] == "closed"


def _merge(kw: dict[str, Any]) -> dict[str, Any]:
    """``params`` of the beacon form plus ``wait``, when the form is the query."""
    return {**kw, "params": {"wait": 5, **kw.get("params", {})}}


async def test_a_beacon_close_hook_can_be_replaced(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(api_keys=KEYS)
    node = Node(settings, redis=redis)
    app = create_app(settings, node)

    async def no_beacons() -> RecordCheck:
        return lambda record: False

    app.dependency_overrides[beacon_close_permission] = no_beacons
    async with app.router.lifespan_context(app):
        await wait_ready(node)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
            sid = await _start(client, ALICE)
            beacon = await client.post(
                f"/calls/c/sessions/{sid}/close", data={"access_token": ALICE}
            )
            assert beacon.status_code == 404
            closed = await client.delete(f"/calls/c/sessions/{sid}", headers=auth(ALICE))
            assert closed.status_code == 202  # close_permission still allows it


DOC_PATHS = ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect")


async def test_api_docs_need_a_token_when_keys_are_set(secured: httpx.AsyncClient) -> None:
    for path in DOC_PATHS:
        for headers in ({}, auth("wrong" * 8)):
            refused = await secured.get(path, headers=headers)
            assert refused.status_code == 401, (path, refused.text)
            assert refused.json()["code"] == "unauthorized"
        assert (await secured.get(path, headers=auth(ALICE))).status_code == 200
        assert (await secured.get(path, params={"access_token": BOB})).status_code == 200
    # A browser opens the page with ?access_token=; the page fetches the document with it.
    for page in ("/docs", "/redoc"):
        resp = await secured.get(page, params={"access_token": ALICE})
        assert f"/openapi.json?access_token={ALICE}" in resp.text
        assert resp.headers["referrer-policy"] == "no-referrer"
        assert "/openapi.json?" not in (await secured.get(page, headers=auth(ALICE))).text
    spec = await secured.get("/openapi.json", params={"access_token": ALICE})
    assert "/calls/{call_id}/sessions" in spec.json()["paths"]
    assert not {"/docs", "/redoc", "/openapi.json"} & set(spec.json()["paths"])


async def test_the_docs_page_quotes_the_token_it_echoes(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """The Swagger page puts the document's URL in a script as it is: a token holding a
    quote must not end that string."""
    token = "q'</script>" + "x" * 16
    settings = make_settings(api_keys=SecretStr(f"alice:{token}"))
    async with api_client(settings, redis) as client:
        page = await client.get("/docs", params={"access_token": token})
        assert page.status_code == 200 and token not in page.text
        assert "access_token=q%27%3C%2Fscript%3E" in page.text


@pytest.mark.parametrize(
    ("mode", "keys", "open_status"),
    [("public", True, 200), ("off", True, 404), ("off", False, 404), ("auth", False, 200)],
)
async def test_api_docs_setting(
    make_settings: SettingsFactory, redis: Redis, mode: str, keys: bool, open_status: int
) -> None:
    """``public``: open even with keys; ``off``: not served; ``auth`` without keys: open,
    like every route then."""
    settings = make_settings(api_keys=KEYS if keys else None, api_docs=mode)
    async with api_client(settings, redis) as client:
        for path in DOC_PATHS:
            assert (await client.get(path)).status_code == open_status, path
            with_token = await client.get(path, headers=auth(ALICE))
            assert with_token.status_code == open_status, path
        # The API itself keeps its rules.
        started = await client.post("/calls/c/sessions")
        assert started.status_code == (401 if keys else 201)


def test_a_token_shared_by_two_principals_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request bearing it would be whichever principal the table matched last."""
    shared = "s" * 32
    monkeypatch.setenv("FLEET_API_KEYS", f"alice:{ALICE},bob:{shared},carol:{shared}")
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert "FLEET_API_KEYS" in message and "'bob'" in message and "'carol'" in message
    assert shared not in message and ALICE not in message
    with pytest.raises(ValidationError) as built:  # by hand, as an embedding app would
        Settings(api_keys=SecretStr(f"alice:{shared},bob:{shared}"))
    assert shared not in str(built.value)
    # One principal with two tokens is a rotation, and the same entry twice is harmless.
    rotation = Settings(api_keys=SecretStr(f"alice:{ALICE},alice:{shared},alice:{shared}"))
    assert {name for name, _ in rotation.principals()} == {"alice"}


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
