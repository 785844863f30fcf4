"""Task helpers."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel tasks and wait for them to end, cancelling again while one still runs.

    On Python 3.11 ``asyncio.wait_for`` loses a cancellation that lands just as its inner
    call completes, and redis-py wraps every socket write in it: a single ``cancel()``
    can leave a task running (a stream whose client left, a loop that never stops).
    """
    pending = {t for t in tasks if t is not None and not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
