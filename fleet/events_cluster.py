"""Live events on Redis Cluster: reads prompted by announcements, not one blocking read.

On a single Redis (or Sentinel) the node's ``EventDispatcher`` blocks in one ``XREAD``
over every stream it watches. On Cluster one ``XREAD`` cannot span hash slots, and the
streams a node watches belong to many calls, so to many slots. Instead, there, every
script that appends to a session's stream also publishes the new entry's id on that
stream's channel (``Keys.events_channel``), in the same atomic step. The node subscribes
to the channels of the streams it watches and, when some are announced, reads them from
where it left off: one ``XREAD`` per hash slot, all slots at once.

Nothing is missed: a subscription counts once Redis confirms it, and every confirmed
subscription (a new stream, or all of them after a reconnect) is followed by a read of that
stream; after that, every entry is announced. An announcement says only "there is more",
so announcements that pile up cost one read.

The channels are classic pub/sub, which Cluster delivers to a subscriber on any shard.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from redis.asyncio.client import PubSub
from redis.crc import key_slot

from fleet.events import REDIS_ERRORS, RETRY_MAX, RETRY_MIN, EventDispatcher

log = logging.getLogger("fleet.events")

RECEIVE_TIMEOUT = 1.0  # seconds a wait for a message lasts before it is simply renewed


class AnnouncedDispatcher(EventDispatcher):
    """The node's reader of session streams on Redis Cluster (see the module's doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pubsub: PubSub | None = None
        self._channels: dict[str, str] = {}  # channel -> stream key, subscribed or asked
        self._due: set[str] = set()  # stream keys to read
        self._failure: BaseException | None = None  # what ended the receiver

    @property
    def holds_connection(self) -> bool:
        return self._pubsub is not None

    def _changed(self) -> None:
        self._stale = True
        self._wakeup.set()

    async def _run(self) -> None:
        backoff = RETRY_MIN
        while True:
            if not self._groups:
                await self._drop_connection()
                self._wakeup.clear()
                if not self._groups:
                    await self._wakeup.wait()
                continue
            try:
                await self._follow()
                backoff = RETRY_MIN
            except REDIS_ERRORS as exc:
                log.warning(
                    "event dispatcher lost Redis (%s); reconnecting in %.2fs",
                    type(exc).__name__,
                    backoff,
                )
                await self._drop_connection()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)

    async def _follow(self) -> None:
        """Until the node's last listener leaves: keep the subscriptions in step with the
        watched streams, and read the streams that are due."""
        await self._drop_connection()  # a previous run's, if the last listener came back
        pubsub = self._pubsub = self._redis.pubsub()
        self._failure = None
        receiver: asyncio.Task[None] | None = None
        try:
            while self._groups:
                self._wakeup.clear()
                await self._subscribe(pubsub)
                if receiver is None:
                    receiver = asyncio.create_task(
                        self._receive(pubsub), name="event announcements"
                    )
                if self._failure is not None:
                    raise self._failure
                if self._due:
                    await self._read_due()
                    continue
                await self._wakeup.wait()
        finally:
            if receiver is not None:
                receiver.cancel()
                await asyncio.gather(receiver, return_exceptions=True)

    async def _subscribe(self, pubsub: PubSub) -> None:
        keys = self.registry.keys
        wanted: dict[str, str] = {}
        for key, group in self._groups.items():
            listener = next(iter(group))
            wanted[keys.events_channel(listener.call_id, listener.session_id)] = key
        new = [channel for channel in wanted if channel not in self._channels]
        gone = [channel for channel in self._channels if channel not in wanted]
        if new:
            self._channels.update((channel, wanted[channel]) for channel in new)
            await pubsub.subscribe(*new)  # read once Redis confirms: see _receive
        if gone:
            for channel in gone:
                del self._channels[channel]
            await pubsub.unsubscribe(*gone)

    async def _receive(self, pubsub: PubSub) -> None:
        """Turn confirmations and announcements into streams due for a read."""
        try:
            while True:
                message = await pubsub.get_message(timeout=RECEIVE_TIMEOUT)
                if message is None or message["type"] not in ("subscribe", "message"):
                    continue
                key = self._channels.get(message["channel"])
                if key is not None:
                    self._due.add(key)
                    self._wakeup.set()
        except REDIS_ERRORS as exc:
            self._failure = exc
            self._wakeup.set()

    async def _read_due(self) -> None:
        """Read every due stream from the dispatcher's position: one XREAD per hash slot,
        the slots concurrently."""
        due = [key for key in self._due if key in self._positions]
        self._due.clear()
        by_slot: dict[int, list[str]] = defaultdict(list)
        for key in due:
            by_slot[key_slot(key.encode())].append(key)
        replies = await asyncio.gather(
            *(
                self._redis.xread(
                    {key: self._positions[key] for key in slot_keys}, count=self.read_count
                )
                for slot_keys in by_slot.values()
            )
        )
        for reply in replies:
            self._fan_out(reply)
            streams: Any = reply.items() if isinstance(reply, dict) else reply
            for key, entries in streams:
                if len(entries) >= self.read_count:
                    self._due.add(key)  # there may be more

    async def _drop_connection(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._channels.clear()
        self._due.clear()
        if pubsub is None:
            return
        try:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        except REDIS_ERRORS:
            pass
