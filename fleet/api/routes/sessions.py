"""Sessions: start, read, list, close, checkpoints, and the worker's metrics."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, TypeAdapter

from fleet.api.auth import (
    CanBeaconClose,
    CanClose,
    CanReadMetrics,
    CanStart,
    CanView,
    RecordCheck,
)
from fleet.api.deps import CallId, NodeDep, SessionId, node_of, scope_of, visible
from fleet.api.limits import check_params
from fleet.api.streams import EventStream
from fleet.errors import SessionNotFound
from fleet.events.listener import START
from fleet.models import (
    Checkpoint,
    CloseAccepted,
    SessionInfo,
    SessionList,
    SessionMetrics,
    SessionPage,
    SessionRecord,
    State,
)
from fleet.runtime.node import Node
from fleet.runtime.reports import reportable
from fleet.settings import ID_PATTERN, WORKER_NAME_PATTERN
from fleet.store.keys import make_ref

router = APIRouter(tags=["sessions"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "A bearer token is needed, or the one given is not valid."},
    404: {"description": "No such session (or its tombstone expired, or it is not yours)."},
    422: {"description": "A malformed id, body or parameter."},
}


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker: str | None = Field(
        default=None,
        pattern=WORKER_NAME_PATTERN,
        description="The named worker to run (GET /workers); default: the fleet's first. "
        "422 unknown_worker when no live node runs it.",
    )
    call_type: str = Field(default="default", pattern=ID_PATTERN)
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The worker's params, validated by its Params model (422 invalid_params "
        "with the field errors).",
    )
    resumable: StrictBool = Field(
        default=True,
        description="false: if its node dies, end the session as node_lost instead of "
        "resuming it elsewhere from its last checkpoint.",
    )
    thread_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Run on this thread (yours alone): start from its latest state; 409 "
        "thread_busy while another session runs on it.",
    )
    close_on_disconnect: StrictBool = Field(
        default=False,
        description="With Accept: text/event-stream: close the session when the client "
        "leaves the stream before the session ends (by default it runs on).",
    )


_INFO = TypeAdapter(SessionInfo)  # the start's answer, serialised as FastAPI would

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=ID_PATTERN,
        description="Makes the start safe to retry: a repeat with the same key (same "
        "principal, same call) gets the first answer, never a second session. 1-128 "
        "characters of A-Z a-z 0-9 . _ : - (a UUID fits).",
    ),
]


WaitSeconds = Annotated[
    float | None,
    Query(ge=0, le=300, description="Wait up to this many seconds for the session to end."),
]


@router.post(
    "/calls/{call_id}/sessions",
    status_code=201,
    response_model=SessionInfo,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "With Accept: text/event-stream: the new session's events, from "
            "session_started to session_ended (Location names the session).",
        },
        409: {
            "description": "thread_busy: a session runs on the thread (the answer names "
            "it); idempotency_in_progress: a start with this Idempotency-Key is still "
            "under way, retry after Retry-After for its answer."
        },
        429: {"description": "A limit refused the session (see code)."},
        503: {
            "description": "not_ready: this node cannot reach Redis; start_failed: the node "
            "chosen for the session did not start it in time (nothing was started). Retry."
        },
        **ERRORS,
    },
)
async def start_session(
    call_id: CallId,
    principal: CanStart,
    request: Request,
    body: Annotated[StartRequest | None, Body()] = None,
    idempotency_key: IdempotencyKey = None,
    wait: WaitSeconds = None,
) -> SessionInfo | Response:
    """Start a session. With an ``Idempotency-Key``, a repeat answers with the first
    start's SessionInfo as it was then (the session may have moved on since: read it for
    its state now); a repeat with another body is 422 ``idempotency_mismatch``. Only a
    start that succeeded is remembered: after a refusal the same key may be tried again.

    Invoke: with ``?wait=SECONDS`` the answer comes once the session has ended (state
    ``ended``, with ``end_reason`` and ``result``), wherever it runs and if it moves; if
    the wait runs out, the session as it runs (follow or close it). Stream: with ``Accept:
    text/event-stream`` the answer is the session's events until ``session_ended``; a
    repeat with the same ``Idempotency-Key`` streams the first start's session again."""
    # The node as NodeDep finds it, without a dependency of its own: FastAPI's cost is per
    # dependency, and this is the route that every session pays.
    node = node_of(request)
    body = body or StartRequest()
    info = await begin(node, call_id, body, principal.name, idempotency_key)
    if "text/event-stream" in request.headers.get("accept", ""):
        # The session's own URL: this path and its id, under whatever prefix fleet is at.
        location = f"{request.url.path.rstrip('/')}/{info.session_id}"
        return _stream(node, info, location, close_on_disconnect=body.close_on_disconnect)
    if wait:
        info = await waited(node, info, wait)
    # Serialised here, once: FastAPI would validate the SessionInfo against the response
    # model again before serialising it (the model still documents the answer).
    return Response(_INFO.dump_json(info), status_code=201, media_type="application/json")


