"""docs/embedding.md's script (examples/embedding/script.py): sessions driven with no HTTP,
on the embedded Redis and on a real redis-server; and run as the doc says to run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples.embedding.script import chat, count_to_three
from fleet.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PRINTED = ["completed {'n': 3}", "{'text': '#1 you said: hello', 'turn': 1}", "ended closed"]


async def test_the_script(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert await count_to_three(settings) == {"n": 3}
    assert await chat(settings) == {"text": "#1 you said: hello", "turn": 1}
    assert capsys.readouterr().out.splitlines() == PRINTED


def test_the_script_runs_as_the_doc_says() -> None:
    env = {**os.environ, "FLEET_DRAIN_TIMEOUT": "0.5", "FLEET_CLOSE_GRACE": "1"}
    env.pop("FLEET_REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "examples.embedding.script"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines() == PRINTED
