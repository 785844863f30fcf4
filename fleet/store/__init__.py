"""Everything that speaks to Redis: connecting, key names, the Lua scripts and the registry."""

from redis.exceptions import RedisError

#: What a Redis call raises when Redis does not answer or refuses: callers that ride out
#: outages catch these.
REDIS_ERRORS = (RedisError, OSError)
