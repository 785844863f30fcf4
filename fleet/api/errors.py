"""Every error answers ``{"detail": "<sentence>", "code": "<machine code>"}``. This is the
one place that maps fleet's errors to HTTP status codes: for fleet's own app (``install``)
and for fleet's routes in any app (``route_error_response``)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet import errors
from fleet.api.auth import Forbidden, Unauthorized
from fleet.api.middleware import BodyTooLarge

log = logging.getLogger("fleet.api")

STATUS: dict[type[errors.FleetError], int] = {
    errors.SessionNotFound: 404,
    errors.ThreadNotFound: 404,
    errors.ThreadBusy: 409,
    errors.AdmissionRejected: 429,
    errors.NotAccepting: 503,
    errors.InvalidParams: 422,
    errors.UnknownWorker: 422,
    errors.CannotMigrate: 409,
    errors.IdempotencyMismatch: 422,
    errors.IdempotencyInProgress: 409,
    errors.CheckpointTooLarge: 413,
    errors.MessageTooLarge: 413,
    errors.SessionEnded: 409,
    errors.InboxBusy: 409,
    errors.InboxFull: 429,
    errors.InvalidRequest: 422,
    errors.UnsupportedMediaType: 415,
    Unauthorized: 401,
    Forbidden: 403,
}

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


NOT_JSON = "the body is not valid JSON"
INTERNAL = "internal error; see the node's log"


def error_response(status: int, detail: str, code: str, headers: Any = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def _describe(exc: RequestValidationError) -> str:
    found = exc.errors()
    if any(err.get("type") == "json_invalid" for err in found):
        # FastAPI words a truncated body as "<offset>: JSON decode error": say it as for
        # any other body that is not JSON.
        return NOT_JSON
    parts = []
    for err in found[:5]:
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


def fleet_error_response(exc: errors.FleetError) -> JSONResponse:
    status = next((s for t, s in STATUS.items() if isinstance(exc, t)), 500)
    retry = status in (429, 503) or isinstance(exc, errors.IdempotencyInProgress)
    headers = {"Retry-After": "1"} if retry else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, errors.InvalidParams) and exc.errors:
        body = {"detail": exc.detail, "code": exc.code, "errors": exc.errors}
        return JSONResponse(body, status_code=status, headers=headers)
    return error_response(status, exc.detail, exc.code, headers)


def invalid_response(exc: RequestValidationError) -> JSONResponse:
    return error_response(422, _describe(exc), "invalid_request")


def _unparsable(exc: StarletteHTTPException) -> bool:
    """FastAPI's answer to a body it cannot even decode: malformed, like any other."""
    return exc.status_code == 400 and exc.detail == "There was an error parsing the body"


def redis_down_response(request: Request, exc: RedisError) -> JSONResponse:
    # One failed request does not make the node unready: the lease loop decides that.
    log.warning("Redis error on %s: %s", request.url.path, type(exc).__name__)
    return error_response(
        503, "Redis did not answer; retry shortly", "redis_unavailable", {"Retry-After": "1"}
    )


def route_error_response(request: Request, exc: Exception) -> JSONResponse | None:
    """fleet's answer to an error raised while one of its own routes ran, in whatever app
    the route is mounted (``fleet.api.router.FleetRoute``); ``None`` for the errors that are
    the app's to answer: an HTTPException fleet did not raise (a host's own dependency may
    raise one), and unexpected errors."""
    if isinstance(exc, errors.FleetError):
        return fleet_error_response(exc)
    if isinstance(exc, RequestValidationError):
        return invalid_response(exc)
    if isinstance(exc, RedisError):
        return redis_down_response(request, exc)
    if isinstance(exc, BodyTooLarge):
        # The rest of the body is never read: the connection cannot serve another request.
        headers = {"Connection": "close"}
        return error_response(413, str(exc.detail), "body_too_large", headers)
    if isinstance(exc, StarletteHTTPException) and _unparsable(exc):
        return error_response(422, NOT_JSON, "invalid_request")
    return None


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.FleetError)
    async def fleet_error(request: Request, exc: errors.FleetError) -> JSONResponse:
        return fleet_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if _unparsable(exc):
            return error_response(422, NOT_JSON, "invalid_request")
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code, headers)

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError) -> JSONResponse:
        return redis_down_response(request, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Only what escapes the outer middleware gets here (CatchUnexpected answers the
        # rest). Starlette re-raises it after this answer and the server logs it: logging it
        # here too would print its traceback twice.
        return error_response(500, INTERNAL, "internal_error")

    # Added before the other middleware, so it runs inside them: its 500 gets the request
    # id, CORS headers and the metrics' count like any other answer.
    app.add_middleware(CatchUnexpected)


class CatchUnexpected:
    """Answers 500 to an error no handler took, and logs its traceback once.

    Starlette's own last resort (``ServerErrorMiddleware``) re-raises such an error to the
    server once it has answered, and uvicorn logs it again ("Exception in ASGI
    application"). Caught here, it goes no further: one log line, with the request's method,
    path and id. An error after the answer began can only cut the connection short; it is
    logged the same way."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:
                await error_response(500, INTERNAL, "internal_error")(scope, receive, send)
