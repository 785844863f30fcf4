"""Placement: which node runs a new session, and handing the start to it.

Admission picks the node (``place.lua``): the node asked when it runs the worker, is not
draining and has room, else the live node with the most room that runs it; the slot is
reserved there in the same step. When the node chosen is another one, the node asked
forwards the start over the chosen node's control channel (``place``) and answers once
that node runs the session (``placed``). The forward is bounded:

* the chosen node refuses (it began draining meanwhile, or the params are wrong): it gives
  its slot back and says why; a draining node's refusal sends the start to another node;
* no answer within ``FORWARD_WAIT`` (the node died, or froze): the asker gives the start
  up with ``forgo_start.lua``, which writes the record ended unless the node created it
  already. Either the session was never created, and never will be (its slot is freed
  like any stray or dead node's slot), and the client gets a clear 503; or it exists, and
  the asker waits, bounded, for it to run, on that node or, if the node died, on the node
  that resumes it.

Nothing is started twice: the record is created once (``create_session.lua`` never
overwrites), by the chosen node, or written ended by the asker first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fleet.errors import (
    IdempotencyInProgress,
    InvalidParams,
    NotAccepting,
    UnknownWorker,
)
from fleet.models import NodeInfo, SessionRecord, State
from fleet.runtime.control import Message
from fleet.settings import Settings
from fleet.store.idempotency import Reservation
from fleet.store.keys import make_ref
from fleet.store.registry import Registry

log = logging.getLogger("fleet.placement")

#: Seconds the node asked waits for the chosen node to say it runs the session.
FORWARD_WAIT = 5.0
#: Seconds the live-node list used for placement may be old.
DIRECTORY_AGE = 1.0


class Directory:
    """The live nodes as this node last read them (``Nodes.live_nodes``), at most
    ``DIRECTORY_AGE`` seconds old: the candidates placement names. A stale list is safe:
    ``place.lua`` checks each candidate's lease, drain, workers and room itself."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._nodes: list[NodeInfo] = []
        self._read_at = -1e9

    async def nodes(self, *, fresh: bool = False) -> list[NodeInfo]:
        if fresh or time.monotonic() - self._read_at > DIRECTORY_AGE:
            self._nodes = await self.registry.live_nodes()
            self._read_at = time.monotonic()
        return self._nodes

    async def running(self, worker: str, *, fresh: bool = False) -> list[str]:
        """The live nodes that run ``worker``."""
        return [n.node_id for n in await self.nodes(fresh=fresh) if worker in n.workers]

    async def known_workers(self) -> list[str]:
        names: dict[str, None] = {}
        for node in await self.nodes(fresh=True):
            names.update(dict.fromkeys(node.workers))
        return list(names)


def encode_start(record: SessionRecord, once: Reservation | None) -> str:
    """What a forwarded start carries: the record to create, and the idempotency
    reservation to create it under."""
    held = None if once is None else [once.key, once.token, once.fingerprint]
    return json.dumps({"record": record.to_hash(), "once": held}, separators=(",", ":"))


def decode_start(payload: str) -> tuple[SessionRecord, Reservation | None]:
    data = json.loads(payload)
    once = data.get("once")
    return SessionRecord.from_hash(data["record"]), (
        None if once is None else Reservation(*(str(x) for x in once))
    )


def refusal(code: str, detail: str, errors: list[dict[str, Any]] | None = None) -> str:
    """A chosen node's answer to a forwarded start it does not run."""
    return json.dumps({"code": code, "detail": detail, "errors": errors or []})


OK = json.dumps({"code": "ok"})


class Forwards:
    """Starts this node forwarded to others, waiting for their answers."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.node_id = settings.node_id
        self._settings = settings
        self._waiting: dict[str, asyncio.Future[str]] = {}

    def answered(self, ref: str, payload: str) -> None:
        """A ``placed`` message: the chosen node's answer."""
        waiting = self._waiting.get(ref)
        if waiting is not None and not waiting.done():
            waiting.set_result(payload)

    async def forward(
        self, target: str, record: SessionRecord, once: Reservation | None
    ) -> SessionRecord:
        """Have ``target`` (whose slot placement reserved) create and run the session;
        returns its record once it runs. Raises what the target refused with (a draining
        target: NotAccepting ``draining``, for the caller to place again)."""
        ref = make_ref(record.call_id, record.session_id)
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[ref] = answer
        try:
            message = Message(
                "place", ref, reply_to=self.node_id, payload=encode_start(record, once)
            )
            channel = self.registry.keys.node_channel(target)
            heard = await self.registry.redis.publish(channel, message.encode())
            # Outside Cluster, PUBLISH counts the listeners: none means no answer will come.
            if heard or self.registry.cluster:
                try:
                    async with asyncio.timeout(FORWARD_WAIT):
                        reply = json.loads(await answer)
                except TimeoutError:
                    reply = None
            else:
                reply = None
        finally:
            self._waiting.pop(ref, None)
        if reply is None:
            return await self._unanswered(target, record)
        code = reply.get("code")
        if code == "ok":
            record.node_id, record.state = target, State.RUNNING
            return record
        detail = str(reply.get("detail", ""))
        if code == "invalid_params":
            raise InvalidParams(detail, reply.get("errors") or None)
        if code == "unknown_worker":
            raise UnknownWorker(detail)
        if code == "idempotency_in_progress":
            raise IdempotencyInProgress(detail)
        raise NotAccepting(str(code), detail)

    async def _unanswered(self, target: str, record: SessionRecord) -> SessionRecord:
        """No answer in time: give the start up, unless the target created the session, in
        which case wait (bounded) until it runs there or wherever it was resumed."""
        extra = {"node_id": self.node_id, "call_id": record.call_id}
        record.node_id = target  # the tombstone names the node it was placed on
        if await self.registry.forgo_start(record):
            log.warning(
                "node %s did not answer a forwarded start within %.0fs; the start is given up",
                target,
                FORWARD_WAIT,
                extra=extra,
            )
            raise NotAccepting(
                "start_failed",
                f"the node chosen for this session ({target}) did not start it in time; "
                "nothing was started: retry",
            )
        # It was created: the target died or froze after that. The reaper resumes it
        # elsewhere within a lease and a maintenance pass or two.
        s = self._settings
        deadline = time.monotonic() + s.node_ttl + 2 * s.maintenance_interval + FORWARD_WAIT
        latest = record
        while time.monotonic() < deadline:
            found = await self.registry.get(record.call_id, record.session_id)
            if found is not None:
                latest = found
                if found.state == State.ENDED:
                    break
                if found.state != State.STARTING and found.node_id in {
                    n.node_id for n in await self.registry.live_nodes()
                }:
                    break
            await asyncio.sleep(0.2)
        return latest
