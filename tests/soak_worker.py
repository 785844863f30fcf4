"""The soak's worker (``tests/multinode/soak.py``): it counts, checkpoints every step and
writes what it did to a log that every node of the fleet appends to.

Each step: wait ``interval`` seconds (or return if asked to close), ``n += 1``,
``await ctx.checkpoint({"n": n})``, then one JSON line. The lines say what only the worker
can see: which copy of a session ran where (a random ``copy`` id per ``run``), what state
it was handed (``start``: ``resumed`` and ``state``), which checkpoints it was told were
saved (``ok``: ``n``), which were fenced (``lease_lost``), and how it stopped (``exit``,
``cancelled``, ``error``). The context does not expose the epoch: the soak joins these lines
with the accepted checkpoints in Redis (version, epoch, state) through ``n``.

Params: ``interval`` (seconds, default 0.1); ``steps`` (complete once ``n`` reaches it);
``stubborn`` (seconds: once asked to stop, by ``ctx.closing`` or a cancellation, carry on
that long without checkpointing, swallowing every cancellation, then stop as asked: user
code stuck in its clean-up, within a bound); ``log`` (the log's path; default: the
``SOAK_WORKER_LOG`` variable). Each line is
one ``os.write`` on a descriptor opened with ``O_APPEND``, so the lines of several
processes never interleave.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.worker import SessionContext

LOG_ENV = "SOAK_WORKER_LOG"
PARAMS = {"interval", "steps", "stubborn", "log"}


def _seconds(params: dict[str, Any], name: str, default: float, top: float) -> float:
    value = params.get(name, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= top
    ):
        raise ValueError(f"params.{name} must be a number of seconds in [0, {top}]")
    return float(value)


class _Log:
    """One session copy's lines, appended to the shared log (or dropped without a path)."""

    def __init__(self, path: str | None, ctx: SessionContext) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
        self._base = {
            "node": ctx.node_id,
            "pid": os.getpid(),
            "copy": secrets.token_hex(6),
            "call": ctx.call_id,
            "sid": ctx.session_id,
        }

    def write(self, ev: str, **fields: Any) -> None:
        if self._fd is not None:
            line = {"t": time.time(), "ev": ev, **self._base, **fields}
            os.write(self._fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SoakWorker:
    resumable = True

    @staticmethod
    def validate_params(params: dict[str, Any]) -> None:
        if _seconds(params, "interval", 0.1, 10) == 0:
            raise ValueError("params.interval must be over 0")
        _seconds(params, "stubborn", 0, 60)
        steps = params.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
            raise ValueError("params.steps must be a whole number")
        if not isinstance(params.get("log", ""), str):
            raise ValueError("params.log must be a path")
        unknown = set(params) - PARAMS
        if unknown:
            raise ValueError(f"unknown params: {', '.join(sorted(unknown))}")

    async def run(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self.interval = float(ctx.params.get("interval", 0.1))
        self.stubborn = float(ctx.params.get("stubborn", 0))
        self.gives_in: float | None = None  # stubborn, asked to stop: when it does
        steps = ctx.params.get("steps")
        state = ctx.state
        self.n = int(state["n"]) if isinstance(state, dict) and "n" in state else 0
        self.log = _Log(ctx.params.get("log") or os.environ.get(LOG_ENV), ctx)
        self.log.write("start", resumed=ctx.resumed, state=state)
        try:
            while steps is None or self.n < steps:
                if not await self._wait():
                    if self.stubborn:
                        await self._hold_out()
                    why = f"closing:{ctx.close_reason}" if ctx.closing.is_set() else "gave_in"
                    self.log.write("exit", why=why, n=self.n)
                    return
                await self._step()
            self.log.write("exit", why="completed", n=self.n)
        finally:
            self.log.close()

    async def _wait(self) -> bool:
        """Wait one interval; False once asked to stop: closed, or cancelled (which a
        stubborn worker swallows, to hold out)."""
        if self.ctx.closing.is_set() or self.gives_in is not None:
            return False
        try:
            async with asyncio.timeout(self.interval):
                await self.ctx.closing.wait()
            return False
        except TimeoutError:
            return True
        except asyncio.CancelledError:
            if not self.stubborn:
                self.log.write("cancelled", n=self.n)
                raise
            _uncancel()
            return False

    async def _hold_out(self) -> None:
        """A stubborn worker asked to stop carries on for ``stubborn`` seconds, without
        checkpointing, ignoring every cancellation; then it stops as asked."""
        if self.gives_in is None:
            self.gives_in = time.monotonic() + self.stubborn
        self.log.write("ignored", n=self.n, closing=self.ctx.closing.is_set())
        while (left := self.gives_in - time.monotonic()) > 0:
            try:
                await asyncio.sleep(left)
            except asyncio.CancelledError:
                _uncancel()

    async def _step(self) -> None:
        self.n += 1
        try:
            if self.stubborn:
                await self._write_shielded()
            else:
                await self.ctx.checkpoint({"n": self.n})
        except asyncio.CancelledError:
            self.log.write("cancelled", n=self.n)
            raise
        except Exception as exc:
            # LeaseLost (fleet.errors, which may move): another copy owns it now.
            code = getattr(exc, "code", "")
            self.log.write("lease_lost" if code == "lease_lost" else "error", n=self.n, code=code)
            raise
        self.ctx.metrics["n"] = self.n
        self.log.write("ok", n=self.n)

    async def _write_shielded(self) -> None:
        """A stubborn worker's write: a cancellation it swallows must not leave it unsure
        whether this n was saved (writing it again would be a duplicate the soak reports),
        so it waits for the write, then holds out."""
        write = asyncio.ensure_future(self.ctx.checkpoint({"n": self.n}))
        write.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        while True:
            try:
                await asyncio.shield(write)
                return
            except asyncio.CancelledError:
                _uncancel()
                if self.gives_in is None:
                    self.gives_in = time.monotonic() + self.stubborn


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


# -- reading the log back (the soak's side) --------------------------------------------------
@dataclass
class Copy:
    """One run of the worker for a session, as its lines tell it."""

    copy: str
    call: str
    sid: str
    node: str
    pid: int
    started: float
    resumed: bool
    state_n: int | None  # the n it was handed; None: no state
    oks: list[tuple[float, int]] = field(default_factory=list)  # (time, n) told saved
    end: str = ""  # exit:<why>, cancelled, lease_lost, error; "": none (killed, or running)
    ended_at: float | None = None

    @property
    def ended_itself(self) -> bool:
        """It returned on its own: completed, or closed (not handed off, not stopped)."""
        return self.end == "exit:completed" or (
            self.end.startswith("exit:closing:") and self.end != "exit:closing:handoff"
        )


def read_log(path: Path) -> tuple[list[Copy], int]:
    """The copies in the log, by start time, and how many lines could not be read."""
    copies: dict[str, Copy] = {}
    bad = 0
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        try:
            d = json.loads(line)
            if d["ev"] == "start":
                state = d["state"]
                n = state.get("n") if isinstance(state, dict) else None
                copies[d["copy"]] = Copy(
                    d["copy"], d["call"], d["sid"], d["node"], d["pid"], d["t"], d["resumed"], n
                )
                continue
            copy = copies[d["copy"]]
        except (ValueError, KeyError):
            bad += 1
            continue
        if d["ev"] == "ok":
            copy.oks.append((d["t"], d["n"]))
        elif d["ev"] != "ignored":
            copy.end = f"exit:{d['why']}" if d["ev"] == "exit" else d["ev"]
            copy.ended_at = d["t"]
    return sorted(copies.values(), key=lambda c: c.started), bad
