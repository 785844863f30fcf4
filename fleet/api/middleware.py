"""Pure ASGI middleware: request ids, HTTP metrics, the request body limit, and
``Connection: close`` while the node drains."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet import metrics
from fleet.logs import request_id_var

_SAFE_REQUEST_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


_CLOSE = ((b"connection", b"close"),)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: The request scope's key for the body limit an ``HttpEdge`` enforces on it already: a
#: route that would enforce the same limit need not wrap ``receive`` a second time.
BODY_LIMIT_KEY = "fleet.body_limit"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over {limit} bytes")


def limit_body(receive: Receive, limit: int) -> Receive:
    """``receive``, raising ``BodyTooLarge`` once the request body streams past ``limit``
    bytes."""
    seen = 0

    async def limited_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return limited_receive


class HttpEdge:
    """Every HTTP request passes here first: it honours or sets ``X-Request-ID``, counts the
    request by route template and status class, and answers 413 to a body over ``limit``
    bytes, whether Content-Length says so or the body streams past it.

    One layer rather than three: one pass over the headers and one wrapped ``send`` per
    request (this runs for every request, and each layer of pure-ASGI middleware costs a
    few closures and an extra call per message)."""

    def __init__(
        self, app: ASGIApp, limit: int, draining: Callable[[], bool] = lambda: False
    ) -> None:
        """``draining``: whether the node drains; its answers then say ``Connection:
        close``, so that a proxy stops reusing connections to it before it exits (a request
        written on an idle keep-alive connection just as the node closes it would be lost:
        a proxy does not send a POST to another node once it has sent it)."""
        self.app = app
        self.limit = limit
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, too_big = self._read_headers(scope)
        scope[BODY_LIMIT_KEY] = self.limit
        token = request_id_var.set(request_id)
        status = 500
        started = False
        began = time.perf_counter()

        async def wrapped_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode()),
                    *(_CLOSE if self.draining() else ()),
                ]
            await send(message)

        try:
            if too_big:
                await self._reject(wrapped_send)
            else:
                try:
                    await self.app(scope, limit_body(receive, self.limit), wrapped_send)
                except BodyTooLarge:
                    if not started:
                        await self._reject(wrapped_send)
        finally:
            _count(scope, status, time.perf_counter() - began)
            request_id_var.reset(token)

    def _read_headers(self, scope: Scope) -> tuple[str, bool]:
        """The request id to use (the client's, if it is safe to echo and log), and whether
        Content-Length is over the limit."""
        request_id = ""
        too_big = False
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")[:128]
                if candidate and set(candidate) <= _SAFE_REQUEST_ID:
                    request_id = candidate
            elif name == b"content-length":
                try:
                    too_big = too_big or int(value) > self.limit
                except ValueError:
                    pass
        return request_id or uuid.uuid4().hex, too_big

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            {"detail": f"request body is over {self.limit} bytes", "code": "body_too_large"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _count(scope: Scope, status: int, seconds: float) -> None:
    route = scope.get("route")
    template = getattr(route, "path", None) or "unmatched"
    method = scope.get("method", "GET")
    method = method if method in _METHODS else "other"
    status_class = f"{status // 100}xx"
    metrics.labelled(metrics.HTTP_REQUESTS, method, template, status_class).inc()
    metrics.labelled(metrics.HTTP_REQUEST_SECONDS, method, template).observe(seconds)
