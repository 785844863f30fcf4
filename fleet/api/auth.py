"""Who is asking, and what they may do.

With ``FLEET_API_KEYS`` every request except /health, /ready and /metrics carries
``Authorization: Bearer <token>``. Tokens are compared in constant time (each configured
token's digest is compared with the offered one's, all of them, every time). A principal
owns the sessions it starts; any other principal gets 404 for them, so existence does not
leak. The principal named ``admin`` sees everything. Without keys everyone is ``anonymous``
and sees everything (and the node refuses to bind beyond loopback unless told to).

Browsers cannot set headers on everything they send, so the event stream and the API
documentation pages also take the token as ``?access_token=``, each on its own principal
dependency. Every other route takes the header only.

The permission hooks (start, view, stream, close, metrics) are plain
dependencies (``async def``: a plain ``def`` would run in a thread pool, which costs more
than the check): replace them with
``app.dependency_overrides[view_permission] = my_view_permission`` (see docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from fleet.errors import FleetError
from fleet.models import SessionRecord

ADMIN = "admin"
ACCESS_TOKEN = "access_token"  # the query parameter, where it is accepted


class Unauthorized(FleetError):
    code = "unauthorized"


class Forbidden(FleetError):
    code = "forbidden"


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool = False


ANONYMOUS = Principal("anonymous", admin=True)


class TokenTable:
    """Tokens by digest: lookups take the same time whichever token matches, if any."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._digests = [(name, _digest(token)) for name, token in pairs]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def lookup(self, token: str) -> Principal | None:
        offered = _digest(token)
        found: str | None = None
        for name, digest in self._digests:
            if hmac.compare_digest(offered, digest):
                found = name
        if found is None:
            return None
        return Principal(found, admin=found == ADMIN)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _authenticate(request: Request, token: str | None) -> Principal:
    table: TokenTable = request.app.state.tokens
    if not table:
        return ANONYMOUS
    if token is None:
        raise Unauthorized("this node needs 'Authorization: Bearer <token>'")
    principal = table.lookup(token)
    if principal is None:
        raise Unauthorized("the bearer token is not valid")
    return principal


def _bearer_or_query(request: Request) -> str | None:
    return _bearer(request) or request.query_params.get(ACCESS_TOKEN)


async def get_principal(request: Request) -> Principal:
    return _authenticate(request, _bearer(request))


async def get_stream_principal(request: Request) -> Principal:
    """For the events route only: browsers' ``EventSource`` cannot send headers, so the
    token may come as ``?access_token=``. URLs end up in proxy logs and browser history:
    prefer the header wherever the client can set it."""
    return _authenticate(request, _bearer_or_query(request))


async def get_docs_principal(request: Request) -> Principal:
    """For /openapi.json, /docs and /redoc with ``FLEET_API_DOCS=auth``: a browser opening
    the page cannot send a header, so ``?access_token=`` is taken too (same trade-off as the
    event stream)."""
    return _authenticate(request, _bearer_or_query(request))


PrincipalDep = Annotated[Principal, Depends(get_principal)]
StreamPrincipalDep = Annotated[Principal, Depends(get_stream_principal)]

RecordCheck = Callable[[SessionRecord], bool]


def owns(principal: Principal, record: SessionRecord) -> bool:
    return principal.admin or record.principal == principal.name


@dataclass(frozen=True)
class OwnedBy:
    """The default record check: the principal's own sessions, or all of them for admin.
    Being a known rule, a Lua script can apply it too (``scope``), which saves the close
    path a read; a custom hook's check runs in Python on the record read first."""

    principal: Principal

    def __call__(self, record: SessionRecord) -> bool:
        return owns(self.principal, record)

    @property
    def scope(self) -> str:
        """The principal a session must belong to; ``""`` for any."""
        return "" if self.principal.admin else self.principal.name


# -- permission hooks: replace any of these with app.dependency_overrides ---------------
async def start_permission(principal: PrincipalDep) -> Principal:
    """Who may start sessions; the principal returned owns the new session."""
    return principal


async def view_permission(principal: PrincipalDep) -> RecordCheck:
    """Which sessions a principal may read (one, lists, checkpoints)."""
    return OwnedBy(principal)


async def stream_permission(principal: StreamPrincipalDep) -> RecordCheck:
    """Which sessions a principal may follow (events)."""
    return OwnedBy(principal)


async def close_permission(principal: PrincipalDep) -> RecordCheck:
    """Which sessions a principal may close."""
    return OwnedBy(principal)


async def metrics_permission(principal: PrincipalDep) -> RecordCheck:
    """Whose per-session metrics a principal may read."""
    return OwnedBy(principal)


CanStart = Annotated[Principal, Depends(start_permission)]
CanView = Annotated[RecordCheck, Depends(view_permission)]
CanStream = Annotated[RecordCheck, Depends(stream_permission)]
CanClose = Annotated[RecordCheck, Depends(close_permission)]
CanReadMetrics = Annotated[RecordCheck, Depends(metrics_permission)]
