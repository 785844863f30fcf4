"""Workers the conversation benchmarks run in ``fleet serve`` (``bench.workers:Probe``).

Not a benchmark (no ``run``): ``python -m bench`` skips it.
"""

from __future__ import annotations

import os
import time
from typing import IO, Any

from fleet.worker import SessionContext


class Probe:
    """Consumes messages as fast as it can and says when each one arrived.

    Params (all optional):

    * ``log``: a file to append ``<seq> <client send time> <receive time>`` to for each
      message (``seq`` and ``t`` from the message's data; unix seconds, one machine's
      clock). Line-buffered, so the bench can read it while the session runs.
    * ``every``: checkpoint after this many messages (default 100), and whenever the
      inbox is empty for 20 ms with messages unconsumed, so nothing stays unconsumed.
    * ``gate``: a file; the worker reads no message until it exists (a backlog builds up
      meanwhile: how fast it drains is the owner's consumption ceiling).

    A message of type ``ask`` is answered at once with ``{"n": <messages so far>}``. The
    checkpoint is ``{"n": <messages consumed>}``.
    """

    async def run(self, ctx: SessionContext) -> None:
        import asyncio

        params: dict[str, Any] = ctx.params
        every = int(params.get("every", 100))
        n = int((ctx.state or {}).get("n", 0))
        log: IO[str] | None = open(params["log"], "a", buffering=1) if params.get("log") else None  # noqa: SIM115
        try:
            while params.get("gate") and not os.path.exists(params["gate"]):
                await asyncio.sleep(0.01)
            pending = 0
            while not ctx.closing.is_set():
                message = await ctx.receive(timeout=0.02 if pending else None)
                if message is None:
                    if pending:
                        await ctx.checkpoint({"n": n})
                        pending = 0
                    continue
                received = time.time()
                n += 1
                pending += 1
                if log is not None:
                    data = message.data if isinstance(message.data, dict) else {}
                    log.write(f"{data.get('seq', -1)} {data.get('t', 0.0)} {received:.6f}\n")
                if message.type == "ask":
                    await message.reply({"n": n})
                if pending >= every:
                    await ctx.checkpoint({"n": n})
                    pending = 0
        finally:
            if log is not None:
                log.close()


class Quick:
    """Returns at once, or answers a few messages first: the invoke and thread benchmark's
    worker (``bench.workers:Quick``).

    Params (all optional):

    * ``replies``: answer this many messages, each at once with ``{"n": <messages so
      far>}``, then return; 0 (the default): return at once without reading any (an
      invoke). It also returns when the session is closing.
    * ``every``: checkpoint ``{"n": ...}`` after this many messages (default 100), so a
      long-lived session's inbox never fills up.

    Returns ``{"ok": true, "n": <messages answered>}``.
    """

    async def run(self, ctx: SessionContext) -> dict[str, Any]:
        params: dict[str, Any] = ctx.params
        replies = int(params.get("replies", 0))
        every = int(params.get("every", 100))
        n = 0
        if replies > 0:
            async for message in ctx.messages:
                n += 1
                await message.reply({"n": n})
                if n >= replies:
                    break
                if n % every == 0:
                    await ctx.checkpoint({"n": n})
        return {"ok": True, "n": n}
