"""``fleet sessions ls|show|close|send`` and ``fleet nodes`` against a real ``fleet serve``
process: tables, ``--json``, and exit codes. Failures are one line on stderr, exit 1."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet.cli import main as cli
from fleet.cli import nodes as cli_nodes
from fleet.cli import ops as cli_ops
from fleet.client import FleetClient
from tests.multinode.harness import LoneNode
from tests.redis_server import free_port


@pytest.fixture(scope="module")
def node_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One node on its embedded Redis, shared by the module's tests (each uses calls of
    its own)."""
    log = tmp_path_factory.mktemp("cli") / "node.log"
    settings = {"FLEET_NODE_ID": "cli-node", "FLEET_DRAIN_TIMEOUT": "0.5", "FLEET_CLOSE_GRACE": "1"}
    with LoneNode(log, **settings) as node:
        yield node.url


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEET_URL", raising=False)
    monkeypatch.delenv("FLEET_TOKEN", raising=False)


def fleet(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def call(node_url: str) -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


def start(url: str, call: str, n: int = 1, **params: float) -> list[str]:
    with FleetClient(url) as client:
        return [client.start_session(call, params or None).session_id for _ in range(n)]


# ---- the commands -------------------------------------------------------------------------


def test_nodes_table_and_json(node_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = fleet(capsys, "nodes", "--url", node_url)
    assert code == 0 and err == ""
    header, row = out.splitlines()
    assert header.split() == [
        "NODE", "HOST", "STATE", "SESSIONS", "CAPACITY", "UP", "HEARTBEAT", "VERSION", "WORKERS",
    ]  # fmt: skip
    assert row.split()[0] == "cli-node" and row.split()[2] == "up"
    assert row.split()[-1] == "counter"  # the default worker's name
    assert header.index("SESSIONS") + len("SESSIONS") == row.index(row.split()[3]) + len(
        row.split()[3]
    ), "numbers align right under their header"

    code, out, _ = fleet(capsys, "nodes", "--json", "--url", node_url)
    nodes = json.loads(out)["nodes"]
    assert code == 0 and [n["node_id"] for n in nodes] == ["cli-node"]


def test_ls_lists_filters_and_pages(
    node_url: str, call: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEET_URL", node_url)  # read from the environment, no --url
    sids = start(node_url, call, 3)
    code, out, err = fleet(capsys, "sessions", "ls", "--call", call)
    lines = out.splitlines()
    assert code == 0 and err == ""
    assert lines[0].split() == [
        "CALL", "SESSION", "STATE", "NODE", "AGE", "EPOCH", "RESUMED", "CKPT", "END",
    ]  # fmt: skip
    assert {line.split()[1] for line in lines[1:]} == set(sids)
    assert all(line.split()[2:4] == ["running", "cli-node"] for line in lines[1:])
    assert all(line.split()[4].endswith("s") for line in lines[1:])  # an age like 0s

    code, out, err = fleet(capsys, "sessions", "ls", "--call", call, "--state", "ended")
    assert (code, out, err) == (0, "", "no sessions\n")

    code, out, _ = fleet(capsys, "sessions", "ls", "--call", call, "--json", "--limit", "2")
    listed = json.loads(out)
    assert code == 0 and len(listed["sessions"]) == 2 and listed["next_cursor"] is None
    assert {s["session_id"] for s in listed["sessions"]} <= set(sids)

    # Fleet-wide: one page, with a hint when there is more; --all follows every page.
    code, out, err = fleet(capsys, "sessions", "ls", "--limit", "1")
    assert code == 0 and len(out.splitlines()) == 2 and "--all" in err
    code, out, _ = fleet(capsys, "sessions", "ls", "--all", "--json", "--node", "cli-node")
    everything = {s["session_id"] for s in json.loads(out)["sessions"]}
    assert code == 0 and set(sids) <= everything


def test_show_and_close(node_url: str, call: str, capsys: pytest.CaptureFixture[str]) -> None:
    (sid,) = start(node_url, call, interval=0.02)
    code, out, _ = fleet(capsys, "sessions", "show", call, sid, "--url", node_url)
    fields = dict(line.split(None, 1) for line in out.splitlines() if " " in line)
    assert code == 0 and fields["state"] == "running" and fields["session"] == sid
    assert "ago)" in fields["started"] and "metrics" in fields

    code, out, _ = fleet(capsys, "sessions", "show", call, sid, "--json", "--url", node_url)
    shown = json.loads(out)
    assert code == 0 and shown["session_id"] == sid and isinstance(shown["metrics"], dict)

    code, out, err = fleet(capsys, "sessions", "close", call, sid, "--wait", "5", "--url", node_url)
    assert code == 0 and err == ""
    assert out == f"{call}/{sid} ended (closed) on cli-node\n"

    (other,) = start(node_url, call)
    code, out, _ = fleet(capsys, "sessions", "close", call, other, "--json", "--url", node_url)
    assert code == 0 and json.loads(out) == {"state": "closing"}


def test_close_that_outlasts_its_wait_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(202, json={"state": "closing"}))
    monkeypatch.setattr(
        cli_ops, "make_client", lambda args: FleetClient("http://fleet", transport=transport)
    )
    code, out, err = fleet(capsys, "sessions", "close", "c", "s", "--wait", "2")
    assert code == 1 and out == "c/s closing: its node has been told\n"
    assert err == "fleet: c/s is still closing after 2s\n"


def test_send_prints_the_message_id(
    node_url: str, call: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (sid,) = start(node_url, call, interval=5)  # the counter: takes messages, never replies
    code, out, err = fleet(
        capsys, "sessions", "send", call, sid, "--data", '{"a": 1}', "--url", node_url
    )
    assert code == 0 and err == "" and re.fullmatch(r"\d+-\d+\n", out), out

    argv = ["sessions", "send", call, sid, "--data", "[1]", "--id", "m-1", "--url", node_url]
    code, first, _ = fleet(capsys, *argv, "--json")
    code2, again, _ = fleet(capsys, *argv, "--json")
    assert code == code2 == 0 and json.loads(first) == json.loads(again)
    assert set(json.loads(first)) == {"message_id"}

    code, out, err = fleet(capsys, *argv[:6], "--wait", "0.2", "--url", node_url)
    assert code == 1 and re.fullmatch(r"\d+-\d+\n", out)
    assert err == f"fleet: no reply to {out.strip()} after 0.2s\n"

    code, out, err = fleet(
        capsys, "sessions", "send", call, "nope", "--data", "1", "--url", node_url
    )
    assert code == 1 and out == "" and err.endswith("[404 not_found]\n")


def test_send_with_wait_prints_the_reply(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[httpx.Request] = []

    def reply(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"message_id": "7-0", "reply": {"ok": [1, "é"]}})

    monkeypatch.setattr(
        cli_ops,
        "make_client",
        lambda args: FleetClient("http://fleet", transport=httpx.MockTransport(reply)),
    )
    argv = ["sessions", "send", "c", "s", "--data", '{"q": "?"}', "--type", "question"]
    code, out, err = fleet(capsys, *argv, "--wait", "3")
    assert (code, out, err) == (0, '{"ok": [1, "é"]}\n', "")
    body = json.loads(seen[0].content)
    assert body["data"] == {"q": "?"} and body["type"] == "question" and body["id"]
    assert float(seen[0].url.params["wait"]) == 3
    code, out, _ = fleet(capsys, *argv, "--wait", "3", "--json")
    assert code == 0 and json.loads(out) == {"message_id": "7-0", "reply": {"ok": [1, "é"]}}


def test_send_with_bad_data_is_a_usage_error_and_sends_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={"message_id": "1-0"})

    monkeypatch.setattr(
        cli_ops,
        "make_client",
        lambda args: FleetClient("http://fleet", transport=httpx.MockTransport(record)),
    )
    for data in ("hi", "{'a': 1}", ""):
        with pytest.raises(SystemExit) as exited:
            cli.main(["sessions", "send", "c", "s", "--data", data])
        assert exited.value.code == 2
        assert "--data: not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sessions", "send", "c", "s"])  # --data is required
    assert seen == []
    assert fleet(capsys, "sessions", "send", "c", "s", "--data", '"hi"')[:2] == (0, "1-0\n")
    assert len(seen) == 1