async def begin(
    node: Node, call_id: str, body: StartRequest, principal: str, idempotency_key: str | None
) -> SessionInfo:
    """A start, as the route and ``fleet.Fleet.start_session`` make it: once per
    ``Idempotency-Key`` when one is given, on a thread when the body names one."""
    check_params(body.params, node.settings)
    if idempotency_key is not None:
        return await node.idempotent.start(
            idempotency_key,
            call_id,
            body.call_type,
            body.params,
            principal=principal,
            resumable=body.resumable,
            thread_id=body.thread_id,
            worker=body.worker,
        )
    record = await node.threads.start(  # with no thread_id, a plain start
        call_id,
        body.call_type,
        body.params,
        principal=principal,
        resumable=body.resumable,
        worker=body.worker,
        thread_id=body.thread_id,
    )
    return record.info()


async def waited(node: Node, info: SessionInfo, wait: float | None) -> SessionInfo:
    """With ``wait`` (invoke): the session once it has ended, else as it runs."""
    if wait:
        ended = await node.wait_for_end(info.call_id, info.session_id, wait)
        if ended is not None:
            return ended.info()
    return info


def _stream(
    node: Node, info: SessionInfo, location: str, *, close_on_disconnect: bool
) -> EventStream:
    """The new session's events, from ``session_started`` on."""
    call_id, session_id = info.call_id, info.session_id

    async def close() -> None:
        await node.close_session(call_id, session_id)

    record = SessionRecord(
        session_id=session_id,
        call_id=call_id,
        call_type=info.call_type,
        node_id=info.node_id,
        started_at=info.session_started_at,
    )
    return EventStream(
        node,
        record,
        START,
        headers={"Location": location},
        on_gone=close if close_on_disconnect else None,
    )


@router.get("/calls/{call_id}/sessions", response_model=SessionList, responses=ERRORS)
async def list_call_sessions(call_id: CallId, node: NodeDep, allowed: CanView) -> SessionList:
    records = await node.registry.list_call(call_id)
    return SessionList(sessions=[r.info() for r in records if allowed(r)])


@router.get("/calls/{call_id}/sessions/{session_id}", response_model=SessionInfo, responses=ERRORS)
async def get_session(
    call_id: CallId, session_id: SessionId, node: NodeDep, allowed: CanView
) -> SessionInfo:
    return (await visible(node, call_id, session_id, allowed)).info()


async def _close(
    call_id: str,
    session_id: str,
    node: Node,
    allowed: RecordCheck,
    wait: float | None,
    response: Response,
) -> SessionInfo | CloseAccepted:
    scope = await scope_of(node, call_id, session_id, allowed)
    record = await node.close_session(call_id, session_id, wait=wait, principal=scope)
    if record is None:
        response.status_code = 202
        return CloseAccepted()
    return record.info()


CLOSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": SessionInfo, "description": "The session has ended."},
    202: {"model": CloseAccepted, "description": "Closing; the owner has been told."},
    **ERRORS,
}


