"""Metrics of real processes: a 2-worker gunicorn pod, and a fleet of nodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.multinode.harness import LocalFleet
from tests.redis_server import RedisServer, free_port
from tests.test_metrics import value


def _scrape(client: httpx.Client, url: str) -> str:
    return client.get(f"{url}/metrics").text


def test_gunicorn_pod_scrape_gives_the_whole_pods_figures() -> None:
    redis = RedisServer().start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    metrics_dir = tempfile.mkdtemp(prefix="fleet-mp-")
    Path(metrics_dir, "stale_counter_999.db").write_bytes(b"junk from an old run")
    log = Path(metrics_dir).parent / f"gunicorn-{port}.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
        "FLEET_REDIS_URL": redis.url,
        "FLEET_NODE_TTL": "2",
        "FLEET_MAINTENANCE_INTERVAL": "0.5",
        "FLEET_DRAIN_TIMEOUT": "1",
        "FLEET_CLOSE_GRACE": "1",
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet", "serve", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    client = httpx.Client(timeout=10)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                # Both workers ready: a worker is listed once it holds its lease, and ready
                # once its control channel is subscribed too; the pod's gauge is their min.
                nodes = client.get(f"{url}/nodes").json()["nodes"]
                if len(nodes) == 2 and value(_scrape(client, url), "fleet_node_ready") == 1:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        for _ in range(8):
            assert client.post(f"{url}/calls/pod/sessions").status_code == 201
        owners = {s["node_id"] for s in client.get(f"{url}/calls/pod/sessions").json()["sessions"]}
        for _ in range(6):  # any worker answers the scrape, each with the pod's totals
            text = _scrape(client, url)
            assert value(text, "fleet_sessions_started_total") == 8
            assert value(text, "fleet_sessions_active", state="running") == 8
            assert value(text, "fleet_node_ready") == 1
        # A worker dies: gunicorn replaces it, its sessions resume on a live worker, and its
        # live gauges leave the sum (no double counting).
        victim = sorted(owners)[0]
        os.kill(int(victim.split("-")[-2]), signal.SIGKILL)
        deadline = time.monotonic() + 15
        while True:
            try:  # a connection to the killed worker is reset: just ask again
                sessions = client.get(f"{url}/calls/pod/sessions").json()["sessions"]
                text = _scrape(client, url)
            except httpx.TransportError:
                continue
            moved = all(s["node_id"] != victim and s["state"] == "running" for s in sessions)
            if moved and value(text, "fleet_sessions_active", state="running") == 8:
                break
            assert time.monotonic() < deadline, (sessions, log.read_text()[-3000:])
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not Path(metrics_dir, "stale_counter_999.db").exists()
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        redis.stop()


def test_each_node_reports_its_own_work() -> None:
    with LocalFleet(2, FLEET_MAINTENANCE_INTERVAL="60") as fleet:
        a, b = fleet.nodes
        sids = [fleet.start("m", node=a)["session_id"] for _ in range(3)]
        for _ in range(2):
            fleet.start("m", node=b)
        resp = fleet.request("DELETE", f"/calls/m/sessions/{sids[0]}", b, params={"wait": 5})
        assert resp.status_code == 200
        text_a, text_b = _scrape(fleet.http, a.url), _scrape(fleet.http, b.url)
        assert value(text_a, "fleet_sessions_started_total") == 3
        assert value(text_b, "fleet_sessions_started_total") == 2
        assert value(text_a, "fleet_sessions_ended_total", reason="closed") == 1
        assert value(text_a, "fleet_session_close_seconds_count") == 1
        assert value(text_a, "fleet_sessions_active", state="running") == 2
        assert value(text_b, "fleet_sessions_active", state="running") == 2
        # Set by the maintenance pass, as this node sees the fleet then.
        assert value(text_a, "fleet_nodes_live") in (0, 1, 2)
