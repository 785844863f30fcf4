"""``fleet serve`` on a port that is taken: one line and a non-zero exit, before the node
starts, logs that it listens, or writes anything to Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest
import redis as redis_sync

from fleet.errors import CannotListen
from fleet.serve.server import bind
from tests.redis_server import RedisServer


def test_a_port_in_use_stops_serve_before_the_node_starts(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(FLEET_REDIS_URL=redis_server.url, FLEET_KEY_PREFIX=prefix)
        done = subprocess.run(
            [sys.executable, "-m", "fleet", "serve", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert f"fleet: port {port} on 127.0.0.1 is in use" in done.stderr
    for started in ("listening", "node started", "Traceback"):
        assert started not in done.stderr, done.stderr
    with redis_sync.Redis.from_url(redis_server.url) as r:
        assert list(r.scan_iter(match=f"{prefix}:*")) == []


def test_bind_says_why_it_cannot_listen() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(CannotListen, match="is in use"):
            bind("127.0.0.1", taken.getsockname()[1])
    with pytest.raises(CannotListen, match="cannot listen on 192.0.2.1:"):
        bind("192.0.2.1", 0)  # TEST-NET: not an address of this machine
    sock = bind("127.0.0.1", 0)
    with sock:
        assert sock.getsockname()[0] == "127.0.0.1"
