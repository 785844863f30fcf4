"""What a request may carry: only the query parameters its route declares, and a JSON body
sent as JSON. Without these checks a typo such as ``?limit=3`` is ignored silently (the
session starts without a limit) and JSON sent as ``text/plain`` gets a puzzling 422.

``RequestChecks`` is one app-wide dependency (``FastAPI(dependencies=[...])``): it reads the
route FastAPI matched, so a route gains or loses a query parameter by declaring it, never
by editing a list here. Permission hooks replaced through ``app.dependency_overrides`` are
followed too, so a hook of a deployer's own may declare query parameters of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from fastapi import FastAPI, params
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import HTTPConnection, Request

from fleet.errors import InvalidRequest, UnsupportedMediaType

JSON = "application/json"

# Read by fleet.api.auth for the browser-facing routes (EventSource cannot send headers)
# without being a declared parameter. Tolerated everywhere: where a route does not honour
# it, a node with API keys answers 401 anyway, and without keys there is nothing to ignore.
AUTH_QUERY = frozenset({"access_token"})

# /health, /ready and /metrics are called by probes and scrapers, whose configuration may
# add parameters of its own (Prometheus' `params:`): an extra one must not take a node out
# of its load balancer.
UNCHECKED_TAGS = frozenset({"operations"})

UNSUPPORTED_415: dict[str, Any] = {"description": f"The body is not sent as {JSON}."}
UNKNOWN_422: dict[str, Any] = {"description": "An unknown query parameter."}


class RequestChecks:
    """The app-wide dependency. Keeps, per route, what it checks: whether it is checked at
    all, the query parameter names it takes, and whether it reads a JSON body."""

    def __init__(self) -> None:
        # By id: routes compare by value and are not hashable. The route is kept in the
        # entry, so its id cannot be reused while the entry stands.
        self._known: dict[int, tuple[APIRoute, dict[Any, Any], _Facts]] = {}

    async def __call__(self, conn: HTTPConnection) -> None:
        route = conn.scope.get("route")
        if conn.scope["type"] != "http" or not isinstance(route, APIRoute):
            return  # the WebSocket route checks what it reads itself
        facts = self._facts(route, conn.app)
        if facts.unchecked:
            return
        if conn.scope.get("query_string"):  # no query string, nothing unknown in it
            unknown = [name for name in conn.query_params if name not in facts.query]
            unknown = [name for name in unknown if name not in AUTH_QUERY]
            if unknown:
                raise InvalidRequest(_unknown_query(unknown, facts.query, facts.json_body))
        if facts.json_body and isinstance(conn, Request) and await conn.body():
            check_json_media_type(conn.headers.get("content-type"))

    def _facts(self, route: APIRoute, app: Any) -> _Facts:
        overrides: dict[Any, Any] = getattr(app, "dependency_overrides", None) or {}
        cached = self._known.get(id(route))
        if cached is not None and cached[0] is route and cached[1] == overrides:
            return cached[2]
        facts = _Facts(
            unchecked=bool(UNCHECKED_TAGS.intersection(route.tags)),
            query=tuple(
                dict.fromkeys(_query_params(route.dependant, route.path_format, overrides))
            ),
            json_body=takes_json(route),
        )
        self._known[id(route)] = (route, dict(overrides), facts)  # a copy: overrides change
        return facts


class _Facts(NamedTuple):
    """What the checks need to know of one route, worked out once."""

    unchecked: bool
    query: tuple[str, ...]
    json_body: bool


def takes_json(route: APIRoute) -> bool:
    """The route reads a JSON body (not a form)."""
    field = route.body_field
    return field is not None and not isinstance(field.field_info, params.Form)


def check_json_media_type(content_type: str | None) -> None:
    """Raise ``UnsupportedMediaType`` unless ``content_type`` is JSON (``application/json``
    or ``application/<anything>+json``, any parameters)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    kind, _, subtype = media.partition("/")
    if kind == "application" and (subtype == "json" or subtype.endswith("+json")):
        return
    if not media:
        raise UnsupportedMediaType(f"the body has no Content-Type; send it as {JSON}")
    shown = media if len(media) <= 100 else media[:100] + "…"
    raise UnsupportedMediaType(f"the body is sent as {shown!r}; send it as {JSON}")


def _unknown_query(unknown: list[str], known: tuple[str, ...], body: bool) -> str:
    names = ", ".join(repr(n[:64]) for n in unknown[:5])
    which = "parameter" if len(unknown) == 1 else "parameters"
    takes = ", ".join(known) if known else "none"
    hint = " (anything else goes in the JSON body)" if body else ""
    return f"unknown query {which} {names}; this route takes: {takes}{hint}"


def _query_params(
    dependant: Dependant, path: str, overrides: dict[Callable[..., Any], Callable[..., Any]]
) -> Iterator[str]:
    """The query parameter names of ``dependant`` and its dependencies, as FastAPI will
    solve them (with ``overrides`` in place of the dependencies they replace)."""
    for field in dependant.query_params:
        model = field.field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):  # Query() of a model
            yield from (f.alias or name for name, f in model.model_fields.items())
        else:
            yield field.alias
    for sub in dependant.dependencies:
        override = overrides.get(sub.call) if sub.call is not None else None
        if override is not None:
            sub = get_dependant(path=path, call=override)
        yield from _query_params(sub, path, overrides)


def document(app: FastAPI) -> None:
    """Add what the checks answer to the OpenAPI document: 415 where a JSON body is read,
    422 wherever query parameters are checked (most routes document it already)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if not UNCHECKED_TAGS.intersection(operation.get("tags", ())):
                    responses.setdefault("422", UNKNOWN_422)
                if JSON in operation.get("requestBody", {}).get("content", {}):
                    responses.setdefault("415", UNSUPPORTED_415)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
