"""``fleet serve --workers N``: gunicorn with uvicorn workers, one node per process.

Prometheus runs in multiprocess mode: every worker process writes its metrics to files in
``PROMETHEUS_MULTIPROC_DIR``, and a scrape of any worker reads them all, so it gives the
whole pod's figures. The directory is emptied when gunicorn starts (stale files would add
old counts), and a dead worker's live gauges are dropped when it exits.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from uvicorn_worker import UvicornWorker

from fleet.serve.server import KEEP_ALIVE_SECONDS, FleetServer
from fleet.settings import Settings, default_node_id


class FleetGunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        config: dict[str, Any] = {
            "bind": f"{s.host}:{s.port}",
            "workers": s.workers,
            "worker_class": f"{__name__}.FleetWorker",
            # No control socket: it would live under $HOME, which a locked-down image lacks.
            "control_socket_disable": True,
            "on_starting": on_starting,
            "child_exit": child_exit,
            # The drain runs inside each worker: gunicorn must wait for it, and then some.
            "graceful_timeout": int(s.drain_timeout + s.close_grace) + 10,
            "timeout": max(30, int(s.node_ttl * 3)),
            "keepalive": KEEP_ALIVE_SECONDS,
        }
        for key, value in config.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        """Runs in each worker process after the fork: each gets a node id of its own."""
        from fleet.api import create_app

        settings = self.settings
        if "node_id" in settings.model_fields_set:
            node_id = f"{settings.node_id}-{os.getpid()}"
        else:
            node_id = default_node_id()
        return create_app(settings.model_copy(update={"node_id": node_id}))


class FleetWorker(UvicornWorker):  # type: ignore[misc]
    """A gunicorn worker that runs one fleet node with the same drain as ``fleet serve``."""

    CONFIG_KWARGS = {"loop": "auto", "http": "auto", "server_header": False}

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        server = FleetServer(config=self.config, node=self.wsgi.state.node)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


def on_starting(server: Any) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        path = Path(directory)
        if path.exists():
            for child in path.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        path.mkdir(parents=True, exist_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def run_gunicorn(settings: Settings) -> int:
    FleetGunicorn(settings).run()
    return 0
