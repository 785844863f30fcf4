"""``fleet.Fleet``: a node as a library.

A host application includes ``fleet.router`` (the whole HTTP API) under a prefix of its
choosing and hands ``fleet.lifespan`` to its app; a script enters ``async with
fleet.lifespan():`` and calls the API's operations without HTTP. ``create_app`` is a Fleet
in an app of its own. docs/embedding.md shows both.

The operations take the runtime paths the routes take (those of ``POST …/sessions``, or
the route functions themselves), with the same checks, and answer with the same models.
What the API answers with a 4xx they raise as the ``fleet.errors`` behind it: a malformed
id, body field or wait is ``InvalidRequest`` (422), params the worker or the limits refuse
``InvalidParams`` (422), another principal's session or none ``SessionNotFound`` (404), and
so on (``fleet.api.errors.STATUS``). They act for ``principal`` (the anonymous admin by
default) under the built-in ownership rule: the permission hooks of ``fleet.api.auth`` are
HTTP dependencies and govern HTTP only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Response
from pydantic import BaseModel, TypeAdapter, ValidationError

from fleet.api.auth import ANONYMOUS, OwnedBy, Principal, TokenTable, as_principal
from fleet.api.deps import CallId, SessionId
from fleet.api.limits import check_params
from fleet.api.router import PrincipalDependency, bind_to, fleet_router
from fleet.api.routes import messages, sessions
from fleet.errors import InvalidParams, InvalidRequest
from fleet.models import CloseAccepted, SessionInfo
from fleet.runtime.node import Node
from fleet.settings import Settings

#: Seconds ``async with fleet.lifespan():`` waits for the node to be ready (as ``fleet run``).
READY_TIMEOUT = 10.0

# The route parameters' own types, so that a value is refused here as the API refuses it.
_CALL_ID: TypeAdapter[str] = TypeAdapter(CallId)
_SESSION_ID: TypeAdapter[str] = TypeAdapter(SessionId)
_WAIT: TypeAdapter[float | None] = TypeAdapter(sessions.WaitSeconds)
_IDEMPOTENCY_KEY: TypeAdapter[str | None] = TypeAdapter(sessions.IdempotencyKey)

Model = TypeVar("Model", bound=BaseModel)
T = TypeVar("T")


class Fleet:
    """One fleet node, to embed: ``router``, ``lifespan`` and the operations.

    ``principal``: a FastAPI dependency of the host's returning who is asking (a
    ``Principal``); it then decides for every route of ``router`` but ``/health``,
    ``/ready`` and ``/metrics``, and ``FLEET_API_KEYS`` play no part. Without it, the routes
    take bearer tokens as ``fleet serve`` does."""

    def __init__(
        self,
        settings: Settings,
        node: Node | None = None,
        *,
        principal: PrincipalDependency | None = None,
    ) -> None:
        self.settings = settings
        self.node = node if node is not None else Node(settings)
        self.tokens = TokenTable(settings.principals())
        #: A dependency that binds a request to this Fleet, for routes of the host's own
        #: that use fleet's dependencies (``NodeDep``, the permission hooks).
        self.bind = bind_to(self.node, self.tokens)
        self.router = fleet_router(self.node, self.tokens, settings.max_body_bytes, principal)
        self._entered = False

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Run the node while inside: ``FastAPI(lifespan=fleet.lifespan)``, or ``async with
        fleet.lifespan():`` in a script. On the way out the node drains (up to
        ``FLEET_DRAIN_TIMEOUT``), then hands off or closes what still runs. Without an app
        it also waits (up to ``READY_TIMEOUT`` s) until the node is ready, so that a script's
        first start does not meet 503 ``not_ready``; an app has ``/ready`` for that. A Fleet
        runs its node once."""
        if self._entered:
            raise RuntimeError("this Fleet's lifespan was entered already; a Fleet runs once")
        self._entered = True
        await self.node.start()
        try:
            if app is None:
                await self.node.wait_ready(READY_TIMEOUT)  # if not, the first start says why
            yield
        finally:
            await self.node.stop()

    async def start_session(
        self,
        call_id: str,
        *,
        worker: str | None = None,
        params: dict[str, Any] | None = None,
        thread_id: str | None = None,
        call_type: str = "default",
        resumable: bool = True,
        principal: Principal | str = ANONYMOUS,
        idempotency_key: str | None = None,
        wait: float | None = None,
    ) -> SessionInfo:
        """``POST /calls/{call_id}/sessions``: the new session, once it runs; with ``wait``
        (seconds), once it has ended (with its ``result``) or the wait ran out. With
        ``idempotency_key``, a repeat by the same principal gets the first answer."""
        _checked(_CALL_ID, call_id, "call_id")
        body = _model(
            sessions.StartRequest,
            worker=worker,
            call_type=call_type,
            params={} if params is None else params,
            resumable=resumable,
            thread_id=thread_id,
        )
        key = _checked(_IDEMPOTENCY_KEY, idempotency_key, "idempotency_key")
        wait = _checked(_WAIT, wait, "wait")
        owner = _principal(principal)
        try:
            check_params(body.params, self.settings)
        except (TypeError, ValueError) as exc:  # not JSON: the API never meets such params
            raise InvalidParams(f"params must be JSON values: {exc}") from None
        info = await sessions.begin(self.node, call_id, body, owner.name, key)
        return await sessions.waited(self.node, info, wait)

    async def get_session(
        self, call_id: str, session_id: str, *, principal: Principal | str = ANONYMOUS
    ) -> SessionInfo:
        """``GET /calls/{call_id}/sessions/{session_id}``, from any node."""
        _checked(_CALL_ID, call_id, "call_id")
        _checked(_SESSION_ID, session_id, "session_id")
        return await sessions.get_session(
            call_id=call_id,
            session_id=session_id,
            node=self.node,
            allowed=OwnedBy(_principal(principal)),
        )

    async def close_session(
        self,
        call_id: str,
        session_id: str,
        *,
        wait: float | None = None,
        principal: Principal | str = ANONYMOUS,
    ) -> SessionInfo | CloseAccepted:
        """``DELETE /calls/{call_id}/sessions/{session_id}``: ``CloseAccepted`` while the
        session closes; its SessionInfo once it has ended (at once if it had, or within
        ``wait`` seconds)."""
        _checked(_CALL_ID, call_id, "call_id")
        _checked(_SESSION_ID, session_id, "session_id")
        return await sessions.close_session(
            call_id=call_id,
            session_id=session_id,
            node=self.node,
            allowed=OwnedBy(_principal(principal)),
            response=Response(),
            wait=_checked(_WAIT, wait, "wait"),
        )

    async def send_message(
        self,
        call_id: str,
        session_id: str,
        data: Any,
        *,
        type: str = "message",
        id: str | None = None,
        wait: float | None = None,
        principal: Principal | str = ANONYMOUS,
    ) -> messages.MessageReply | messages.MessageAccepted:
        """``POST /calls/{call_id}/sessions/{session_id}/messages``: ``MessageAccepted`` once
        the message is in the session's inbox; with ``wait`` (seconds), ``MessageReply``
        once the worker replied (``MessageAccepted`` if the wait ran out). A retry with the
        same ``id`` is not sent twice."""
        _checked(_CALL_ID, call_id, "call_id")
        _checked(_SESSION_ID, session_id, "session_id")
        try:
            json.dumps(data)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"data must be JSON values: {exc}") from None
        return await messages.send_message(
            call_id=call_id,
            session_id=session_id,
            node=self.node,
            allowed=OwnedBy(_principal(principal)),
            body=_model(messages.SendRequest, type=type, data=data, id=id),
            response=Response(),
            wait=_checked(_WAIT, wait, "wait"),
        )


def _principal(who: Principal | str) -> Principal:
    try:
        return as_principal(who)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(str(exc)) from None


def _checked(adapter: TypeAdapter[T], value: T, name: str) -> T:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc, name)) from None


def _model(model: type[Model], **fields: Any) -> Model:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None


def _describe(exc: ValidationError, name: str = "") -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in (name, *err.get("loc", ())) if p != "")
        message = err.get("msg", "invalid")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid value"
