"""``create_app(settings)``: the FastAPI application of one node, a ``fleet.Fleet`` in an
app of its own: its router at the root, its lifespan, and what only fleet's own app adds
(the documentation pages, CORS, request ids and HTTP metrics, the answers to requests no
route matched)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, JSONResponse

from fleet import __version__
from fleet.api import checks, errors
from fleet.api.auth import ACCESS_TOKEN, get_docs_principal
from fleet.api.library import Fleet
from fleet.api.middleware import HttpEdge
from fleet.runtime.node import Node
from fleet.settings import Settings


def create_app(settings: Settings, node: Node | None = None) -> FastAPI:
    """The app runs ``node`` (a new ``Node(settings)`` by default) for its lifespan."""
    fleet = Fleet(settings, node)
    app = FastAPI(
        title="fleet",
        version=__version__,
        description="Long-lived worker sessions on a fleet of stateless nodes.",
        lifespan=fleet.lifespan,
        # Served by _docs_router instead, so that FLEET_API_DOCS decides who may read them.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.fleet = fleet
    app.state.node = fleet.node
    errors.install(app)
    checks.document(app)
    # The whole API. A new router module goes in fleet.api.router (GUARDED or OPEN), not
    # here: there it is bound to its Fleet, in this app and in any other.
    app.include_router(fleet.router)
    if settings.api_docs != "off":
        app.include_router(_docs_router(app, fleet, public=settings.api_docs == "public"))
    if settings.cors_origin_list():
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list(),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "Last-Event-ID",
                "X-Request-ID",
            ],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(
        HttpEdge, limit=settings.max_body_bytes, draining=lambda: fleet.node.draining
    )
    return app


# The pages load their scripts from a CDN: no Referer, so a token in the page's URL stays
# here; and nothing that may hold a token is cached.
_DOCS_HEADERS = {"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def _docs_router(app: FastAPI, fleet: Fleet, public: bool) -> APIRouter:
    """/openapi.json, /docs (Swagger UI) and /redoc. Unless public they need a token when
    keys are set, which a browser opening a page can only give as ``?access_token=``; the
    pages then fetch the document with that same token. Checked like the API's routes."""
    router = APIRouter(
        include_in_schema=False,
        dependencies=[
            Depends(checks.RequestChecks()),
            Depends(fleet.bind),
            *([] if public else [Depends(get_docs_principal)]),
        ],
    )

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def spec_url(request: Request) -> str:
        url = root(request) + "/openapi.json"
        token = request.query_params.get(ACCESS_TOKEN)
        if public or not token or not fleet.tokens:
            return url
        # Checked by get_docs_principal; quoted, as the pages put it in a script unescaped.
        return f"{url}?{ACCESS_TOKEN}={quote(token, safe='')}"

    @router.get("/openapi.json")
    async def openapi(request: Request) -> JSONResponse:
        schema: dict[str, Any] = app.openapi()
        root_path = root(request)
        if root_path and root_path not in {s.get("url") for s in schema.get("servers", [])}:
            schema = {**schema, "servers": [{"url": root_path}, *schema.get("servers", [])]}
        return JSONResponse(schema, headers=_DOCS_HEADERS)

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=spec_url(request),
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root(request) + "/docs/oauth2-redirect",
        )
        page.headers.update(_DOCS_HEADERS)
        return page

    @router.get("/docs/oauth2-redirect")
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        page = get_redoc_html(openapi_url=spec_url(request), title=f"{app.title} - ReDoc")
        page.headers.update(_DOCS_HEADERS)
        return page

    return router
