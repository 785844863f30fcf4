"""``create_app(settings)``: the FastAPI application of one node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from fleet import __version__
from fleet.api import errors
from fleet.api.auth import TokenTable
from fleet.api.middleware import HttpEdge
from fleet.api.routes import events, health, nodes, sessions
from fleet.runtime.node import Node
from fleet.settings import Settings


def create_app(settings: Settings, node: Node | None = None) -> FastAPI:
    """The app runs ``node`` (a new ``Node(settings)`` by default) for its lifespan."""
    running = node if node is not None else Node(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await running.start()
        try:
            yield
        finally:
            await running.stop()

    app = FastAPI(
        title="fleet",
        version=__version__,
        description="Long-lived worker sessions on a fleet of stateless nodes.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.node = running
    app.state.tokens = TokenTable(settings.principals())
    errors.install(app)
    app.include_router(sessions.router)
    app.include_router(events.router)
    app.include_router(nodes.router)
    app.include_router(health.router)
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
    app.add_middleware(HttpEdge, limit=settings.max_body_bytes)
    return app
