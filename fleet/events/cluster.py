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

The announcements use sharded pub/sub (``SPUBLISH``, Redis 7): a message stays on the
shard that holds its channel's slot, which is the stream's, instead of crossing the cluster
bus to every shard, so a busier fleet does not cost every shard more (docs/capacity.md).
The node subscribes (``SSUBSCRIBE``, one command per slot) on the shard that holds each
slot. Should a slot move, its shard drops the subscriptions (``sunsubscribe``): the node
forgets those channels and subscribes them again where the slot now is, which is followed
by a read like any new subscription, so nothing written meanwhile is missed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, cast

from redis.asyncio import ConnectionPool, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, SlotNotCoveredError

from fleet.events.dispatcher import EventDispatcher
from fleet.store import REDIS_ERRORS
from fleet.tasks import cancel_and_wait

# The slot map can be briefly incomplete (a failover): redis-py says so outside RedisError.
ERRORS = (*REDIS_ERRORS, RedisClusterException)
RECEIVE_TIMEOUT = 1.0  # seconds a wait for a message lasts before it is simply renewed


class AnnouncedDispatcher(EventDispatcher):
    """The node's reader of session streams on Redis Cluster (see the module's doc)."""

    read_errors = ERRORS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cluster = cast(RedisCluster, self._redis)
        self._pubsubs: dict[str, PubSub] = {}  # shard name -> its subscriber connection
        self._receivers: dict[str, asyncio.Task[None]] = {}  # shard name -> its reader
        self._channels: dict[str, str] = {}  # channel -> stream key, subscribed or asked
        self._shard_of: dict[str, str] = {}  # channel -> the shard it is subscribed on
        self._due: set[str] = set()  # stream keys to read
        self._failure: BaseException | None = None  # what ended a receiver
        self._moved = False  # a slot may have moved since the slot map was read

    @property
    def holds_connection(self) -> bool:
        return bool(self._pubsubs)

    def _changed(self) -> None:
        self._stale = True
        self._wakeup.set()

    async def _read(self) -> None:
        """Until the node's last listener leaves: keep the subscriptions in step with the
        watched streams, and read the streams that are due."""
        await self._drop_connection()  # a previous run's, if the last listener came back
        self._failure = None
        self._stale = True
        try:
            while self._groups:
                self._wakeup.clear()
                await self._subscribe()
                if self._failure is not None:
                    raise self._failure
                if self._due:
                    await self._read_due()
                    continue
                await self._wakeup.wait()
        except BaseException:
            self._moved = True  # a MOVED answer, or a shard gone: the map may be old
            raise

    async def _subscribe(self) -> None:
        if not self._stale and len(self._channels) == len(self._groups):
            return  # no stream came or went since the last look
        self._stale = False
        if self._moved:
            self._moved = False
            await self._cluster.nodes_manager.initialize()  # where each slot is now
        keys = self.registry.keys
        wanted: dict[str, str] = {}
        for key, group in self._groups.items():
            listener = next(iter(group))
            wanted[keys.events_channel(listener.call_id, listener.session_id)] = key
        for name, channels in self._new(wanted).items():
            pubsub = self._pubsubs[name]
            for slot_channels in _by_slot(channels).values():
                await pubsub.ssubscribe(*slot_channels)  # read once confirmed: see _receive
            if name not in self._receivers:
                self._receivers[name] = asyncio.create_task(
                    self._receive(pubsub), name="event announcements"
                )
        gone: dict[str, list[str]] = defaultdict(list)
        for channel in [c for c in self._channels if c not in wanted]:
            gone[self._shard_of.pop(channel)].append(channel)
            del self._channels[channel]
        for name, channels in gone.items():
            for slot_channels in _by_slot(channels).values():
                await self._pubsubs[name].sunsubscribe(*slot_channels)

    def _new(self, wanted: dict[str, str]) -> dict[str, list[str]]:
        """The wanted channels not yet subscribed, by the shard that holds each (taken as
        subscribed from here on)."""
        new: dict[str, list[str]] = defaultdict(list)
        for channel, key in wanted.items():
            if channel in self._channels:
                continue
            shard = self._cluster.get_node_from_key(channel)
            if shard is None:
                raise SlotNotCoveredError(f"no shard holds the slot of {channel}")
            new[shard.name].append(channel)
            self._shard_of[channel] = shard.name
            self._channels[channel] = key
            if shard.name not in self._pubsubs:
                self._pubsubs[shard.name] = _subscriber(shard)
        return new

    async def _receive(self, pubsub: PubSub) -> None:
        """Turn one shard's confirmations and announcements into streams due for a read;
        channels the shard dropped (their slot moved) are subscribed again."""
        try:
            while True:
                message = await pubsub.get_message(timeout=RECEIVE_TIMEOUT)
                if message is None:
                    continue
                kind, channel = message["type"], message["channel"]
                if kind == "sunsubscribe":
                    self._dropped(channel)
                    continue
                if kind not in ("ssubscribe", "smessage"):
                    continue
                key = self._channels.get(channel)
                if key is not None:
                    self._due.add(key)
                    self._wakeup.set()
        except Exception as exc:  # Redis' or not, the reader reconnects (see _run)
            self._failure = exc
            self._wakeup.set()

    def _dropped(self, channel: str) -> None:
        """A shard ended a subscription: ours (a stream no longer watched: nothing to do) or
        the server's, because the channel's slot moved. Then forget it, so that the next
        look subscribes it where the slot map, read again, says the slot is now. Should that
        shard not know it yet, it answers MOVED, which ends these connections, and every
        channel is subscribed anew after a pause."""
        if channel in self._channels:
            del self._channels[channel]
            self._shard_of.pop(channel, None)
            self._moved = True
            self._changed()

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
        receivers, self._receivers = self._receivers, {}
        pubsubs, self._pubsubs = self._pubsubs, {}
        self._channels.clear()
        self._shard_of.clear()
        self._due.clear()
        await cancel_and_wait(*receivers.values())
        for pubsub in pubsubs.values():
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except REDIS_ERRORS:
                pass


def _subscriber(shard: ClusterNode) -> PubSub:
    """A subscriber connection to one shard, of its own: not redis-py's ``ClusterPubSub``,
    which would route each ``SSUBSCRIBE`` again by its own map and take its connection
    from the pool that the node's commands share."""
    pool = ConnectionPool(
        connection_class=shard.connection_class, max_connections=1, **shard.connection_kwargs
    )
    return PubSub(connection_pool=pool)


def _by_slot(channels: list[str]) -> dict[int, list[str]]:
    """SSUBSCRIBE takes channels of one slot at a time."""
    slots: dict[int, list[str]] = defaultdict(list)
    for channel in channels:
        slots[key_slot(channel.encode())].append(channel)
    return slots
