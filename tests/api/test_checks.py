"""Clear answers to requests a route cannot read: a JSON body sent as something else (415),
bad JSON of any kind (one sentence), and query parameters the route does not declare
(422), on fakeredis and on a real redis-server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from fleet.api.auth import PrincipalDep, RecordCheck, owns, view_permission
from fleet.api.checks import check_json_media_type
from fleet.errors import UnsupportedMediaType
from tests.conftest import SettingsFactory, api_client

BODY = b'{"params": {"interval": 0.02, "limit": 2}}'
JSON_TYPE = {"content-type": "application/json"}
TOKEN = "alice-token-0123456789"


async def nothing_started(client: httpx.AsyncClient, call: str = "demo") -> bool:
    listed: dict[str, Any] = (await client.get(f"/calls/{call}/sessions")).json()
    return listed == {"sessions": []}


@pytest.mark.parametrize(
    ("content_type", "named"),
    [
        ("text/plain", "'text/plain'"),
        ("text/plain;charset=UTF-8", "'text/plain'"),  # what fetch() sends for a string
        ("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),
        (None, "no Content-Type"),
    ],
)
async def test_json_sent_as_another_type_is_415(
    client: httpx.AsyncClient, content_type: str | None, named: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    resp = await client.post("/calls/demo/sessions", content=BODY, headers=headers)
    assert resp.status_code == 415, resp.text
    assert resp.json()["code"] == "unsupported_media_type"
    detail = resp.json()["detail"]
    assert named in detail and "application/json" in detail, detail
    assert await nothing_started(client)


async def test_json_types_and_empty_bodies_are_accepted(client: httpx.AsyncClient) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.fleet+json"):
        resp = await client.post(
            "/calls/demo/sessions", content=BODY, headers={"content-type": content_type}
        )
        assert resp.status_code == 201, (content_type, resp.text)
    # No body at all, with or without a content type: every field is optional (the
    # README's first `curl -X POST`).
    for headers in ({}, {"content-type": "text/plain"}):
        resp = await client.post("/calls/demo/sessions", headers=headers)
        assert resp.status_code == 201, (headers, resp.text)


async def test_beacon_close_takes_any_body(client: httpx.AsyncClient) -> None:
    """``navigator.sendBeacon`` posts text/plain, form or blob bodies: the close route
    reads no body, so none is refused."""
    bodies: list[dict[str, Any]] = [
        {"content": b"bye", "headers": {"content-type": "text/plain;charset=UTF-8"}},
        {"data": {"reason": "tab closed"}},  # application/x-www-form-urlencoded
        {"content": b"\x00\x01", "headers": {}},
    ]
    for body in bodies:
        resp = await client.post("/calls/demo/sessions", content=BODY, headers=JSON_TYPE)
        sid = resp.json()["session_id"]
        closed = await client.post(f"/calls/demo/sessions/{sid}/close", **body)
        assert closed.status_code in (200, 202), (body, closed.text)


@pytest.mark.parametrize(
    "body",
    [
        b'{"params": {"limit"',  # truncated: FastAPI's own words were "19: JSON decode error"
        b'{"params": }',
        b"{bad",
        b"8\xbfh\xc3",  # not even text
    ],
)
async def test_every_bad_json_gets_one_sentence(client: httpx.AsyncClient, body: bytes) -> None:
    resp = await client.post("/calls/demo/sessions", content=body, headers=JSON_TYPE)
    assert resp.status_code == 422
    assert resp.json() == {"detail": "the body is not valid JSON", "code": "invalid_request"}


async def test_unknown_query_parameters_are_refused(client: httpx.AsyncClient) -> None:
    resp = await client.post("/calls/demo/sessions", params={"limit": 3})
    assert resp.status_code == 422 and resp.json()["code"] == "invalid_request"
    assert resp.json()["detail"] == (
        "unknown query parameter 'limit'; this route takes: wait "
        "(anything else goes in the JSON body)"
    )
    assert await nothing_started(client)

    listed = await client.get("/sessions", params={"limt": 5, "cursr": 1})
    assert listed.status_code == 422
    assert listed.json()["detail"] == (
        "unknown query parameters 'limt', 'cursr'; this route takes: state, node_id, limit, cursor"
    )

    sid = (await client.post("/calls/demo/sessions")).json()["session_id"]
    typo = await client.delete(f"/calls/demo/sessions/{sid}", params={"wiat": 5})
    assert typo.status_code == 422 and "'wiat'" in typo.json()["detail"]
    assert typo.json()["detail"].endswith("this route takes: wait")
    assert (await client.get(f"/calls/demo/sessions/{sid}")).json()["state"] == "running"
    nodes = await client.get("/nodes", params={"verbose": 1})
    assert nodes.status_code == 422 and nodes.json()["detail"].endswith("takes: none")
    # The declared ones work as before.
    assert (await client.get("/sessions", params={"limit": 5})).status_code == 200
    closed = await client.delete(f"/calls/demo/sessions/{sid}", params={"wait": 5})
    assert closed.status_code == 200 and closed.json()["state"] == "ended"


async def test_probes_and_scrapes_take_any_query(client: httpx.AsyncClient) -> None:
    for path in ("/health", "/ready", "/metrics"):
        resp = await client.get(path, params={"name[]": "x", "_": "1"})
        assert resp.status_code == 200, (path, resp.text)


async def test_access_token_in_the_query_still_works(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """The events route reads ``?access_token=`` without declaring it (EventSource sends
    no headers); elsewhere it is not a token, and the answer is still 401, not 422."""
    settings = make_settings(api_keys=f"alice:{TOKEN}")
    async with api_client(settings, redis) as client:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        resp = await client.post("/calls/c/sessions", content=BODY, headers=JSON_TYPE | bearer)
        sid = resp.json()["session_id"]
        closed = await client.delete(f"/calls/c/sessions/{sid}?wait=5", headers=bearer)
        assert closed.json()["state"] == "ended"
        events = await client.get(f"/calls/c/sessions/{sid}/events", params={"access_token": TOKEN})
        assert events.status_code == 200 and "session_ended" in events.text
        other = await client.get(f"/calls/c/sessions/{sid}", params={"access_token": TOKEN})
        assert other.status_code == 401


async def tenant_view(principal: PrincipalDep, tenant: str | None = None) -> RecordCheck:
    return lambda record: owns(principal, record) and tenant != "nobody"


async def test_a_replaced_hook_may_declare_query_parameters(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_client(make_settings(), redis) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        assert (await client.get("/sessions", params={"tenant": "x"})).status_code == 422
        app.dependency_overrides[view_permission] = tenant_view
        try:
            resp = await client.get("/sessions", params={"tenant": "x", "limit": 2})
            assert resp.status_code == 200, resp.text
            refused = await client.get("/sessions", params={"tenannt": "x"})
            assert "this route takes: state, node_id, limit, cursor, tenant" in refused.text
        finally:
            app.dependency_overrides.clear()
        assert (await client.get("/sessions", params={"tenant": "x"})).status_code == 422


async def test_openapi_documents_what_the_checks_answer(
    client: httpx.AsyncClient,
) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "415" in paths["/calls/{call_id}/sessions"]["post"]["responses"]
    assert "415" not in paths["/calls/{call_id}/sessions/{session_id}/close"]["post"]["responses"]
    assert "415" not in paths["/calls/{call_id}/sessions"]["get"]["responses"]
    assert "422" in paths["/nodes"]["get"]["responses"]  # the query check applies there too
    assert "422" not in paths["/health"]["get"]["responses"]


def test_media_types() -> None:
    for good in ("application/json", "Application/JSON; charset=utf-8", "application/ld+json"):
        check_json_media_type(good)
    for bad in ("text/json", "application/jsonx", "", "json", "multipart/form-data; b=x"):
        with pytest.raises(UnsupportedMediaType):
            check_json_media_type(bad)
