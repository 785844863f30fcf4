"""What both clients share: errors, each request described once, and configuration."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote, unquote

import httpx
from pydantic import BaseModel, ValidationError

from fleet import __version__
from fleet.client.errors import FleetAPIError, api_error
from fleet.client.retries import START_RETRIES
from fleet.errors import FleetError
from fleet.models import (
    Checkpoint,
    CloseAccepted,
    MigrateAccepted,
    NodeInfo,
    NodeList,
    SessionInfo,
    SessionList,
    SessionMetrics,
    SessionPage,
    State,
    ThreadInfo,
    ThreadMessageAccepted,
    ThreadMessageReply,
    WorkerInfo,
    WorkerList,
)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# The server writes a comment line every 15 s on an idle stream: a stream silent for
# much longer than that is dead, not idle.
STREAM_READ_TIMEOUT = 60.0
INVOKE_WAIT = 60.0  # seconds an invoke waits for the end by default (the node allows 300)
WAIT_MARGIN = 10.0  # a close with ?wait=S may take S seconds plus a round trip or two
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


# ---- answers that have no model in fleet.models ------------------------------------------


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    """``/ready``: 200 and 503 are both answers here, not errors."""

    status: str
    reason: str | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"


class MessageAccepted(BaseModel):
    """A message in the session's inbox (202): without a wait, or the wait ran out."""

    message_id: str


class MessageReply(BaseModel):
    """The worker's reply to a message sent with a wait (200)."""

    message_id: str
    reply: Any


# ---- requests, described once ------------------------------------------------------------


Params = Mapping[str, str | int | float]


