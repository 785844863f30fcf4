"""gunicorn hooks for ``fleet serve --workers N``: Prometheus multiprocess mode.

Every worker process writes its metrics to files in ``PROMETHEUS_MULTIPROC_DIR``; a scrape of
any worker reads them all, so it gives the whole pod's figures. The directory is emptied when
gunicorn starts (stale files would add old counts), and a dead worker's live gauges are
dropped when it exits.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


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
