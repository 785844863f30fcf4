"""Messages: input sent to a running session from any node, and its reply."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Response
from pydantic import BaseModel, ConfigDict, Field

from fleet.api.auth import CanSend
from fleet.api.deps import CallId, NodeDep, SessionId, scope_of
from fleet.api.limits import depth
from fleet.api.routes.sessions import ERRORS, WaitSeconds
from fleet.errors import InvalidRequest, MessageTooLarge, SessionNotFound
from fleet.metrics import MESSAGES_SENT, labelled
from fleet.settings import ID_PATTERN, Settings

router = APIRouter(tags=["messages"])

TYPE_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"


class SendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(default="message", pattern=TYPE_PATTERN)
    data: Any = Field(default=None, description="Any JSON value, for the worker.")
    id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Your id for this message: a retry with the same id is not sent twice "
        "and gets the first answer.",
    )


class MessageAccepted(BaseModel):
    message_id: str


class MessageReply(BaseModel):
    message_id: str
    reply: Any


def message_json(body: SendRequest, settings: Settings) -> str:
    """The message's data as JSON text, within the size and depth limits."""
    data_json = json.dumps(body.data, separators=(",", ":"), ensure_ascii=False)
    size = len(data_json.encode())
    if size > settings.max_message_bytes:
        labelled(MESSAGES_SENT, "too_large").inc()
        raise MessageTooLarge(
            f"the message's data is {size} bytes of JSON; the limit is "
            f"{settings.max_message_bytes} (FLEET_MAX_MESSAGE_BYTES)"
        )
    if depth(body.data, settings.max_params_depth) > settings.max_params_depth:
        raise InvalidRequest(f"data nests deeper than {settings.max_params_depth} levels")
    return data_json


@router.post(
    "/calls/{call_id}/sessions/{session_id}/messages",
    status_code=202,
    response_model=MessageReply | MessageAccepted,
    responses={
        200: {"model": MessageReply, "description": "With ?wait: the worker's reply."},
        202: {"model": MessageAccepted, "description": "In the session's inbox."},
        409: {"description": "session_ended, or busy (the worker rejects messages now)."},
        413: {"description": "The message is over FLEET_MAX_MESSAGE_BYTES."},
        429: {"description": "inbox_full: FLEET_INBOX_MAXLEN unconsumed messages."},
        **ERRORS,
    },
)
async def send_message(
    call_id: CallId,
    session_id: SessionId,
    node: NodeDep,
    allowed: CanSend,
    body: Annotated[SendRequest, Body()],
    response: Response,
    wait: WaitSeconds = None,
) -> MessageReply | MessageAccepted:
    """Append a message to the session's inbox, wherever it runs; its owner is told at
    once. With ``?wait=SECONDS``, answer 200 with the worker's reply (202 if the wait runs
    out: the reply still appears as a ``reply`` event)."""
    data_json = message_json(body, node.settings)
    try:
        scope = await scope_of(node, call_id, session_id, allowed)
    except SessionNotFound:  # a permission hook's 404 (the send script counts its own)
        labelled(MESSAGES_SENT, "not_found").inc()
        raise
    sent = await node.conversations.send(
        call_id,
        session_id,
        body.type,
        data_json,
        client_id=body.id or "",
        wait=wait,
        principal=scope,
    )
    if sent.replied:
        response.status_code = 200
        return MessageReply(message_id=sent.message_id, reply=sent.reply)
    return MessageAccepted(message_id=sent.message_id)
