"""Admission: every limit checked and the slot reserved in one atomic step (``place.lua``),
and slots given back or put back.

Placement is part of it: the same step picks the node (``place.lua``), from the candidates
the caller names (the live nodes it knows of; the script checks each one's lease, drain,
workers and room itself, so a stale list costs at most a less than ideal choice).

The slots of all nodes live in the fleet-wide ``{g}`` slot (``keys.py``), so the per-call,
fleet-wide and per-node counts are read and changed together: under any race, across any
number of nodes, no limit is ever exceeded.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleet.errors import AdmissionRejected, NotAccepting
from fleet.store.base import Call, StoreBase, limit_arg
from fleet.store.keys import make_ref
from fleet.store.scripts import AdmitResult

_ADMIT_DETAIL = {
    AdmitResult.MAX_SESSIONS_PER_CALL: "this call already has its maximum number of sessions",
    AdmitResult.MAX_SESSIONS: "the fleet already runs its maximum number of sessions",
}


class Admission(StoreBase):
    async def place(
        self,
        asked: str,
        call_id: str,
        session_id: str,
        worker: str,
        candidates: Sequence[str],
        mode: str = "local",
    ) -> str:
        """Check every limit, pick the node for a new session and reserve its slot there,
        in one step (``place.lua``): ``asked`` if it can take it (``mode`` ``local``),
        else the candidate with the most room that runs ``worker`` (``""``: any). Returns
        the node chosen; raises AdmissionRejected (``no_capacity`` when no candidate has
        room) or NotAccepting. A node placing its own start asks ``place_here`` first,
        which costs the same whatever the fleet's size; this call reads every candidate."""
        if asked in candidates:
            order = [asked, *(c for c in candidates if c != asked)]
        else:  # the node asked cannot take it (it drains, say): the one with most room
            order, mode = [*candidates], "spread"
        ref = make_ref(call_id, session_id)
        result, chosen = await self._place(ref, call_id, worker, order, mode)
        return self._outcome(result, chosen, worker)

    async def place_here(
        self, node_id: str, call_id: str, session_id: str, worker: str
    ) -> str | None:
        """``local`` placement's first step, for a caller that has not read the fleet's
        list yet: reserve the slot on ``node_id`` if it can take the session (returns
        ``node_id``), else None (then ``place`` with the candidates, as ``spread``).
        Raises as ``place`` does for a limit reached."""
        ref = make_ref(call_id, session_id)
        result, chosen = await self._place(ref, call_id, worker, [node_id], "asked")
        return None if result is AdmitResult.OTHERS else self._outcome(result, chosen, worker)

    @staticmethod
    def _outcome(result: AdmitResult, chosen: str, worker: str) -> str:
        """The node chosen, or the error a refusal is."""
        if result is AdmitResult.OK:
            return chosen
        if result is AdmitResult.NOT_READY:
            raise NotAccepting("not_ready", "this node's lease is not held; retry another node")
        if result is AdmitResult.SETTLING:
            raise NotAccepting(
                "not_ready",
                "Redis lost its data moments ago: new sessions wait until every node has "
                "written back its own (a second at most); retry shortly",
            )
        if result is AdmitResult.ELSEWHERE:
            # A retry of a start admitted already, whose slot moved since to a node that
            # is no candidate: admitting it again would count it twice. The slot has no
            # record and is freed like any stray (``Moves.settle_strays``).
            raise NotAccepting(
                "start_failed", "this start was admitted already and its slot moved; retry"
            )
        if result is AdmitResult.NO_CAPACITY:
            where = f"runs worker {worker!r}" if worker else "can take it"
            raise AdmissionRejected(
                result.value, f"no node that {where} has room for another session; retry later"
            )
        raise AdmissionRejected(result.value, _ADMIT_DETAIL[result])

    async def _place(
        self, ref: str, call_id: str, worker: str, order: list[str], mode: str
    ) -> tuple[AdmitResult, str]:
        k, s = self.keys, self._settings
        keys = [k.nodes(), k.call_counts(), k.live(), k.settling(), k.node_loads()]
        for node_id in order:
            keys += [k.node_sessions(node_id), k.node_info(node_id)]
        code, chosen = await self.scripts(
            "place",
            keys,
            [
                ref,
                call_id,
                limit_arg(s.max_sessions_per_call),
                limit_arg(s.max_sessions),
                worker,
                mode,
                *order,
            ],
        )
        return AdmitResult(code), str(chosen)

    async def admit(self, node_id: str, call_id: str, session_id: str) -> None:
        """Check every limit and reserve a slot for the session on ``node_id`` itself."""
        await self.place(node_id, call_id, session_id, "", [node_id])

    def _release_call(self, node_id: str, call_id: str, session_id: str) -> Call:
        k = self.keys
        return (
            "release",
            [k.node_sessions(node_id), k.call_counts(), k.live(), k.ended(), k.node_loads()],
            [make_ref(call_id, session_id), call_id, self._tombstone_ms, node_id],
        )

    async def release(self, node_id: str, call_id: str, session_id: str) -> bool:
        """Free a session's slot, once; the session is listed as ended (a listing drops it
        when it has no tombstone)."""
        return bool(await self.scripts(*self._release_call(node_id, call_id, session_id)))

    async def reassert_slot(
        self, node_id: str, call_id: str, session_id: str, start: float
    ) -> bool:
        k = self.keys
        return bool(
            await self.scripts(
                "reassert",
                [k.node_sessions(node_id), k.call_counts(), k.live(), k.node_loads()],
                [make_ref(call_id, session_id), call_id, int(start * 1000), node_id],
            )
        )
