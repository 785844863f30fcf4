"""Close requests and hand-overs between nodes: each node listens on its own channel.

The durable close flag lives in the session record (``request_close.lua`` sets it and
publishes in one step); the message only makes the owner act at once. A message lost
while a connection was down is caught by the maintenance pass, which reads the flags.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("fleet.control")


@dataclass(frozen=True)
class Message:
    # "close", "inbox" (a message arrived), "resume" and "watch" (tell me when it ends) go
    # to a session's owner; "ended" and "reply" go back to whoever waits for them
    op: str
    ref: str
    reason: str = ""  # a close's reason; a reply's ask token
    reply_to: str = ""
    payload: str = ""  # a reply's data (JSON text)

    def encode(self) -> str:
        # Empty fields are left out: most messages are a few bytes of op and ref.
        return json.dumps({k: v for k, v in self.__dict__.items() if v}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> Message | None:
        try:
            data = json.loads(raw)
            return cls(
                op=str(data["op"]),
                ref=str(data["ref"]),
                reason=str(data.get("reason", "")),
                reply_to=str(data.get("reply_to", "")),
                payload=str(data.get("payload", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None


Handler = Callable[[Message], None]


class ControlListener:
    """Subscribes to this node's channel, resubscribing after any connection loss.

    ``on_subscribed`` runs after every (re)subscription: the node then reads its sessions'
    close flags, since messages published meanwhile were lost.
    """

    def __init__(
        self,
        redis: Redis,
        channel: str,
        handler: Handler,
        on_subscribed: Callable[[], Awaitable[None]],
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self._redis = redis
        self._channel = channel
        self._handler = handler
        self._on_subscribed = on_subscribed
        self._on_lost = on_lost
        self.subscribed = False

    async def run(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self.subscribed = True
                backoff = 0.1
                await self._on_subscribed()
                while True:
                    raw = await pubsub.get_message(timeout=1.0)
                    if raw is None or raw.get("type") != "message":
                        continue
                    message = Message.decode(raw["data"])
                    if message is None:
                        log.warning("ignored a malformed control message")
                        continue
                    try:
                        self._handler(message)
                    except Exception:  # one message's bug must not deafen the node
                        log.exception("control message %r failed", message.op)
            except Exception as exc:
                # A Redis error, or anything else the client raises: either way, subscribe
                # again. A listener that died would leave the node deaf (closes wait for
                # the maintenance pass) and, unsubscribed, not ready for good.
                if isinstance(exc, (RedisError, OSError)):
                    if self.subscribed:
                        log.warning("control channel lost (%s); resubscribing", type(exc).__name__)
                else:
                    log.exception("control listener failed; resubscribing")
                if self.subscribed:
                    self._on_lost()
                self.subscribed = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
            finally:
                self.subscribed = False
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except (RedisError, OSError):
                    pass
