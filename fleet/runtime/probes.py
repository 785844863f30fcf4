"""The node's own health figures: how late its event loop runs (``fleet_event_loop_lag_seconds``).

A timer that should fire every ``LAG_PROBE`` seconds records how late it fired: the time
any callback waited behind other work (a long synchronous stretch, a garbage collection,
a burst of starts). It costs one timer per probe."""

from __future__ import annotations

import asyncio

from fleet import metrics

#: Seconds between two probes of the event loop.
LAG_PROBE = 0.1


async def probe_loop_lag(period: float = LAG_PROBE) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period
        await asyncio.sleep(period)
        metrics.LOOP_LAG_SECONDS.observe(max(0.0, loop.time() - due))
