"""``fleet demo`` as a user runs it: a real redis-server, three ``fleet serve`` processes
and a real nginx or haproxy front, started, used, and stopped with Ctrl-C (SIGINT). Also
the front configurations (checked by nginx and haproxy themselves) and
``ops/compose.yaml``, the same fleet for Docker, whose structure is checked here since no
Docker engine is at hand."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from fleet.cli import demo, processes
from fleet.client import FleetClient
from tests.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "ops" / "compose.yaml"
STATUS = re.compile(r"nodes ready (\d+)/(\d+) \| sessions running (\d+)/(\d+) \| (.*)")


def need(binary: str) -> str:
    """The binary's path; a missing one fails the test with the command that installs it
    (nothing is silently skipped)."""
    path = processes.find(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: {processes.install_hint(binary)}", pytrace=False)
    return path


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class DemoProcess:
    """``python -m fleet demo ...`` with its output read line by line on a thread."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first line from now on that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line like {pattern.pattern!r}:\n{self.text()}")
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                assert self.proc.poll() is None, f"demo exited:\n{self.text()}"
                continue
            self.output.append(line)
            if match := pattern.search(line):
                return match

    def text(self) -> str:
        while not self.lines.empty():
            self.output.append(self.lines.get_nowait())
        return "\n".join(self.output)

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def close(self, pids: set[int]) -> None:
        """After the test: the demo and whatever it left behind are killed (if the test
        failed), and the pipe is closed."""
        for pid in [self.proc.pid, *pids]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def front_port() -> int:
    return free_port()


