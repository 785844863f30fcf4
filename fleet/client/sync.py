"""``FleetClient``: the API of a fleet, blocking."""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import httpx

from fleet.client.base import (
    INVOKE_WAIT,
    ClientBase,
    Health,
    MessageAccepted,
    MessageReply,
    Readiness,
    Request,
    Requests,
    T,
    answer,
    session_path,
)
from fleet.client.errors import NoReply, api_error, unreachable
from fleet.client.retries import (
    RETRYABLE_ERRORS,
    RETRYABLE_STATUS,
    START_RETRIES,
    retry_delay,
    worth_retrying,
)
from fleet.client.sse import Follow, Opening, ServerSentEvent
from fleet.models import (
    Checkpoint,
    CloseAccepted,
    MigrateAccepted,
    NodeInfo,
    SessionInfo,
    SessionMetrics,
    SessionPage,
    State,
    ThreadInfo,
    ThreadMessageAccepted,
    ThreadMessageReply,
    WorkerInfo,
)


class FleetClient(ClientBase):
    """The API of a fleet node (or of the load balancer in front of several), blocking.

    Use it as a context manager, or call ``close()``. ``transport`` replaces httpx's
    network transport (tests pass an in-process one)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        retries: int = START_RETRIES,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, timeout, retries)
        self._http = httpx.Client(
            base_url=self.url, headers=self._headers(), timeout=self.timeout, transport=transport
        )

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, req: Request[T]) -> T:
        """Send ``req``; send it again (up to ``req.retries`` times, after a pause) when no
        answer came or the answer is worth another attempt."""
        attempt = 0
        while True:
            resp: httpx.Response | None = None
            try:
                resp = self._http.request(
                    req.method,
                    req.path,
                    params=req.params,
                    json=req.body,
                    headers=req.headers,
                    timeout=req.timeout or httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as exc:
                if attempt >= req.retries or not isinstance(exc, RETRYABLE_ERRORS):
                    raise unreachable(self.url, exc) from exc
            if resp is not None and (attempt >= req.retries or not worth_retrying(resp)):
                return answer(req, resp)
            time.sleep(retry_delay(attempt, resp))
            attempt += 1

    def start_session(
        self,
        call_id: str,
        params: dict[str, Any] | None = None,
        call_type: str = "default",
        resumable: bool = True,
        *,
        thread_id: str | None = None,
        idempotency_key: str | None = None,
        worker: str | None = None,
    ) -> SessionInfo:
        """Start a session of ``worker`` (a name ``workers()`` lists; default: the
        fleet's first) in ``call_id``, on a node that runs it and has room; with
        ``thread_id``, on that thread, from its latest state (409 ``thread_busy`` while
        another session runs on it). Refused with 422 ``unknown_worker``, 422
        ``invalid_params`` (``FleetAPIError.errors`` names the fields), or 429
        (``no_capacity``: no node that runs the worker has room). The start carries an
        ``Idempotency-Key`` (``idempotency_key``, or a new UUID), so it is sent again
        safely when no answer comes or a proxy or a node cannot take it for now
        (502/503/504, ``start_failed`` included; up to ``retries`` times): however many
        attempts reach a node, one session starts. Pass the same ``idempotency_key`` to
        retry a start yourself later."""
        req = Requests.start_session(
            call_id,
            params,
            call_type,
            resumable,
            idempotency_key,
            self.retries,
            thread_id=thread_id,
            timeout=self.timeout,
            worker=worker,
        )
        return self._send(req)

    def invoke(
        self,
        call_id: str,
        *,
        params: dict[str, Any] | None = None,
        call_type: str = "default",
        thread_id: str | None = None,
        wait: float = INVOKE_WAIT,
        idempotency_key: str | None = None,
        worker: str | None = None,
    ) -> SessionInfo:
        """Start a session (of ``worker``, as ``start_session`` does) and wait up to
        ``wait`` seconds (at most 300) for its end: the ended ``SessionInfo``, with
        ``end_reason`` and ``result`` (what the worker's ``run`` returned). If it still
        runs when the wait is over, the session as it runs (``state`` is not ``ended``:
        follow it, read it later, or close it). Retried as a start is, with one
        ``Idempotency-Key`` (``idempotency_key`` or a new UUID): an attempt cut off (its
        node killed, say) is sent again, reaches the same session wherever it runs now,
        and waits for its end; each attempt waits up to ``wait``."""
        req = Requests.start_session(
            call_id,
            params,
            call_type,
            True,
            idempotency_key,
            self.retries,
            thread_id=thread_id,
            wait=wait,
            timeout=self.timeout,
            worker=worker,
        )
        return self._send(req)

    def get_session(self, call_id: str, session_id: str) -> SessionInfo:
        return self._send(Requests.get_session(call_id, session_id))

    def list_call_sessions(self, call_id: str) -> list[SessionInfo]:
        """The call's sessions, live ones first."""
        return self._send(Requests.list_call_sessions(call_id))

    def list_sessions(
        self,
        *,
        state: State | str | None = None,
        node_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SessionPage:
        """One page of the fleet-wide list; ``next_cursor`` asks for the next."""
        return self._send(Requests.list_sessions(state, node_id, limit, cursor))

    def iter_sessions(
        self, *, state: State | str | None = None, node_id: str | None = None, page_size: int = 100
    ) -> Generator[SessionInfo, None, None]:
        """Every session of the fleet, page after page."""
        cursor: str | None = None
        while True:
            page = self.list_sessions(state=state, node_id=node_id, limit=page_size, cursor=cursor)
            yield from page.sessions
            if page.next_cursor is None or page.next_cursor == cursor:
                return
            cursor = page.next_cursor

    def close_session(
        self, call_id: str, session_id: str, wait: float | None = None
    ) -> SessionInfo | CloseAccepted:
        """Ask for the close. With ``wait``, the final ``SessionInfo`` once the session
        ended, or ``CloseAccepted`` if it still runs after ``wait`` seconds."""
        return self._send(Requests.close_session(call_id, session_id, wait, self.timeout))

    def send(
        self,
        call_id: str,
        session_id: str,
        data: Any,
        *,
        type: str = "message",
        id: str | None = None,
        wait: float | None = None,
    ) -> MessageReply | MessageAccepted:
        """Send ``data`` (any JSON value) to the session's inbox, wherever it runs. With
        ``wait``, wait up to that many seconds for the worker's reply: ``MessageReply``,
        or ``MessageAccepted`` if the wait ran out. The message carries ``id`` (or a new
        UUID), so it is sent again safely when no answer comes or a proxy or a draining
        node refuses it (up to ``retries`` times): the inbox holds it once. Refusals
        raise ``FleetAPIError``: 404, 409 ``session_ended`` / ``busy``, 413, 429
        ``inbox_full``."""
        req = Requests.send_message(
            call_id, session_id, data, type, id, wait, self.timeout, self.retries
        )
        return self._send(req)

    def ask(
        self,
        call_id: str,
        session_id: str,
        data: Any,
        *,
        timeout: float = 30.0,
        type: str = "message",
        id: str | None = None,
    ) -> Any:
        """Send ``data`` and return the worker's reply (any JSON value, ``None``
        included). Raises ``NoReply`` (with the ``message_id``) if no reply came within
        ``timeout`` seconds: the message stays in the inbox, and a late reply is a
        ``reply`` event."""
        answer = self.send(call_id, session_id, data, type=type, id=id, wait=timeout)
        if isinstance(answer, MessageReply):
            return answer.reply
        raise NoReply(answer.message_id, timeout)

    def thread(
        self, thread_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> ThreadInfo:
        """The thread: its latest state, the session running on it (``live_session``),
        and its sessions, newest first (``limit`` a page, 20 by default; ``next_cursor``
        asks for the next). 404 ``not_found`` for a thread that is not (or no longer)
        yours."""
        return self._send(Requests.get_thread(thread_id, limit, cursor))

    def delete_thread(self, thread_id: str) -> None:
        """Forget the thread (its state and its list of sessions). Refused with 409
        ``thread_busy`` while a session runs on it: close that session first."""
        self._send(Requests.delete_thread(thread_id))

    def send_to_thread(
        self,
        thread_id: str,
        data: Any,
        *,
        type: str = "message",
        id: str | None = None,
        call_id: str | None = None,
        params: dict[str, Any] | None = None,
        wait: float | None = None,
        worker: str | None = None,
    ) -> ThreadMessageReply | ThreadMessageAccepted:
        """Send ``data`` to the session running on the thread, or, when none runs, start
        one on it (in ``call_id``, default the thread's id; of ``worker``, default the
        fleet's first; with ``params``) and deliver this message to it first
        (``started`` says which). With ``wait``, wait up to that many seconds for the
        reply: ``ThreadMessageReply``, or ``ThreadMessageAccepted`` if the wait ran out.
        Retried as ``send`` is, with the same ``id`` (or a new UUID): a repeat reaches the
        same session, which holds the message once."""
        req = Requests.send_to_thread(
            thread_id,
            data,
            type,
            id,
            call_id,
            params,
            wait,
            self.timeout,
            self.retries,
            worker=worker,
        )
        return self._send(req)

    def get_checkpoint(
        self, call_id: str, session_id: str, version: int | None = None
    ) -> Checkpoint:
        return self._send(Requests.get_checkpoint(call_id, session_id, version))

    def session_metrics(self, call_id: str, session_id: str) -> SessionMetrics:
        return self._send(Requests.session_metrics(call_id, session_id))

    def nodes(self) -> list[NodeInfo]:
        """The live nodes of the fleet."""
        return self._send(Requests.nodes())

    def workers(self) -> list[WorkerInfo]:
        """The named workers the live nodes run (a node's default first): what each
        is, whether it resumes and migrates, its inbox policy, the JSON schema of its
        params, and the nodes that run it. A start names one with ``worker=``."""
        return self._send(Requests.workers())

    def migrate(self, call_id: str, session_id: str) -> MigrateAccepted:
        """Move a running, resumable session to another node now (the ``admin``
        principal only): its worker saves a last checkpoint and returns, and the session
        resumes on the node with the most room that runs its worker (a
        ``session_resumed`` event), or where it was if none can take it by then. Answers
        at once with the node it moves away from. Sent once; refusals raise
        ``FleetAPIError``: 403 ``forbidden``, 404, 409 ``not_resumable`` / ``no_target``
        / ``session_ended``."""
        return self._send(Requests.migrate_session(call_id, session_id))

    def health(self) -> Health:
        return self._send(Requests.health())

    def ready(self) -> Readiness:
        """Readiness of the node that answers; ``.ready`` is False on a 503."""
        return self._send(Requests.ready())

    def events(
        self,
        call_id: str,
        session_id: str,
        last_event_id: str | None = None,
        *,
        reconnect: bool = True,
    ) -> Generator[ServerSentEvent, None, None]:
        """The session's events from the start (or after ``last_event_id``), live, until
        ``session_ended``. A cut stream is resumed where it stopped, on whatever node
        answers. Break out early with ``contextlib.closing`` to free the connection."""
        follow = Follow(session_path(call_id, session_id, "/events"), last_event_id, reconnect)
        yield from self._follow(follow)

    def stream(
        self,
        call_id: str,
        *,
        params: dict[str, Any] | None = None,
        call_type: str = "default",
        thread_id: str | None = None,
        resumable: bool = True,
        close_on_disconnect: bool = False,
        idempotency_key: str | None = None,
        reconnect: bool = True,
        worker: str | None = None,
    ) -> Generator[ServerSentEvent, None, None]:
        """Start a session (of ``worker``, as ``start_session`` does) and iterate its
        events, from ``session_started`` to ``session_ended`` (whose data holds the
        ``end_reason`` and, if any, the ``result``), in one request. Until the stream
        opens, the start is retried as ``start_session`` is (one ``Idempotency-Key``: one
        session). A stream cut after that is resumed from ``…/events`` with
        ``Last-Event-ID``, as ``events`` does. The session runs on if you leave early,
        unless ``close_on_disconnect`` (then leaving, or a cut connection, closes it).
        Break out with ``contextlib.closing``."""
        req = Requests.stream_session(
            call_id,
            params,
            call_type,
            resumable,
            idempotency_key,
            self.retries,
            thread_id=thread_id,
            close_on_disconnect=close_on_disconnect,
            worker=worker,
        )
        opening = Opening(req, self.url, reconnect)
        while opening.follow is None:
            resp: httpx.Response | None = None
            try:
                with self._http.stream(
                    req.method,
                    req.path,
                    json=req.body,
                    headers=req.headers,
                    timeout=self._stream_timeout(),
                ) as resp:
                    if resp.status_code != 200:
                        resp.read()
                    if (follow := opening.answered(resp)) is not None:
                        for chunk in resp.iter_bytes():
                            yield from follow.feed(chunk)
                            if follow.finished:
                                return
                        follow.ended_cleanly()
            except httpx.TransportError as exc:
                opening.cut(exc)
            if opening.follow is None:
                time.sleep(retry_delay(opening.attempt, resp))
                opening.attempt += 1
        follow = opening.follow
        if follow.attempts:
            time.sleep(follow.delay)
        yield from self._follow(follow)

    def _follow(self, follow: Follow) -> Generator[ServerSentEvent, None, None]:
        """Read ``follow``'s session's events until it is finished, reconnecting as it
        says."""
        while not follow.finished:
            try:
                with self._http.stream(
                    "GET", follow.path, headers=follow.open(), timeout=self._stream_timeout()
                ) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        error = api_error(resp)
                        if resp.status_code not in RETRYABLE_STATUS:
                            raise error
                        follow.failed(error)
                    else:
                        for chunk in resp.iter_bytes():
                            yield from follow.feed(chunk)
                            if follow.finished:
                                return
                        follow.ended_cleanly()
                        continue
            except httpx.TransportError as exc:
                follow.failed(unreachable(self.url, exc))
            time.sleep(follow.delay)
