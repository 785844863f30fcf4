"""``fleet serve --workers N``: gunicorn with uvicorn workers, one node per process."""

from __future__ import annotations

import os
from typing import Any

from gunicorn.app.base import BaseApplication

from fleet import gunicorn_conf
from fleet.server import KEEP_ALIVE_SECONDS
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
            "worker_class": "fleet.gunicorn_worker.FleetWorker",
            # No control socket: it would live under $HOME, which a locked-down image lacks.
            "control_socket_disable": True,
            "on_starting": gunicorn_conf.on_starting,
            "child_exit": gunicorn_conf.child_exit,
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


def run_gunicorn(settings: Settings) -> int:
    FleetGunicorn(settings).run()
    return 0
