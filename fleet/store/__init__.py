"""Everything that speaks to Redis: connecting, key names, the Lua scripts and the registry."""

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

#: What a Redis call raises when Redis does not answer or refuses: callers that ride out
#: outages catch these.
REDIS_ERRORS = (RedisError, OSError)

#: Attempts after the first, for a call that met a connection error or a timeout.
RETRIES = 3


def command_retry() -> Retry:
    """How a Redis call that met a connection error or a timeout is tried again before it
    is an error: on a fresh connection (redis-py drops the failed one), after 50, 100 and
    200 ms. A restarted Redis leaves every pooled connection stale; without this each of
    them failed one call. Every command fleet sends is safe to repeat: reads, and scripts
    that are idempotent or fenced (docs/architecture.md, "Retries")."""
    return Retry(ExponentialBackoff(cap=0.4, base=0.05), RETRIES)
