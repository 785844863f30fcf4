"""Starting sessions: admission with placement, and running a session here, whether it
was asked of this node or forwarded to it by another (``placement.py``)."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fleet import metrics
from fleet.errors import (
    AdmissionRejected,
    FleetError,
    InvalidParams,
    NotAccepting,
    UnknownWorker,
)
from fleet.models import EndReason, SessionRecord, State
from fleet.runtime.control import Message
from fleet.runtime.placement import OK, Directory, Forwards, decode_start, refusal
from fleet.runtime.session import LocalSession, SessionHost
from fleet.runtime.threads import OnThread
from fleet.store import REDIS_ERRORS
from fleet.store.idempotency import Reservation
from fleet.store.keys import make_ref
from fleet.worker import WorkerSet, WorkerSpec

log = logging.getLogger("fleet.node")

#: Times a start is placed again after the node chosen refused it for draining.
PLACE_TRIES = 3


class StartHost(SessionHost, Protocol):
    """What starting sessions needs of the node (``fleet.runtime.node.Node``)."""

    sessions: dict[str, LocalSession]

    @property
    def draining(self) -> bool: ...

    def readiness(self) -> tuple[bool, str]: ...


class Starts:
    def __init__(
        self,
        host: StartHost,
        workers: WorkerSet,
        directory: Directory,
        forwards: Forwards,
        pending: set[str],
    ) -> None:
        """``pending``: refs admitted here but not yet in ``host.sessions`` (the
        maintenance pass leaves their slots alone)."""
        self.host = host
        self.node_id = host.node_id
        self.registry = host.registry
        self.workers = workers
        self.directory = directory
        self.forwards = forwards
        self._pending = pending
        #: A test hook: awaited just before a session's record is created here, so a test
        #: can hold a (forwarded) start exactly there.
        self.before_create: Callable[[SessionRecord], Awaitable[None]] | None = None

    async def start(
        self,
        call_id: str,
        call_type: str,
        params: dict[str, Any],
        principal: str = "",
        resumable: bool = True,
        *,
        worker: str | None = None,
        once: Reservation | None = None,
        session_id: str | None = None,
        thread: OnThread | None = None,
    ) -> SessionRecord:
        """Admit the session, place it (here, or on the node with most room that runs its
        worker) and start it there; returns once it runs."""
        began = time.perf_counter()
        ready, reason = self.host.readiness()
        if not ready and reason != "draining":  # a draining node places elsewhere
            metrics.ADMISSION_REJECTED.labels("not_ready").inc()
            raise NotAccepting("not_ready", f"this node does not take new sessions now ({reason})")
        name = worker or self.host.settings.default_worker or self.workers.default.name
        spec = self.workers.get(name)
        if spec is not None:
            params = spec.validate_params(params)
        elif name not in (known := await self.directory.known_workers()):
            names = sorted({*self.workers.names, *known})
            raise UnknownWorker(
                f"no live node runs a worker named {name!r}; known: {', '.join(names)}"
            )
        record = SessionRecord(
            session_id=session_id or secrets.token_hex(16),
            call_id=call_id,
            call_type=call_type,
            node_id=self.node_id,
            params=params,
            principal=principal,
            worker=name,
            started_at=time.time(),
            resumable=resumable and (spec.resumable if spec is not None else True),
            inbox=spec.inbox if spec is not None else "queue",
            thread_id=thread.thread_id if thread else None,
            state_from=thread.state_from if thread else "",
        )
        ref = make_ref(call_id, record.session_id)
        refused: set[str] = set()
        for _ in range(PLACE_TRIES):
            self._pending.add(ref)
            try:
                target = await self._place(record, refused)
                if target == self.node_id:
                    assert spec is not None
                    state = thread.state if thread else None
                    if not await self.run_here(record, spec, once, state):
                        # Only a record already under this random id could refuse it.
                        raise NotAccepting("not_ready", "the session record could not be written")
                    break
            finally:
                self._pending.discard(ref)
            try:
                record = await self.forwards.forward(target, record, once)
                break
            except NotAccepting as exc:
                if exc.code != "draining":
                    raise
                refused.add(target)  # it began draining since: place again
        else:
            raise NotAccepting("not_ready", "the nodes chosen for this session are draining")
        metrics.SESSIONS_STARTED.inc()
        metrics.SESSION_START_SECONDS.observe(time.perf_counter() - began)
        return record

    async def _place(self, record: SessionRecord, refused: set[str]) -> str:
        """The node that runs the session, its slot reserved there. With ``local``
        placement, this node first asks for itself alone: a start it takes reads no list
        of the fleet's nodes, so its cost does not grow with the fleet."""
        exclude = refused | ({self.node_id} if self.host.draining else set())
        mode = self.host.settings.placement
        try:
            if mode == "local" and self._runs(record.worker, exclude):
                here = await self.registry.place_here(
                    self.node_id, record.call_id, record.session_id, record.worker
                )
                if here is not None:
                    return here
                mode = "spread"  # this node cannot take it: the others, by room
            return await self._place_among(record, exclude, mode)
        except (NotAccepting, AdmissionRejected) as exc:
            metrics.ADMISSION_REJECTED.labels(exc.code).inc()
            raise

    def _runs(self, worker: str, exclude: set[str]) -> bool:
        return self.workers.get(worker) is not None and self.node_id not in exclude

    async def _place_among(self, record: SessionRecord, exclude: set[str], mode: str) -> str:
        fresh = False
        while True:
            candidates = [
                n
                for n in await self.directory.running(record.worker, fresh=fresh)
                if n not in exclude
            ]
            if self._runs(record.worker, exclude):
                candidates.insert(0, self.node_id)  # whatever the list says of this node
            try:
                return await self.registry.place(
                    self.node_id,
                    record.call_id,
                    record.session_id,
                    record.worker,
                    candidates or [self.node_id],
                    mode,
                )
            except AdmissionRejected as exc:
                if exc.code == "no_capacity" and not fresh:
                    fresh = True  # maybe a node joined since the list was read
                    continue
                raise

    async def run_here(
        self,
        record: SessionRecord,
        spec: WorkerSpec,
        once: Reservation | None,
        state: Any,
    ) -> bool:
        """Create the record of a session whose slot this node holds, and run it. False
        when a record was there already (a forwarded start its asker gave up: the slot is
        freed)."""
        ref = make_ref(record.call_id, record.session_id)
        record.node_id = self.node_id
        if self.before_create is not None:
            await self.before_create(record)
        try:
            created = await self.registry.create_running(record, once)
        except BaseException:
            # The write may have happened even though its answer was lost: end the record
            # if there is one (fenced, idempotent) and free the slot either way.
            with contextlib.suppress(*REDIS_ERRORS):
                await self.registry.end(record, EndReason.FAILED.value, error="start")
            raise
        if not created:
            await self.registry.release(self.node_id, record.call_id, record.session_id)
            return False
        session = LocalSession(self.host, record, spec.create(), state=state, running=True)
        self.host.sessions[ref] = session
        self.host.count_state(State.RUNNING, +1)
        session.start()
        if log.isEnabledFor(logging.INFO):  # not even the log's extra at warning
            log.info("session started", extra=session.log_extra)
        return True

    async def accept(
        self, message: Message, reply: Callable[[str, str, str], Awaitable[None]]
    ) -> None:
        """A start another node forwarded here (``place``): placement reserved this node's
        slot. Run it and say so, or give the slot back and say why not."""
        record, once = decode_start(message.payload)
        ref = message.ref
        self._pending.add(ref)
        try:
            answer = await self._accept(record, once)
        except FleetError as exc:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.registry.release(self.node_id, record.call_id, record.session_id)
            errors = exc.errors if isinstance(exc, InvalidParams) else None
            answer = refusal(exc.code, exc.detail, errors)
        finally:
            self._pending.discard(ref)
        if answer is not None:
            await reply(ref, message.reply_to, answer)

    async def _accept(self, record: SessionRecord, once: Reservation | None) -> str | None:
        spec = self.workers.get(record.worker)
        if spec is None:
            raise UnknownWorker(f"node {self.node_id} does not run worker {record.worker!r}")
        ready, reason = self.host.readiness()
        if not ready:
            code = "draining" if reason == "draining" else "not_ready"
            raise NotAccepting(code, f"node {self.node_id} does not take sessions now ({reason})")
        record.params = spec.validate_params(record.params)
        record.resumable = record.resumable and spec.resumable
        record.inbox = spec.inbox
        state = None
        if record.state_from:  # a session on a thread starts from the thread's state
            envelope = (await self.registry.state_envelope(record.state_from))[1]
            state = json.loads(envelope)["state"] if envelope else None
        if not await self.run_here(record, spec, once, state):
            return None  # the asker gave up on it: it waits for no answer
        return OK
