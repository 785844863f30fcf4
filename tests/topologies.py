"""Real local Redis topologies for tests and benchmarks: a 3-master Cluster, and a master
with a replica watched by 3 Sentinels. Debian's redis-server, redis-sentinel, redis-cli."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from tests.redis_server import RedisServer, free_port


def _need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(
            f"{binary} is not installed; install it with: apt-get install -y {package}"
        )
    return path


def _ask(port: int, *words: str) -> str:
    cli = _need("redis-cli", "redis-tools")
    done = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), *words],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    return done.stdout.strip()


class LocalCluster:
    """Three masters, no replicas, on free loopback ports."""

    def __init__(self, masters: int = 3) -> None:
        self.servers = [
            RedisServer(None, "--cluster-enabled", "yes", "--cluster-node-timeout", "2000")
            for _ in range(masters)
        ]
        for server in self.servers:
            server.extra = (
                *server.extra,
                "--cluster-config-file",
                str(server.dir / "nodes.conf"),
                # The bus port defaults to port + 10000, too high for most free ports.
                "--cluster-port",
                str(free_port()),
            )

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{s.port}" for s in self.servers)
        return f"redis+cluster://{seeds}"

    def start(self) -> LocalCluster:
        """Start the masters and make them one Cluster; return once every master says it
        is whole (a client that meets one still joining gets ``CLUSTERDOWN``). Should
        anything fail on the way, the servers started are stopped again."""
        try:
            for server in self.servers:
                server.start()
            cli = _need("redis-cli", "redis-tools")
            addresses = [f"127.0.0.1:{s.port}" for s in self.servers]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            deadline = time.monotonic() + 20
            for server in self.servers:
                while "cluster_state:ok" not in _ask(server.port, "cluster", "info"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the cluster did not come up")
                    time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def _clients(self) -> list[Any]:
        """A plain client per master (``Any``: ``execute_command`` is untyped)."""
        return [redis.Redis(port=s.port, decode_responses=True) for s in self.servers]

    def owner(self, slot: int) -> int:
        """The index in ``servers`` of the master that holds ``slot``."""
        with self._clients()[0] as client:
            for first, last, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if first <= slot <= last:
                    ports = [s.port for s in self.servers]
                    return ports.index(int(master[1]))
        raise RuntimeError(f"no master holds slot {slot}")

    def move_slot(self, slot: int, to: int) -> None:
        """Move ``slot`` and its keys to ``servers[to]``, as ``redis-cli --cluster reshard``
        does: importing/migrating, ``MIGRATE`` of the keys, then the new owner everywhere."""
        src = self.owner(slot)
        clients = self._clients()
        try:
            ids = [c.execute_command("CLUSTER", "MYID") for c in clients]
            clients[to].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
            clients[src].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to])
            while keys := clients[src].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
                port = self.servers[to].port
                clients[src].execute_command(
                    "MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys
                )
            for i in (to, src, *(i for i in range(len(clients)) if i not in (to, src))):
                clients[i].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to])
        finally:
            for client in clients:
                client.close()

    def bus_publishes(self) -> list[int]:
        """Per master: the classic ``PUBLISH``es it got from the others over the cluster
        bus (``cluster_stats_messages_publish_received``)."""
        counts = []
        for client in self._clients():
            with client:
                info = client.execute_command("CLUSTER", "INFO")
            line = next(
                (
                    x
                    for x in info.splitlines()
                    if x.startswith("cluster_stats_messages_publish_received:")
                ),
                "x:0",
            )
            counts.append(int(line.split(":")[1]))
        return counts


class LocalSentinel:
    """A master, one replica, and three sentinels watching them as ``fleet-master``."""

    SERVICE = "fleet-master"

    def __init__(self) -> None:
        self.master = RedisServer()
        self.replica = RedisServer(None, "--replicaof", "127.0.0.1", str(self.master.port))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.dir = Path(tempfile.mkdtemp(prefix="fleet-sentinel-"))
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def start(self) -> LocalSentinel:
        binary = _need("redis-sentinel", "redis-sentinel")
        self.master.start()
        self.replica.start()
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                f"sentinel failover-timeout {self.SERVICE} 5000\n"
                f"sentinel parallel-syncs {self.SERVICE} 1\n"
            )
            self._procs.append(
                subprocess.Popen(
                    [binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        for port in self.sentinel_ports:
            _wait_port(port)
        deadline = time.monotonic() + 20
        while True:
            replication = _ask(self.master.port, "info", "replication")
            if "connected_slaves:1" in replication and all(
                "num-other-sentinels" in _ask(p, "sentinel", "master", self.SERVICE)
                for p in self.sentinel_ports
            ):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("sentinels did not come up")
            time.sleep(0.1)
        return self

    def master_port(self) -> int:
        answer = _ask(
            self.sentinel_ports[0], "sentinel", "get-master-addr-by-name", self.SERVICE
        ).split()
        return int(answer[-1])

    def failover(self) -> None:
        """Force a failover and wait until the sentinels name the replica master."""
        old = self.master_port()
        _ask(self.sentinel_ports[0], "sentinel", "failover", self.SERVICE)
        deadline = time.monotonic() + 30
        while self.master_port() == old:
            if time.monotonic() > deadline:
                raise RuntimeError("no failover happened")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.master.stop()
        self.replica.stop()


def _wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
