"""How a serving node uses CPython's garbage collector.

A full (generation 2) collection walks every container object in the process and stops
the event loop meanwhile. An idle node holds about 80,000 of them (FastAPI, pydantic,
redis-py and the app), and each idle session adds about 25 more (its task, coroutines,
context, events): with 10,000 sessions one full collection takes about 200 ms here. By
default CPython runs one every 10 middle-generation collections (and whenever the objects
that survived since the last one reach a quarter of the old ones), that is about every
700 starts: 15 stalls of up to 300 ms while a node starts 10,000 sessions.

``settle()`` runs once, when the node has started and serves:

* ``gc.freeze()`` moves everything start-up built (modules, routes, models, settings, the
  node's own loops) out of the collector's sight: it lives as long as the process, so
  walking it again finds nothing. What start-up built and later becomes cyclic garbage
  stays in memory; that is bounded by the start-up heap and happens once. Nothing created
  after start-up (sessions, requests, connections) is frozen.
* a full collection every 100 middle-generation collections instead of 10: about one
  while 10,000 sessions start. Young garbage is still collected as often as before; only
  cyclic garbage that lived through two young collections (mostly ended sessions) waits
  longer for a full collection, which still comes after at most about 700,000 net
  allocations of container objects, or later while live objects dominate (CPython's own
  quarter rule).
"""

from __future__ import annotations

import gc

#: (young, middle, full): CPython's default is (700, 10, 10).
THRESHOLDS = (700, 10, 100)


def settle() -> None:
    """Collect what start-up left as garbage, freeze the rest, set the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
