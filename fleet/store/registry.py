"""The registry: sessions, nodes, admission, leases and reaping, in Redis.

One class made of one part per concept, each in its own module: ``admission.py`` (limits
and slots), ``sessions.py`` (records and fenced writes), ``lookups.py`` (reads and lists),
``nodes.py`` (leases, dead and draining nodes), ``idempotency.py`` (starts'
``Idempotency-Key`` reservations and answers), ``inbox.py`` (messages), ``threads.py``
(conversations across sessions). Every method is one round trip unless it
says otherwise. Atomic steps are Lua scripts (``lua/``); key names come from ``keys.py``.
"""

from __future__ import annotations

from fleet.store.idempotency import Idempotency
from fleet.store.inbox import Inbox
from fleet.store.lookups import Lookups
from fleet.store.sessions import Sessions
from fleet.store.threads import Threads


class Registry(Sessions, Lookups, Idempotency, Inbox, Threads):
    """Everything fleet keeps in Redis, behind one object per node."""