# ---- failures -----------------------------------------------------------------------------


def test_unknown_session_is_one_line_and_exit_1(
    node_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = fleet(capsys, "sessions", "show", "demo", "nope", "--url", node_url)
    assert code == 1 and out == ""
    assert err.startswith("fleet: ") and err.endswith("[404 not_found]\n")
    assert err.count("\n") == 1
    code, _, err = fleet(capsys, "sessions", "close", "demo", "bad id!", "--url", node_url)
    assert code == 1 and "[422 invalid_request]" in err


def test_unreachable_and_unauthorized(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = fleet(capsys, "nodes", "--url", dead)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"fleet: cannot reach {dead}") and "FLEET_URL" in err

    code, _, err = fleet(capsys, "nodes", "--url", "ftp://nowhere")
    assert code == 1 and "http://" in err

    seen: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, json={"detail": "missing or bad token", "code": "unauthorized"})

    monkeypatch.setenv("FLEET_TOKEN", "cli-test-token-0123456789")
    monkeypatch.setattr(
        cli_ops,
        "make_client",
        lambda args: FleetClient("http://fleet", transport=httpx.MockTransport(refuse)),
    )
    code, _, err = fleet(capsys, "sessions", "ls")
    assert code == 1
    assert err == (
        "fleet: missing or bad token [401 unauthorized] "
        "(set FLEET_TOKEN to a token from the nodes' FLEET_API_KEYS)\n"
    )
    assert seen[0].headers["authorization"] == "Bearer cli-test-token-0123456789"


