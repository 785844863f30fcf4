"""Prometheus metrics. Labels are bounded sets (states, reasons, codes, route templates):
never a session id, call id or raw path, so the series count does not grow with traffic.

Gauges declare how gunicorn's worker processes combine (``multiprocess_mode``): per-node
figures add up across the pod's processes; fleet-wide figures take the max.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip

SESSIONS_ACTIVE = Gauge(
    "fleet_sessions_active",
    "Sessions this node runs, by state.",
    ["state"],
    multiprocess_mode="livesum",
)
SESSIONS_STARTED = Counter("fleet_sessions_started", "Sessions started on this node.")
SESSIONS_ENDED = Counter(
    "fleet_sessions_ended", "Sessions ended on this node, by end reason.", ["reason"]
)
SESSION_START_SECONDS = Histogram(
    "fleet_session_start_seconds",
    "Time from a start request to the session running.",
    buckets=LATENCY_BUCKETS,
)
SESSION_CLOSE_SECONDS = Histogram(
    "fleet_session_close_seconds",
    "Time from a close request reaching the owner to the session ended.",
    buckets=LATENCY_BUCKETS,
)
ADMISSION_REJECTED = Counter(
    "fleet_admission_rejected", "Start requests refused, by code.", ["code"]
)
CHECKPOINTS = Counter("fleet_checkpoints", "Checkpoint writes, by result.", ["result"])
CHECKPOINT_BYTES = Histogram(
    "fleet_checkpoint_bytes",
    "Size of saved checkpoints.",
    buckets=(64, 256, 1024, 4096, 16384, 65536, 262144, 1048576),
)
EVENTS_EMITTED = Counter("fleet_events_emitted", "Events appended to session streams.")
EVENT_LISTENERS = Gauge(
    "fleet_event_listeners", "Open event streams on this node.", multiprocess_mode="livesum"
)
FAILOVERS = Counter("fleet_failovers", "Sessions taken from dead nodes, by result.", ["result"])
REDIS_UP = Gauge(
    "fleet_redis_up", "1 when the last Redis call succeeded.", multiprocess_mode="livemin"
)
REDIS_COMMAND_SECONDS = Histogram(
    "fleet_redis_command_seconds",
    "Latency of fleet's Redis operations, by operation.",
    ["command"],
    buckets=LATENCY_BUCKETS,
)
LEASE_RENEWAL_FAILURES = Counter("fleet_node_lease_renewal_failures", "Lease renewals that failed.")
LEASE_RENEWAL_GAP_MAX = Gauge(
    "fleet_node_lease_renewal_gap_max_seconds",
    "The longest time between two successful lease renewals since the node started "
    "(renewals are due every FLEET_NODE_TTL / 3; the lease lapses after FLEET_NODE_TTL).",
    multiprocess_mode="livemax",
)
LOOP_LAG_SECONDS = Histogram(
    "fleet_event_loop_lag_seconds",
    "How late the node's event loop woke a timer, probed every 100 ms: how long any "
    "callback (a request, a session, a lease renewal) may wait behind other work.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
NODE_DRAINING = Gauge(
    "fleet_node_draining", "1 while this node drains.", multiprocess_mode="livemax"
)
NODE_READY = Gauge("fleet_node_ready", "1 while this node is ready.", multiprocess_mode="livemin")
NODES_LIVE = Gauge(
    "fleet_nodes_live", "Live nodes in the registry, as this node sees it.", multiprocess_mode="max"
)
BUILD_INFO = Gauge(
    "fleet_build_info", "Always 1; the version is a label.", ["version"], multiprocess_mode="max"
)
MESSAGE_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0
)  # fmt: skip  # a message may wait behind others, an answer on a slow model
MESSAGE_OUTCOMES = ("accepted", "duplicate", "busy", "full", "ended", "not_found", "too_large")
MESSAGES_SENT = Counter(
    "fleet_messages_sent",
    "Messages sent to sessions through this node, by outcome (duplicate: a retry with a "
    "known id; busy, full, ended, not_found, too_large: refused).",
    ["outcome"],
)
MESSAGE_REPLIES = Counter(
    "fleet_message_replies",
    "Replies by workers on this node, by where they go: sender (its sender waits with "
    "?wait: sent back to the asking node, and as an event) or event (a reply event only).",
    ["to"],
)
MESSAGE_DELIVERY_SECONDS = Histogram(
    "fleet_message_delivery_seconds",
    "Time from a message's send to its worker receiving it, on the owner (queueing "
    "behind earlier messages included).",
    buckets=MESSAGE_BUCKETS,
)
MESSAGE_ASK_SECONDS = Histogram(
    "fleet_message_ask_seconds",
    "Time from a send with ?wait to the reply reaching the asking node (answered asks only).",
    buckets=MESSAGE_BUCKETS,
)
HTTP_REQUESTS = Counter(
    "fleet_http_requests",
    "HTTP requests, by route template and status class.",
    ["method", "route", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "fleet_http_request_duration_seconds",
    "HTTP request latency, by route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)


def init_labels() -> None:
    """Create every labelled series at zero, so that the first event after a start shows in
    ``increase()`` and ``rate()`` (a series that appears at 1 has no increase)."""
    from fleet.models import EndReason, State

    for state in State:
        if state is not State.ENDED:
            SESSIONS_ACTIVE.labels(state.value)
    for reason in EndReason:
        SESSIONS_ENDED.labels(reason.value)
    for code in (
        "max_sessions_per_call",
        "max_sessions",
        "no_capacity",
        "start_failed",
        "not_ready",
    ):
        ADMISSION_REJECTED.labels(code)
    for result in ("ok", "stale", "too_large", "error"):
        CHECKPOINTS.labels(result)
    for result in ("resumed", "lost"):
        FAILOVERS.labels(result)
    for outcome in MESSAGE_OUTCOMES:
        MESSAGES_SENT.labels(outcome)
    for to in ("sender", "event"):
        MESSAGE_REPLIES.labels(to)


_children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}


def labelled(metric: M, *values: str) -> M:
    """``metric.labels(*values)``, remembered: on the paths every request takes, the
    lookup behind ``labels`` (a lock, a tuple of str copies) costs more than the update.
    fleet never removes a series, and label sets are bounded, so the memo is too."""
    key = (metric, values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found  # type: ignore[return-value]


@contextmanager
def redis_timer(operation: str) -> Iterator[None]:
    """Time one Redis operation (a script by name, or a named read): a bounded label set."""
    began = time.perf_counter()
    try:
        yield
    finally:
        labelled(REDIS_COMMAND_SECONDS, operation).observe(time.perf_counter() - began)
