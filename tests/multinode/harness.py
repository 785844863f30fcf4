"""A local fleet for tests and benchmarks: a real redis-server and N real ``fleet serve``
processes on free loopback ports, plus a round-robin client."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

import httpx

from tests.redis_server import RedisServer, free_port


class NodeProcess:
    def __init__(self, name: str, port: int, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = env
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet", "serve", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def move_to(self, port: int) -> None:
        """Start again on another port (the one chosen was taken meanwhile)."""
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class RedisLike(Protocol):
    """A Redis to run against: a server, a Cluster or a Sentinel setup."""

    @property
    def url(self) -> str: ...
    def start(self) -> object: ...
    def stop(self) -> None: ...


class LocalFleet:
    """``with LocalFleet(3, FLEET_NODE_TTL="2") as fleet:`` starts Redis and three nodes."""

    def __init__(self, nodes: int = 3, redis: RedisLike | None = None, **settings: str) -> None:
        self.redis: RedisLike = redis or RedisServer()
        self._own_redis = redis is None
        self.dir = Path(tempfile.mkdtemp(prefix="fleet-nodes-"))
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.settings = {
            "FLEET_NODE_TTL": "3",
            "FLEET_MAINTENANCE_INTERVAL": "0.5",
            "FLEET_CLOSE_GRACE": "1",
            "FLEET_DRAIN_TIMEOUT": "1",
            **settings,
        }
        self.nodes = [self._make(f"node-{i}") for i in range(nodes)]
        self._rr = itertools.count()
        self.http = httpx.Client(timeout=10)

    def _make(self, name: str, **settings: str) -> NodeProcess:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
            "FLEET_REDIS_URL": self.redis.url,
            "FLEET_NODE_ID": name,
            "FLEET_KEY_PREFIX": self.prefix,
            "PYTHONUNBUFFERED": "1",
            **self.settings,
            **settings,
        }
        return NodeProcess(name, free_port(), env, self.dir / f"{name}.log")

    def __enter__(self) -> LocalFleet:
        if self._own_redis:
            self.redis.start()
        try:
            for node in self.nodes:
                node.start()
            self.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()
        for node in self.nodes:
            node.stop()
        if self._own_redis:
            self.redis.stop()

    def add_node(self, name: str, **settings: str) -> NodeProcess:
        """Start one more node; ``settings`` are its own on top of the fleet's."""
        node = self._make(name, **settings)
        self.nodes.append(node)
        node.start()
        self.wait_ready([node])
        return node

    # -- waiting ----------------------------------------------------------------------
    def ready(self, node: NodeProcess) -> bool:
        try:
            return self.http.get(f"{node.url}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, nodes: list[NodeProcess] | None = None, timeout: float = 20) -> float:
        """Seconds until every node answers ready."""
        began = time.monotonic()
        for node in nodes or self.nodes:
            moves = 0
            while not self.ready(node):
                if not node.alive():
                    # free_port() only found a port free a moment ago: another process (an
                    # outgoing connection's ephemeral port) may have taken it since.
                    if "is in use" in node.log()[-500:] and moves < 3:
                        moves += 1
                        node.move_to(free_port())
                        continue
                    raise AssertionError(f"{node.name} exited:\n{node.log()[-3000:]}")
                if time.monotonic() - began > timeout:
                    raise AssertionError(f"{node.name} not ready:\n{node.log()[-3000:]}")
                time.sleep(0.05)
        return time.monotonic() - began

    # -- requests ---------------------------------------------------------------------
    def next_node(self) -> NodeProcess:
        for _ in self.nodes:
            node = self.nodes[next(self._rr) % len(self.nodes)]
            if node.alive():
                return node
        raise AssertionError("no node is alive")

    def request(
        self, method: str, path: str, node: NodeProcess | None = None, **kw: Any
    ) -> httpx.Response:
        """A request to ``node``, or round-robin over the live nodes."""
        target = node or self.next_node()
        return self.http.request(method, target.url + path, **kw)

    def start(
        self, call: str = "demo", node: NodeProcess | None = None, **body: Any
    ) -> dict[str, Any]:
        resp = self.request("POST", f"/calls/{call}/sessions", node, json=body or None)
        assert resp.status_code == 201, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def session(self, call: str, sid: str, node: NodeProcess | None = None) -> dict[str, Any]:
        resp = self.request("GET", f"/calls/{call}/sessions/{sid}", node)
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def wait_session(
        self,
        call: str,
        sid: str,
        *,
        timeout: float = 10,
        via: NodeProcess | None = None,
        **expect: Any,
    ) -> dict[str, Any]:
        """Poll the session (through ``via``, or round-robin) until it matches ``expect``."""
        deadline = time.monotonic() + timeout
        while True:
            data = self.session(call, sid, via)
            if all(data.get(k) == v for k, v in expect.items()):
                return data
            if time.monotonic() > deadline:
                raise AssertionError(f"session {sid} is {data}, expected {expect}")
            time.sleep(0.02)

    def node_named(self, name: str) -> NodeProcess:
        return next(n for n in self.nodes if n.name == name)


class LoneNode:
    """One ``fleet serve`` on its embedded Redis (no ``FLEET_REDIS_URL``), as a new user
    runs it: ``with LoneNode(log_path, FLEET_DRAIN_TIMEOUT="1") as node: node.url``."""

    def __init__(self, log: Path, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        self.env.update(PYTHONUNBUFFERED="1", **settings)
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "fleet", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def __enter__(self) -> LoneNode:
        self.proc = self._spawn()
        deadline = time.monotonic() + 20
        moves = 0
        while True:
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None and "is in use" in self.log() and moves < 3:
                moves += 1  # the port was taken since free_port() found it free
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                self.proc = self._spawn()
                continue
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError(f"the node did not become ready:\n{self.log()}")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
