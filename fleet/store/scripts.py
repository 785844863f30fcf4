"""The Lua scripts: read from ``lua/*.lua``, loaded once per connection, called by SHA.

A Redis that restarted has an empty script cache; the first call then gets NOSCRIPT, loads
the script again and retries, so callers never see it.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from fleet.metrics import redis_timer


class AdmitResult(enum.StrEnum):
    """What ``place.lua`` answers: ``ok``, or the name of the limit that refused."""

    OK = "ok"
    NOT_READY = "not_ready"
    SETTLING = "settling"  # Redis lost its data: nodes are still writing back their sessions
    MAX_SESSIONS_PER_CALL = "max_sessions_per_call"
    MAX_SESSIONS = "max_sessions"
    NO_CAPACITY = "no_capacity"  # no candidate node that runs the worker has room
    ELSEWHERE = "elsewhere"  # a retry whose slot a node that is no candidate holds now
    OTHERS = "others"  # 'asked': the node asked cannot take it; name every candidate


class EndResult(enum.IntEnum):
    """What ``end_session.lua`` answers."""

    FENCED = -1
    MISSING = 0
    ENDED = 1
    ALREADY_ENDED = 2


class ReapResult(enum.StrEnum):
    """What ``reap.lua`` answers."""

    ALIVE = "alive"
    GONE = "gone"
    NO_ROOM = "no_room"
    MOVED = "moved"
    RELEASED = "released"


class HandoffResult(enum.StrEnum):
    """What ``handoff.lua`` answers."""

    MOVED = "moved"
    NO_ROOM = "no_room"
    GONE = "gone"


class ReserveResult(enum.StrEnum):
    """What ``idempotency_reserve.lua`` answers."""

    RESERVED = "reserved"
    PENDING = "pending"
    DONE = "done"
    MISMATCH = "mismatch"


# checkpoint.lua, emit.lua, report_metrics.lua and claim.lua: this owner is fenced out;
# create_session.lua: this start's idempotency reservation is no longer its own.
FENCED = -1
MISSING = -2  # checkpoint.lua, emit.lua, report_metrics.lua: no record (Redis lost it)
REPORTED = 1  # report_metrics.lua: written
TAKEN = -3  # claim.lua: another node holds the session now


class HeartbeatStatus(enum.StrEnum):
    OK = "ok"
    EXPIRED = "expired"
    NEW = "new"


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str


def read_script(name: str) -> Script:
    source = (
        resources.files(__package__ or "fleet.store").joinpath("lua", f"{name}.lua").read_text()
    )
    return Script(name, source, hashlib.sha1(source.encode()).hexdigest())


class Scripts:
    """Every script of fleet, callable by name."""

    NAMES = (
        "place",
        "forgo_start",
        "release",
        "create_session",
        "mark_running",
        "end_session",
        "request_close",
        "heartbeat",
        "expired_nodes",
        "reap",
        "forget_node",
        "reassert",
        "checkpoint",
        "emit",
        "claim",
        "handoff",
        "watch",
        "report_metrics",
        "idempotency_reserve",
        "idempotency_release",
        "send",
        "thread_claim",
        "thread_started",
        "thread_release",
        "thread_delete",
    )

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._scripts = {name: read_script(name) for name in self.NAMES}
        self.cluster = isinstance(redis, RedisCluster)

    async def load(self) -> None:
        for script in self._scripts.values():
            await self._redis.script_load(script.source)

    async def __call__(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        with redis_timer(name):
            try:
                return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._redis.script_load(script.source)
                return await self._redis.evalsha(script.sha, len(keys), *keys, *args)

    async def _run_in_order(
        self,
        calls: list[tuple[str, list[str], list[Any]]],
        before: Callable[[Any], None] | None,
    ) -> list[Any]:
        plain: list[Any] = []
        if before is not None:
            pipe = self._redis.pipeline(transaction=False)
            before(pipe)
            plain = await pipe.execute()
        return [*plain, *[await self(*call) for call in calls]]

    def queue(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        """Add a call to a pipeline (scripts must be loaded: see ``run_pipeline``)."""
        script = self._scripts[name]
        pipe.evalsha(script.sha, len(keys), *keys, *args)

    async def run_pipeline(
        self,
        calls: list[tuple[str, list[str], list[Any]]],
        before: Callable[[Any], None] | None = None,
    ) -> list[Any]:
        """Run several script calls in one round trip, after any plain commands ``before``
        queues (their results come first). Calls that met an empty script cache (NOSCRIPT:
        Redis restarted) are run again, alone, after a reload.

        redis-py's Cluster pipelines refuse scripts: on Cluster the calls go one after
        the other instead (in order: a later call may need an earlier one's write)."""
        if self.cluster:
            return await self._run_in_order(calls, before)
        pipe = self._redis.pipeline(transaction=False)
        if before is not None:
            before(pipe)
        offset = len(pipe)
        for name, keys, args in calls:
            self.queue(pipe, name, keys, args)
        with redis_timer("+".join(dict.fromkeys(name for name, _, _ in calls))):
            results: list[Any] = await pipe.execute(raise_on_error=False)
        for i, result in enumerate(results):
            if isinstance(result, NoScriptError) and i >= offset:
                results[i] = await self(*calls[i - offset])
            elif isinstance(result, Exception):
                raise result
        return results
