"""A real ``prometheus`` server for tests: its own TSDB in a directory of the test's, on a
free loopback port, running a given prometheus.yml; plus the HTTP API calls tests make."""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.redis_server import free_port

INSTALL_HINT = "apt-get install -y prometheus"


def timestamp(rfc3339: str) -> float:
    """Unix time of an API timestamp such as an alert's ``activeAt``."""
    return datetime.fromisoformat(rfc3339).timestamp()


class LocalPrometheus:
    """``with LocalPrometheus(config, workdir) as prom:`` runs ``prometheus`` on ``config``
    (a prometheus.yml as a dict; relative rule_files resolve against ``workdir``)."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError(f"prometheus is not installed; install it with: {INSTALL_HINT}")
        self.binary = binary
        self.dir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(timeout=10)

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.dir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def __enter__(self) -> LocalPrometheus:
        self.proc = self._spawn()
        moves = 0
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None:
                # free_port() only found the port free a moment ago: it may be taken since.
                if "address already in use" in self.log()[-2000:] and moves < 3:
                    moves += 1
                    self.proc = self._spawn()
                    continue
                self.__exit__()
                raise AssertionError(f"prometheus exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError(f"prometheus not ready in 30s:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _ready(self) -> bool:
        try:
            return self.http.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- HTTP API -------------------------------------------------------------------------
    def get(self, path: str, **params: Any) -> dict[str, Any]:
        """The API's JSON answer, an error one (``status: error``) included."""
        resp = self.http.get(f"{self.url}/api/v1/{path}", params=params)
        body: dict[str, Any] = resp.json()
        return body

    def data(self, path: str, **params: Any) -> Any:
        body = self.get(path, **params)
        assert body["status"] == "success", f"GET /api/v1/{path} {params}: {body}"
        return body["data"]

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts, pending and firing (resolved ones are left out)."""
        alerts: list[dict[str, Any]] = self.data("alerts")["alerts"]
        return alerts

    def targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.data("targets", state="active")["activeTargets"]
        return targets

    def query_range(self, expr: str, start: float, end: float, step: float) -> dict[str, Any]:
        return self.get("query_range", query=expr, start=start, end=end, step=step)

    def label_values(self, label: str, match: str, start: float, end: float) -> list[str]:
        values: list[str] = self.data(
            f"label/{label}/values", **{"match[]": match}, start=start, end=end
        )
        return values
