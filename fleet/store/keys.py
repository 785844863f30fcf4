"""Every Redis key and channel name fleet uses, built in this one place.

Layout: ``<prefix>:{<tag>}:<kind>[:<id>]``. The id is always the last part and the kinds are
fixed words, so two distinct ids can never build the same key, and since ids cannot hold
``{`` or ``}`` no id can move a key to another hash slot or out of the prefix.

Four hash tags decide where keys live on Redis Cluster:

* ``{g}``, the fleet-wide slot: node leases, per-node session sets and the admission
  counters. Admission must check the per-call, fleet-wide and per-node counts and reserve
  the slot in one atomic step, so every key that step reads lives in one slot.
* ``{c:<call_id>}``, one slot per call: the session records, the call's indexes,
  checkpoints, event streams and idempotency keys. Closing, ending or fencing a session,
  and creating one together with the answer to its ``Idempotency-Key``, are atomic steps
  on keys of one call, so they run on whichever shard holds that call.
* ``{n:<node_id>}``, one slot per node: the close requests a node's maintenance pass
  looks at, so that a pass costs the same whatever the node runs, and no node's requests
  pile up in the fleet-wide slot.
* ``{t:<principal>/<thread_id>}``, one slot per thread: the thread's record and its list of
  sessions. Marking a thread busy (at most one live session) is one step on that slot;
  the steps that span a thread and a session are in ``docs/architecture.md`` (Threads).

A session reference (``ref``) is ``<call_id>/<session_id>``: ``/`` is not an id character,
so it splits back unambiguously. An idempotency key's id is ``<principal>/<key>`` for the
same reason: the client's key comes last and cannot hold ``/``, so the last ``/`` splits
it, and no two (principal, key) pairs build the same id, whatever the principal's name.
"""

from __future__ import annotations

REF_SEPARATOR = "/"


def make_ref(call_id: str, session_id: str) -> str:
    return f"{call_id}{REF_SEPARATOR}{session_id}"


def split_ref(ref: str) -> tuple[str, str]:
    call_id, _, session_id = ref.partition(REF_SEPARATOR)
    return call_id, session_id