@dataclass(frozen=True)
class Request(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Params | None = None
    body: Any = None
    timeout: httpx.Timeout | None = None
    answers: frozenset[int] = frozenset({200})  # statuses that are answers, not errors
    headers: Mapping[str, str] | None = None
    retries: int = 0  # times it may be sent again: only where that is safe


def _model(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda resp: model.model_validate_json(resp.content)


def _seg(value: str) -> str:
    return quote(value, safe="")


def session_path(call_id: str, session_id: str, tail: str = "") -> str:
    return f"/calls/{_seg(call_id)}/sessions/{_seg(session_id)}{tail}"


def thread_path(thread_id: str, tail: str = "") -> str:
    return f"/threads/{_seg(thread_id)}{tail}"


def _clean(params: Mapping[str, str | int | float | None]) -> dict[str, str | int | float]:
    return {k: v for k, v in params.items() if v is not None}


def _close_answer(resp: httpx.Response) -> SessionInfo | CloseAccepted:
    if resp.status_code == 202:
        return CloseAccepted.model_validate_json(resp.content)
    return SessionInfo.model_validate_json(resp.content)


def _message_answer(resp: httpx.Response) -> MessageReply | MessageAccepted:
    if resp.status_code == 200:
        return MessageReply.model_validate_json(resp.content)
    return MessageAccepted.model_validate_json(resp.content)


def _thread_message_answer(resp: httpx.Response) -> ThreadMessageReply | ThreadMessageAccepted:
    if resp.status_code == 200:
        return ThreadMessageReply.model_validate_json(resp.content)
    return ThreadMessageAccepted.model_validate_json(resp.content)


def _start_body(
    params: dict[str, Any] | None,
    call_type: str,
    resumable: bool,
    thread_id: str | None,
    worker: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"call_type": call_type, "params": params or {}, "resumable": resumable}
    # Only when asked: older nodes refuse fields they do not know.
    if thread_id is not None:
        body["thread_id"] = thread_id
    if worker is not None:
        body["worker"] = worker
    return body


def _workers(resp: httpx.Response) -> list[WorkerInfo]:
    return WorkerList.model_validate_json(resp.content).workers


def _events_path(call_id: str, resp: httpx.Response) -> str | None:
    """``…/events`` of the session a stream on start names in ``Location``
    (``/calls/{call_id}/sessions/{session_id}``); ``None`` without one."""
    location = httpx.URL(resp.headers.get("location", "")).path
    _, found, session_id = location.rpartition("/sessions/")
    if not found or not session_id or "/" in session_id:
        return None
    return session_path(call_id, unquote(session_id), "/events")


def _waiting(timeout: httpx.Timeout, wait: float | None) -> httpx.Timeout:
    """The timeout of a request the server may hold for ``wait`` seconds."""
    if wait is None:
        return timeout
    read = max(timeout.read or 0.0, wait + WAIT_MARGIN)
    return httpx.Timeout(timeout.connect, read=read, write=timeout.write, pool=None)


def _readiness(resp: httpx.Response) -> Readiness:
    try:
        return Readiness.model_validate_json(resp.content)
    except ValidationError:
        if resp.status_code != 200:  # e.g. a proxy's own 503 page: no node answered
            raise api_error(resp) from None
        raise


class Requests:
    """What each API call sends, and how its answer is read."""

    @staticmethod
    def start_session(
        call_id: str,
        params: dict[str, Any] | None,
        call_type: str,
        resumable: bool,
        idempotency_key: str | None = None,
        retries: int = START_RETRIES,
        *,
        thread_id: str | None = None,
        wait: float | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        worker: str | None = None,
    ) -> Request[SessionInfo]:
        """A start (of ``worker``, or the fleet's default) with an ``Idempotency-Key`` (a
        new UUID unless one is given), which makes it safe to send again: a repeat gets
        the first answer, never a second session. With ``wait`` (an invoke) the node
        answers once the session has ended or the wait ran out; a repeat then waits for
        the first attempt's session."""
        return Request(
            "POST",
            f"/calls/{_seg(call_id)}/sessions",
            _model(SessionInfo),
            params=_clean({"wait": wait}),
            body=_start_body(params, call_type, resumable, thread_id, worker),
            timeout=_waiting(timeout, wait),
            answers=frozenset({201}),
            headers={"Idempotency-Key": idempotency_key or str(uuid.uuid4())},
            retries=retries,
        )

    @staticmethod
    def stream_session(
        call_id: str,
        params: dict[str, Any] | None,
        call_type: str,
        resumable: bool,
        idempotency_key: str | None,
        retries: int,
        *,
        thread_id: str | None,
        close_on_disconnect: bool,
        worker: str | None = None,
    ) -> Request[str | None]:
        """A start whose answer is the new session's event stream. Safe to send again as
        any start is, until the stream opens; the answer read here is the path of the
        session's ``…/events`` (from ``Location``), where a cut stream resumes."""
        body = _start_body(params, call_type, resumable, thread_id, worker)
        if close_on_disconnect:
            body["close_on_disconnect"] = True
        headers = {
            "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
            "Accept": "text/event-stream",
            "Cache-Control": "no-cache",
        }
        return Request(
            "POST",
            f"/calls/{_seg(call_id)}/sessions",
            lambda resp: _events_path(call_id, resp),
            body=body,
            headers=headers,
            retries=retries,
        )

    @staticmethod
    def get_session(call_id: str, session_id: str) -> Request[SessionInfo]:
        return Request("GET", session_path(call_id, session_id), _model(SessionInfo))

    @staticmethod
    def list_call_sessions(call_id: str) -> Request[list[SessionInfo]]:
        path = f"/calls/{_seg(call_id)}/sessions"
        return Request("GET", path, lambda r: SessionList.model_validate_json(r.content).sessions)

    @staticmethod
    def list_sessions(
        state: State | str | None, node_id: str | None, limit: int | None, cursor: str | None
    ) -> Request[SessionPage]:
        params = _clean({"state": state, "node_id": node_id, "limit": limit, "cursor": cursor})
        return Request("GET", "/sessions", _model(SessionPage), params=params)

    @staticmethod
    def close_session(
        call_id: str, session_id: str, wait: float | None, timeout: httpx.Timeout
    ) -> Request[SessionInfo | CloseAccepted]:
        params = _clean({"wait": wait})
        timeout = _waiting(timeout, wait)
        path = session_path(call_id, session_id)
        return Request(
            "DELETE", path, _close_answer, params, timeout=timeout, answers=frozenset({200, 202})
        )

    @staticmethod
    def send_message(
        call_id: str,
        session_id: str,
        data: Any,
        type: str,
        id: str | None,
        wait: float | None,
        timeout: httpx.Timeout,
        retries: int = START_RETRIES,
    ) -> Request[MessageReply | MessageAccepted]:
        """A message with an id (a new UUID unless one is given), which makes it safe to
        send again: the session's inbox keeps one message per id. A repeat whose first
        attempt went in answers 202 at once, even with a wait (the reply is then a
        ``reply`` event)."""
        body = {"type": type, "data": data, "id": id or str(uuid.uuid4())}
        return Request(
            "POST",
            session_path(call_id, session_id, "/messages"),
            _message_answer,
            params=_clean({"wait": wait}),
            body=body,
            timeout=_waiting(timeout, wait),
            answers=frozenset({200, 202}),
            retries=retries,
        )

    @staticmethod
    def migrate_session(call_id: str, session_id: str) -> Request[MigrateAccepted]:
        """Sent once: an operator's act, whose refusals (403, 404, 409) are answers."""
        path = session_path(call_id, session_id, "/migrate")
        return Request("POST", path, _model(MigrateAccepted), answers=frozenset({202}))

    @staticmethod
    def get_thread(thread_id: str, limit: int | None, cursor: str | None) -> Request[ThreadInfo]:
        params = _clean({"limit": limit, "cursor": cursor})
        return Request("GET", thread_path(thread_id), _model(ThreadInfo), params=params)

    @staticmethod
    def delete_thread(thread_id: str) -> Request[None]:
        return Request("DELETE", thread_path(thread_id), lambda _: None, answers=frozenset({204}))

    @staticmethod
    def send_to_thread(
        thread_id: str,
        data: Any,
        type: str,
        id: str | None,
        call_id: str | None,
        params: dict[str, Any] | None,
        wait: float | None,
        timeout: httpx.Timeout,
        retries: int = START_RETRIES,
        *,
        worker: str | None = None,
    ) -> Request[ThreadMessageReply | ThreadMessageAccepted]:
        """A message to a thread, with an id (a new UUID unless one is given): a repeat
        reaches the session the first attempt reached (or started), whose inbox keeps one
        message per id."""
        body: dict[str, Any] = {"type": type, "data": data, "id": id or str(uuid.uuid4())}
        if call_id is not None:
            body["call_id"] = call_id
        if params is not None:
            body["params"] = params
        if worker is not None:
            body["worker"] = worker
        return Request(
            "POST",
            thread_path(thread_id, "/messages"),
            _thread_message_answer,
            params=_clean({"wait": wait}),
            body=body,
            timeout=_waiting(timeout, wait),
            answers=frozenset({200, 202}),
            retries=retries,
        )

    @staticmethod
    def get_checkpoint(call_id: str, session_id: str, version: int | None) -> Request[Checkpoint]:
        path = session_path(call_id, session_id, "/checkpoint")
        return Request("GET", path, _model(Checkpoint), params=_clean({"version": version}))

    @staticmethod
    def session_metrics(call_id: str, session_id: str) -> Request[SessionMetrics]:
        path = session_path(call_id, session_id, "/metrics")
        return Request("GET", path, _model(SessionMetrics))

    @staticmethod
    def nodes() -> Request[list[NodeInfo]]:
        return Request("GET", "/nodes", lambda r: NodeList.model_validate_json(r.content).nodes)

    @staticmethod
    def workers() -> Request[list[WorkerInfo]]:
        return Request("GET", "/workers", _workers)

    @staticmethod
    def health() -> Request[Health]:
        return Request("GET", "/health", _model(Health))

    @staticmethod
    def ready() -> Request[Readiness]:
        return Request("GET", "/ready", _readiness, answers=frozenset({200, 503}))


def answer(req: Request[T], resp: httpx.Response) -> T:
    if resp.status_code not in req.answers:
        raise api_error(resp)
    try:
        return req.parse(resp)
    except (ValidationError, ValueError):
        raise FleetAPIError(
            resp.status_code, "invalid_response", "the answer is not fleet's (wrong URL?)"
        ) from None


# ---- the clients -------------------------------------------------------------------------


class ClientBase:
    """Configuration both clients share: URL, token, timeouts, headers."""

    def __init__(
        self,
        url: str | None,
        token: str | None,
        timeout: float | httpx.Timeout | None,
        retries: int = START_RETRIES,
    ) -> None:
        self.retries = retries
        self.url = (url or os.environ.get("FLEET_URL") or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise FleetError(f"the fleet URL must start with http:// or https://: {self.url!r}")
        token = token if token is not None else os.environ.get("FLEET_TOKEN")
        self._token = token or None
        if timeout is None:
            self.timeout = DEFAULT_TIMEOUT
        elif isinstance(timeout, httpx.Timeout):
            self.timeout = timeout
        else:
            self.timeout = httpx.Timeout(timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"fleet-client/{__version__}", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _stream_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout.connect, read=STREAM_READ_TIMEOUT, write=10.0, pool=None)

    def __repr__(self) -> str:
        token = "'***'" if self._token else "None"
        return f"{type(self).__name__}(url={self.url!r}, token={token})"