@router.delete(
    "/calls/{call_id}/sessions/{session_id}",
    response_model=SessionInfo | CloseAccepted,
    responses=CLOSE_RESPONSES,
)
async def close_session(
    call_id: CallId,
    session_id: SessionId,
    node: NodeDep,
    allowed: CanClose,
    response: Response,
    wait: WaitSeconds = None,
) -> SessionInfo | CloseAccepted:
    return await _close(call_id, session_id, node, allowed, wait, response)


@router.post(
    "/calls/{call_id}/sessions/{session_id}/close",
    response_model=SessionInfo | CloseAccepted,
    responses=CLOSE_RESPONSES,
)
async def close_session_beacon(
    call_id: CallId,
    session_id: SessionId,
    node: NodeDep,
    allowed: CanBeaconClose,
    response: Response,
    wait: WaitSeconds = None,
) -> SessionInfo | CloseAccepted:
    """The same as DELETE, for ``navigator.sendBeacon``, which can only POST and cannot
    send headers: besides ``Authorization: Bearer``, the token may come as an
    ``access_token`` field of the body (``application/x-www-form-urlencoded``,
    ``multipart/form-data``, or ``text/plain`` holding ``access_token=<url-encoded token>``)
    or as ``?access_token=`` (which lands in access logs: prefer the body)."""
    return await _close(call_id, session_id, node, allowed, wait, response)


@router.get(
    "/calls/{call_id}/sessions/{session_id}/metrics",
    response_model=SessionMetrics,
    responses=ERRORS,
)
async def session_metrics(
    call_id: CallId, session_id: SessionId, node: NodeDep, allowed: CanReadMetrics
) -> SessionMetrics:
    """The worker's ``ctx.metrics``: from any node, as its owner last reported them into
    the record (at most every ``FLEET_METRICS_REPORT_INTERVAL`` seconds, and at the end),
    with ``reported_at``; the owner itself answers its live values, taken now."""
    record = await visible(node, call_id, session_id, allowed)
    local = node.sessions.get(make_ref(call_id, session_id))
    values, reported_at = record.metrics, record.metrics_reported_at
    owner = record.node_id == node.node_id and record.state != State.ENDED
    if local is not None and owner and local.record.epoch == record.epoch:
        values, reported_at = reportable(local.ctx.metrics)[0], time.time()
    end = record.ended_at or time.time()
    return SessionMetrics(
        session_id=record.session_id,
        call_id=record.call_id,
        node_id=record.node_id,
        state=State(record.state),
        metrics=values,
        reported_at=reported_at,
        started_at=record.started_at,
        ended_at=record.ended_at,
        duration_seconds=round(max(0.0, end - record.started_at), 3),
    )


@router.get(
    "/calls/{call_id}/sessions/{session_id}/checkpoint",
    response_model=Checkpoint,
    responses=ERRORS,
)
async def get_checkpoint(
    call_id: CallId,
    session_id: SessionId,
    node: NodeDep,
    allowed: CanView,
    version: Annotated[int | None, Query(ge=1, description="An older kept version.")] = None,
) -> Checkpoint:
    """The latest checkpoint, or one of the last ``FLEET_CHECKPOINT_HISTORY`` versions."""
    await visible(node, call_id, session_id, allowed)
    for envelope in await node.registry.checkpoints(call_id, session_id):
        checkpoint = Checkpoint.model_validate_json(envelope)
        if version is None or checkpoint.version == version:
            return checkpoint
    which = "no checkpoint" if version is None else f"no checkpoint version {version}"
    raise SessionNotFound(f"session {session_id} has {which}")


@router.get("/sessions", response_model=SessionPage, responses=ERRORS)
async def list_sessions(
    node: NodeDep,
    allowed: CanView,
    state: State | None = None,
    node_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,9}$")] = None,
) -> SessionPage:
    """Live sessions first, then recently ended ones. A page may hold fewer than ``limit``
    sessions (filters apply after paging); follow ``next_cursor`` until it is null."""
    records, next_cursor = await node.registry.list_sessions(
        state=state, node_id=node_id, limit=limit, cursor=int(cursor or 0)
    )
    return SessionPage(
        sessions=[r.info() for r in records if allowed(r)],
        next_cursor=None if next_cursor is None else str(next_cursor),
    )
