"""A gunicorn worker that runs one fleet node with the same drain as ``fleet serve``."""

from __future__ import annotations

import sys

from gunicorn.arbiter import Arbiter
from uvicorn_worker import UvicornWorker

from fleet.server import FleetServer


class FleetWorker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS = {"loop": "auto", "http": "auto", "server_header": False}

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        server = FleetServer(config=self.config, node=self.wsgi.state.node)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
