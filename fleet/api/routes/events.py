"""Live events of a session, from any node: Server-Sent Events and a WebSocket.

Both read through the node's ``EventDispatcher`` (``fleet/events/dispatcher.py``): a client costs a
small buffer, not a Redis connection. Both resume strictly after a given event id and end
after ``session_ended``. The WebSocket also takes the client's side of a conversation:
``{"type": "message", ...}`` frames go through the same send as ``POST …/messages``, and
the ``message`` and ``reply`` events come back on the socket like any other event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, WebSocket
from pydantic import ValidationError
from starlette.responses import Response

from fleet.api import streams
from fleet.api.auth import (
    CanStream,
    OwnedBy,
    Principal,
    owns,
    send_permission,
    socket_principal,
)
from fleet.api.deps import CallId, NodeDep, SessionId, node_of, visible
from fleet.api.routes.messages import SendRequest, send_message
from fleet.api.streams import EventStream
from fleet.errors import FleetError, SessionNotFound
from fleet.events.listener import EVENT_ID_PATTERN, START, Listener, is_event_id
from fleet.models import State
from fleet.runtime.node import Node
from fleet.store import REDIS_ERRORS
from fleet.tasks import cancel_and_wait

log = logging.getLogger("fleet.api.events")
router = APIRouter(tags=["events"])


# WebSocket close codes: 4000 + the HTTP status they stand for.
WS_UNAUTHORIZED, WS_NOT_FOUND, WS_INVALID, WS_TRY_AGAIN = 4401, 4404, 4422, 1013

EventIdQuery = Annotated[
    str | None,
    Query(
        pattern=EVENT_ID_PATTERN,
        description="Resume strictly after this event id (Last-Event-ID wins if both).",
    ),
]
LastEventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        pattern=EVENT_ID_PATTERN,
        description="Sent by EventSource on reconnect: resume strictly after this id.",
    ),
]


@router.get(
    "/calls/{call_id}/sessions/{session_id}/events",
    status_code=200,
    response_class=EventStream,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "The session's events (id, event, data), then the end.",
        },
        404: {"description": "No such session (or its tombstone expired)."},
        422: {"description": "A malformed id, Last-Event-ID or after."},
    },
)
async def session_events(
    call_id: CallId,
    session_id: SessionId,
    node: NodeDep,
    allowed: CanStream,
    after: EventIdQuery = None,
    last_event_id: LastEventId = None,
) -> EventStream:
    """Server-Sent Events of a session, served by any node. Replays the stream from the
    start (or strictly after ``Last-Event-ID`` / ``after``), then follows it live and ends
    after ``session_ended``."""
    async with node.events.read_slots:
        record = await visible(node, call_id, session_id, allowed)  # 404 before streaming
    return EventStream(node, record, last_event_id or after or START)


@router.websocket("/calls/{call_id}/sessions/{session_id}/ws")
async def session_socket(
    websocket: WebSocket, call_id: CallId, session_id: SessionId, after: str | None = None
) -> None:
    """The same events as JSON messages ``{"id", "event", "data"}``. The client may send
    ``{"type": "message", "data": ..., "id": ..., "message_type": ...}`` (the session's
    inbox, as ``POST …/messages``; answered ``{"type": "ack", "id", "message_id"}`` or an
    error frame) and ``{"type": "close"}`` (the session's close). Closes after ``session_ended``;
    with 4401 without a valid token (header or ``?access_token=``), 4404 for an unknown
    session (or another principal's), 4422 for a malformed ``after``. It applies the
    ownership rule itself: the ``stream_permission`` hook (a FastAPI dependency that needs
    an HTTP request) governs the event stream only."""
    node = node_of(websocket)
    await websocket.accept()
    principal = socket_principal(websocket)
    if principal is None:
        await websocket.close(WS_UNAUTHORIZED, "a valid bearer token is needed")
        return
    if after is not None and not is_event_id(after):
        await websocket.close(WS_INVALID, "after must be an event id like 1700000000000-0")
        return
    try:
        async with node.events.read_slots:
            record = await visible(
                node, call_id, session_id, lambda record: owns(principal, record)
            )
    except SessionNotFound:
        await websocket.close(WS_NOT_FOUND, "no such session")
        return
    except REDIS_ERRORS:
        await websocket.close(WS_TRY_AGAIN, "Redis did not answer; retry shortly")
        return
    lock = asyncio.Lock()  # both tasks send
    with node.events.listen(
        call_id,
        session_id,
        after or START,
        replay_only=record.state == State.ENDED,
        started_at=record.started_at,
    ) as listener:
        sender = asyncio.create_task(_send_events(websocket, listener, lock))
        custom = send_permission in websocket.app.dependency_overrides
        frames = Frames(node, call_id, session_id, principal, custom)
        receiver = asyncio.create_task(_receive(websocket, frames, lock))
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(sender, receiver)
    if sender in done and sender.exception() is None:  # the session ended, the client stays
        with contextlib.suppress(Exception):
            await websocket.close(1000, "session ended")


async def _send_events(websocket: WebSocket, listener: Listener, lock: asyncio.Lock) -> None:
    while not listener.done:
        event = await listener.next(streams.KEEPALIVE_SECONDS)
        if event is None:
            if not listener.done:
                await listener.check_session()
            continue
        async with lock:
            for item in [event, *listener.take_ready(streams.BURST - 1)]:
                await websocket.send_text(item.message)


async def _receive(websocket: WebSocket, frames: Frames, lock: asyncio.Lock) -> None:
    """Client frames until the client leaves, each answered in the order received. Nothing
    a client sends can crash this or close the socket: a bad frame gets an error frame."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        reply = await frames.answer(message.get("text"))
        async with lock:
            await websocket.send_text(json.dumps(reply, separators=(",", ":")))


class Frames:
    """What a client may send on the socket: ``{"type": "close"}``, and ``{"type":
    "message", "data": ..., "id": ..., "message_type": ...}``, sent as ``POST …/messages``
    sends (the same size and depth limits, the same errors, the same dedupe by ``id``), by
    the socket's principal under the built-in ownership rule."""

    def __init__(
        self, node: Node, call_id: str, session_id: str, principal: Principal, custom: bool
    ) -> None:
        self.node = node
        self.call_id = call_id
        self.session_id = session_id
        self.allowed = OwnedBy(principal)
        # A replaced send_permission hook is an HTTP dependency the socket cannot run:
        # refuse rather than apply a rule the deployer replaced.
        self.custom_permission = custom

    async def answer(self, text: str | None) -> dict[str, Any]:
        if text is not None and len(text) > self.node.settings.max_body_bytes:
            return _error(
                "message_too_large",
                f"a frame may be at most {self.node.settings.max_body_bytes} characters "
                "(FLEET_MAX_BODY_BYTES)",
            )
        try:
            payload = json.loads(text) if text is not None else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return _error("invalid_message", 'frames are JSON objects, like {"type": "close"}')
        kind = payload.get("type")
        if kind == "message":
            return await self._send(payload)
        if kind != "close":
            return _error(
                "unknown_message",
                'a client may send {"type": "message", "data": ...} or {"type": "close"}',
            )
        try:
            await self.node.close_session(self.call_id, self.session_id)
        except SessionNotFound:
            return _error("not_found", "no such session")
        except REDIS_ERRORS:
            return _error("redis_unavailable", "Redis did not answer; retry shortly")
        return {"type": "closing"}

    async def _send(self, payload: dict[str, Any]) -> dict[str, Any]:
        client_id = payload.get("id")
        if self.custom_permission:
            detail = "this fleet's send_permission hook runs on HTTP only: POST …/messages"
            return {**_error("forbidden", detail), "id": client_id}
        fields = {k: v for k, v in payload.items() if k not in ("type", "message_type")}
        fields["type"] = payload.get("message_type", "message")
        try:
            body = SendRequest.model_validate(fields)
        except ValidationError as exc:
            return {**_error("invalid_message", _describe(exc)), "id": client_id}
        try:
            # The route itself, so that a frame is checked and sent exactly as a POST is.
            answer = await send_message(
                self.call_id, self.session_id, self.node, self.allowed, body, Response()
            )
        except FleetError as exc:
            return {**_error(exc.code, exc.detail), "id": client_id}
        except REDIS_ERRORS:
            return {
                **_error("redis_unavailable", "Redis did not answer; retry shortly"),
                "id": client_id,
            }
        return {"type": "ack", "id": client_id, "message_id": answer.message_id}


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        where = "message_type" if where == "type" else where
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    return "; ".join(parts) or "invalid message"


def _error(code: str, detail: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "detail": detail}
