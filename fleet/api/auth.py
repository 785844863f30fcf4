"""Who is asking, and what they may do.

With ``FLEET_API_KEYS`` every request except /health, /ready and /metrics carries
``Authorization: Bearer <token>``. Tokens are compared in constant time (each configured
token's digest is compared with the offered one's, all of them, every time). A principal
owns the sessions it starts; any other principal gets 404 for them, so existence does not
leak. The principal named ``admin`` sees everything. Without keys everyone is ``anonymous``
and sees everything (and the node refuses to bind beyond loopback unless told to).

Browsers cannot set headers on everything they send, so three kinds of route also take
the token elsewhere, each on its own principal dependency: the event stream and the API
documentation pages as ``?access_token=``, the beacon close also as an ``access_token``
field of its body. Every other route takes the header only.

The permission hooks (start, view, stream, close, beacon close, send, migrate, metrics)
are plain dependencies (``async def``: a plain ``def`` would run in a thread pool, which
costs more than the check): replace them with
``app.dependency_overrides[view_permission] = my_view_permission`` (see docs/security.md).

fleet's routes may run in an app that is not fleet's (``fleet.Fleet``'s router), so they
find the tokens in the request's scope, put there by the Fleet they belong to, not in the
app's state. An app that decides who is asking itself (``Fleet(settings, principal=...)``)
puts its principal there too, and it stands for every route instead of a token.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from fleet.errors import FleetError
from fleet.models import SessionRecord
from fleet.settings import ID_PATTERN

ADMIN = "admin"
ACCESS_TOKEN = "access_token"  # the query parameter and form field, where they are accepted

# Request scope keys, set by the Fleet whose route serves the request.
TOKENS_KEY = "fleet.tokens"  # its TokenTable
PRINCIPAL_KEY = "fleet.principal"  # the principal its app decided, if it decides
UNBOUND = (
    "fleet's routes run in the router of a fleet.Fleet (Fleet(settings).router); "
    "this request did not come through one"
)


class Unauthorized(FleetError):
    code = "unauthorized"


class Forbidden(FleetError):
    code = "forbidden"


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool = False


ANONYMOUS = Principal("anonymous", admin=True)

_NAME = re.compile(ID_PATTERN)


def as_principal(who: Principal | str) -> Principal:
    """``who`` as a principal (a name is ``admin`` only if it is ``"admin"``). Its name must
    be an id: an empty one would read as "any owner" where ownership is checked."""
    principal = who if isinstance(who, Principal) else Principal(who, admin=who == ADMIN)
    if not _NAME.match(principal.name):
        raise ValueError(f"a principal's name must match {ID_PATTERN}, not {principal.name!r}")
    return principal


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


def _bearer(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _table(conn: HTTPConnection) -> TokenTable:
    try:
        table: TokenTable = conn.scope[TOKENS_KEY]
    except KeyError:
        raise RuntimeError(UNBOUND) from None
    return table


def _decided(conn: HTTPConnection) -> Principal | None:
    """The principal the app decided for this request, if it decides (and then no token
    counts)."""
    principal: Principal | None = conn.scope.get(PRINCIPAL_KEY)
    return principal


def _authenticate(conn: HTTPConnection, token: str | None) -> Principal:
    decided = _decided(conn)
    if decided is not None:
        return decided
    table = _table(conn)
    if not table:
        return ANONYMOUS
    if token is None:
        raise Unauthorized("this node needs 'Authorization: Bearer <token>'")
    principal = table.lookup(token)
    if principal is None:
        raise Unauthorized("the bearer token is not valid")
    return principal


def _bearer_or_query(conn: HTTPConnection) -> str | None:
    return _bearer(conn) or conn.query_params.get(ACCESS_TOKEN)


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


async def get_beacon_principal(request: Request) -> Principal:
    """For the beacon close only: ``navigator.sendBeacon`` cannot send headers, so the
    token may also come as ``?access_token=`` or as an ``access_token`` field of the body
    (form-encoded, multipart, or ``text/plain`` holding ``access_token=<url-encoded>``).
    The body keeps the token out of URLs, hence out of access logs: prefer it."""
    token = _bearer_or_query(request)
    if token is None and _decided(request) is None and _table(request):
        token = await _body_token(request)
    return _authenticate(request, token)


def socket_principal(conn: HTTPConnection) -> Principal | None:
    """Who opened a WebSocket (``None``: no valid token). The same rules as the event
    stream: ``Authorization: Bearer`` or, for browsers, which cannot set headers on a
    WebSocket, ``?access_token=``."""
    try:
        return _authenticate(conn, _bearer_or_query(conn))
    except Unauthorized:
        return None


async def _body_token(request: Request) -> str | None:
    """The ``access_token`` field of a body a beacon can send without a preflight."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type in ("application/x-www-form-urlencoded", "text/plain"):
        text = (await request.body()).decode("utf-8", "replace")
        values = parse_qs(text, keep_blank_values=True, max_num_fields=100).get(ACCESS_TOKEN)
        return values[0] if values else None
    if media_type == "multipart/form-data":
        return _multipart_field(content_type, await request.body(), ACCESS_TOKEN)
    return None


def _multipart_field(content_type: str, body: bytes, name: str) -> str | None:
    """One text field of a ``multipart/form-data`` body (the standard library's MIME
    parser: fleet does not depend on python-multipart for one field)."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        return None
    for part in message.get_payload():
        if isinstance(part, email.message.Message) and (
            part.get_param("name", header="content-disposition") == name
        ):
            payload = part.get_payload(decode=True)
            return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None
    return None


PrincipalDep = Annotated[Principal, Depends(get_principal)]
StreamPrincipalDep = Annotated[Principal, Depends(get_stream_principal)]
BeaconPrincipalDep = Annotated[Principal, Depends(get_beacon_principal)]

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


async def beacon_close_permission(principal: BeaconPrincipalDep) -> RecordCheck:
    """Which sessions a principal may close with a beacon (the token may come in the URL
    or the body). A deployer who replaces ``close_permission`` replaces this one too."""
    return OwnedBy(principal)


async def send_permission(principal: PrincipalDep) -> RecordCheck:
    """Which sessions a principal may send messages to."""
    return OwnedBy(principal)


async def migrate_permission(principal: PrincipalDep) -> Principal:
    """Who may move sessions between nodes: operators, the ``admin`` principal."""
    if not principal.admin:
        raise Forbidden("moving sessions between nodes is for the admin principal")
    return principal


async def metrics_permission(principal: PrincipalDep) -> RecordCheck:
    """Whose per-session metrics a principal may read."""
    return OwnedBy(principal)


CanStart = Annotated[Principal, Depends(start_permission)]
CanView = Annotated[RecordCheck, Depends(view_permission)]
CanStream = Annotated[RecordCheck, Depends(stream_permission)]
CanClose = Annotated[RecordCheck, Depends(close_permission)]
CanBeaconClose = Annotated[RecordCheck, Depends(beacon_close_permission)]
CanReadMetrics = Annotated[RecordCheck, Depends(metrics_permission)]
CanSend = Annotated[RecordCheck, Depends(send_permission)]
CanMigrate = Annotated[Principal, Depends(migrate_permission)]