def wait_front_ready(url: str, run: DemoProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert run.proc.poll() is None, f"demo exited:\n{run.text()}"
        assert time.monotonic() < deadline, f"front not ready:\n{run.text()}"
        time.sleep(0.1)


@pytest.mark.parametrize("front", ["nginx", "haproxy"])
def test_demo_spreads_sessions_and_stops_everything(front: str, front_port: int) -> None:
    need("redis-server")
    need(front)
    run = DemoProcess("--nodes", "3", "--port", str(front_port), "--front", front)
    url = f"http://127.0.0.1:{front_port}"
    children: set[int] = set()
    try:
        banner = run.expect(re.compile(rf"front\s+{re.escape(url)}\s+{front} \(pid (\d+)\)"), 60)
        wait_front_ready(url, run)
        with FleetClient(url) as client:
            started = [client.start_session("demo-test") for _ in range(9)]
            assert {s.node_id for s in started} == {"node-1", "node-2", "node-3"}
            assert len(client.nodes()) == 3
        status = run.expect(re.compile(r"nodes ready 3/3 \| sessions running 9/9"), 20)
        parts = STATUS.search(status.string)
        assert parts is not None and parts.group(5).count(", ") == 2

        children = descendants(run.proc.pid)
        assert int(banner.group(1)) in children
        assert len(children) >= 5  # redis-server, three nodes, the front (and its workers)
        run.proc.send_signal(signal.SIGINT)
        assert run.finish(60) == 0, run.text()
        assert "fleet demo: stopped" in run.text()
        assert not [pid for pid in children if alive(pid)]
        assert not listening(front_port)
    finally:
        run.close(children)


def test_demo_without_front_stops_on_sigterm() -> None:
    need("redis-server")
    run = DemoProcess("--nodes", "1", "--no-front")
    children: set[int] = set()
    try:
        node = run.expect(re.compile(r"node-1\s+(http://127\.0\.0\.1:\d+)\s+fleet serve"), 60)
        run.expect(re.compile(r"nodes ready 1/1 \| sessions running 0/0 \| node-1 0"), 30)
        with FleetClient(node.group(1)) as client:
            assert client.ready().ready
        children = descendants(run.proc.pid)
        assert len(children) == 2  # redis-server and the node
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish(60) == 0, run.text()
        assert not [pid for pid in children if alive(pid)]
    finally:
        run.close(children)


# ---- what the demo checks before it starts anything -------------------------------------------


def test_missing_programs_name_their_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = str(tmp_path)
    with pytest.raises(processes.DemoError, match=r"apt-get install -y redis-server$"):
        demo.Plan.make(3, free_port(), "auto", path=empty)
    with pytest.raises(processes.DemoError) as neither:
        processes.find_front("auto", path=empty)
    assert "apt-get install -y nginx-light" in neither.value.detail
    assert "apt-get install -y haproxy" in neither.value.detail
    assert "--no-front" in neither.value.detail
    with pytest.raises(processes.DemoError, match=r"haproxy is not installed.*-y haproxy$"):
        processes.find_front("haproxy", path=empty)

    fake = tmp_path / "haproxy"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert processes.find_front("auto", path=empty) == ("haproxy", str(fake))

    # Through the command: one line on stderr, exit 1, nothing started.
    monkeypatch.setenv("PATH", empty)
    monkeypatch.setattr(processes, "EXTRA_PATH", ())
    assert demo.run_demo(3, free_port(), "auto") == 1
    assert capsys.readouterr().err == (
        "fleet demo: redis-server is not installed; install it with: "
        "apt-get install -y redis-server\n"
    )


def test_busy_port_is_refused() -> None:
    need("redis-server")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(processes.DemoError, match=f"port {port} on 127.0.0.1 is in use"):
            demo.Plan.make(3, port, "auto")


# ---- front configurations, checked by the programs themselves ----------------------------------


def nginx_test(tmp_path: Path, conf: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    return subprocess.run(
        [need("nginx"), "-t", "-p", f"{tmp_path}/", "-c", str(path),
         "-e", str(tmp_path / "error.log")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_generated_front_configs_are_valid(tmp_path: Path) -> None:
    conf = processes.nginx_config(tmp_path, 8000, [9001, 9002, 9003])
    assert "proxy_buffering off;" in conf and "daemon off;" in conf
    assert conf.count("server 127.0.0.1:") == 3 and "non_idempotent" not in conf
    checked = nginx_test(tmp_path, conf)
    assert checked.returncode == 0, checked.stderr

    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(processes.haproxy_config(8000, [9001, 9002]))
    assert "balance roundrobin" in cfg.read_text() and "uri /ready" in cfg.read_text()
    checked = subprocess.run(
        [need("haproxy"), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr


# ---- ops/compose.yaml ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


NODES = ["node-1", "node-2", "node-3"]


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", *NODES, "front"}
    assert "ports" not in services["redis"] and all("ports" not in services[n] for n in NODES)
    assert services["front"]["ports"] == ["127.0.0.1:8000:8080"]
    for name in NODES:
        node = services[name]
        assert node["build"] == {"context": "..", "dockerfile": "Dockerfile"}
        assert (COMPOSE.parent / node["build"]["context"] / "Dockerfile").resolve() == (
            REPO / "Dockerfile"
        )
        env = node["environment"]
        assert env["FLEET_NODE_ID"] == name
        assert env["FLEET_REDIS_URL"] == "redis://redis:6379/0"
        assert node["depends_on"] == {"redis": {"condition": "service_healthy"}}
    ids = [services[n]["environment"]["FLEET_NODE_ID"] for n in NODES]
    assert len(set(ids)) == 3
    assert services["front"]["depends_on"] == {n: {"condition": "service_healthy"} for n in NODES}


def test_compose_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, needle in [("redis", "ping"), ("front", "/ready"), *((n, "/ready") for n in NODES)]:
        check = services[name]["healthcheck"]
        assert check["test"][0] == "CMD" and needle in " ".join(check["test"]), name
        assert {"interval", "timeout", "retries"} <= set(check), name
    for name in NODES:  # the node's check must reach the port the image listens on
        assert "127.0.0.1:8000/ready" in " ".join(services[name]["healthcheck"]["test"])


def test_compose_nginx_config_is_valid(compose: dict[str, Any], tmp_path: Path) -> None:
    front = compose["services"]["front"]
    (mount,) = front["configs"]
    assert mount["target"] == "/etc/nginx/conf.d/default.conf"
    content: str = compose["configs"][mount["source"]]["content"]
    for needle in ("proxy_buffering off;", "listen 8080;", "proxy_next_upstream"):
        assert needle in content
    assert [f"node-{i}:8000" in content for i in (1, 2, 3)] == [True] * 3
    assert re.search(r"(?<!\$)\$(?!\$)", content) is None, "escape nginx variables as $$"

    # What nginx would read once compose has interpolated it, checked by the nginx here:
    # service names become loopback, and `resolve` (nginx >= 1.27.3) is left out for an
    # older local nginx.
    snippet = content.replace("$$", "$").replace(" resolve ", " ")
    snippet = re.sub(r"node-\d:8000", "127.0.0.1:8000", snippet)
    temp = "\n".join(
        f"{kind}_temp_path {tmp_path}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = f"{user}\npid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n{temp}\n{snippet}\n}}\n"
    checked = nginx_test(tmp_path, conf)
    assert checked.returncode == 0, checked.stderr


def test_compose_uses_the_image_the_dockerfile_builds(compose: dict[str, Any]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "EXPOSE 8000" in dockerfile and "FLEET_PORT=8000" in dockerfile
    images = {compose["services"][n]["image"] for n in NODES}
    assert images == {"fleet:local"}


@pytest.fixture(autouse=True)
def _no_leftover_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("FLEET_URL", raising=False)
    monkeypatch.delenv("FLEET_TOKEN", raising=False)
    yield
