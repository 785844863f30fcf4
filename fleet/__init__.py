"""fleet: long-lived worker sessions on a fleet of stateless nodes coordinated through Redis.

``fleet.Fleet`` is a node as a library (docs/embedding.md); it is imported on first use, so
that ``import fleet`` stays cheap (the command line, the client) and cycle-free.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.api.library import Fleet

try:
    __version__ = version("fleet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

__all__ = ["Fleet", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Fleet":
        from fleet.api.library import Fleet

        globals()["Fleet"] = Fleet  # later lookups skip this function
        return Fleet
    raise AttributeError(f"module 'fleet' has no attribute {name!r}")
