"""What a node does with each message on its control channel (``control.py``).

Messages to a session's owner: ``close`` (stop it; the asker's ``request_close.lua``
recorded the flag already), ``inbox`` (a message arrived), ``resume`` (a session was
claimed for this node) and ``watch`` (tell the asker when it ends). Answers to this node:
``ended`` (a session it waits for ended, or is not where it asked) and ``reply`` (a
worker's reply to a message it sent with ``?wait``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from fleet.models import CloseReason
from fleet.runtime.control import Message
from fleet.runtime.ends import Ends
from fleet.runtime.inbox import Conversations
from fleet.runtime.moves import Moves
from fleet.runtime.session import LocalSession


class Orders:
    """The control channel's handler: ``Orders(...)(message)``."""

    def __init__(
        self,
        node_id: str,
        sessions: dict[str, LocalSession],
        ends: Ends,
        conversations: Conversations,
        moves: Moves,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        self.node_id = node_id
        self._sessions = sessions
        self._ends = ends
        self._conversations = conversations
        self._moves = moves
        self._spawn = spawn

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
