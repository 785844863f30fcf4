"""Limits on what clients send, beyond the body size: the depth and size of ``params``."""

from __future__ import annotations

import json
from typing import Any

from fleet.errors import InvalidParams
from fleet.settings import Settings


def depth(value: Any, limit: int) -> int:
    """How deeply ``value`` nests, counting no further than ``limit + 1``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def check_params(params: dict[str, Any], settings: Settings) -> None:
    size = len(json.dumps(params, separators=(",", ":")).encode())
    if size > settings.max_params_bytes:
        raise InvalidParams(
            f"params is {size} bytes of JSON; the limit is {settings.max_params_bytes}"
        )
    if depth(params, settings.max_params_depth) > settings.max_params_depth:
        raise InvalidParams(f"params nests deeper than {settings.max_params_depth} levels")
