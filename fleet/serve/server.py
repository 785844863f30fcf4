"""One node in one process: uvicorn, with a drain on the first signal."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from types import FrameType

import uvicorn

from fleet.api import create_app
from fleet.errors import CannotListen
from fleet.runtime.node import Node
from fleet.serve import gc_tuning
from fleet.settings import Settings

log = logging.getLogger("fleet.server")

KEEP_ALIVE_SECONDS = 75


class FleetServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM or SIGINT starts the node's drain while the
    server keeps answering (``/ready`` says 503, new starts get 503 ``draining``); the
    server stops once the drain is over. A second signal stops it at once."""

    def __init__(self, config: uvicorn.Config, node: Node) -> None:
        super().__init__(config)
        self.node = node
        self._signals = 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            gc_tuning.settle()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1 or not self.started:
            super().handle_exit(sig, frame)
            return
        self.node.begin_drain()
        asyncio.get_running_loop().create_task(self._exit_when_drained())

    async def _exit_when_drained(self) -> None:
        await self.node.drained.wait()
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts: a port in use stops
    ``fleet serve`` with one line, before the node registers or logs that it listens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CannotListen(
                f"port {port} on {host} is in use; choose another with --port or FLEET_PORT"
            ) from None
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run_uvicorn(settings: Settings) -> int:
    sock = bind(settings.host, settings.port)
    with sock:
        node = Node(settings)
        app = create_app(settings, node)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            timeout_graceful_shutdown=max(1, int(settings.close_grace) + 1),
            proxy_headers=True,
            # Longer than load balancers' idle timeouts (60 s on most), so the proxy closes
            # idle connections first and never reuses one this end is closing.
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            server_header=False,
            # fleet logs uvicorn's access lines at warning only (fleet.logs), and uvicorn never
            # writes them above info: do not format one per request just to drop it.
            access_log=False,
        )
        server = FleetServer(config, node)
        log.info(
            "listening on http://%s:%d (node %s, pid %d)",
            settings.host,
            sock.getsockname()[1],
            settings.node_id,
            os.getpid(),
        )
        server.run(sockets=[sock])
    return 0
