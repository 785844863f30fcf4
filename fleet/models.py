"""What a session and a node look like: in Redis (flat hashes) and to clients (JSON)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from pydantic import BaseModel, Field


class State(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    ENDED = "ended"


class EndReason(enum.StrEnum):
    COMPLETED = "completed"
    CLOSED = "closed"
    FAILED = "failed"
    MAX_DURATION = "max_duration"
    IDLE = "idle"
    NODE_LOST = "node_lost"
    NODE_SHUTDOWN = "node_shutdown"


class CloseReason(enum.StrEnum):
    """Why ``ctx.closing`` was set: what the worker reads in ``ctx.close_reason``."""

    CLOSED = "closed"
    MAX_DURATION = "max_duration"
    IDLE = "idle"
    HANDOFF = "handoff"


@dataclass
class SessionRecord:
    """A session as the registry stores it: one Redis hash of strings."""

    session_id: str
    call_id: str
    call_type: str
    node_id: str
    params: dict[str, Any] = field(default_factory=dict)
    principal: str = ""
    worker: str = ""  # the named worker it runs; "" (records of older nodes): the default
    state: str = State.STARTING
    epoch: int = 1
    started_at: float = 0.0
    ended_at: float | None = None
    end_reason: str | None = None
    resumed_count: int = 0
    checkpoint_version: int = 0
    close_reason: str | None = None
    # The worker's ``ctx.metrics`` as last reported by the owner (``fleet/runtime/reports.py``),
    # and when (unix seconds; ``None``: never reported).
    metrics: dict[str, int | float] = field(default_factory=dict)
    metrics_reported_at: float | None = None
    resumable: bool = True
    inbox: str = "queue"  # the worker's busy policy: queue, reject or interrupt
    inbox_pos: str = "0-0"  # the last inbox entry the latest checkpoint consumed
    inbox_done: int = 0  # how many messages that is
    # The conversation this session is on (``fleet/runtime/threads.py``), and the session
    # whose latest checkpoint it started from (a ref; "" for none): its state until it
    # writes a checkpoint of its own, also after a failover.
    thread_id: str | None = None
    state_from: str = ""
    result: str | None = None  # what ``run`` returned, as JSON text (written with the end)
    error: str | None = None  # why it failed, in a word (written with the end)

    def to_hash(self) -> dict[str, str]:
        # Field by field from the instance's dict rather than ``asdict``, whose deep copy is
        # wasted work here, and with one JSON encoder for every record (``json.dumps`` with
        # separators builds one per call): this runs on every start.
        out: dict[str, str] = {}
        values = self.__dict__
        for key in _RECORD_FIELDS:
            value = values[key]
            if value is None:
                continue
            kind = type(value)
            if kind is str:
                out[key] = value
            elif key in _JSON_FIELDS:
                out[key] = _COMPACT.encode(value) if value else "{}"
            elif kind is bool:
                out[key] = "1" if value else "0"
            else:
                out[key] = str(value)
        return out

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> SessionRecord:
        ended_at = raw.get("ended_at")
        reported_at = raw.get("metrics_reported_at")
        return cls(
            session_id=raw["session_id"],
            call_id=raw["call_id"],
            call_type=raw.get("call_type", "default"),
            node_id=raw.get("node_id", ""),
            params=json.loads(raw.get("params", "{}")),
            principal=raw.get("principal", ""),
            worker=raw.get("worker", ""),
            state=raw.get("state", State.STARTING),
            epoch=int(raw.get("epoch", "1")),
            started_at=float(raw.get("started_at", "0")),
            ended_at=float(ended_at) if ended_at else None,
            end_reason=raw.get("end_reason") or None,
            resumed_count=int(raw.get("resumed_count", "0")),
            checkpoint_version=int(raw.get("checkpoint_version", "0")),
            close_reason=raw.get("close_reason") or None,
            metrics=json.loads(raw.get("metrics", "{}")),  # JSON keeps ints ints
            metrics_reported_at=float(reported_at) if reported_at else None,
            resumable=raw.get("resumable", "1") == "1",
            inbox=raw.get("inbox", "queue"),
            inbox_pos=raw.get("inbox_pos", "0-0"),
            inbox_done=int(raw.get("inbox_done", "0")),
            thread_id=raw.get("thread_id") or None,
            state_from=raw.get("state_from", ""),
            result=raw.get("result"),
            error=raw.get("error") or None,
        )

    def info(self) -> SessionInfo:
        return SessionInfo(
            session_id=self.session_id,
            call_id=self.call_id,
            call_type=self.call_type,
            worker=self.worker,
            node_id=self.node_id,
            state=State(self.state),
            session_started_at=self.started_at,
            ended_at=self.ended_at,
            end_reason=EndReason(self.end_reason) if self.end_reason else None,
            epoch=self.epoch,
            resumed_count=self.resumed_count,
            checkpoint_version=self.checkpoint_version,
            thread_id=self.thread_id,
            result=None if self.result is None else json.loads(self.result),
            error=self.error,
        )


_RECORD_FIELDS = tuple(f.name for f in fields(SessionRecord))
_JSON_FIELDS = frozenset({"params", "metrics"})  # dicts, kept as JSON text
_COMPACT = json.JSONEncoder(separators=(",", ":"))


class SessionInfo(BaseModel):
    """A session as clients see it. Times are unix seconds."""

    session_id: str
    call_id: str
    call_type: str
    worker: str = Field(default="", description="The named worker the session runs.")
    node_id: str = Field(description="The node that runs (or last ran) the session.")
    state: State
    session_started_at: float
    ended_at: float | None = None
    end_reason: EndReason | None = None
    epoch: int = Field(description="Grows by one every time ownership changes.")
    resumed_count: int
    checkpoint_version: int
    thread_id: str | None = Field(default=None, description="The thread it runs on, if any.")
    result: Any = Field(
        default=None,
        description="What the worker's run returned (JSON), once the session has ended.",
    )
    error: str | None = Field(
        default=None,
        description="Why a failed session failed, in a word: the exception's class name, "
        "or a code such as invalid_result (details are in the node's log, never here).",
    )


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class SessionPage(BaseModel):
    sessions: list[SessionInfo]
    next_cursor: str | None = None


class CloseAccepted(BaseModel):
    state: Literal["closing"] = "closing"


class SessionMetrics(BaseModel):
    """``…/metrics`` of one session: the worker's ``ctx.metrics`` plus timings."""

    session_id: str
    call_id: str
    node_id: str
    state: State
    # int | float, in that order: an integer stays an integer, through JSON and back.
    metrics: dict[str, int | float]
    reported_at: float | None = Field(
        default=None,
        description="When these values were taken from the worker (unix seconds): now on "
        "the owner, which answers its live values; the owner's last report on any other "
        "node and after the end; null if the owner never reported any.",
    )
    started_at: float
    ended_at: float | None
    duration_seconds: float


