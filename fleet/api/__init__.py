"""The HTTP API: ``create_app(settings)``, and ``Fleet`` to embed it in an app of your own."""

from fleet.api.app import create_app
from fleet.api.library import Fleet

__all__ = ["Fleet", "create_app"]
