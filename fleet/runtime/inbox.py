"""Conversations on a node: sending to any session (and waiting for its reply), and each
local session's side of its inbox.

The owner is nudged over its channel by the send itself (``send.lua``), so it reads its
inbox only when something arrived, never on a timer. A session hands its worker each
message once per run (``delivered``); the next checkpoint records that position with the
state, which consumes the messages. A session that resumes elsewhere starts from the
position of its last checkpoint, so it gets exactly the messages after it again.

A send that waits for the reply leaves the asking node's id and a token in the message;
whichever node runs the session when the worker replies publishes the reply to that node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fleet.errors import InboxBusy, InboxFull, SessionEnded, SessionNotFound
from fleet.metrics import (
    MESSAGE_ASK_SECONDS,
    MESSAGE_DELIVERY_SECONDS,
    MESSAGE_REPLIES,
    MESSAGES_SENT,
    labelled,
)
from fleet.runtime.control import Message as ControlMessage
from fleet.store.inbox import InboxEntry
from fleet.store.keys import make_ref
from fleet.store.registry import Registry
from fleet.worker import Message

#: Messages read from Redis at a time.
READ_COUNT = 100
#: The send script's statuses, as the ``outcome`` of ``fleet_messages_sent``.
OUTCOMES = {
    "ok": "accepted",
    "dup": "duplicate",
    "busy": "busy",
    "full": "full",
    "ended": "ended",
    "missing": "not_found",
}


@dataclass(frozen=True)
class SendResult:
    message_id: str
    replied: bool = False
    reply: Any = None


class Replies:
    """The asking node's side: futures for replies, resolved from the control channel."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[str]] = {}

    def expect(self) -> tuple[str, asyncio.Future[str]]:
        token = secrets.token_hex(8)
        future = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        return token, future

    def forget(self, token: str) -> None:
        self._waiting.pop(token, None)

    def resolve(self, token: str, payload: str) -> None:
        future = self._waiting.get(token)
        if future is not None and not future.done():
            future.set_result(payload)


class Conversations:
    """Sending to a session, from any node."""

    def __init__(self, registry: Registry, node_id: str, inbox_maxlen: int) -> None:
        self.registry = registry
        self.node_id = node_id
        self.inbox_maxlen = inbox_maxlen
        self.replies = Replies()

    async def send(
        self,
        call_id: str,
        session_id: str,
        type: str,
        data_json: str,
        *,
        client_id: str = "",
        wait: float | None = None,
        principal: str = "",
        appended: Callable[[], Awaitable[None]] | None = None,
    ) -> SendResult:
        """Append a message to the session's inbox; with ``wait``, wait that long for the
        worker's reply. ``appended`` runs once the message is in the inbox (before the
        wait). Raises SessionNotFound, SessionEnded, InboxBusy or InboxFull."""
        ref = make_ref(call_id, session_id)
        token, future = self.replies.expect() if wait else ("", None)
        began = time.perf_counter()
        try:
            sent = await self.registry.send(
                call_id,
                session_id,
                type,
                data_json,
                client_id=client_id,
                nudge=ControlMessage("inbox", ref).encode(),
                principal=principal,
                reply_to=(self.node_id, token) if token else ("", ""),
            )
            labelled(MESSAGES_SENT, OUTCOMES.get(sent.status, "accepted")).inc()
            if sent.status == "missing":
                raise SessionNotFound(f"no session {session_id} in call {call_id}")
            if sent.status == "ended":
                raise SessionEnded(f"session {session_id} has ended: it takes no messages")
            if sent.status == "busy":
                raise InboxBusy(
                    f"session {session_id} is busy with an earlier message (its worker "
                    "rejects messages until it has consumed the last one); retry later"
                )
            if sent.status == "full":
                raise InboxFull(
                    f"session {session_id} has {self.inbox_maxlen} "
                    "unconsumed messages, its limit (FLEET_INBOX_MAXLEN); retry later"
                )
            if appended is not None:
                await appended()
            if future is None or sent.status == "dup" or wait is None:
                return SendResult(sent.message_id)
            with contextlib.suppress(TimeoutError):
                payload = await asyncio.wait_for(future, wait)
                MESSAGE_ASK_SECONDS.observe(time.perf_counter() - began)
                return SendResult(sent.message_id, True, json.loads(payload))
            return SendResult(sent.message_id)
        finally:
            if token:
                self.replies.forget(token)


class SessionInbox:
    """One local session's inbox: what its worker receives, and how far it got."""

    def __init__(self, registry: Registry, call_id: str, session_id: str, pos: str, done: int):
        self.registry = registry
        self.call_id = call_id
        self.session_id = session_id
        self.delivered = pos  # the last entry handed to the worker
        self.count = done  # messages handed out since the session began
        self._buffer: deque[InboxEntry] = deque()
        self._wake = asyncio.Event()
        self._wake.set()  # read once at the start: messages may be waiting

    def wake(self) -> None:
        """Something arrived (a nudge), or the session is closing: look again."""
        self._wake.set()

    @property
    def consumed(self) -> tuple[str, int]:
        """What the next checkpoint records as consumed."""
        return self.delivered, self.count

    async def next(self, closing: asyncio.Event, timeout: float | None) -> InboxEntry | None:
        """The next message, or None on timeout or once the session is closing."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._buffer:
                entry = self._buffer.popleft()
                self.delivered, self.count = entry.id, self.count + 1
                if entry.sent_at > 0:  # the sender's clock: another node's may run behind
                    MESSAGE_DELIVERY_SECONDS.observe(max(0.0, time.time() - entry.sent_at))
                return entry
            if closing.is_set():
                return None
            if self._wake.is_set():
                self._wake.clear()  # before reading: a nudge during the read is kept
                try:
                    rows = await self.registry.read_inbox(
                        self.call_id, self.session_id, self.delivered, READ_COUNT
                    )
                except BaseException:
                    self._wake.set()  # read again on the next try
                    raise
                self._buffer.extend(rows)
                if len(rows) == READ_COUNT:
                    self._wake.set()  # more may wait: their nudges came before this read
                continue
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)


def to_message(entry: InboxEntry, reply: Any) -> Message:
    """The worker's view of an inbox entry; ``reply`` answers it."""
    to = "sender" if entry.reply_to and entry.ask else "event"

    async def replier(message: Message, data: Any) -> None:
        await reply(message, data)
        labelled(MESSAGE_REPLIES, to).inc()

    return Message(
        id=entry.id,
        type=entry.type,
        data=json.loads(entry.data),
        sent_at=entry.sent_at,
        replier=replier,
    )
