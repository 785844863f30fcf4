"""Moving a session to another node now (operators)."""

from __future__ import annotations

from fastapi import APIRouter

from fleet.api.auth import CanMigrate
from fleet.api.deps import CallId, NodeDep, SessionId
from fleet.models import MigrateAccepted

router = APIRouter(tags=["sessions"])


@router.post(
    "/calls/{call_id}/sessions/{session_id}/migrate",
    status_code=202,
    response_model=MigrateAccepted,
    responses={
        401: {"description": "A bearer token is needed, or the one given is not valid."},
        403: {"description": "Only the admin principal may move sessions."},
        404: {"description": "No such session."},
        422: {"description": "A malformed id."},
        409: {
            "description": "not_resumable: the session cannot resume elsewhere; no_target: no "
            "other live node that runs its worker has room; session_ended."
        },
    },
)
async def migrate_session(
    call_id: CallId, session_id: SessionId, node: NodeDep, principal: CanMigrate
) -> MigrateAccepted:
    """Move a running, resumable session to another node now: its worker gets
    ``ctx.closing`` with ``close_reason == "handoff"``, saves a last checkpoint and
    returns; the session then resumes on the node with the most room that runs its
    worker (``session_resumed`` in its events). If no node can take it by then, it
    resumes where it was."""
    owner = await node.migrate_session(call_id, session_id)
    return MigrateAccepted(node_id=owner)
