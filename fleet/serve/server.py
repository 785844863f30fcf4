"""One node in one process: uvicorn, with a drain on the first signal."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import threading
from types import FrameType

import uvicorn

from fleet.api import create_app
from fleet.errors import CannotListen
from fleet.runtime.node import Node
from fleet.runtime.session import CANCEL_GRACE
from fleet.serve import gc_tuning
from fleet.settings import Settings

log = logging.getLogger("fleet.server")

KEEP_ALIVE_SECONDS = 75


#: Seconds past drain + close grace + cancel grace before a shutdown that has not ended
#: is cut short (a worker that blocks the event loop, a task that ignores cancellation).
SHUTDOWN_SLACK = 5.0


class FleetServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM or SIGINT starts the node's drain while the
    server keeps answering (``/ready`` says 503, new starts are placed on other nodes, and
    every answer says ``Connection: close``); the server stops once the drain is over. A
    second signal exits at once, as a crash would: the sessions left behind keep their
    slots, and other nodes resume them once this node's lease lapses. Either way the
    process is gone within drain + close grace + cancel grace + ``SHUTDOWN_SLACK``
    seconds of the first signal, whatever its tasks do."""

    def __init__(self, config: uvicorn.Config, node: Node) -> None:
        super().__init__(config)
        self.node = node
        self._signals = 0
        self._watchdog: threading.Timer | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            gc_tuning.settle()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if not self.started:
            super().handle_exit(sig, frame)
            return
        if self._signals > 1:
            exit_now(
                "second signal: exiting now; other nodes resume this node's sessions once "
                "its lease lapses",
                code=1,
            )
        self._arm_watchdog()
        self.node.begin_drain()
        asyncio.get_running_loop().create_task(self._exit_when_drained())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.node.left_behind:
            # The node recorded everything; only tasks that ignore cancellation are left,
            # and asyncio's own clean-up would wait for them forever.
            exit_now("tasks left behind by workers that ignore cancellation: exiting", code=0)

    def _arm_watchdog(self) -> None:
        s = self.node.settings
        bound = s.drain_timeout + s.close_grace + CANCEL_GRACE + SHUTDOWN_SLACK
        self._watchdog = threading.Timer(
            bound, exit_now, (f"shutdown still running {bound:.0f}s after the signal",)
        )
        self._watchdog.daemon = True
        self._watchdog.start()

    async def _exit_when_drained(self) -> None:
        await self.node.drained.wait()
        self.should_exit = True


def exit_now(why: str, code: int = 1) -> None:
    """Leave at once, from any thread: log why, flush the logs, skip every cleanup."""
    log.error("%s", why)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(code)


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
