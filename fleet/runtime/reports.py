"""Per-session metrics on record: the owner reports each worker's ``ctx.metrics`` into its
session's record, so that any node answers ``…/metrics``, during the session and after it.

Every ``FLEET_METRICS_REPORT_INTERVAL`` seconds the node writes the metrics of the sessions
whose values changed since their last report, all in one pipelined round trip
(``report_metrics.lua``, fenced by owner and epoch: a node that lost a session cannot
overwrite what its new owner reports). A session whose metrics did not change costs no
Redis call. The end carries the final values in the same step as the end itself
(``end_session.lua``).

What a worker puts in ``ctx.metrics`` is checked before it leaves the node: string names of
1 to ``MAX_NAME_CHARS`` characters, numbers (int or float, not bool; floats finite, ints
within 64 bits), at most ``MAX_METRICS`` of them. Anything else is dropped with one warning
per session. Integers stay integers: JSON keeps them apart from floats, all the way to the
client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import numbers
import time
from collections.abc import Mapping

from fleet.runtime.session import LocalSession
from fleet.settings import Settings
from fleet.store import REDIS_ERRORS
from fleet.store.registry import Registry
from fleet.store.scripts import REPORTED

log = logging.getLogger("fleet.reports")

MAX_METRICS = 64
MAX_NAME_CHARS = 64
_INT_LIMIT = 2**63  # a signed 64-bit integer: what every reader of the JSON can hold

Metrics = dict[str, int | float]


def _number(value: object) -> int | float | None:
    if type(value) is float:  # the usual cases first: the ABC checks below are slower
        return value if math.isfinite(value) else None
    if type(value) is int:
        return value if -_INT_LIMIT <= value < _INT_LIMIT else None
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        whole = int(value)
        return whole if -_INT_LIMIT <= whole < _INT_LIMIT else None
    if isinstance(value, numbers.Real):
        real = float(value)
        return real if math.isfinite(real) else None
    return None


def reportable(raw: object) -> tuple[Metrics, list[str]]:
    """The part of a worker's ``ctx.metrics`` that can be reported (plain ints and floats),
    and the names of what was dropped. Never raises, whatever the worker put there."""
    if not isinstance(raw, Mapping):
        return {}, [f"ctx.metrics is a {type(raw).__name__}, not a dict"]
    clean: Metrics = {}
    dropped: list[str] = []
    try:
        for name, value in raw.items():
            number = _number(value)
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
                dropped.append(repr(name)[:MAX_NAME_CHARS])
            elif number is None or len(clean) >= MAX_METRICS:
                dropped.append(name)
            else:
                clean[name] = number
    except Exception as exc:  # a Mapping of the worker's own that fails to iterate
        return {}, [f"ctx.metrics could not be read ({type(exc).__name__})"]
    return clean, dropped


def _same(a: Metrics, b: Metrics) -> bool:
    """Equal values of equal types (1 == 1.0 == True in Python, not in the report)."""
    return a == b and all(type(value) is type(b[name]) for name, value in a.items())


def _to_json(metrics: Metrics) -> str:
    return json.dumps(metrics, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class MetricsReports:
    """The node's reporter. ``sessions``: the node's running sessions, by ref."""

    def __init__(
        self, registry: Registry, settings: Settings, sessions: Mapping[str, LocalSession]
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.node_id = settings.node_id
        self._sessions = sessions
        # Refs of sessions whose metrics were warned about: kept while the session is in
        # ``sessions`` (which it still is while its end is written).
        self._warned: set[str] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.metrics_report_interval)
            try:
                await self.report()
            except REDIS_ERRORS as exc:
                log.warning(
                    "metrics report failed: %s", type(exc).__name__, extra={"node_id": self.node_id}
                )
            except Exception:
                log.exception("metrics report failed", extra={"node_id": self.node_id})

    async def report(self) -> int:
        """Report every session whose metrics changed since its last report, in one round
        trip; the number written. A session that moved (fenced) or whose record Redis lost
        is left to the maintenance pass, which stops or restores it."""
        self._warned.intersection_update(self._sessions.keys())
        due: list[tuple[LocalSession, Metrics]] = []
        for session in list(self._sessions.values()):
            if session.done.is_set():
                continue
            metrics = self._changed(session)
            if metrics is not None:
                due.append((session, metrics))
        if not due:
            return 0
        now = time.time()
        codes = await self.registry.report_metrics(
            self.node_id,
            [(s.ref, s.record.epoch, _to_json(metrics)) for s, metrics in due],
            now,
        )
        written = 0
        for (session, metrics), code in zip(due, codes, strict=True):
            if code == REPORTED:
                # The record a restore would write back holds the last report too.
                session.record.metrics = metrics
                session.record.metrics_reported_at = now
                written += 1
        return written

    def final(self, session: LocalSession) -> str:
        """The session's last metrics (JSON) for its end to record, or ``""`` when the last
        report holds them already."""
        metrics = self._changed(session)
        return "" if metrics is None else _to_json(metrics)

    def _changed(self, session: LocalSession) -> Metrics | None:
        """The session's reportable metrics if they differ from its last report (the record's,
        as written at start, by a report, or by the previous owner of a resumed session)."""
        metrics, dropped = reportable(session.ctx.metrics)
        if dropped and session.ref not in self._warned:
            self._warned.add(session.ref)
            more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
            log.warning(
                "ctx.metrics: not reported: %s (metrics are at most %d numbers, int or float, "
                "named by strings of 1-%d characters); not said again for this session",
                ", ".join(dropped[:5]) + more,
                MAX_METRICS,
                MAX_NAME_CHARS,
                extra=session.log_extra,
            )
        return None if _same(metrics, session.record.metrics) else metrics
