"""capacity: what Redis does per session and per node, measured on a real 3-master Cluster
at several scales, and the model (docs/capacity.md) those measurements give.

No HTTP: real ``fleet.runtime.node.Node`` objects, each with its own Cluster client, run in
processes of at most 10 (``bench/capacity_fleet.py``). Per run:

* the unit costs (``bench/capacity_units.py``): one emit, checkpoint, metrics report and
  message, each measured apart, at the fleet's pace and on a busy shard; what a ``PUBLISH``
  costs the other shards over the cluster bus; fleet's ``{g}`` calls (leases, passes,
  admission, the directory, reaping) against the registry of 10, 100 and 1,000 nodes;
* a burst of 128 commands (fleet's ``REAP_CONCURRENCY``) to one shard through fleet's own
  Cluster client (100 connections per shard, which wait when all are busy), and through
  one whose pools hold 1,000;
* **as deployed** (fleet's own client, ``FLEET_NODE_TTL=10``): 10 nodes × 500 sessions,
  SIGKILL of 5, and what became of the sessions;
* the **scales** (``bench/capacity_scale.py``): 10, 25 and 50 nodes × 1,000 sessions that
  emit, checkpoint and change their metrics every ``TICK`` seconds: idle nodes, a mass start,
  steady state, and SIGKILL of 10 nodes (5 of 10 at the smallest scale). These run with
  fleet's own client and ``FLEET_NODE_TTL=30``: this 2-core machine runs every node of the
  fleet, so while the fleet reaps, a node's event loop can lag seconds behind, which a
  10 s lease does not always survive (the as-deployed part runs the default 10 s).

``--quick``: 4 and 10 nodes × 250 sessions, shorter windows, one run.
"""

from __future__ import annotations

import contextlib
import pickle
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from bench import capacity_scale, capacity_units, common
from bench.capacity_scale import ScaleRun, measure
from bench.capacity_units import Bus, GlobalCall, PoolCheck, Unit, Units

NAME = "capacity"
TITLE = "capacity: Redis work per session and per node, measured on a 3-shard Cluster"
SCALES = ((10, 1000), (25, 1000), (50, 1000))
QUICK_SCALES = ((4, 250), (10, 250))
TICK = 120.0
QUICK_TICK = 30.0
WIDE_POOL = 1000  # connections per shard of the client pool_check compares fleet's with
TTL = 30.0  # FLEET_NODE_TTL in the scale runs
DEPLOYED = (10, 500)
QUICK_DEPLOYED = (4, 250)
MAX_RUNS = 3


@dataclass
class Results:
    tick: float
    scales: tuple[tuple[int, int], ...]
    units: list[Units] = field(default_factory=list)
    busy: list[dict[str, Unit]] = field(default_factory=list)
    bus: list[Bus] = field(default_factory=list)
    global_calls: list[dict[int, dict[str, GlobalCall]]] = field(default_factory=list)
    pools: list[tuple[PoolCheck, PoolCheck]] = field(default_factory=list)
    deployed: list[ScaleRun] = field(default_factory=list)
    runs: dict[tuple[int, int], list[ScaleRun]] = field(default_factory=dict)


def _quick() -> None:
    """Shorter windows for a smoke run."""
    capacity_scale.IDLE = 8.0
    capacity_scale.STEADY = 1
    capacity_scale.STEADY_WINDOW = 10.0
    capacity_scale.MONITOR_WINDOW = 5.0
    capacity_units.UNIT_WINDOW = 10.0
    capacity_units.UNIT_SESSIONS = 200
    capacity_units.FLEET_SIZES = (10, 100)


@contextlib.contextmanager
def _terminated_cleanly() -> Iterator[None]:
    """SIGTERM (``timeout``, a CI runner) unwinds like an exception, so that the node
    processes and the Cluster are stopped on the way out."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(opts: common.Options) -> common.Report:
    from bench.capacity_report import report

    began = time.monotonic()
    load_before = common.load_average()
    runs = 1 if opts.quick else min(opts.runs, MAX_RUNS)
    if opts.quick:
        _quick()
    results = Results(QUICK_TICK if opts.quick else TICK, QUICK_SCALES if opts.quick else SCALES)
    deployed = QUICK_DEPLOYED if opts.quick else DEPLOYED
    # What was measured, kept as it comes in: a report that fails can be rendered again.
    keep = Path(tempfile.mkdtemp(prefix="fleet-capacity-")) / "results.pickle"
    common.progress(f"measurements are kept in {keep}")
    with _terminated_cleanly():
        for r in range(runs):
            common.progress(f"run {r + 1}/{runs}: unit costs")
            results.units.append(capacity_units.units())
            results.busy.append(capacity_units.busy_units())
            results.bus.append(capacity_units.bus())
            results.global_calls.append(capacity_units.global_slot())
            results.pools.append(
                (capacity_units.pool_check(0), capacity_units.pool_check(WIDE_POOL))
            )
            common.progress(f"run {r + 1}/{runs}: as deployed, {deployed[0]} × {deployed[1]}")
            results.deployed.append(
                measure(*deployed, results.tick, f"r{r + 1} deployed", only_failover=True)
            )
            for nodes, per_node in results.scales:
                tag = f"r{r + 1} {nodes}x{per_node}"
                one = measure(nodes, per_node, results.tick, tag, ttl=TTL)
                results.runs.setdefault((nodes, per_node), []).append(one)
                keep.write_bytes(pickle.dumps(results))
    return report(TITLE, results, runs, load_before, time.monotonic() - began)


if __name__ == "__main__":  # python -m bench.capacity: the same as python -m bench capacity
    from bench.__main__ import main

    sys.exit(main([NAME, *sys.argv[1:]]))
