"""``fleet demo --worker``: the demo's nodes run the worker named (the chat here), and a
worker that cannot be loaded stops the demo before anything starts."""

from __future__ import annotations

import re
import signal

import httpx
import pytest

from fleet.cli import demo, processes
from tests.multinode.test_demo import DemoProcess, descendants, need
from tests.redis_server import free_port


def test_demo_runs_the_worker_it_is_given() -> None:
    need("redis-server")
    run = DemoProcess("--nodes", "1", "--no-front", "--worker", "fleet.workers.chat:Chat")
    children: set[int] = set()
    try:
        run.expect(re.compile(r"running fleet\.workers\.chat:Chat"), 60)
        node = run.expect(re.compile(r"node-1\s+(http://127\.0\.0\.1:\d+)\s+fleet serve"), 10)
        run.expect(re.compile(r"nodes ready 1/1"), 30)
        children = descendants(run.proc.pid)
        with httpx.Client(base_url=node.group(1), timeout=15) as http:
            sid = http.post("/calls/demo/sessions").json()["session_id"]
            reply = http.post(
                f"/calls/demo/sessions/{sid}/messages",
                json={"data": {"text": "hi"}},
                params={"wait": 10},
            )
        assert reply.status_code == 200, reply.text
        assert reply.json()["reply"] == {"text": "#1 you said: hi", "turn": 1}
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish(60) == 0, run.text()
    finally:
        run.close(children)


def test_a_worker_that_cannot_load_stops_the_demo_first(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(processes.DemoError, match="cannot import module 'no_such_module'"):
        demo.Plan.make(1, free_port(), None, worker="no_such_module:Chat")
    assert demo.run_demo(1, free_port(), None, worker="fleet.workers.chat:Nope") == 1
    assert "has no attribute 'Nope'" in capsys.readouterr().err
