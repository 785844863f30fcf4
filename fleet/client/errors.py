"""The errors of both clients: a node's error answer, no answer at all, no reply."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from fleet.errors import FleetError


@dataclass(frozen=True)
class FieldError:
    """One field of a request that a node refused: ``loc`` its path (``("params",
    "language")``), ``msg`` what is wrong with it, ``type`` the kind of error."""

    loc: tuple[str | int, ...]
    msg: str
    type: str

    @property
    def field(self) -> str:
        """``loc`` as one dotted name: ``params.language``."""
        return ".".join(str(part) for part in self.loc)


class FleetAPIError(FleetError):
    """A node answered with an error: ``status`` is the HTTP status, ``code`` the
    machine-readable code from the body (``not_found``, ``invalid_params``...).
    ``errors``: the fields at fault, where the answer names them (a worker's ``Params``
    model refused the params: 422 ``invalid_params``); empty otherwise."""

    def __init__(
        self, status: int, code: str, detail: str, errors: list[FieldError] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.errors = errors or []

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.detail}"


class FleetConnectionError(FleetError):
    """No answer: the node is down, the URL is wrong, or the request timed out."""

    code = "unreachable"


class NoReply(FleetError):
    """``ask``: the wait ran out before the worker replied. The message is in the session's
    inbox all the same (``message_id``); a late reply shows as a ``reply`` event. Raised,
    not returned as ``None``, because ``None`` (JSON ``null``) is a reply like any other."""

    code = "no_reply"

    def __init__(self, message_id: str, waited: float) -> None:
        super().__init__(f"no reply to message {message_id} within {waited:g}s")
        self.message_id = message_id
        self.waited = waited


def api_error(resp: httpx.Response) -> FleetAPIError:
    """The error a response stands for. fleet answers ``{"detail", "code"}``; a proxy in
    front of it may answer HTML, which becomes ``http_<status>``."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])
        code = str(body.get("code") or "http_error")
        return FleetAPIError(resp.status_code, code, detail, _field_errors(body.get("errors")))
    reason = resp.reason_phrase or "error"
    return FleetAPIError(resp.status_code, f"http_{resp.status_code}", f"HTTP {reason}")


def _field_errors(found: Any) -> list[FieldError]:
    """The ``errors`` of an answer, those that read as ``{"loc", "msg", "type"}``; an
    error answer is never itself refused for a malformed list."""
    if not isinstance(found, list):
        return []
    out = []
    for err in found:
        if not isinstance(err, dict) or not isinstance(err.get("loc"), list):
            continue
        loc = tuple(p if isinstance(p, int) else str(p) for p in err["loc"])
        out.append(FieldError(loc, str(err.get("msg", "")), str(err.get("type", ""))))
    return out


def unreachable(url: str, exc: httpx.TransportError) -> FleetConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        why = "timed out"
    else:
        why = str(exc) or type(exc).__name__
    return FleetConnectionError(f"cannot reach {url}: {why}")
