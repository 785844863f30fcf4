"""soak: the seeded fault-injection soak of ``tests/multinode/soak.py``, run for longer
before a release (the CI test runs 90 s of it).

Three nodes on a real redis-server, ``FLEET_NODE_TTL=3``, ``FLEET_CHECKPOINT_HISTORY=100``,
``FLEET_MAX_SESSIONS=10``, ``FLEET_MAX_SESSIONS_PER_CALL=3`` (4 calls); three clients start,
close and read sessions of ``tests.soak_worker:SoakWorker`` (a checkpoint every 0.1 s);
the nemesis kills, pauses and SIGTERMs nodes and restarts Redis empty, one fault at a time
(some with a pause of a second node on top). ``--seconds`` sets the seconds of faults
(default 600; 60 with ``--quick``) and ``--seed`` the seed (default: a fresh one, printed);
both are ``FLEET_SOAK_SECONDS`` and ``FLEET_SOAK_SEED`` to the test as well.

It reports the figures and every invariant violation seen (a soak does not assert here:
the test does). Runs once, whatever ``--runs`` says.
"""

from __future__ import annotations

import sys
from collections import Counter

from bench import common

NAME = "soak"
TITLE = "soak: faults injected for minutes, invariants checked"
SECONDS = 600.0
QUICK_SECONDS = 60.0


def run(opts: common.Options) -> common.Report:
    if str(common.ROOT) not in sys.path:
        sys.path.insert(0, str(common.ROOT))
    from tests.multinode.soak import INVARIANTS, Soak, SoakConfig

    seconds = QUICK_SECONDS if opts.quick else SECONDS
    config = SoakConfig.from_env(default_seconds=seconds)
    load = common.load_average()
    result = Soak(config, progress=common.progress).run()
    common.progress(result.report(evidence=3))

    seen = Counter(v.invariant for v in result.violations)
    first: dict[str, str] = {}
    for v in result.violations:
        first.setdefault(v.invariant, _cell(v.detail.splitlines()[0][:200]))
    body = [
        "Run on request only (`python -m bench` alone skips it): `python -m bench soak "
        "[--seconds S] [--seed N]`. CI runs 90 s of the same soak as "
        "`tests/multinode/test_soak.py` (`pytest -m soak`).",
        "",
        f"Seed {config.seed} (`FLEET_SOAK_SEED={config.seed}` replays the fault schedule), "
        f"{config.seconds:.0f} s of faults, {result.seconds:.0f} s in all.",
        "",
        *common.table(["figure", "value"], [[k, _cell(v)] for k, v in result.figures.items()]),
        "",
        *common.table(
            ["invariant", "violations", "first seen"],
            [[name, str(seen.get(name, 0)), first.get(name, "")] for name in INVARIANTS],
        ),
    ]
    overlapped = sum(1 for f in result.faults if f.kind == "pause" and f.note.startswith("with"))
    return common.Report(
        NAME,
        TITLE,
        f"{len(result.faults)} faults, {result.figures['sessions seen']} sessions: "
        f"{len(result.violations)} invariant violations "
        f"({', '.join(f'{k} {v}' for k, v in seen.items()) or 'none'}).",
        body,
        notes=[
            "What each invariant means: `INVARIANTS` in `tests/multinode/soak.py`. The "
            "evidence of each violation (the worker's and the nodes' log lines about it) is "
            "in the run's progress output on stderr, which names the directory of the logs.",
            f"{overlapped} of the pauses were injected on top of another fault (a kill, a "
            "SIGTERM or a Redis restart), timed to land while sessions move.",
            common.load_note(load),
        ],
    )


def _cell(value: object) -> str:
    """A figure for a table cell: ``{"kill": 4}`` as ``kill 4``."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    return str(value).replace("|", "\\|")
