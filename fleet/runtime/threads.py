"""Threads on a node: starting a session on a thread, and sending to a thread.

A thread is a principal's conversation that outlives its sessions (``fleet/store/threads.py``
keeps it). Starting a session on one takes three steps, each atomic on its own slot
(on Redis Cluster the thread and the session's call sit on different shards):

1. ``claim``: mark the thread busy with the new session's ref (``thread_claim.lua``), or
   learn which session holds it;
2. ``start``: admit and create the session as any other (its call's slot), with the
   thread's latest state and where it came from (``state_from``) in its record;
3. ``started``: the session is the thread's latest (``thread_started.lua``).

Its end (``end_session.lua``, then ``thread_release.lua``) frees the thread. A crash
between two steps leaves the thread marked busy by a session that never started, or that
ended: the next request on the thread finds the holder over (its record is ended, or
missing ``START_GRACE`` seconds after the claim) and releases it, fenced by the holder's
ref, before it claims. docs/architecture.md (Threads) walks through each case.

A send to a thread goes to its live session, or starts one and delivers the message
before the session counts as started: a racing send waits for that mark, so the
messages reach the session in the order the thread accepted them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fleet.errors import SessionEnded, SessionNotFound, ThreadBusy
from fleet.models import SessionRecord, State
from fleet.runtime.inbox import Conversations, SendResult
from fleet.store import REDIS_ERRORS
from fleet.store.idempotency import Reservation
from fleet.store.keys import make_ref, split_ref
from fleet.store.registry import Registry
from fleet.store.threads import Claim

log = logging.getLogger("fleet.threads")

#: Seconds a claim may go without its session's record before the claim counts as
#: abandoned (its starter died): far above a start's few milliseconds, retries included.
START_GRACE = 10.0
#: While a racing start on the thread is under way, a send looks again this often...
BUSY_POLL = 0.02
#: ... for at most this long (then 409 ``thread_busy``).
BUSY_WAIT = START_GRACE + 5.0


class Holder(enum.StrEnum):
    """What became of the session a busy thread is claimed for."""

    RUNNING = "runs"
    STARTING = "is starting"  # no record yet, within START_GRACE of the claim
    ENDED = "ended"
    ABANDONED = "never started"  # no record START_GRACE after the claim


@dataclass(frozen=True)
class OnThread:
    """What a session started on a thread gets: the thread, its latest state, and the
    session whose checkpoint that state is (``""``: none yet)."""

    thread_id: str
    state_from: str = ""
    state: Any = None


class StartSession(Protocol):
    """``Node.start_session``, seen from here."""

    async def __call__(
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
    ) -> SessionRecord: ...


@dataclass(frozen=True)
class ThreadSend:
    """Where a send to a thread went, and what came of it."""

    call_id: str
    session_id: str
    sent: SendResult
    started: bool  # the send started the session


class Threads:
    def __init__(
        self,
        registry: Registry,
        start: StartSession,
        close: Callable[[str, str], Awaitable[Any]],
        conversations: Conversations,
    ) -> None:
        self.registry = registry
        self._start = start
        self._close = close
        self._conversations = conversations

    async def start(
        self,
        call_id: str,
        call_type: str,
        params: dict[str, Any],
        principal: str = "",
        resumable: bool = True,
        *,
        worker: str | None = None,
        thread_id: str | None = None,
        once: Reservation | None = None,
    ) -> SessionRecord:
        """Start a session, on ``thread_id`` if given. Raises ThreadBusy while another
        session runs on the thread, and whatever a start raises."""
        if thread_id is None:
            return await self._start(
                call_id, call_type, params, principal, resumable, worker=worker, once=once
            )
        session_id = secrets.token_hex(16)
        ref = make_ref(call_id, session_id)
        claim = await self.registry.claim_thread(principal, thread_id, ref)
        if not claim.claimed and await self._repaired(principal, thread_id, claim):
            claim = await self.registry.claim_thread(principal, thread_id, ref)
        if not claim.claimed:
            raise self.busy(thread_id, claim.live)
        record = await self._start_claimed(
            claim,
            call_id,
            call_type,
            params,
            principal,
            resumable,
            thread_id,
            session_id,
            once,
            worker,
        )
        await self._mark_started(record)
        return record

    async def send(
        self,
        principal: str,
        thread_id: str,
        type: str,
        data_json: str,
        *,
        call_id: str,
        params: dict[str, Any],
        worker: str | None = None,
        client_id: str = "",
        wait: float | None = None,
    ) -> ThreadSend:
        """Send to the thread's live session, or start one on the thread (in ``call_id``,
        with ``params``) and deliver this message to it first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_WAIT
        while True:
            session_id = secrets.token_hex(16)
            claim = await self.registry.claim_thread(
                principal, thread_id, make_ref(call_id, session_id)
            )
            appended: Callable[[], Awaitable[None]] | None = None
            if claim.claimed:
                record = await self._start_claimed(
                    claim,
                    call_id,
                    "default",
                    params,
                    principal,
                    True,
                    thread_id,
                    session_id,
                    worker=worker,
                )
                target = (call_id, session_id)
                appended = functools.partial(self._mark_started, record)
            else:
                # A holder marked started is sent to at once; should it turn out to be over,
                # the send says so and the thread is repaired then.
                holder = Holder.RUNNING if claim.live_started else await self._holder(claim)
                if holder in (Holder.ENDED, Holder.ABANDONED):
                    await self._release(principal, thread_id, claim, holder)
                    continue
                if holder is Holder.STARTING:  # a racing send is starting the session
                    if loop.time() >= deadline:
                        raise self.busy(thread_id, claim.live)
                    await asyncio.sleep(BUSY_POLL)
                    continue
                target = split_ref(claim.live)
            try:
                sent = await self._conversations.send(
                    *target,
                    type,
                    data_json,
                    client_id=client_id,
                    wait=wait,
                    principal=principal,
                    appended=appended,
                )
            except (SessionEnded, SessionNotFound):
                if not claim.claimed and await self._repaired(principal, thread_id, claim):
                    continue
                raise
            return ThreadSend(*target, sent, started=claim.claimed)

    # -- the steps ----------------------------------------------------------------------
    async def _start_claimed(
        self,
        claim: Claim,
        call_id: str,
        call_type: str,
        params: dict[str, Any],
        principal: str,
        resumable: bool,
        thread_id: str,
        session_id: str,
        once: Reservation | None = None,
        worker: str | None = None,
    ) -> SessionRecord:
        """Start the session the thread was claimed for, from the thread's state; give
        the claim back if it does not start."""
        ref = make_ref(call_id, session_id)
        try:
            state_from, envelope = await self.registry.state_envelope(
                claim.latest, claim.state_from
            )
            thread = OnThread(
                thread_id, state_from, json.loads(envelope)["state"] if envelope else None
            )
            return await self._start(
                call_id,
                call_type,
                params,
                principal,
                resumable,
                worker=worker,
                once=once,
                session_id=session_id,
                thread=thread,
            )
        except BaseException:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.registry.release_thread(principal, thread_id, ref)
            raise

    async def _mark_started(self, record: SessionRecord) -> None:
        assert record.thread_id is not None
        ref = make_ref(record.call_id, record.session_id)
        before = await self.registry.thread_started(
            record.principal, record.thread_id, ref, record.state_from, record.started_at
        )
        if before is None:
            # Only a repair releases a claim, and only one older than START_GRACE whose
            # session it did not find: this start took that long. It must not run beside
            # whatever holds the thread now.
            log.error(
                "thread %s was released while this session started; closing it",
                record.thread_id,
                extra={"session_id": record.session_id, "call_id": record.call_id},
            )
            with contextlib.suppress(*REDIS_ERRORS):
                await self._close(record.call_id, record.session_id)
            raise self.busy(record.thread_id, "")
        # Checkpoints that held the thread's state before now keep a tombstone's time.
        stale = {r for r in before if r and r != record.state_from}
        with contextlib.suppress(*REDIS_ERRORS):
            await self.registry.expire_checkpoints(sorted(stale))

    # -- repairs ------------------------------------------------------------------------
    async def _holder(self, claim: Claim) -> Holder:
        """What became of the session a busy thread is claimed for: its record, and for a
        session with no record, how long ago the claim was made (Redis' clock)."""
        record = await self.registry.get(*split_ref(claim.live))
        if record is not None:
            return Holder.ENDED if record.state == State.ENDED else Holder.RUNNING
        seconds, micros = await self.registry.redis.time()
        age = seconds + micros / 1e6 - claim.live_since_ms / 1000
        return Holder.ABANDONED if age >= START_GRACE else Holder.STARTING

    async def _repaired(self, principal: str, thread_id: str, claim: Claim) -> bool:
        """Release the thread if the session holding it is over: ended, or never started
        (no record ``START_GRACE`` seconds after the claim). True if the holder is over,
        whoever released the thread: its own end releases it too, a moment after its
        record reads ended."""
        holder = await self._holder(claim)
        if holder not in (Holder.ENDED, Holder.ABANDONED):
            return False
        await self._release(principal, thread_id, claim, holder)
        return True

    async def _release(self, principal: str, thread_id: str, claim: Claim, holder: Holder) -> None:
        if await self.registry.release_thread(principal, thread_id, claim.live):
            # An ended holder is most often a race with its own release, not a crash.
            level = logging.INFO if holder is Holder.ENDED else logging.WARNING
            log.log(level, "thread %s released: its session %s %s", thread_id, claim.live, holder)

    @staticmethod
    def busy(thread_id: str, live: str) -> ThreadBusy:
        call_id, session_id = split_ref(live)
        where = f": session {session_id} in call {call_id}" if live else ""
        return ThreadBusy(f"a session runs on thread {thread_id} already{where}", live)
