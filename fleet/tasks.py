"""Task helpers."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(
    *tasks: asyncio.Task[Any] | None, timeout: float | None = None
) -> set[asyncio.Task[Any]]:
    """Cancel tasks and wait for them to end, cancelling again while one still runs.
    With ``timeout``, give up after that many seconds and return the tasks still running
    (code that catches its cancellation and carries on), rather than wait forever.

    On Python 3.11 ``asyncio.wait_for`` loses a cancellation that lands just as its inner
    call completes, and redis-py wraps every socket write in it: a single ``cancel()``
    can leave a task running (a stream whose client left, a loop that never stops).
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    pending = {t for t in tasks if t is not None and not t.done()}
    while pending:
        if deadline is not None and loop.time() >= deadline:
            return pending
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
    return set()
