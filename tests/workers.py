"""Workers the tests run (by import string, as a user would name their own)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleet.worker import SessionContext
from fleet.workers.counter import Counter


class Boom:
    async def run(self, ctx: SessionContext) -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("the worker broke, with a secret: hunter2")


class Stubborn:
    """Ignores ``ctx.closing``: only cancellation stops it."""

    async def run(self, ctx: SessionContext) -> None:
        while True:
            await asyncio.sleep(3600)


class Deaf:
    """Catches its cancellation and carries on: the worker that once wedged a node. Stops
    only when the test sets ``Deaf.release`` (so tests leave no task behind)."""

    release = asyncio.Event()

    async def run(self, ctx: SessionContext) -> None:
        while not Deaf.release.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                pass


class Quiet:
    """Waits for a close, never touching or emitting: idles out."""

    async def run(self, ctx: SessionContext) -> None:
        ctx.metrics["answer"] = 42
        await ctx.closing.wait()


class Chatty:
    """Touches every 50 ms until closed: never idle."""

    async def run(self, ctx: SessionContext) -> None:
        while not ctx.closing.is_set():
            ctx.touch()
            await asyncio.sleep(0.05)


class SlowStart:
    """Takes 0.3 s to accept its params, so a start holds its Idempotency-Key that long
    (blocking its node's event loop meanwhile, as a slow synchronous check would)."""

    @staticmethod
    def validate_params(params: dict[str, Any]) -> None:
        time.sleep(0.3)

    async def run(self, ctx: SessionContext) -> None:
        await ctx.closing.wait()


async def function_worker(ctx: SessionContext) -> None:
    await ctx.emit("hello", {"from": ctx.node_id})


not_a_worker = 42


class Hoarder:
    """Tries a checkpoint over the limit, sees the clear error, saves a small one."""

    async def run(self, ctx: SessionContext) -> None:
        from fleet.errors import CheckpointTooLarge

        try:
            await ctx.checkpoint({"blob": "x" * 5000})
        except CheckpointTooLarge as exc:
            assert "over the 1024-byte limit" in exc.detail
            await ctx.checkpoint({"small": True})
            return
        raise AssertionError("the oversized checkpoint was accepted")


class Echo:
    """Answers each message with what it said, and keeps the conversation in its checkpoint."""

    async def run(self, ctx: SessionContext) -> None:
        heard: list[Any] = list((ctx.state or {}).get("heard", []))
        async for message in ctx.messages:
            heard.append(message.data)
            await ctx.checkpoint({"heard": heard})
            await message.reply({"echo": message.data, "count": len(heard)})


class LateEcho(Echo):
    """Echo, after half a second: messages queue up before it first reads its inbox."""

    async def run(self, ctx: SessionContext) -> None:
        await asyncio.sleep(0.5)
        await super().run(ctx)


class Picky:
    """Rejects messages while an earlier one is unconsumed: takes 0.3 s over each, then
    consumes it (a checkpoint)."""

    inbox = "reject"

    async def run(self, ctx: SessionContext) -> None:
        async for message in ctx.messages:
            await asyncio.sleep(0.3)
            await ctx.checkpoint({"last": message.data})


class Listener:
    """Talks until interrupted (``inbox = "interrupt"``), then listens."""

    inbox = "interrupt"

    async def run(self, ctx: SessionContext) -> None:
        while not ctx.closing.is_set():
            await ctx.interrupt.wait()
            ctx.interrupt.clear()
            message = await ctx.receive(timeout=1)
            if message is not None:
                await ctx.emit("interrupted", {"by": message.data})
                await message.reply("listening")


class Metered:
    """Sets ``ctx.metrics = {"turns": 3, "latency_ms": 12.5}`` (with ``params["bad"]``, also
    entries that are not metrics), waits for a close, and takes one more turn on its way
    out: a value that only the end can report."""

    async def run(self, ctx: SessionContext) -> None:
        ctx.metrics = {"turns": 3, "latency_ms": 12.5}
        if ctx.params.get("bad"):
            bad: dict[Any, Any] = {
                "flag": True,
                "nan": float("nan"),
                "inf": float("inf"),
                "text": "12",
                "huge": 2**70,
                "n" * 65: 1,
                "": 1,
                7: 1,
            }
            ctx.metrics.update(bad)
        await ctx.closing.wait()
        ctx.metrics["turns"] = 4


class Answer:
    """Returns at once: ``params["value"]`` (default ``{"answer": 42}``), or, with
    ``params["bytes"]``, a string of that many characters; with ``params["object"]``, an
    object that is not JSON. With ``params["after"]``, waits that long (or for a close)
    first. The invoke tests' worker."""

    async def run(self, ctx: SessionContext) -> Any:
        if after := ctx.params.get("after"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.closing.wait(), after)
        if "bytes" in ctx.params:
            return "x" * int(ctx.params["bytes"])
        if ctx.params.get("object"):
            return object()
        return ctx.params.get("value", {"answer": 42})


class Steps:
    """Emits ``step`` n for n in 1..``params["steps"]`` (default 3), checkpointing each,
    ``params["interval"]`` seconds apart (default 0.05), and returns ``{"steps": n}``. On a
    resume it goes on from the checkpoint."""

    async def run(self, ctx: SessionContext) -> Any:
        n = int((ctx.state or {}).get("n", 0))
        steps = int(ctx.params.get("steps", 3))
        while n < steps:
            await asyncio.sleep(float(ctx.params.get("interval", 0.05)))
            n += 1
            await ctx.emit("step", {"n": n})
            await ctx.checkpoint({"n": n})
        return {"steps": n}


class Remember:
    """Counts its runs on a thread: ``n`` one more than the state it started from,
    checkpointed; returns ``{"thread_id", "n"}``. With ``params["hold"]``, waits for a
    close after the checkpoint."""

    async def run(self, ctx: SessionContext) -> Any:
        n = int((ctx.state or {}).get("n", 0)) + 1
        await ctx.checkpoint({"n": n})
        if ctx.params.get("hold"):
            await ctx.closing.wait()
        return {"thread_id": ctx.thread_id, "n": n}


class Voice:
    """A worker with a Params model: ``language`` (two letters) and ``speed`` in (0, 4].
    Runs until closed, checkpointing ``{"n": n}`` every ``tick`` seconds."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        language: str = Field(pattern=r"^[a-z]{2}$")
        speed: float = Field(default=1.0, gt=0, le=4)
        tick: float = Field(default=0.05, gt=0)

    async def run(self, ctx: SessionContext) -> Any:
        n = int((ctx.state or {}).get("n", 0))
        while not ctx.closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.closing.wait(), ctx.params["tick"])
            if ctx.closing.is_set():
                break
            n += 1
            await ctx.checkpoint({"n": n, "language": ctx.params["language"]})
        return {"n": n}


class Migratable(Counter):
    """The counter, handed off at once when its node drains."""

    migratable = True
