"""The counter: fleet's demo worker. It ticks, emits and checkpoints, and resumes where it
left off. Params: ``interval`` (seconds between ticks, default 1.0) and ``limit`` (complete
after this many ticks; optional). Its result is the last ``{"n": n}``."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fleet.worker import SessionContext


class Counter:
    resumable = True

    @staticmethod
    def validate_params(params: dict[str, Any]) -> None:
        interval = params.get("interval", 1.0)
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not math.isfinite(interval)
            or not 0 < interval <= 86400
        ):
            raise ValueError("params.interval must be a number of seconds in (0, 86400]")
        limit = params.get("limit")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise ValueError("params.limit must be a whole number >= 0")
        unknown = set(params) - {"interval", "limit"}
        if unknown:
            raise ValueError(f"unknown params for the counter: {', '.join(sorted(unknown))}")

    async def run(self, ctx: SessionContext) -> dict[str, int]:
        """Ticks until ``limit`` (or a close); the result is the last ``{"n": n}``."""
        interval = float(ctx.params.get("interval", 1.0))
        limit = ctx.params.get("limit")
        n = int(ctx.state["n"]) if isinstance(ctx.state, dict) and "n" in ctx.state else 0
        while limit is None or n < limit:
            # asyncio.timeout, not wait_for: no extra task per wait (an idle session is
            # then a few objects fewer for every garbage collection to walk).
            try:
                async with asyncio.timeout(interval):
                    await ctx.closing.wait()
                return {"n": n}  # asked to close: the last tick is already checkpointed
            except TimeoutError:
                pass
            n += 1
            await ctx.emit("tick", {"n": n})
            await ctx.checkpoint({"n": n})
            ctx.metrics["ticks"] = n
        return {"n": n}
