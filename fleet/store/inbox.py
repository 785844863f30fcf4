"""Inboxes: messages sent to a running session from any node.

A session's inbox is a stream in its call's slot. ``send.lua`` appends a message, writes it
into the session's event stream and nudges the owner over its channel, in one step: the
owner never polls. A message is consumed when the owner's next checkpoint records the inbox
position with the state (``checkpoint.lua``); a session that resumes elsewhere reads the
inbox again from that position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from fleet.store.base import StoreBase


@dataclass(frozen=True)
class Sent:
    """What ``send.lua`` answered: ``ok`` or ``dup`` (with the entry id), ``missing``,
    ``ended``, ``busy`` or ``full``."""

    status: str
    message_id: str = ""


@dataclass(frozen=True)
class InboxEntry:
    id: str
    type: str
    data: str  # JSON text
    sent_at: float
    reply_to: str  # the asking node, or ""
    ask: str  # its token for the reply, or ""


class Inbox(StoreBase):
    async def send(
        self,
        call_id: str,
        session_id: str,
        type: str,
        data_json: str,
        *,
        client_id: str,
        nudge: str,
        principal: str = "",
        reply_to: tuple[str, str] = ("", ""),
    ) -> Sent:
        k, s = self.keys, self._settings
        c, sid = call_id, session_id
        status, *rest = await self.scripts(
            "send",
            [k.session(c, sid), k.inbox(c, sid), k.inbox_ids(c, sid), k.events(c, sid)],
            [
                principal,
                type,
                data_json,
                client_id,
                s.inbox_maxlen,
                k.node_channel_prefix(),
                nudge,
                s.events_maxlen,
                self._announce(c, sid),
                repr(time.time()),
                *reply_to,
            ],
        )
        return Sent(str(status), str(rest[0]) if rest else "")

    async def read_inbox(
        self, call_id: str, session_id: str, after: str, count: int
    ) -> list[InboxEntry]:
        """Up to ``count`` messages after the entry ``after``, oldest first."""
        rows = await self.redis.xrange(
            self.keys.inbox(call_id, session_id), f"({after}", "+", count=count
        )
        out = []
        for entry_id, fields in cast(list[tuple[str, dict[str, Any]]], rows):
            out.append(
                InboxEntry(
                    entry_id,
                    str(fields.get("type", "message")),
                    str(fields.get("data", "null")),
                    float(fields.get("sent_at", 0) or 0),
                    str(fields.get("reply_to", "")),
                    str(fields.get("ask", "")),
                )
            )
        return out
