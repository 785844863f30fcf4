"""Reading Server-Sent Events in tests, the way a browser's EventSource would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx

SSE = dict[str, str]  # one event's fields: id, event, data


async def read_sse(
    client: httpx.AsyncClient,
    url: str,
    *,
    upto: int | None = None,
    comments: list[str] | None = None,
    on_event: Callable[[SSE], None] | None = None,
    timeout: float = 20.0,
    method: str = "GET",
    **kw: Any,
) -> list[SSE]:
    """Events of an SSE response until it ends (or ``upto`` events, then hang up).
    Comment lines go to ``comments`` if given; ``kw`` goes to the request."""
    out: list[SSE] = []
    async with asyncio.timeout(timeout), client.stream(method, url, **kw) as resp:
        assert resp.status_code == 200, await resp.aread()
        fields: SSE = {}
        async for line in resp.aiter_lines():
            if line.startswith(":"):
                if comments is not None:
                    comments.append(line)
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if fields:
                out.append(fields)
                if on_event is not None:
                    on_event(fields)
                fields = {}
                if upto is not None and len(out) >= upto:
                    break
    return out


def ticks(events: list[SSE]) -> list[int]:
    """The counter's tick numbers, in the order received."""
    return [json.loads(e["data"])["n"] for e in events if e["event"] == "tick"]
