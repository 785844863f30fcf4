"""One factory for the Redis client a node uses."""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from fleet.settings import Settings

log = logging.getLogger("fleet.redis")


def connect(settings: Settings) -> Redis:
    """A client for ``FLEET_REDIS_URL``, or an embedded in-process Redis when it is unset."""
    if settings.redis_url is None:
        from fakeredis import FakeAsyncRedis, FakeServer

        log.warning(
            "FLEET_REDIS_URL is not set: using an embedded in-process Redis. Sessions live "
            "only in this process and are lost when it stops; run several nodes against a "
            "real Redis (FLEET_REDIS_URL=redis://host:6379/0)."
        )
        client: Redis = FakeAsyncRedis(server=FakeServer(), decode_responses=True)
        return client
    # A call that hangs longer than a third of the lease would let the lease lapse
    # unnoticed: time out well before that.
    timeout = min(5.0, max(0.5, settings.node_ttl / 3))
    return Redis.from_url(
        settings.redis_url.get_secret_value(),
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=max(1, int(settings.node_ttl)),
    )
