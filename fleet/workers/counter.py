"""The counter: fleet's demo worker. It ticks, emits and checkpoints, and resumes where it
left off. Params: ``interval`` (seconds between ticks, default 1.0) and ``limit`` (complete
after this many ticks; optional). Its result is the last ``{"n": n}``."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from fleet.worker import SessionContext


class Counter:
    """Ticks, emits and checkpoints every interval; resumes where it left off."""

    resumable = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        interval: float = Field(
            default=1.0, gt=0, le=86400, allow_inf_nan=False, description="Seconds between ticks."
        )
        limit: int | None = Field(
            default=None, ge=0, description="Complete after this many ticks (none: run on)."
        )

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
