"""fleet's HTTP API as one ``APIRouter`` that keeps fleet's rules in any app that includes
it, under any prefix (``fleet.Fleet(settings).router``).

What an app of fleet's own would apply app-wide travels with the routes instead, so that
a host app's own routes, exception handlers and middleware stay exactly the host's:

* each route answers fleet's errors in fleet's shape and enforces
  ``FLEET_MAX_BODY_BYTES`` itself (``FleetRoute``);
* router dependencies, which FastAPI runs before a route's own, apply the request checks
  (``checks.RequestChecks``) and put the Fleet's node and tokens where the routes look for
  them (``bind_to``), both in one dependency (``checked_and_bound``), and, when the host
  decides who is asking, ask the host's dependency (``decided_by``).

FastAPI has no router-level exception handlers, and ``include_router`` keeps each route's
own class: so the routes of ``fleet.api.routes`` are registered again here, as FleetRoutes
(``_register``).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the annotations of the
# dependency ``decided_by`` builds, and one of them names a dependency known only then.

from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.params import Depends as DependsParam
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.requests import HTTPConnection

from fleet.api import checks
from fleet.api.auth import PRINCIPAL_KEY, TOKENS_KEY, Principal, TokenTable, as_principal
from fleet.api.deps import NODE_KEY
from fleet.api.errors import route_error_response
from fleet.api.middleware import BODY_LIMIT_KEY, BodyTooLarge, limit_body
from fleet.api.routes import events, health, messages, migrate, nodes, sessions, threads
from fleet.runtime.node import Node

#: A FastAPI dependency (any parameters FastAPI can solve) that returns who is asking, a
#: ``Principal``; it raises (e.g. ``HTTPException(401)``) to refuse.
PrincipalDependency = Callable[..., Principal | Awaitable[Principal]]

#: The routers whose routes act for a principal; ``health`` (probes, scrapers) never does.
GUARDED = (
    sessions.router,
    messages.router,
    migrate.router,
    events.router,
    threads.router,
    nodes.router,
)
OPEN = (health.router,)

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class FleetRoute(APIRoute):
    """A route of fleet's API. Errors that are fleet's to answer (``fleet.errors``,
    malformed requests, Redis being away, a body over the limit) get fleet's answer here,
    before any app's exception handlers see them; the others (an HTTPException raised by a
    host's own dependency, a bug) go on to the app's."""

    max_body_bytes: ClassVar[int]  # FLEET_MAX_BODY_BYTES, set per Fleet: ``route_class``

    def get_route_handler(self) -> Handler:
        handle = super().get_route_handler()
        limit = self.max_body_bytes

        async def handle_in_any_app(request: Request) -> Response:
            try:
                if request.scope.get(BODY_LIMIT_KEY, limit + 1) <= limit:
                    # fleet's own app: its HttpEdge enforces this limit on the body already
                    return await handle(request)
                length = request.headers.get("content-length", "")
                if length.isdigit() and int(length) > limit:
                    raise BodyTooLarge(limit)
                return await handle(Request(request.scope, limit_body(request.receive, limit)))
            except Exception as exc:
                answer = route_error_response(request, exc)
                if answer is None:
                    raise
                return answer

        return handle_in_any_app


def route_class(max_body_bytes: int) -> type[FleetRoute]:
    class Route(FleetRoute):
        pass

    Route.max_body_bytes = max_body_bytes
    return Route


def bind_to(node: Node, tokens: TokenTable) -> Callable[[HTTPConnection], Awaitable[None]]:
    """A dependency that puts ``node`` and ``tokens`` where fleet's dependencies look for
    them (``deps.node_of``, ``auth``): the request's scope, not the app's state."""

    async def bind(conn: HTTPConnection) -> None:
        conn.scope[NODE_KEY] = node
        conn.scope[TOKENS_KEY] = tokens

    return bind


def checked_and_bound(
    node: Node, tokens: TokenTable
) -> Callable[[HTTPConnection], Awaitable[None]]:
    """The request checks, then ``bind_to``'s binding, as one dependency: FastAPI's own
    cost is per dependency, and every request of the API pays it. In this order: a
    request with an unknown parameter is refused before anything else."""
    check = checks.RequestChecks()

    async def checked_and_bound(conn: HTTPConnection) -> None:
        await check(conn)
        conn.scope[NODE_KEY] = node  # as bind_to's dependency does
        conn.scope[TOKENS_KEY] = tokens

    return checked_and_bound


def decided_by(dependency: PrincipalDependency) -> Callable[..., Awaitable[None]]:
    """A dependency that asks the host's ``dependency`` who is asking and puts the answer
    where fleet's principal dependencies look first (``auth.PRINCIPAL_KEY``): it stands
    for every route, header, stream, beacon and WebSocket alike, instead of a token."""

    async def decide(
        conn: HTTPConnection, principal: Annotated[Principal, Depends(dependency)]
    ) -> None:
        if not isinstance(principal, Principal):
            # A name alone would leave admin rights to a naming rule: the app says.
            raise TypeError(f"{dependency!r} returned {principal!r}, not a Principal")
        conn.scope[PRINCIPAL_KEY] = as_principal(principal)

    return decide


def fleet_router(
    node: Node,
    tokens: TokenTable,
    max_body_bytes: int,
    principal: PrincipalDependency | None = None,
) -> APIRouter:
    """Every route of the API, bound to ``node``; with ``principal``, who is asking is
    what that dependency says (else: ``tokens``)."""
    router = APIRouter(
        route_class=route_class(max_body_bytes),
        dependencies=[Depends(checked_and_bound(node, tokens))],
    )
    guard = [] if principal is None else [Depends(decided_by(principal))]
    for source in GUARDED:
        _register(router, source, guard)
    for source in OPEN:
        _register(router, source, [])
    return router


def _register(target: APIRouter, source: APIRouter, dependencies: list[DependsParam]) -> None:
    """``target.include_router(source, dependencies=dependencies)``, except that the routes
    become ``target``'s route class."""
    for route in source.routes:
        if isinstance(route, APIRoute):
            target.add_api_route(
                route.path,
                route.endpoint,
                response_model=route.response_model,
                status_code=route.status_code,
                tags=route.tags,
                dependencies=[*dependencies, *route.dependencies],
                summary=route.summary,
                description=route.description,
                response_description=route.response_description,
                responses=route.responses,
                deprecated=route.deprecated,
                methods=route.methods,
                operation_id=route.operation_id,
                response_model_include=route.response_model_include,
                response_model_exclude=route.response_model_exclude,
                response_model_by_alias=route.response_model_by_alias,
                response_model_exclude_unset=route.response_model_exclude_unset,
                response_model_exclude_defaults=route.response_model_exclude_defaults,
                response_model_exclude_none=route.response_model_exclude_none,
                include_in_schema=route.include_in_schema,
                response_class=route.response_class,
                name=route.name,
                callbacks=route.callbacks,
                openapi_extra=route.openapi_extra,
                generate_unique_id_function=route.generate_unique_id_function,
            )
        elif isinstance(route, APIWebSocketRoute):
            target.add_api_websocket_route(
                route.path,
                route.endpoint,
                name=route.name,
                dependencies=[*dependencies, *route.dependencies],
            )
        else:
            raise TypeError(f"fleet's router cannot carry {route!r}")