def test_as_a_process_no_traceback(node_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    dead = f"http://127.0.0.1:{free_port()}"
    failed = subprocess.run(
        [sys.executable, "-m", "fleet", "sessions", "ls", "--url", dead],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert failed.returncode == 1 and failed.stdout == ""
    assert "Traceback" not in failed.stderr and failed.stderr.count("\n") == 1
    listed = subprocess.run(
        [sys.executable, "-m", "fleet", "nodes", "--json"],
        capture_output=True,
        text=True,
        env={**env, "FLEET_URL": node_url},
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["nodes"][0]["node_id"] == "cli-node"


# ---- the pieces ---------------------------------------------------------------------------


def test_ages() -> None:
    seconds = (-3, 0, 59.9, 60, 192, 3599, 3600, 7500, 86400 * 3 + 3600 * 4)
    assert [cli_ops.age(s) for s in seconds] == [
        "0s", "0s", "59s", "1m00s", "3m12s", "59m59s", "1h00m", "2h05m", "3d04h",
    ]  # fmt: skip


def test_table_aligns() -> None:
    text = cli_ops.table(["NAME", "N"], [["a", "1"], ["longer", "100"]], right=frozenset({1}))
    assert text.splitlines() == ["NAME      N", "a         1", "longer  100"]


def test_serve_and_run_are_unchanged() -> None:
    parser = cli.build_parser()
    serve = parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "9", "--workers", "2"])
    assert serve.func is cli.cmd_serve and (serve.host, serve.port, serve.workers) == (
        "0.0.0.0", 9, 2,
    )  # fmt: skip
    run = parser.parse_args(["run", "--params", "{}", "--call-id", "x"])
    assert run.func is cli.cmd_run and run.call_id == "x"
    demo = parser.parse_args(["demo", "--no-front"])
    assert (demo.nodes, demo.port, demo.front, demo.no_front) == (3, 8000, "auto", True)


def test_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["sessions", "ls", "--limit", "0"],
        ["sessions", "close", "c"],
        ["demo", "--nodes", "0"],
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_namespace_for_ops_commands_has_client_command() -> None:
    args = cli.build_parser().parse_args(["nodes"])
    assert isinstance(args, argparse.Namespace) and args.client_command is cli_nodes.cmd_nodes


# ---- fleet run: one session in the console --------------------------------------------------


def _fleet_run(params: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_CLOSE_GRACE="2")
    return subprocess.Popen(
        [sys.executable, "-m", "fleet", "run", "--params", params],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_run_prints_every_event_and_exits_when_the_session_ends() -> None:
    proc = _fleet_run('{"interval": 0.05, "limit": 3}')
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == [
        "session_started",
        "tick",
        "tick",
        "tick",
        "session_ended",
    ]
    assert [e["data"] for e in events[1:4]] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert events[-1]["data"] == {"end_reason": "completed", "result": {"n": 3}}


def test_run_closes_the_session_on_ctrl_c() -> None:
    proc = _fleet_run('{"interval": 60}')
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())  # the session runs
    assert first["event"] == "session_started"
    proc.send_signal(2)  # SIGINT
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == ["session_closing", "session_ended"]
    assert events[-1]["data"] == {"end_reason": "closed", "result": {"n": 0}}


def test_help_is_plain_text() -> None:
    """``fleet --help`` and each command's help read as plain text, not reStructuredText."""
    parser = cli.build_parser()
    texts = [parser.format_help()]
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        choices = getattr(action, "choices", None) or {}
        texts += [sub.format_help() for sub in choices.values()]
    for text in texts:
        assert "``" not in text, text
