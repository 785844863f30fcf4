"""What a node does with each message on its control channel (``control.py``).

Messages to a session's owner: ``close`` (stop it; the asker's ``request_close.lua``
recorded the flag already), ``inbox`` (a message arrived), ``resume`` (a session was
claimed for this node), ``watch`` (tell the asker when it ends) and ``migrate`` (move it
to another node now). To a node placement chose: ``place`` (run this new session). Answers
to this node: ``ended`` (a session it waits for ended, or is not where it asked),
``reply`` (a worker's reply to a message it sent with ``?wait``) and ``placed`` (the
answer to a start it forwarded).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, Protocol

from fleet.models import CloseReason
from fleet.runtime.control import Message
from fleet.runtime.ends import Ends
from fleet.runtime.inbox import Conversations
from fleet.runtime.moves import Moves
from fleet.runtime.placement import Forwards
from fleet.runtime.session import LocalSession
from fleet.runtime.starts import Starts
from fleet.store import REDIS_ERRORS
from fleet.store.registry import Registry


class OrdersHost(Protocol):
    """What the handler needs of the node (``fleet.runtime.node.Node``)."""

    node_id: str
    registry: Registry
    starts: Starts
    forwards: Forwards

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...


class Orders:
    """The control channel's handler: ``Orders(...)(message)``."""

    def __init__(
        self,
        host: OrdersHost,
        sessions: dict[str, LocalSession],
        ends: Ends,
        conversations: Conversations,
        moves: Moves,
    ) -> None:
        self.host = host
        self.node_id = host.node_id
        self._sessions = sessions
        self._ends = ends
        self._conversations = conversations
        self._moves = moves
        self._spawn = host.spawn

    def __call__(self, message: Message) -> None:
        if message.op == "ended":
            self._ends.wake(message.ref)
        elif message.op == "reply":
            self._conversations.replies.resolve(message.reason, message.payload)
        elif message.op == "inbox":
            if (session := self._sessions.get(message.ref)) is not None:
                session.nudge()
        elif message.op == "resume":
            self._spawn(self._moves.resume(message.ref))
        elif message.op == "close":
            self._close(message)
        elif message.op == "watch":
            self._watch(message)
        elif message.op == "place":
            self._spawn(self.host.starts.accept(message, self._answer_placed))
        elif message.op == "placed":
            self.host.forwards.answered(message.ref, message.payload)
        elif message.op == "migrate":
            if (session := self._sessions.get(message.ref)) is not None:
                session.migrate()

    async def _answer_placed(self, ref: str, asker: str, answer: str) -> None:
        channel = self.host.registry.keys.node_channel(asker)
        with contextlib.suppress(*REDIS_ERRORS):  # the asker then gives the start up
            await self.host.registry.redis.publish(
                channel, Message("placed", ref, payload=answer).encode()
            )

    def _not_here(self, message: Message) -> None:
        """The session is not on this node (it ended, or moved on): tell the asker at
        once, and it reads the record to learn which."""
        if message.reply_to and message.reply_to != self.node_id:
            self._spawn(self._ends.publish_ended(message.ref, {message.reply_to}))

    def _watch(self, message: Message) -> None:
        """Another node waits for this session's end: tell it when it comes."""
        session = self._sessions.get(message.ref)
        if session is None:
            self._not_here(message)
        elif message.reply_to:
            session.reply_to.add(message.reply_to)

    def _close(self, message: Message) -> None:
        session = self._sessions.get(message.ref)
        if session is None:
            self._not_here(message)
            return
        if message.reply_to:
            session.reply_to.add(message.reply_to)
        try:
            reason = CloseReason(message.reason)
        except ValueError:
            reason = CloseReason.CLOSED
        # The asker's request_close wrote the flag and session_closing already.
        session.request_close(reason, recorded=True)
