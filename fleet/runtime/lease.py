"""The node's lease: one key renewed every ``FLEET_NODE_TTL / 3``, whatever the session count.

A session is alive while its owner's lease is. The lease also decides this node's readiness
(together with draining and the control channel): Redis answering and the lease held.

When a renewal finds that the lease had lapsed or was unknown (Redis lost its data), the
node re-checks its own sessions before it calls itself ready again (``recover``). When
Redis does not answer for longer than the lease, another node may own this node's sessions
by now: they are stopped (``lapse``), and their ends are written once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import ResponseError

from fleet import metrics
from fleet.settings import Settings
from fleet.store import REDIS_ERRORS
from fleet.store.registry import Registry
from fleet.store.scripts import HeartbeatStatus

log = logging.getLogger("fleet.lease")

#: Renewals that must fail in a row before the node calls itself not ready.
UNREADY_AFTER = 2


class Lease:
    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        *,
        info: Callable[[], dict[str, str]],
        recover: Callable[[], Awaitable[None]],
        lapse: Callable[[], None],
        changed: Callable[[], None],
        session_count: Callable[[], int],
    ) -> None:
        """``info``: what the node reports about itself at each renewal; ``recover``: re-check
        local sessions after a lapse or a Redis restart; ``lapse``: stop local sessions;
        ``changed``: readiness may have changed."""
        self.registry = registry
        self.settings = settings
        self.node_id = settings.node_id
        self._info = info
        self._recover = recover
        self._lapse = lapse
        self._changed = changed
        self._session_count = session_count
        self.redis_ok = False
        self.held = False
        self.failures = 0  # renewals failed in a row
        self._now = asyncio.Event()
        self._last_renewal: float | None = None
        self._longest_gap = 0.0  # between two successful renewals (a metric)
        self._run_id: str | None = None  # the Redis server's, as last seen (not on Cluster)
        self._problem = ""  # the last ResponseError text a renewal met, if any

    @property
    def _extra(self) -> dict[str, str]:
        return {"node_id": self.node_id}

    async def run(self) -> None:
        while True:
            # While Redis is away, knock more often: the node is ready again soon after
            # Redis is back, whatever the lease length.
            interval = self.settings.heartbeat_interval
            healthy = self.redis_ok and not self.failures
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._now.wait(), interval if healthy else min(interval, 0.25)
                )
            self._now.clear()
            await self.renew()

    def wake(self) -> None:
        """Renew now: something (the control channel dropping) suggests Redis is away."""
        self._now.set()

    async def renew(self) -> None:
        now = time.monotonic()
        try:
            # Retries inside the call (``command_retry``) must not outlast a renewal
            # interval: a lease that lapses while a call retries has to be noticed.
            async with asyncio.timeout(self.settings.heartbeat_interval):
                status = await self.registry.heartbeat(
                    self.node_id, self._info(), held_before=self._last_renewal is not None
                )
                run_id = await self.registry.server_run_id()
        except (*REDIS_ERRORS, TimeoutError) as exc:
            self._failed(exc, time.monotonic())  # as of now: a failed call may take a while
            return
        # Another server answers now (a Sentinel failover, a restart): it may lack writes
        # the old one took, the lease aside (a replica promoted before it had synced).
        replaced = None not in (run_id, self._run_id) and run_id != self._run_id
        self._run_id = run_id or self._run_id
        lapsed = (
            self._last_renewal is not None and now - self._last_renewal > self.settings.node_ttl
        )
        recovering = not self.redis_ok or not self.held
        self._problem = ""
        self.failures = 0
        if self._last_renewal is not None:
            self._longest_gap = max(self._longest_gap, now - self._last_renewal)
            metrics.LEASE_RENEWAL_GAP_MAX.set(self._longest_gap)
        self._last_renewal = now
        if status is not HeartbeatStatus.OK or lapsed or recovering or replaced:
            if replaced:
                log.warning(
                    "Redis is another server now (its run id changed): re-checking local sessions",
                    extra=self._extra,
                )
                self.redis_ok = False  # not ready until what it may lack is written back
                self._changed()
            elif self._session_count() or status is not HeartbeatStatus.OK:
                log.info("lease %s: re-checking local sessions", status.value, extra=self._extra)
            # Ready again only once what Redis may have lost is written back: until then
            # the node still says redis_unavailable.
            try:
                await self._recover()
            except REDIS_ERRORS:
                self.redis_ok = False
                self._changed()
                return
        self.redis_ok = True
        self.held = True
        self._changed()

    def _failed(self, exc: BaseException, now: float) -> None:
        metrics.LEASE_RENEWAL_FAILURES.inc()
        # Redis' own refusals (NOPERM, OOM, READONLY…) name the problem and hold no secret.
        problem = f"{type(exc).__name__}: {exc}" if isinstance(exc, ResponseError) else ""
        self.failures += 1
        if self.redis_ok or problem != self._problem:
            log.warning(
                "lease renewal failed: %s", problem or type(exc).__name__, extra=self._extra
            )
        self._problem = problem
        # Readiness follows the lease, not one error: the failed call was retried already
        # (``command_retry``), and a busy pool can still time out one renewal while Redis
        # is healthy. Two failures in a row (the next try comes within 250 ms) say Redis
        # is away. The lease itself only lapses after FLEET_NODE_TTL without a renewal.
        if self.failures >= UNREADY_AFTER:
            self.redis_ok = False
        if self._last_renewal is not None and now - self._last_renewal > self.settings.node_ttl:
            self._lapsed()
        self._changed()

    def _lapsed(self) -> None:
        """Redis did not answer for longer than the lease: another node may own our
        sessions now, so stop them. Their ends are written when Redis is back."""
        if self.held:
            log.error(
                "lease lapsed (Redis unreachable for over %.1fs): stopping %d local sessions",
                self.settings.node_ttl,
                self._session_count(),
                extra=self._extra,
            )
        self.held = False
        self._lapse()
