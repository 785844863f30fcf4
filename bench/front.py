"""An nginx front for a local fleet, as ``fleet demo`` runs it (``fleet.cli.processes``:
the same configuration, round-robin, and the same child process handling).

Not a benchmark (no ``run``): ``python -m bench`` skips it.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import common
from fleet.cli.processes import (
    Child,
    StopFlag,
    find_front,
    free_port,
    nginx_config,
    stop_children,
)

READY_WAIT = 10.0
STOP_WAIT = 5.0
# The access log line of fleet demo's nginx configuration:
# $remote_addr "$request" $status upstream=$upstream_addr $request_time
_ACCESS = re.compile(
    r'^\S+ "(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d+) upstream=(?P<up>.*) \S+$'
)


@dataclass(frozen=True)
class Front:
    url: str
    port: int
    workdir: Path

    @property
    def access_log(self) -> Path:
        return self.workdir / "nginx-access.log"

    def upstreams(self) -> dict[str, list[int]]:
        """Request path -> the node ports nginx tried for it, in order (more than one when
        it passed the request on to the next node)."""
        out: dict[str, list[int]] = {}
        try:
            lines = self.access_log.read_text(errors="replace").splitlines()
        except OSError:
            return out
        for line in lines:
            m = _ACCESS.match(line)
            if m is None:
                continue
            ports = [int(p) for p in re.findall(r":(\d+)", m["up"])]
            out[m["path"]] = ports
        return out

    def errors(self) -> list[str]:
        """nginx's error log (warnings and worse: failed upstream connections)."""
        try:
            return (self.workdir / "nginx-error.log").read_text(errors="replace").splitlines()
        except OSError:
            return []


@contextlib.contextmanager
def nginx(node_ports: Sequence[int]) -> Iterator[Front]:
    """nginx on a free loopback port in front of ``node_ports``, until the block ends."""
    _, binary = find_front("nginx")
    workdir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    port = free_port(node_ports)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(workdir, port, node_ports))
    argv = [binary, "-p", f"{workdir}/", "-c", str(conf), "-e", str(workdir / "nginx-error.log")]
    child = Child("nginx", argv, workdir / "nginx.log", url=f"http://127.0.0.1:{port}")
    child.start()
    try:
        _wait_ready(child)
        common.progress(f"nginx on {child.url} in front of ports {list(node_ports)}")
        yield Front(child.url, port, workdir)
    finally:
        stop_children([child], StopFlag(), STOP_WAIT)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(child: Child) -> None:
    """Until a node answers ready through nginx."""
    deadline = time.monotonic() + READY_WAIT
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{child.url}/ready", timeout=1).status_code == 200:
                return
        if not child.running() or time.monotonic() > deadline:
            raise RuntimeError(f"nginx did not answer on {child.url}:\n{child.tail()}")
        time.sleep(0.05)