class Checkpoint(BaseModel):
    version: int
    epoch: int
    saved_at: float
    state: Any


class NodeInfo(BaseModel):
    node_id: str
    host: str
    started_at: float
    last_heartbeat: float
    sessions: int
    capacity: int | None
    draining: bool
    version: str
    workers: list[str] = Field(default_factory=list, description="The workers it runs.")


class NodeList(BaseModel):
    nodes: list[NodeInfo]


class WorkerInfo(BaseModel):
    """A named worker, as ``GET /workers`` shows it."""

    name: str
    description: str = Field(description="The first line of the worker's docstring.")
    resumable: bool = Field(description="Whether its sessions resume elsewhere on failover.")
    migratable: bool = Field(description="Whether a draining node hands its sessions off at once.")
    inbox: str = Field(description="Its inbox policy: queue, reject or interrupt.")
    params_schema: dict[str, Any] | None = Field(
        description="The JSON schema of its Params model; null when it declares none."
    )
    nodes: list[str] = Field(description="The live nodes that run it.")


class WorkerList(BaseModel):
    workers: list[WorkerInfo]


class MigrateAccepted(BaseModel):
    state: Literal["migrating"] = "migrating"
    node_id: str = Field(description="The node the session is moving away from.")


class ThreadSession(BaseModel):
    """One session that ran on a thread. ``state`` and ``end_reason`` are null once its
    tombstone has expired (``FLEET_TOMBSTONE_TTL``); the thread remembers it longer."""

    call_id: str
    session_id: str
    started_at: float
    state: State | None = None
    end_reason: EndReason | None = None


class ThreadSessionRef(BaseModel):
    call_id: str
    session_id: str


class ThreadInfo(BaseModel):
    """A thread: its latest state (the latest checkpoint of its sessions), the session
    running on it, and its sessions, newest first."""

    thread_id: str
    state: Any = Field(description="The thread's latest state; null before any checkpoint.")
    checkpoint_version: int | None = Field(
        default=None, description="The version of that checkpoint in its session."
    )
    created_at: float
    updated_at: float = Field(
        description="The last change: a session started or ended, or a checkpoint saved."
    )
    live_session: ThreadSessionRef | None = None
    sessions: list[ThreadSession]
    next_cursor: str | None = None


class ThreadMessageAccepted(BaseModel):
    message_id: str
    call_id: str
    session_id: str
    started: bool = Field(description="Whether this send started the session.")


class ThreadMessageReply(ThreadMessageAccepted):
    reply: Any
