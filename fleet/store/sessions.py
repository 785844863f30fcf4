"""Session records and what is written under their fencing: create, run, checkpoint, emit,
close, claim for a new owner, end; and the maintenance pass's look at a node's sessions.

Every write a session's owner makes names the owner and epoch it was made under, and the
script refuses it once ownership has moved on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

from redis.crc import key_slot

from fleet.errors import IdempotencyInProgress
from fleet.metrics import redis_timer
from fleet.models import SessionRecord, State
from fleet.store.admission import Admission
from fleet.store.base import Call, to_json
from fleet.store.idempotency import Reservation
from fleet.store.keys import make_ref, split_ref
from fleet.store.scripts import FENCED, EndResult
from fleet.store.threads import release_thread_call

#: Seconds a node's close requests are kept unread: far longer than a maintenance pass
#: takes to read them; only a dead node's are ever left to expire.
CLOSES_TTL = 3600
# Sessions per watch.lua call: big enough to be cheap, small enough to keep Redis snappy.
WATCH_CHUNK = 500
# Sessions per report_metrics.lua call: each carries up to a few KB of metrics.
REPORT_CHUNK = 200


def ended_event(reason: str, result: str | None) -> str:
    """The data of ``session_ended``: the reason, and the result (JSON text) if any."""
    if result is None:
        return to_json({"end_reason": reason})
    return f'{{"end_reason":{to_json(reason)},"result":{result}}}'


class Sessions(Admission):
    def _create_call(self, record: SessionRecord, once: Reservation | None = None) -> Call:
        k = self.keys
        fields = [x for pair in record.to_hash().items() for x in pair]
        keys = [
            k.session(record.call_id, record.session_id),
            k.call_live(record.call_id),
            k.call_ended(record.call_id),
        ]
        once_args: list[str | int] = ["", "", "", ""]  # see create_session.lua
        if once is not None:
            keys.append(once.key)
            once_args = [
                once.token,
                once.fingerprint,
                record.info().model_dump_json(),
                self._settings.idempotency_ttl * 1000,
            ]
        return (
            "create_session",
            keys,
            [int(record.started_at * 1000), record.session_id, *once_args, *fields],
        )

    def _mark_running_call(self, record: SessionRecord, event: str, data: Any) -> Call:
        c, sid = record.call_id, record.session_id
        return (
            "mark_running",
            [self.keys.session(c, sid), self.keys.events(c, sid)],
            [
                record.node_id,
                record.epoch,
                self._settings.events_maxlen,
                event,
                to_json(data),
                self._announce(c, sid),
            ],
        )

    async def create(self, record: SessionRecord) -> bool:
        """Write a new record, or write back one Redis lost. Never overwrites. True when the
        record is in place: written now, or by an earlier try of this same write."""
        return await self.create_code(record) != 0

    async def create_code(self, record: SessionRecord) -> int:
        """``create``'s answer as ``create_session.lua`` gives it: 1 written, 2 there
        already (this same write, retried), 0 another record is there."""
        return int(await self.scripts(*self._create_call(record)))

    async def create_running(self, record: SessionRecord, once: Reservation | None = None) -> bool:
        """Write a new session's record as running. Its stream starts empty: the
        ``session_started`` event is made from the record (``fleet/events/listener.py``), so a
        session that emits nothing costs no stream. False if a record was there.

        With ``once`` (a start's idempotency reservation), the answer to the start is kept
        under its key in the same step; raises IdempotencyInProgress, creating nothing, if
        the reservation expired and another request holds the key now."""
        record.state = State.RUNNING
        result = int(await self.scripts(*self._create_call(record, once)))
        if result == FENCED:
            raise IdempotencyInProgress(
                "another request with this Idempotency-Key took it over; retry for its answer"
            )
        return bool(result)

    async def forgo_start(self, record: SessionRecord) -> bool:
        """Give up a forwarded start that was not answered in time (``forgo_start.lua``):
        True when the session was never created (and now never will be); False when the
        node it went to created it after all."""
        k = self.keys
        now = time.time()
        fields = [x for pair in record.to_hash().items() for x in pair]
        return bool(
            await self.scripts(
                "forgo_start",
                [k.session(record.call_id, record.session_id), k.call_ended(record.call_id)],
                [
                    record.session_id,
                    repr(now),
                    int(now * 1000),
                    self._settings.tombstone_ttl,
                    *fields,
                ],
            )
        )

    async def mark_running(self, record: SessionRecord, event: str, data: Any) -> str:
        """starting -> running for this owner and epoch, emitting the lifecycle ``event``
        (``session_started`` or ``session_resumed``). Returns the state, or ``lease_lost``."""
        return str(await self.scripts(*self._mark_running_call(record, event, data)))

    async def end(
        self,
        record: SessionRecord,
        reason: str,
        *,
        error: str = "",
        owner: str | None = None,
        any_epoch: bool = False,
        release_from: str | None = None,
        notify: tuple[str, Iterable[str]] = ("", ()),
        metrics: str = "",
    ) -> EndResult:
        """End a session (fenced by owner and epoch, emitting ``session_ended``) and release
        its slot, in one round trip.

        ``owner`` defaults to the record's node; the reaper passes the dead node with
        ``any_epoch``. ``release_from`` names the node whose slot to free (default: the
        owner; ``""`` for none). ``notify``: a message and the nodes to publish it to once
        the session is ended (now or before), in the same step. ``metrics``: the worker's
        final metrics (JSON) to record with the end; ``""`` keeps the last report. The
        record's ``result`` (what ``run`` returned) is kept with the tombstone.
        """
        message, nodes = notify
        k = self.keys
        c, sid = record.call_id, record.session_id
        owner = owner or record.node_id
        calls: list[Call] = [
            (
                "end_session",
                [
                    k.session(c, sid),
                    k.call_live(c),
                    k.call_ended(c),
                    k.checkpoint(c, sid),
                    k.events(c, sid),
                    k.inbox(c, sid),
                    k.inbox_ids(c, sid),
                ],
                [
                    owner,
                    "" if any_epoch else record.epoch,
                    reason,
                    repr(time.time()),
                    self._settings.tombstone_ttl,
                    error,
                    self._settings.events_maxlen,
                    ended_event(reason, record.result),
                    self._announce(c, sid),
                    message,
                    metrics,
                    record.result or "",
                    self._settings.thread_ttl if record.thread_id else self._settings.tombstone_ttl,
                    *(k.node_channel(node) for node in nodes),
                ],
            )
        ]
        if release_from != "":
            calls.append(self._release_call(release_from or owner, c, sid))
        results = await self.scripts.run_pipeline(calls)
        ended = EndResult(int(results[0]))
        if record.thread_id and ended in (EndResult.ENDED, EndResult.ALREADY_ENDED):
            # The thread's slot may be on another shard: a step of its own (a crash
            # before it is repaired by the next request on the thread: runtime/threads.py).
            # A session that wrote no checkpoint leaves the thread's state where it found
            # it, which is kept as long as the thread from now on.
            def keep_state(pipe: Any) -> None:
                source = k.checkpoint(*split_ref(record.state_from))
                pipe.expire(source, self._settings.thread_ttl, gt=True)

            before = keep_state if record.state_from else None
            release = release_thread_call(self.keys, self._settings, record)
            await self.scripts.run_pipeline([release], before=before)
        return ended

    async def checkpoint(
        self,
        record: SessionRecord,
        state_json: str,
        history: int,
        consumed: tuple[str, int] | None = None,
    ) -> int:
        """Save a checkpoint under the record's owner and epoch, as version
        ``record.checkpoint_version + 1`` (once: a retry of an applied write changes
        nothing); -1 when fenced out. ``consumed``: the last inbox entry the state has taken
        in and how many messages that makes, recorded with the state."""
        k = self.keys
        c, sid = record.call_id, record.session_id
        version = record.checkpoint_version + 1
        return int(
            await self.scripts(
                "checkpoint",
                [k.session(c, sid), k.checkpoint(c, sid), k.inbox(c, sid)],
                [
                    record.node_id,
                    record.epoch,
                    state_json,
                    repr(time.time()),
                    history,
                    version,
                    *(consumed or ("", 0)),
                ],
            )
        )

    async def emit(self, record: SessionRecord, type: str, data_json: str) -> str | int:
        """Append an event to the session's stream, fenced like a checkpoint. Returns the
        entry id, or ``FENCED`` / ``MISSING``."""
        c, sid = record.call_id, record.session_id
        result = await self.scripts(
            "emit",
            [self.keys.session(c, sid), self.keys.events(c, sid)],
            [
                record.node_id,
                record.epoch,
                self._settings.events_maxlen,
                type,
                data_json,
                self._announce(c, sid),
            ],
        )
        return result if isinstance(result, int) else str(result)

    async def claim(self, ref: str, previous: str, new_owner: str, message: str) -> int:
        """Give a session whose slot moved to ``new_owner``: epoch + 1, and a message to the
        new owner. Returns the new epoch, ``FENCED`` (ended or gone) or ``TAKEN`` (another
        node holds it now)."""
        return int(
            await self.scripts(
                "claim",
                [self.keys.session(*split_ref(ref))],
                [previous, new_owner, self.keys.node_channel_prefix(), message],
            )
        )

    async def request_close(
        self,
        call_id: str,
        session_id: str,
        reason: str,
        message: str,
        *,
        asker: str = "",
        principal: str = "",
    ) -> tuple[str, str, SessionRecord | None]:
        """Set the close flag, write ``session_closing`` and publish ``message`` to the
        owner (unless the owner is ``asker``), in one round trip. With ``principal``, a
        session someone else started counts as missing. Returns (status, owner, record):
        status ``missing``, ``closing`` or ``ended`` (then with the ended record)."""
        c, sid = call_id, session_id
        status, *rest = await self.scripts(
            "request_close",
            [self.keys.session(c, sid), self.keys.events(c, sid)],
            [
                reason,
                repr(time.time()),
                self.keys.node_channel_prefix(),
                message,
                asker,
                principal,
                self._settings.events_maxlen,
                to_json({"reason": reason}),
                self._announce(c, sid),
            ],
        )
        if status == "missing":
            return "missing", "", None
        owner, fields = str(rest[0]), rest[1:]
        record = None
        if status == "ended":
            record = SessionRecord.from_hash(dict(zip(fields[::2], fields[1::2], strict=True)))
        elif owner:
            # The owner's maintenance pass finds it here should the message be lost (a
            # step of its own: the node's slot is not the call's).
            await self.note_close(owner, make_ref(c, sid), reason)
        return str(status), owner, record

    async def note_close(self, owner: str, ref: str, reason: str) -> None:
        key = self.keys.node_closes(owner)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, ref, reason)
        pipe.expire(key, CLOSES_TTL)  # a dead node's requests go with it
        await pipe.execute()

    async def steady_look(self, node_id: str) -> tuple[dict[str, str], int]:
        """What a maintenance pass reads when nothing was lost: the close requests sent to
        the node since the last look (taken: each is seen once) and how many slots it
        holds. Two round trips when there are requests, else one."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(k.node_closes(node_id))
        pipe.scard(k.node_sessions(node_id))
        closes, count = await pipe.execute()
        if closes:
            await self.redis.hdel(k.node_closes(node_id), *closes)
        return cast(dict[str, str], closes), int(count)

    async def watch(
        self, node_id: str, sessions: list[tuple[str, int]]
    ) -> tuple[int, list[tuple[int, str, str]]]:
        """The node's slot count, and the sessions among ``sessions`` (ref, epoch) that need
        attention as (index, code, detail): see ``watch.lua``. One round trip: the sessions
        go in pipelined chunks (on Cluster, one hash slot per chunk)."""
        chunks = self._slot_chunks([ref for ref, _ in sessions], WATCH_CHUNK)
        calls: list[Call] = [
            (
                "watch",
                [self.keys.session(*split_ref(sessions[i][0])) for i in chunk],
                [node_id, *(sessions[i][1] for i in chunk)],
            )
            for chunk in chunks
        ]
        slot_key = self.keys.node_sessions(node_id)
        with redis_timer("watch"):
            count, *answers = await self.scripts.run_pipeline(
                calls, before=lambda pipe: pipe.scard(slot_key)
            )
        found: list[tuple[int, str, str]] = []
        for chunk, flat in zip(chunks, answers, strict=True):
            for j in range(0, len(flat), 3):
                found.append((chunk[int(flat[j]) - 1], str(flat[j + 1]), str(flat[j + 2])))
        return int(count), found

    async def report_metrics(
        self, node_id: str, reports: list[tuple[str, int, str]], reported_at: float
    ) -> list[int]:
        """Write the metrics of this node's sessions (ref, epoch, metrics JSON) into their
        records, each fenced by owner and epoch: one code per report, ``REPORTED``,
        ``FENCED`` or ``MISSING`` (``report_metrics.lua``). One round trip, in pipelined
        chunks like ``watch``."""
        chunks = self._slot_chunks([ref for ref, _, _ in reports], REPORT_CHUNK)
        calls: list[Call] = [
            (
                "report_metrics",
                [self.keys.session(*split_ref(reports[i][0])) for i in chunk],
                [
                    node_id,
                    repr(reported_at),
                    *(x for i in chunk for x in (reports[i][1], reports[i][2])),
                ],
            )
            for chunk in chunks
        ]
        codes = [0] * len(reports)
        answers = await self.scripts.run_pipeline(calls)  # timed there
        for chunk, answer in zip(chunks, answers, strict=True):
            for i, code in zip(chunk, answer, strict=True):
                codes[i] = int(code)
        return codes

    def _slot_chunks(self, refs: list[str], size: int) -> list[list[int]]:
        """Indexes into ``refs`` in chunks of at most ``size``, each chunk's sessions in one
        hash slot on Cluster (a script's keys must share one) and in any order elsewhere."""
        groups: dict[int, list[int]] = {}
        for i, ref in enumerate(refs):
            slot = key_slot(self.keys.session(*split_ref(ref)).encode()) if self.cluster else 0
            groups.setdefault(slot, []).append(i)
        return [
            indexes[start : start + size]
            for indexes in groups.values()
            for start in range(0, len(indexes), size)
        ]
