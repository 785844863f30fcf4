"""A session's events as a ``text/event-stream`` response: for ``GET …/events`` and for a
start with ``Accept: text/event-stream``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fleet.models import SessionRecord, State
from fleet.runtime.node import Node
from fleet.tasks import cancel_and_wait

log = logging.getLogger("fleet.api.events")

KEEPALIVE_SECONDS = 15.0  # a comment line this often keeps proxies from cutting idle streams
KEEPALIVE = b": keep-alive\n\n"
BURST = 64  # events written in one chunk or one go when they are already waiting


class EventStream(Response):
    """``text/event-stream`` of one session. It watches for the client's disconnect
    itself, so a client that goes away frees its listener at once, not at the next
    write (which may be a keep-alive 15 s later)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        node: Node,
        record: SessionRecord,
        after: str,
        *,
        headers: dict[str, str] | None = None,
        on_gone: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """``on_gone``: what to do when the client leaves before the stream ended."""
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        )
        self._node = node
        self._record = record
        self._after = after
        self._on_gone = on_gone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pump = asyncio.create_task(self._pump(send))
        gone = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(pump, gone)
        if gone.done() and not gone.cancelled():
            # The client left. The session runs on unless it was asked to end with it.
            if self._on_gone is not None and not (pump.done() and not pump.cancelled()):
                try:
                    await self._on_gone()
                except Exception:
                    log.exception("could not act on a client's disconnect")
            return
        if not pump.cancelled() and (exc := pump.exception()) is not None:
            if not isinstance(exc, OSError):  # OSError: the client left mid-write
                log.error("event stream failed", exc_info=exc)
            return
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _pump(self, send: Send) -> None:
        record = self._record
        with self._node.events.listen(
            record.call_id,
            record.session_id,
            self._after,
            replay_only=record.state == State.ENDED,
            started_at=record.started_at,
        ) as listener:
            while not listener.done:
                event = await listener.next(KEEPALIVE_SECONDS)
                if event is not None:
                    body = b"".join(e.sse for e in [event, *listener.take_ready(BURST - 1)])
                elif listener.done:
                    break
                else:
                    body = KEEPALIVE
                    await listener.check_session()
                await send({"type": "http.response.body", "body": body, "more_body": True})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