class Keys:
    """Pure key builders under one configurable prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._global = f"{prefix}:{{g}}"

    # -- fleet-wide slot ------------------------------------------------------------------
    def nodes(self) -> str:
        """ZSET node_id -> lease expiry (ms, Redis clock). A node is live while its score
        is in the future."""
        return f"{self._global}:nodes"

    def node_info(self, node_id: str) -> str:
        """HASH of what a node reports about itself (host, capacity, draining, ...)."""
        return f"{self._global}:node-info:{node_id}"

    def node_sessions(self, node_id: str) -> str:
        """SET of refs a node holds an admission slot for: the per-node index."""
        return f"{self._global}:node-sessions:{node_id}"

    def node_directory(self) -> str:
        """HASH node_id -> what the node reported at its last renewal, as
        ``<renewal time (ms)> <JSON>``: written by the renewal, so that the live-node
        directory is one read, whatever the fleet's size (``Nodes.live_nodes``)."""
        return f"{self._global}:node-directory"

    def node_loads(self) -> str:
        """HASH node_id -> how many slots the node holds (its node_sessions SET's size),
        kept by every script that adds, moves or removes a slot and set again from the SET
        at each renewal. For reading only: admission counts the SET itself."""
        return f"{self._global}:node-loads"

    def workers(self) -> str:
        """HASH worker name -> what ``GET /workers`` shows of it (JSON), written by the
        nodes that run it, so that any node can describe workers it does not run."""
        return f"{self._global}:workers"

    def settling(self) -> str:
        """STRING: until when (ms, Redis clock) admission waits after Redis lost its data,
        so that every live node has written back its sessions before new ones count."""
        return f"{self._global}:settling"

    def born(self) -> str:
        """STRING: when the fleet's data in this Redis began. A node that held a lease and
        finds it gone knows Redis lost its data (a restart without persistence)."""
        return f"{self._global}:born"

    def call_counts(self) -> str:
        """HASH call_id -> live sessions, for the per-call limit."""
        return f"{self._global}:call-counts"

    def live(self) -> str:
        """ZSET ref -> start time (ms) of every live session in the fleet."""
        return f"{self._global}:live"

    def ended(self) -> str:
        """ZSET ref -> end time (ms) of recently ended sessions, trimmed to the tombstone TTL."""
        return f"{self._global}:ended"

    # -- one slot per call ----------------------------------------------------------------
    def _call(self, call_id: str) -> str:
        return f"{self.prefix}:{{c:{call_id}}}"

    def session(self, call_id: str, session_id: str) -> str:
        """HASH: the session record (owner node, epoch, state, close flag, ...)."""
        return f"{self._call(call_id)}:session:{session_id}"

    def call_live(self, call_id: str) -> str:
        """ZSET session_id -> start time (ms) of the call's live sessions."""
        return f"{self._call(call_id)}:live"

    def call_ended(self, call_id: str) -> str:
        """ZSET session_id -> end time (ms) of the call's ended sessions."""
        return f"{self._call(call_id)}:ended"

    def checkpoint(self, call_id: str, session_id: str) -> str:
        """LIST of the latest checkpoints, newest first."""
        return f"{self._call(call_id)}:checkpoint:{session_id}"

    def events(self, call_id: str, session_id: str) -> str:
        """STREAM of the session's events."""
        return f"{self._call(call_id)}:events:{session_id}"

    def inbox(self, call_id: str, session_id: str) -> str:
        """STREAM of the messages sent to the session; entries up to the position its last
        checkpoint consumed are trimmed."""
        return f"{self._call(call_id)}:inbox:{session_id}"

    def inbox_ids(self, call_id: str, session_id: str) -> str:
        """HASH client message id -> inbox entry id: a retried send gets the first answer."""
        return f"{self._call(call_id)}:inbox-ids:{session_id}"

    def idempotency(self, call_id: str, principal: str, key: str) -> str:
        """HASH: a start's ``Idempotency-Key``, per principal and call: the reservation
        (state, fingerprint, token) and then the answer. ``key`` must match the id pattern
        (the API checks it before it gets here); it comes last, after a ``/``."""
        return f"{self._call(call_id)}:idem:{principal}{REF_SEPARATOR}{key}"

    # -- one slot per node ---------------------------------------------------------------
    def node_closes(self, node_id: str) -> str:
        """HASH ref -> close reason: the close requests sent to a node since its last
        maintenance pass, which finds a request whose message it missed here rather than
        by reading every session's record (``Maintenance``)."""
        return f"{self.prefix}:{{n:{node_id}}}:closes"

    # -- one slot per thread -------------------------------------------------------------
    def _thread(self, principal: str, thread_id: str) -> str:
        # The principal's name is an id (no "/", "{" or "}"), so the pair cannot collide.
        return f"{self.prefix}:{{t:{principal}{REF_SEPARATOR}{thread_id}}}"

    def thread(self, principal: str, thread_id: str) -> str:
        """HASH: a principal's thread: the live session (``live``, a ref, "" for none, and
        since when), the latest session, the session whose checkpoint holds the state
        until the latest writes its own (``state_from``), when it was created and updated."""
        return f"{self._thread(principal, thread_id)}:thread"

    def thread_sessions(self, principal: str, thread_id: str) -> str:
        """ZSET ref -> start time (ms): the sessions that ran on the thread."""
        return f"{self._thread(principal, thread_id)}:sessions"

    # -- channels -------------------------------------------------------------------------
    def node_channel_prefix(self) -> str:
        """Scripts that must notify a session's owner append the owner's node id to this."""
        return f"{self.prefix}:chan:node:"

    def node_channel(self, node_id: str) -> str:
        """Pub/sub channel a node listens on for close requests and hand-overs."""
        return f"{self.node_channel_prefix()}{node_id}"

    def events_channel(self, call_id: str, session_id: str) -> str:
        """Redis Cluster only: the channel a stream write is announced on, so that nodes
        with listeners read it (``fleet/events/cluster.py``). It carries the call's hash
        tag like the stream, so it moves with its slot should it ever be sharded."""
        return f"{self._call(call_id)}:chan:events:{session_id}"
