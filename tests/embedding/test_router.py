"""``Fleet.router`` in an app that is not fleet's: fleet's routes keep fleet's rules (bearer
tokens, request checks, the body limit, ``{"detail", "code"}`` errors) while the host's own
routes keep the host's exception handlers, and the host's dependency overrides reach
fleet's permission hooks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.exceptions import HTTPException

from fleet import Fleet
from fleet.api.auth import Principal, RecordCheck, view_permission
from fleet.api.router import PrincipalDependency
from tests.conftest import SettingsFactory
from tests.embedding.conftest import until_ready

ALICE, BOB = "a" * 32, "b" * 32
SESSIONS = "/fleet/calls/c/sessions"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def host_app(fleet: Fleet) -> FastAPI:
    """A host with error handlers of its own, which fleet's routes must not go through."""
    app = FastAPI(lifespan=fleet.lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"host": "invalid"}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"host": exc.detail}, status_code=exc.status_code)

    @app.get("/items/{n}")
    async def item(n: int) -> dict[str, int]:
        return {"n": n}

    @app.post("/echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return body

    app.include_router(fleet.router, prefix="/fleet")
    return app


@asynccontextmanager
async def client_of(app: FastAPI, raises: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raises)
        async with httpx.AsyncClient(transport=transport, base_url="http://host") as client:
            await until_ready(client, "/fleet")
            yield client


async def test_each_side_answers_its_own_errors(make_settings: SettingsFactory) -> None:
    settings = make_settings(api_keys=SecretStr(f"alice:{ALICE},bob:{BOB}"))
    async with client_of(host_app(Fleet(settings))) as client:
        # The host's routes: the host's handlers, the host's (lack of) checks.
        assert (await client.get("/items/x")).json() == {"host": "invalid"}
        assert (await client.get("/nowhere")).json() == {"host": "Not Found"}
        assert (await client.get("/items/3", params={"whatever": 1})).json() == {"n": 3}
        big = {"x": "a" * (settings.max_body_bytes + 10)}
        assert (await client.post("/echo", json=big)).status_code == 200
        # Fleet's routes: fleet's auth and answers.
        unauthorized = await client.get(SESSIONS)
        assert unauthorized.status_code == 401
        assert unauthorized.json()["code"] == "unauthorized"
        assert unauthorized.headers["www-authenticate"] == "Bearer"
        alice = bearer(ALICE)
        as_json = {**alice, "content-type": "application/json"}
        as_text = {**alice, "content-type": "text/plain"}
        bad_params = {"params": {"interval": -1}}
        cases: list[tuple[httpx.Response, int, str]] = [
            (await client.get("/fleet/calls/bad%20id/sessions", headers=alice), 422, ""),
            (await client.get(SESSIONS, params={"limit": 3}, headers=alice), 422, ""),
            (await client.get(f"{SESSIONS}/nope", headers=alice), 404, "not_found"),
            (await client.post(SESSIONS, content=b"{nope", headers=as_json), 422, ""),
            (await client.post(SESSIONS, content=b"{}", headers=as_text), 415, ""),
            (await client.post(SESSIONS, json=bad_params, headers=alice), 422, "invalid_params"),
            (await client.post(SESSIONS, json=big, headers=alice), 413, "body_too_large"),
        ]
        for resp, status, code in cases:
            assert resp.status_code == status, resp.text
            # fleet's own shape; invalid params also say which fields (``errors``)
            assert set(resp.json()) - {"errors"} == {"detail", "code"}, resp.text
            assert not code or resp.json()["code"] == code, resp.text

        # A body that streams past the limit without saying its length.
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"params": {"x": "'
            for _ in range(10):
                yield b"a" * (settings.max_body_bytes // 8)
            yield b'"}}'

        streamed = await client.post(
            SESSIONS, content=chunks(), headers={**alice, "content-type": "application/json"}
        )
        assert streamed.status_code == 413 and streamed.json()["code"] == "body_too_large"
        # Alice's session is hers; the OpenAPI document of the host shows fleet's routes.
        sid = (await client.post(SESSIONS, headers=alice)).json()["session_id"]
        assert (await client.get(f"{SESSIONS}/{sid}", headers=bearer(BOB))).status_code == 404
        assert (await client.get(f"{SESSIONS}/{sid}", headers=alice)).status_code == 200
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert "/fleet/calls/{call_id}/sessions/{session_id}" in paths


async def test_the_hosts_overrides_reach_fleets_permission_hooks(
    make_settings: SettingsFactory,
) -> None:
    app = host_app(Fleet(make_settings()))

    async def sees_call_public_only() -> RecordCheck:
        return lambda record: record.call_id == "public"

    app.dependency_overrides[view_permission] = sees_call_public_only
    async with client_of(app) as client:
        hidden = (await client.post(SESSIONS)).json()["session_id"]
        shown = (await client.post("/fleet/calls/public/sessions")).json()["session_id"]
        assert (await client.get(f"{SESSIONS}/{hidden}")).status_code == 404
        assert (await client.get(f"/fleet/calls/public/sessions/{shown}")).status_code == 200


async def by_email() -> Principal:
    return Principal("alice@example.com")


async def by_name() -> Any:
    return "admin"


@pytest.mark.parametrize("dependency", [by_email, by_name])
async def test_a_host_principal_that_is_no_principal_is_a_bug_of_the_host(
    make_settings: SettingsFactory, dependency: PrincipalDependency
) -> None:
    """A principal's name goes into Redis keys: one that is not an id is refused, never used;
    so is a bare name (admin rights are the app's to give, explicitly). Refused as a bug:
    500, the host's own error handling."""
    app = host_app(Fleet(make_settings(), principal=dependency))
    async with client_of(app, raises=False) as client:
        assert (await client.post(SESSIONS)).status_code == 500
        assert (await client.get("/fleet/sessions")).status_code == 500
        assert (await client.get("/fleet/health")).status_code == 200


async def test_a_streamed_start_names_the_session_under_the_prefix(
    make_settings: SettingsFactory,
) -> None:
    async with client_of(host_app(Fleet(make_settings()))) as client:
        body = {"params": {"interval": 0.01, "limit": 1}}
        headers = {"accept": "text/event-stream"}
        async with client.stream("POST", SESSIONS, json=body, headers=headers) as resp:
            assert resp.status_code == 200
            where = resp.headers["location"]
            async for _ in resp.aiter_lines():
                pass
        assert where.startswith(f"{SESSIONS}/")
        assert (await client.get(where)).json()["state"] == "ended"
