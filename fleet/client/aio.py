"""``AsyncFleetClient``: the API of a fleet, for asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
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


class AsyncFleetClient(ClientBase):
    """The same API as ``FleetClient``, for asyncio: every method is a coroutine, and
    ``iter_sessions`` and ``events`` are async iterators."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        retries: int = START_RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, timeout, retries)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self._headers(), timeout=self.timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncFleetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, req: Request[T]) -> T:
        """Send ``req``; send it again (up to ``req.retries`` times, after a pause) when no
        answer came or the answer is worth another attempt."""
        attempt = 0
        while True:
            resp: httpx.Response | None = None
            try:
                resp = await self._http.request(
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
            await asyncio.sleep(retry_delay(attempt, resp))
            attempt += 1

    async def start_session(
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
        """See ``FleetClient.start_session``."""
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
        return await self._send(req)

    async def invoke(
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
        """Start a session and wait up to ``wait`` seconds for its end: the ended
        ``SessionInfo`` with its ``result``, or the session as it runs if the wait ran
        out. Retried safely; see ``FleetClient.invoke``."""
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
        return await self._send(req)

    async def get_session(self, call_id: str, session_id: str) -> SessionInfo:
        return await self._send(Requests.get_session(call_id, session_id))

    async def list_call_sessions(self, call_id: str) -> list[SessionInfo]:
        """The call's sessions, live ones first."""
        return await self._send(Requests.list_call_sessions(call_id))

    async def list_sessions(
        self,
        *,
        state: State | str | None = None,
        node_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SessionPage:
        """One page of the fleet-wide list; ``next_cursor`` asks for the next."""
        return await self._send(Requests.list_sessions(state, node_id, limit, cursor))

    async def iter_sessions(
        self, *, state: State | str | None = None, node_id: str | None = None, page_size: int = 100
    ) -> AsyncGenerator[SessionInfo, None]:
        """Every session of the fleet, page after page."""
        cursor: str | None = None
        while True:
            page = await self.list_sessions(
                state=state, node_id=node_id, limit=page_size, cursor=cursor
            )
            for info in page.sessions:
                yield info
            if page.next_cursor is None or page.next_cursor == cursor:
                return
            cursor = page.next_cursor

    async def close_session(
        self, call_id: str, session_id: str, wait: float | None = None
    ) -> SessionInfo | CloseAccepted:
        """Ask for the close. With ``wait``, the final ``SessionInfo`` once the session
        ended, or ``CloseAccepted`` if it still runs after ``wait`` seconds."""
        return await self._send(Requests.close_session(call_id, session_id, wait, self.timeout))

    async def send(
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
        return await self._send(req)

    async def ask(
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
        answer = await self.send(call_id, session_id, data, type=type, id=id, wait=timeout)
        if isinstance(answer, MessageReply):
            return answer.reply
        raise NoReply(answer.message_id, timeout)

    async def thread(
        self, thread_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> ThreadInfo:
        """See ``FleetClient.thread``."""
        return await self._send(Requests.get_thread(thread_id, limit, cursor))

    async def delete_thread(self, thread_id: str) -> None:
        """See ``FleetClient.delete_thread``."""
        await self._send(Requests.delete_thread(thread_id))

    async def send_to_thread(
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
        """See ``FleetClient.send_to_thread``."""
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
        return await self._send(req)

    async def get_checkpoint(
        self, call_id: str, session_id: str, version: int | None = None
    ) -> Checkpoint:
        return await self._send(Requests.get_checkpoint(call_id, session_id, version))

    async def session_metrics(self, call_id: str, session_id: str) -> SessionMetrics:
        return await self._send(Requests.session_metrics(call_id, session_id))

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes of the fleet."""
        return await self._send(Requests.nodes())

    async def workers(self) -> list[WorkerInfo]:
        """See ``FleetClient.workers``."""
        return await self._send(Requests.workers())

    async def migrate(self, call_id: str, session_id: str) -> MigrateAccepted:
        """See ``FleetClient.migrate``."""
        return await self._send(Requests.migrate_session(call_id, session_id))

    async def health(self) -> Health:
        return await self._send(Requests.health())

    async def ready(self) -> Readiness:
        """Readiness of the node that answers; ``.ready`` is False on a 503."""
        return await self._send(Requests.ready())

    async def events(
        self,
        call_id: str,
        session_id: str,
        last_event_id: str | None = None,
        *,
        reconnect: bool = True,
    ) -> AsyncGenerator[ServerSentEvent, None]:
        """The session's events from the start (or after ``last_event_id``), live, until
        ``session_ended``. A cut stream is resumed where it stopped, on whatever node
        answers. Break out early with ``contextlib.aclosing`` to free the connection."""
        follow = Follow(session_path(call_id, session_id, "/events"), last_event_id, reconnect)
        async for event in self._follow(follow):
            yield event

    async def stream(
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
    ) -> AsyncGenerator[ServerSentEvent, None]:
        """Start a session and iterate its events, from ``session_started`` to
        ``session_ended``; see ``FleetClient.stream``. Break out with
        ``contextlib.aclosing``."""
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
                async with self._http.stream(
                    req.method,
                    req.path,
                    json=req.body,
                    headers=req.headers,
                    timeout=self._stream_timeout(),
                ) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                    if (follow := opening.answered(resp)) is not None:
                        async for chunk in resp.aiter_bytes():
                            for event in follow.feed(chunk):
                                yield event
                            if follow.finished:
                                return
                        follow.ended_cleanly()
            except httpx.TransportError as exc:
                opening.cut(exc)
            if opening.follow is None:
                await asyncio.sleep(retry_delay(opening.attempt, resp))
                opening.attempt += 1
        follow = opening.follow
        if follow.attempts:
            await asyncio.sleep(follow.delay)
        async for event in self._follow(follow):
            yield event

    async def _follow(self, follow: Follow) -> AsyncGenerator[ServerSentEvent, None]:
        """Read ``follow``'s session's events until it is finished, reconnecting as it
        says."""
        while not follow.finished:
            try:
                async with self._http.stream(
                    "GET", follow.path, headers=follow.open(), timeout=self._stream_timeout()
                ) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        error = api_error(resp)
                        if resp.status_code not in RETRYABLE_STATUS:
                            raise error
                        follow.failed(error)
                    else:
                        async for chunk in resp.aiter_bytes():
                            for event in follow.feed(chunk):
                                yield event
                            if follow.finished:
                                return
                        follow.ended_cleanly()
                        continue
            except httpx.TransportError as exc:
                follow.failed(unreachable(self.url, exc))
            await asyncio.sleep(follow.delay)
