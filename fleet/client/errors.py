"""The errors of both clients: a node's error answer, no answer at all, no reply."""

from __future__ import annotations

import json

import httpx

from fleet.errors import FleetError


class FleetAPIError(FleetError):
    """A node answered with an error: ``status`` is the HTTP status, ``code`` the
    machine-readable code from the body (``not_found``, ``draining``...)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code

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
        return FleetAPIError(resp.status_code, str(body.get("code") or "http_error"), detail)
    reason = resp.reason_phrase or "error"
    return FleetAPIError(resp.status_code, f"http_{resp.status_code}", f"HTTP {reason}")


def unreachable(url: str, exc: httpx.TransportError) -> FleetConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        why = "timed out"
    else:
        why = str(exc) or type(exc).__name__
    return FleetConnectionError(f"cannot reach {url}: {why}")
