"""Threads: conversations that outlive sessions, per principal. Read one, forget one, and
send to one (to its live session, or to a session started on it for the message)."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response
from pydantic import ConfigDict, Field

from fleet.api.auth import CanStart, PrincipalDep
from fleet.api.deps import NodeDep
from fleet.api.limits import check_params
from fleet.api.routes.messages import SendRequest, message_json
from fleet.api.routes.sessions import ERRORS, WaitSeconds
from fleet.errors import ThreadNotFound
from fleet.models import (
    Checkpoint,
    State,
    ThreadInfo,
    ThreadMessageAccepted,
    ThreadMessageReply,
    ThreadSession,
    ThreadSessionRef,
)
from fleet.runtime.node import Node
from fleet.settings import ID_PATTERN, WORKER_NAME_PATTERN
from fleet.store import REDIS_ERRORS
from fleet.store.keys import split_ref
from fleet.store.threads import ThreadRecord

router = APIRouter(tags=["threads"])

ThreadId = Annotated[
    str,
    Path(
        pattern=ID_PATTERN,
        description="Your name for the conversation; yours alone (another principal's "
        "thread of the same name is another thread).",
    ),
]
THREAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"description": "No such thread (or it expired, or it is not yours)."},
}


async def _thread(node: Node, principal: str, thread_id: str) -> ThreadRecord:
    thread = await node.registry.get_thread(principal, thread_id)
    if thread is None:
        raise ThreadNotFound(f"no thread {thread_id}")
    return thread


async def _live(node: Node, thread: ThreadRecord) -> str:
    """The ref of the session that runs on the thread now, or ``""`` (a mark left by a
    session that is over does not count)."""
    if not thread.live:
        return ""
    record = await node.registry.get(*split_ref(thread.live))
    return thread.live if record is not None and record.state != State.ENDED else ""


def _ref(ref: str) -> ThreadSessionRef:
    call_id, session_id = split_ref(ref)
    return ThreadSessionRef(call_id=call_id, session_id=session_id)


@router.get("/threads/{thread_id}", response_model=ThreadInfo, responses=THREAD_ERRORS)
async def get_thread(
    thread_id: ThreadId,
    node: NodeDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Sessions per page.")] = 20,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,9}$")] = None,
) -> ThreadInfo:
    """The thread's latest state, the session running on it, and its sessions, newest
    first (``next_cursor`` pages on)."""
    thread = await _thread(node, principal.name, thread_id)
    _, envelope = await node.registry.state_envelope(thread.latest, thread.state_from)
    checkpoint = Checkpoint.model_validate_json(envelope) if envelope else None
    offset = int(cursor or 0)
    rows = await node.registry.thread_sessions(principal.name, thread_id, offset, limit + 1)
    page = rows[:limit]
    records = await node.registry.get_refs(ref for ref, _ in page)  # one round trip
    sessions = []
    for (ref, started_at), record in zip(page, records, strict=True):
        call_id, session_id = split_ref(ref)
        sessions.append(
            ThreadSession(
                call_id=call_id,
                session_id=session_id,
                started_at=started_at,
                state=State(record.state) if record else None,
                end_reason=record.info().end_reason if record else None,
            )
        )
    live = await _live(node, thread)
    updated_at = max(thread.updated_at, checkpoint.saved_at if checkpoint else 0.0)
    return ThreadInfo(
        thread_id=thread_id,
        state=checkpoint.state if checkpoint else None,
        checkpoint_version=checkpoint.version if checkpoint else None,
        created_at=thread.created_at,
        updated_at=updated_at,
        live_session=_ref(live) if live else None,
        sessions=sessions,
        next_cursor=str(offset + limit) if len(rows) > limit else None,
    )


@router.delete(
    "/threads/{thread_id}",
    status_code=204,
    responses={409: {"description": "thread_busy: a session runs on it."}, **THREAD_ERRORS},
)
async def delete_thread(thread_id: ThreadId, node: NodeDep, principal: PrincipalDep) -> Response:
    """Forget the thread: its state and its list of sessions (the sessions' own records
    stay until their tombstones expire). Not while a session runs on it: close that one
    first."""
    thread = await _thread(node, principal.name, thread_id)
    over = thread.live if thread.live and not await _live(node, thread) else ""
    status, refs = await node.registry.delete_thread(principal.name, thread_id, over)
    if status == "missing":
        raise ThreadNotFound(f"no thread {thread_id}")
    if status == "busy":
        raise node.threads.busy(thread_id, refs[0])
    with contextlib.suppress(*REDIS_ERRORS):  # else they expire with the thread's TTL
        await node.registry.expire_checkpoints(refs)
    return Response(status_code=204)


class ThreadSendRequest(SendRequest):
    model_config = ConfigDict(extra="forbid")

    call_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="The call a session started for this message runs in (default: the "
        "thread's id).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="The params of a session started for it."
    )
    worker: str | None = Field(
        default=None,
        pattern=WORKER_NAME_PATTERN,
        description="The named worker of a session started for it (default: the first).",
    )


@router.post(
    "/threads/{thread_id}/messages",
    status_code=202,
    response_model=ThreadMessageReply | ThreadMessageAccepted,
    responses={
        200: {"model": ThreadMessageReply, "description": "With ?wait: the worker's reply."},
        202: {"model": ThreadMessageAccepted, "description": "In the session's inbox."},
        409: {"description": "thread_busy (a racing start did not finish), busy."},
        413: {"description": "The message is over FLEET_MAX_MESSAGE_BYTES."},
        429: {"description": "inbox_full, or a limit refused the session it needs."},
        **THREAD_ERRORS,
    },
)
async def send_to_thread(
    thread_id: ThreadId,
    node: NodeDep,
    principal: CanStart,
    body: Annotated[ThreadSendRequest, Body()],
    response: Response,
    wait: WaitSeconds = None,
) -> ThreadMessageReply | ThreadMessageAccepted:
    """Send to the session running on the thread; if none runs, start one on the thread
    (from its latest state) and deliver this message to it first. Two racing sends start
    one session, and both messages reach it in the order the thread took them. With
    ``?wait=SECONDS``: 200 with the worker's reply (202 if the wait runs out)."""
    check_params(body.params, node.settings)
    out = await node.threads.send(
        principal.name,
        thread_id,
        body.type,
        message_json(body, node.settings),
        call_id=body.call_id or thread_id,
        params=body.params,
        worker=body.worker,
        client_id=body.id or "",
        wait=wait,
    )
    accepted = ThreadMessageAccepted(
        message_id=out.sent.message_id,
        call_id=out.call_id,
        session_id=out.session_id,
        started=out.started,
    )
    if out.sent.replied:
        response.status_code = 200
        return ThreadMessageReply(**accepted.model_dump(), reply=out.sent.reply)
    return accepted
