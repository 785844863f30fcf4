"""Redis Cluster connection pools that wait when they are full, and never close a
connection under the command using it.

redis-py's asyncio ``ClusterNode`` holds up to ``max_connections`` connections per shard and
raises ``MaxConnectionsError`` at once when all of them are busy: a burst (a reaping node
sends ``REAP_CONCURRENCY`` commands to the ``{g}`` shard at once) fails by the dozen. Worse,
``MaxConnectionsError`` is a ``ConnectionError``: a pipeline that meets one makes redis-py
reset the whole client (``RedisCluster.aclose``), which disconnects every connection of
every shard, including those other tasks are halfway through using. Those fail with
``AttributeError: 'NoneType' object has no attribute 'writelines'`` (a connection closed
while it was connecting) or "Connection closed by server", and subscriptions drop.

A client made here behaves as ``BlockingConnectionPool`` does for a single Redis:

* a command or a pipeline waits for a free connection to its shard, first come first
  served, for up to the socket timeout; then it raises ``PoolTimeout``, a ``RedisError``
  that is not a ``ConnectionError``, so that redis-py does not reset the client over it;
* closing a shard's connections (``aclose``, the clean-up after a failed command, a
  topology change) closes the idle ones at once and the busy ones when their command
  returns, as redis-py already does when it marks connections for a reconnect.

redis-py makes ``ClusterNode`` objects itself wherever it meets a shard (the start-up
nodes, ``CLUSTER SLOTS``, a ``MOVED`` to a new primary after a failover), with no class to
pass in. Every node enters the client's caches through ``NodesManager.set_nodes``, so the
nodes manager of a client made here turns each node it is handed into a ``WaitingNode``:
the same object with the same state, with these methods.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode, NodesManager, PipelineCommand
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

#: Seconds a command waits for a connection when the client has no socket timeout.
DEFAULT_WAIT = 5.0


class PoolTimeout(RedisError):
    """No connection to a shard came free in time. Not a ``ConnectionError``: redis-py
    answers those by resetting the whole client, which a busy pool does not call for."""


class _Idle(deque[Connection]):
    """A node's idle connections; putting one back wakes the first command waiting."""

    def __init__(self, connections: Iterable[Connection], maxlen: int) -> None:
        super().__init__(connections, maxlen)
        self.waiters: deque[asyncio.Future[None]] = deque()

    def append(self, connection: Connection) -> None:
        super().append(connection)
        self.wake()

    def wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
                return


class WaitingNode(ClusterNode):
    """A shard's pool that waits when full (see the module's docstring)."""

    __slots__ = ()  # the layout of ClusterNode, so that a node can become one

    @classmethod
    def adopt(cls, node: ClusterNode) -> None:
        if isinstance(node, cls):
            return
        node._free = _Idle(node._free, node.max_connections)
        node.__class__ = cls

    @property
    def _idle(self) -> _Idle:
        return cast(_Idle, self._free)

    def _room(self) -> bool:
        return bool(self._free) or len(self._connections) < self.max_connections

    async def _wait_for_room(self) -> None:
        """Return once ``acquire_connection`` will not raise. Callers acquire at once after
        (no ``await`` in between), so the connection seen free is theirs."""
        idle = self._idle
        if not idle.waiters and self._room():
            return
        loop = asyncio.get_running_loop()
        timeout = float(self.connection_kwargs.get("socket_timeout") or DEFAULT_WAIT)
        deadline = loop.time() + timeout
        again = False
        while True:
            waiter = loop.create_future()
            # One woken but beaten to the connection keeps its place at the front.
            (idle.waiters.appendleft if again else idle.waiters.append)(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                idle.waiters.remove(waiter)
                if self._room():
                    idle.wake()  # a wake-up this waiter will not use goes to the next
                if isinstance(exc, TimeoutError):
                    raise PoolTimeout(
                        f"no connection to {self.name} came free within {timeout:g}s "
                        f"({self.max_connections} in use)"
                    ) from None
                raise
            idle.waiters.remove(waiter)
            if self._room():
                return
            again = True

    async def execute_command(self, *args: Any, asking: bool = False, **kwargs: Any) -> Any:
        await self._wait_for_room()
        return await super().execute_command(*args, asking=asking, **kwargs)

    async def execute_pipeline(self, commands: list[PipelineCommand]) -> bool:
        await self._wait_for_room()
        return await super().execute_pipeline(commands)

    async def _disconnect_and_release(self, connection: Connection) -> None:
        await super()._disconnect_and_release(connection)
        if self._room():
            self._idle.wake()  # a connection that failed to close is dropped: room made

    async def disconnect(self) -> None:
        """Close the idle connections now, the busy ones when their command returns."""
        self.update_active_connections_for_reconnect()
        await self.disconnect_free_connections()

    async def disconnect_free_connections(self) -> None:
        # Out of the idle queue while they close: no command picks one up half closed.
        idle = list(self._free)
        self._free.clear()
        try:
            await asyncio.gather(*(c.disconnect() for c in idle), return_exceptions=True)
        finally:
            for connection in idle:
                self._free.append(connection)


class _WaitingNodes(NodesManager):
    """Turns every node that enters the client's caches into a ``WaitingNode``."""

    __slots__ = ()

    def set_nodes(
        self,
        old: dict[str, ClusterNode],
        new: dict[str, ClusterNode],
        remove_old: bool = False,
    ) -> None:
        for node in new.values():
            WaitingNode.adopt(node)
        super().set_nodes(old, new, remove_old)


def waiting_cluster(hosts: Iterable[tuple[str, int]], **options: Any) -> RedisCluster:
    """A ``RedisCluster`` for these start-up nodes whose pools wait when full."""
    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], **options)
    manager = client.nodes_manager
    manager.__class__ = _WaitingNodes
    for node in manager.startup_nodes.values():
        WaitingNode.adopt(node)
    return client
