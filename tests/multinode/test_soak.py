"""The seeded fault-injection soak (``tests/multinode/soak.py``), bounded for CI.

``FLEET_SOAK_SEED`` replays a schedule (a fresh seed is drawn otherwise, and printed);
``FLEET_SOAK_SECONDS`` sets the seconds of faults (default 90). ``pytest -m soak`` runs only
this; ``python -m bench soak`` runs it longer and records the figures.
"""

from __future__ import annotations

import os

import pytest

from tests.multinode.soak import Soak, SoakConfig

# Faults for this long; starting, settling and checking add 10 to 60 s (bounded).
SECONDS = float(os.environ.get("FLEET_SOAK_SECONDS") or 90)


@pytest.mark.soak
@pytest.mark.timeout(SECONDS + 90)
def test_soak_keeps_every_invariant_under_faults() -> None:
    config = SoakConfig.from_env(default_seconds=SECONDS)
    result = Soak(config).run()
    print(result.report())
    assert not result.violations, result.report()
