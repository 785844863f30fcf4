"""``fleet demo``: a whole fleet on this machine, to try fleet out.

It starts a real ``redis-server`` on a free loopback port, N ``fleet serve`` nodes on free
loopback ports pointing at it, and an nginx or haproxy front on ``127.0.0.1:<port>`` that
spreads requests round-robin, as a production load balancer would. It prints the URLs and
a status line refreshed every second, and on Ctrl-C or SIGTERM stops everything it
started, by PID, in order: the front, the nodes (they drain), Redis.

The pieces it runs (binaries, front configurations, child processes) are in
``processes.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.cli.processes import (
    Child,
    DemoError,
    StopFlag,
    find,
    find_front,
    free_port,
    haproxy_config,
    install_hint,
    nginx_config,
    port_is_free,
    stop_children,
)
from fleet.client import AsyncFleetClient
from fleet.errors import FleetError, WorkerLoadError
from fleet.models import State
from fleet.worker import load_workers

# Demo-friendly node settings (the environment wins): a dead node's sessions resume
# within seconds, and Ctrl-C does not wait out a 30 s drain.
NODE_DEFAULTS = {
    "FLEET_NODE_TTL": "3",
    "FLEET_MAINTENANCE_INTERVAL": "1",
    "FLEET_DRAIN_TIMEOUT": "2",
    "FLEET_CLOSE_GRACE": "2",
}
START_TIMEOUT = 30.0  # seconds for Redis, every node and the front to answer
STOP_TIMEOUT = 10.0  # seconds a child gets after SIGTERM before SIGKILL
TICK = 1.0  # seconds between status lines


# ---- the demo ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to start, checked before anything starts."""

    nodes: int
    port: int
    redis: str  # the redis-server binary
    front: tuple[str, str] | None  # (kind, binary), or None for --no-front
    worker: str | None = None  # FLEET_WORKER for the nodes (None: the environment's)

    @classmethod
    def make(
        cls,
        nodes: int,
        port: int,
        front: str | None,
        path: str | None = None,
        *,
        worker: str | None = None,
    ) -> Plan:
        if worker is not None:
            try:  # here, once, rather than in every node after Redis has started
                load_workers(worker)
            except WorkerLoadError as exc:
                raise DemoError(exc.detail) from None
        redis = find("redis-server", path)
        if redis is None:
            raise DemoError(
                f"redis-server is not installed; install it with: {install_hint('redis-server')}"
            )
        chosen = find_front(front, path) if front is not None else None
        if chosen is not None and not port_is_free(port):
            raise DemoError(f"port {port} on 127.0.0.1 is in use; choose another with --port")
        return cls(nodes, port, redis, chosen, worker)


def _seconds_from_env(name: str) -> float:
    try:
        return float(os.environ.get(name) or NODE_DEFAULTS[name])
    except ValueError:
        return float(NODE_DEFAULTS[name])


