"""FastAPI dependencies, as ``Annotated`` aliases. The permission hooks are plain
dependencies: a deployer replaces them with ``app.dependency_overrides``.

fleet's routes may run in an app that is not fleet's, so they find their node in the
request's scope (put there by the ``fleet.Fleet`` whose router serves the request), never
in the app's state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path
from starlette.requests import HTTPConnection

from fleet.api.auth import UNBOUND, OwnedBy, RecordCheck
from fleet.errors import SessionNotFound
from fleet.models import SessionRecord
from fleet.runtime.node import Node
from fleet.settings import ID_PATTERN

NODE_KEY = "fleet.node"  # the request scope's key for the node that serves it


def node_of(conn: HTTPConnection) -> Node:
    try:
        node: Node = conn.scope[NODE_KEY]
    except KeyError:
        raise RuntimeError(UNBOUND) from None
    return node


async def get_node(conn: HTTPConnection) -> Node:
    return node_of(conn)


NodeDep = Annotated[Node, Depends(get_node)]

CallId = Annotated[
    str, Path(pattern=ID_PATTERN, description="A grouping key chosen by the client.")
]
SessionId = Annotated[str, Path(pattern=ID_PATTERN)]


async def scope_of(node: Node, call_id: str, session_id: str, allowed: RecordCheck) -> str:
    """The principal a script must check the session against (``""`` for any). The
    built-in ownership rule travels with the script itself (no extra round trip); a custom
    hook sees the record first."""
    if isinstance(allowed, OwnedBy):
        return allowed.scope
    await visible(node, call_id, session_id, allowed)
    return ""


async def visible(node: Node, call_id: str, session_id: str, allowed: RecordCheck) -> SessionRecord:
    """The session if the caller may see it; 404 alike when it does not exist and when it is
    someone else's, so that existence does not leak."""
    record = await node.registry.get(call_id, session_id)
    if record is None or not allowed(record):
        raise SessionNotFound(f"no session {session_id} in call {call_id}")
    return record
