"""Every error answers ``{"detail": "<sentence>", "code": "<machine code>"}``. This is the
one place that maps fleet's errors to HTTP status codes."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from fleet import errors
from fleet.api.auth import Forbidden, Unauthorized

log = logging.getLogger("fleet.api")

STATUS: dict[type[errors.FleetError], int] = {
    errors.SessionNotFound: 404,
    errors.AdmissionRejected: 429,
    errors.NotAccepting: 503,
    errors.InvalidParams: 422,
    errors.IdempotencyMismatch: 422,
    errors.IdempotencyInProgress: 409,
    errors.CheckpointTooLarge: 413,
    Unauthorized: 401,
    Forbidden: 403,
}

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, detail: str, code: str, headers: Any = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _allowed_methods(request: Request) -> str:
    """Every method served at this path (Starlette's 405 names only the first route's)."""
    return ", ".join(
        method
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.routes
        )
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.FleetError)
    async def fleet_error(request: Request, exc: errors.FleetError) -> JSONResponse:
        status = next((s for t, s in STATUS.items() if isinstance(exc, t)), 500)
        retry = status in (429, 503) or isinstance(exc, errors.IdempotencyInProgress)
        headers = {"Retry-After": "1"} if retry else None
        if status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(status, exc.detail, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _describe(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body it cannot even decode: malformed, like any other.
            return error_response(422, "the body is not valid JSON", "invalid_request")
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code, headers)

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError) -> JSONResponse:
        # One failed request does not make the node unready: the lease loop decides that.
        log.warning("Redis error on %s: %s", request.url.path, type(exc).__name__)
        return error_response(
            503, "Redis did not answer; retry shortly", "redis_unavailable", {"Retry-After": "1"}
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; see the node's log", "internal_error")