class Demo:
    """Starts the children of a ``Plan``, watches them, and stops them."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.workdir = Path(tempfile.mkdtemp(prefix="fleet-demo-"))
        self.flag = StopFlag()
        self.tty = sys.stdout.isatty()
        self._status_shown = False
        redis_port = free_port([plan.port])
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.redis = Child(
            "redis-server",
            [plan.redis, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            self.workdir / "redis.log",
            url=self.redis_url,
        )  # fmt: skip
        self.nodes = [self._node(i, free_port([plan.port, redis_port])) for i in range(plan.nodes)]
        self.front = self._front() if plan.front is not None else None

    def _node(self, index: int, port: int) -> Child:
        name = f"node-{index + 1}"
        env = {**NODE_DEFAULTS, **os.environ}
        env.update(
            FLEET_REDIS_URL=self.redis_url,
            FLEET_NODE_ID=name,
            FLEET_HOST="127.0.0.1",
            FLEET_PORT=str(port),
            FLEET_WORKERS="1",
            PYTHONUNBUFFERED="1",
        )
        if self.plan.worker is not None:
            env["FLEET_WORKER"] = self.plan.worker
        argv = [sys.executable, "-m", "fleet", "serve", "--host", "127.0.0.1", "--port", str(port)]
        return Child(name, argv, self.workdir / f"{name}.log", env, f"http://127.0.0.1:{port}")

    def _front(self) -> Child:
        assert self.plan.front is not None
        kind, binary = self.plan.front
        node_ports = [int(n.url.rsplit(":", 1)[1]) for n in self.nodes]
        if kind == "nginx":
            conf = self.workdir / "nginx.conf"
            conf.write_text(nginx_config(self.workdir, self.plan.port, node_ports))
            argv = [binary, "-p", f"{self.workdir}/", "-c", str(conf),
                    "-e", str(self.workdir / "nginx-error.log")]  # fmt: skip
        else:
            conf = self.workdir / "haproxy.cfg"
            conf.write_text(haproxy_config(self.plan.port, node_ports))
            argv = [binary, "-db", "-f", str(conf)]
        return Child(
            kind, argv, self.workdir / f"{kind}.log", url=f"http://127.0.0.1:{self.plan.port}"
        )

    @property
    def children(self) -> list[Child]:
        return [self.redis, *self.nodes, *([self.front] if self.front else [])]

    # -- running ---------------------------------------------------------------------------

    def run(self) -> int:
        """Start, watch until a signal, stop. 0 after Ctrl-C/SIGTERM, 1 on a failure."""
        self.flag.install()
        code = 0
        try:
            asyncio.run(self._main())
        except DemoError as exc:
            self._end_status_line()
            print(f"fleet demo: {exc.detail}", file=sys.stderr, flush=True)
            code = 1
        finally:
            self._end_status_line()
            self._stop()
            self.flag.restore()
        if code == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"fleet demo: logs kept in {self.workdir}", file=sys.stderr, flush=True)
        return code

    async def _main(self) -> None:
        self.redis.start()
        if not await self._until(self._redis_answers, [self.redis], "redis-server"):
            return
        for node in self.nodes:
            node.start()
        clients = [AsyncFleetClient(n.url, timeout=2.0) for n in self.nodes]
        front = AsyncFleetClient(self.front.url, timeout=2.0) if self.front else None
        try:
            if not await self._until(lambda: _all_ready(clients), self.nodes, "the nodes"):
                return
            if self.front is not None and front is not None:
                self.front.start()
                if not await self._until(lambda: _ready(front), [self.front], self.front.name):
                    return
            self._banner()
            await self._watch(clients, front)
        finally:
            for client in [*clients, *([front] if front else [])]:
                await client.aclose()

    async def _until(
        self, check: Callable[[], object], children: Sequence[Child], what: str
    ) -> bool:
        """Poll ``check`` until it holds (True), a signal comes (False), or a child exits
        or time runs out (DemoError with the end of its log)."""
        deadline = time.monotonic() + START_TIMEOUT
        while not self.flag.requested:
            for child in children:
                if (code := child.exited()) is not None:
                    raise DemoError(f"{child.name} exited with code {code}:\n{child.tail()}")
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return True
            if time.monotonic() > deadline:
                logs = "\n".join(c.tail(5) for c in children)
                raise DemoError(f"{what} did not answer within {START_TIMEOUT:.0f}s:\n{logs}")
            await asyncio.sleep(0.1)
        return False

    async def _redis_answers(self) -> bool:
        host, port = "127.0.0.1", int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _watch(self, clients: list[AsyncFleetClient], front: AsyncFleetClient | None) -> None:
        """The status line, every second, until a signal. Redis or the front dying ends
        the demo; a node dying does not (killing one is how to watch a failover)."""
        while not self.flag.requested:
            for child in (self.redis, self.front):
                if child is not None and (code := child.exited()) is not None:
                    raise DemoError(
                        f"{child.name} exited with code {code}; stopping.\n{child.tail()}"
                    )
            self._show(await status_line(self.nodes, clients, front))
            deadline = time.monotonic() + TICK
            while not self.flag.requested and time.monotonic() < deadline:
                await asyncio.sleep(0.1)

    # -- output ----------------------------------------------------------------------------

    def _banner(self) -> None:
        rows: list[tuple[str, str, str]] = []
        if self.front is not None:
            rows.append(("front", self.front.url, f"{self.front.name} (pid {self.front.pid})"))
        for node in self.nodes:
            rows.append((node.name, node.url, f"fleet serve (pid {node.pid})"))
        rows.append(("redis", self.redis_url, f"redis-server (pid {self.redis.pid})"))
        rows.append(("logs", f"{self.workdir}/", ""))
        width = max(len(r[1]) for r in rows)
        url = self.front.url if self.front else self.nodes[0].url
        lines = [f"fleet demo: {len(self.nodes)} nodes on one Redis"]
        if self.plan.worker is not None:
            lines[0] += f", running {self.plan.worker}"
        lines += [f"  {name:<7} {where:<{width}}  {what}".rstrip() for name, where, what in rows]
        lines += [
            "",
            "Try:",
            f"  curl -s -X POST {url}/calls/demo/sessions",
            f"  FLEET_URL={url} fleet sessions ls",
            "  kill a node's pid and watch its sessions resume on the others",
            "Ctrl-C stops everything.",
            "",
        ]
        print("\n".join(lines), flush=True)

    def _show(self, line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        if self.tty:
            sys.stdout.write(f"\r\x1b[2K{stamped}")
            sys.stdout.flush()
            self._status_shown = True
        elif line != getattr(self, "_last_line", None):
            print(stamped, flush=True)
        self._last_line = line

    def _end_status_line(self) -> None:
        if self._status_shown:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._status_shown = False

    # -- stopping --------------------------------------------------------------------------

    def _stop(self) -> None:
        """Front first (no request reaches a stopping node through it), then the nodes
        together (they drain and hand off), then Redis."""
        if not any(c.running() for c in self.children):
            return
        print("fleet demo: stopping", file=sys.stderr, flush=True)
        node_grace = (
            _seconds_from_env("FLEET_DRAIN_TIMEOUT")
            + _seconds_from_env("FLEET_CLOSE_GRACE")
            + STOP_TIMEOUT
        )
        if self.front is not None:
            stop_children([self.front], self.flag, STOP_TIMEOUT)
        stop_children(self.nodes, self.flag, node_grace)
        stop_children([self.redis], self.flag, STOP_TIMEOUT)
        print("fleet demo: stopped", file=sys.stderr, flush=True)


async def _ready(client: AsyncFleetClient) -> bool:
    try:
        return (await client.ready()).ready
    except FleetError:
        return False


async def _all_ready(clients: Sequence[AsyncFleetClient]) -> bool:
    return all(await asyncio.gather(*(_ready(c) for c in clients)))


async def status_line(
    nodes: Sequence[Child], clients: Sequence[AsyncFleetClient], front: AsyncFleetClient | None
) -> str:
    """``nodes ready 3/3 | sessions running 6/9 | node-1 2, node-2 2, node-3 2``: read
    through the client, from the front (or the first node that answers)."""
    ready = await asyncio.gather(*(_ready(c) for c in clients))
    sources = (
        [front] if front is not None else [c for c, ok in zip(clients, ready, strict=True) if ok]
    )
    running: Counter[str] = Counter()
    total: int | None = None
    for source in sources:
        try:
            total, running = 0, Counter()
            async for info in source.iter_sessions(page_size=1000):
                total += 1
                if info.state == State.RUNNING:
                    running[info.node_id] += 1
            break
        except FleetError:
            total = None
    per_node = ", ".join(
        f"{n.name} {running[n.name] if ok else ('not ready' if n.running() else 'exited')}"
        for n, ok in zip(nodes, ready, strict=True)
    )
    sessions = "?" if total is None else f"{sum(running.values())}/{total}"
    return f"nodes ready {sum(ready)}/{len(nodes)} | sessions running {sessions} | {per_node}"


def run_demo(
    nodes: int = 3, port: int = 8000, front: str | None = "auto", worker: str | None = None
) -> int:
    """``fleet demo``. ``front`` is ``auto``, ``nginx``, ``haproxy``, or None for none;
    ``worker`` the nodes' ``FLEET_WORKER`` (None: as the environment says)."""
    try:
        plan = Plan.make(nodes, port, front, worker=worker)
    except DemoError as exc:
        print(f"fleet demo: {exc.detail}", file=sys.stderr)
        return 1
    return Demo(plan).run()
