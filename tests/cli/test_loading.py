"""Loading a worker through the real ``fleet`` console script (not ``python -m fleet``,
whose ``sys.path`` already starts at the working directory)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_server import free_port

WORKERS = """
import asyncio


class Quick:
    async def run(self, ctx):
        await ctx.emit("hello", {"from": __name__})


class NeedsArgs:
    def __init__(self, api_key):
        self.api_key = api_key

    async def run(self, ctx):
        await asyncio.sleep(0)
"""


@pytest.fixture
def script() -> str:
    """The ``fleet`` script installed next to this interpreter (the venv's)."""
    beside = Path(sys.executable).parent / "fleet"
    found = str(beside) if beside.exists() else shutil.which("fleet")
    if found is None:
        pytest.fail("no 'fleet' console script: pip install -e . first", pytrace=False)
    return found


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "mod.py").write_text(WORKERS)
    return tmp_path


def env() -> dict[str, str]:
    """No FLEET_* settings and no PYTHONPATH: only the working directory can provide mod."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLEET_") and k not in ("PYTHONPATH", "PYTHONSAFEPATH")
    }


def test_fleet_run_loads_a_worker_from_the_working_directory(script: str, workdir: Path) -> None:
    done = subprocess.run(
        [script, "run", "--worker", "mod:Quick"],
        cwd=workdir,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in events] == ["session_started", "hello", "session_ended"]
    assert events[1]["data"] == {"from": "mod"}


def test_serve_refuses_a_class_it_cannot_build_before_listening(script: str, workdir: Path) -> None:
    done = subprocess.run(
        [script, "serve", "--worker", "mod:NeedsArgs", "--port", str(free_port())],
        cwd=workdir,
        env=env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert (
        "fleet: worker 'mod:NeedsArgs': class NeedsArgs cannot be built without arguments "
        "(TypeError: NeedsArgs.__init__() missing 1 required positional argument: 'api_key')"
    ) in done.stderr
    assert "listening" not in done.stderr and "Traceback" not in done.stderr
