"""``fleet invoke`` and ``fleet threads show|rm|send`` against real ``fleet serve``
processes (one running ``tests.workers:Answer``, one ``tests.workers:Echo``): what they
print, with and without ``--json``, and their exit codes."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator

import httpx
import pytest

from fleet.cli import main as cli
from fleet.cli import ops as cli_ops
from fleet.client import FleetClient
from tests.cli.test_cli import clean_env, fleet  # noqa: F401  (clean_env: a fixture)
from tests.multinode.harness import LoneNode


def lone_node(factory: pytest.TempPathFactory, worker: str) -> Iterator[str]:
    log = factory.mktemp("cli") / "node.log"
    settings = {"FLEET_WORKER": worker, "FLEET_DRAIN_TIMEOUT": "0.5", "FLEET_CLOSE_GRACE": "1"}
    with LoneNode(log, **settings) as node:
        yield node.url


@pytest.fixture(scope="module")
def answer_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A node whose sessions return at once (or after ``params["after"]`` s)."""
    yield from lone_node(tmp_path_factory, "tests.workers:Answer")


@pytest.fixture(scope="module")
def echo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A node whose sessions answer each message and keep what they heard."""
    yield from lone_node(tmp_path_factory, "tests.workers:Echo")


@pytest.fixture
def name() -> str:
    """A call or thread id of the test's own (the nodes are shared by the module)."""
    return f"cli-{uuid.uuid4().hex[:8]}"


# ---- fleet invoke -------------------------------------------------------------------------


def test_invoke_prints_the_result(
    answer_url: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    params = json.dumps({"value": {"text": "é", "n": [1, 2]}})
    code, out, err = fleet(capsys, "invoke", name, "--params", params, "--url", answer_url)
    assert (code, out, err) == (0, '{"text": "é", "n": [1, 2]}\n', "")

    code, out, err = fleet(capsys, "invoke", name, "--url", answer_url, "--json")
    info = json.loads(out)
    assert code == 0 and err == ""
    assert info["state"] == "ended" and info["end_reason"] == "completed"
    assert info["result"] == {"answer": 42} and info["call_id"] == name

    argv = ["invoke", name, "--thread", name, "--json", "--url", answer_url]
    code, out, _ = fleet(capsys, *argv)
    assert code == 0 and json.loads(out)["thread_id"] == name
    code, out, _ = fleet(capsys, "invoke", name, "--params", '{"value": null}', "--url", answer_url)
    assert (code, out) == (0, "null\n")  # a result like any other


def test_invoke_of_a_session_that_fails_exits_1(
    answer_url: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["invoke", name, "--params", '{"object": true}', "--url", answer_url]
    code, out, err = fleet(capsys, *argv)
    assert code == 1 and out == ""
    assert re.fullmatch(rf"fleet: {name}/[0-9a-f]+ ended failed \(invalid_result\)\n", err), err
    code, out, err = fleet(capsys, *argv, "--json")
    assert code == 1 and json.loads(out)["error"] == "invalid_result" and "ended failed" in err


def test_invoke_that_outlasts_its_wait_exits_1_and_a_key_waits_again(
    answer_url: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["invoke", name, "--params", '{"after": 1.5}', "--url", answer_url]
    code, out, err = fleet(capsys, *argv, "--wait", "0.2", "--key", f"{name}-key", "--json")
    running = json.loads(out)
    assert code == 1 and running["state"] == "running" and running["result"] is None
    assert err == f"fleet: {name}/{running['session_id']} still runs after 0.2s\n"
    # The same key again: no second session, a wait for the first one's end.
    code, out, err = fleet(capsys, *argv, "--wait", "20", "--key", f"{name}-key", "--json")
    ended = json.loads(out)
    assert code == 0 and err == "" and ended["session_id"] == running["session_id"]
    assert ended["result"] == {"answer": 42}
    with FleetClient(answer_url) as client:
        assert len(client.list_call_sessions(name)) == 1
    code, out, err = fleet(capsys, *argv, "--wait", "0.2")  # a new key: a new session
    assert code == 1 and out == "" and "still runs after 0.2s" in err
    assert f"/{running['session_id']} " not in err


def test_invoke_usage_errors_send_nothing(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--params", "[1]"], ["--params", "{"], ["--wait", "301"], ["--wait", "-1"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(["invoke", name, *argv, "--url", "http://127.0.0.1:1"])
        assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "must be a JSON object" in err and "between 0 and 300" in err


# ---- fleet threads ------------------------------------------------------------------------


def test_threads_send_show_and_rm(
    echo_url: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--url", echo_url]
    code, out, err = fleet(
        capsys, "threads", "send", name, "--data", '"hello"', "--wait", "5", *url
    )
    assert (code, out, err) == (0, '{"echo": "hello", "count": 1}\n', "")
    code, out, err = fleet(capsys, "threads", "send", name, "--data", "[2]", "--json", *url)
    sent = json.loads(out)
    assert code == 0 and err == "" and sent["started"] is False and sent["call_id"] == name
    assert set(sent) == {"message_id", "call_id", "session_id", "started"}
    code, out, _ = fleet(capsys, "threads", "send", name, "--data", '{"n": 3}', *url)
    assert code == 0 and re.fullmatch(r"\d+-\d+\n", out)

    with FleetClient(echo_url) as client:  # the three messages are heard, in order
        client.ask(name, sent["session_id"], "four", timeout=5)
    code, out, err = fleet(capsys, "threads", "show", name, *url)
    details, _, sessions = out.partition("\n\n")
    fields = dict(line.split(None, 1) for line in details.splitlines())
    assert code == 0 and err == ""
    assert fields["thread"] == name and fields["live"] == f"{name}/{sent['session_id']}"
    assert json.loads(fields["state"]) == {"heard": ["hello", [2], {"n": 3}, "four"]}
    assert fields["checkpoint"] == "version 4" and fields["updated"].endswith("ago)")
    header, row = sessions.splitlines()
    assert header.split() == ["CALL", "SESSION", "STATE", "AGE", "END"]
    assert row.split()[:3] == [name, sent["session_id"], "running"] and row.split()[4] == "-"

    code, out, err = fleet(capsys, "threads", "rm", name, *url)
    assert code == 1 and out == ""
    assert err.startswith(f"fleet: a session runs on thread {name} already")
    assert err.endswith("[409 thread_busy] (close that session first, or wait for its end)\n")

    with FleetClient(echo_url) as client:
        client.close_session(name, sent["session_id"], wait=5)
    code, out, _ = fleet(capsys, "threads", "show", name, "--json", *url)
    shown = json.loads(out)
    assert code == 0 and shown["live_session"] is None
    assert [s["end_reason"] for s in shown["sessions"]] == ["closed"]
    assert (code, *fleet(capsys, "threads", "rm", name, *url)[1:]) == (
        0, f"thread {name} deleted\n", "",
    )  # fmt: skip
    code, out, err = fleet(capsys, "threads", "show", name, *url)
    assert code == 1 and out == "" and err.endswith("[404 not_found]\n")
    code, _, err = fleet(capsys, "threads", "rm", name, *url)
    assert code == 1 and err.endswith("[404 not_found]\n")


def test_threads_show_pages_and_send_starts_in_the_call_asked(
    echo_url: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--url", echo_url]
    sessions = []
    for n in range(3):
        argv = ["threads", "send", name, "--data", str(n), "--call", f"{name}-call", "--json"]
        code, out, _ = fleet(capsys, *argv, "--params", "{}", "--wait", "5", *url)
        sent = json.loads(out)
        assert code == 0 and sent["started"] and sent["call_id"] == f"{name}-call"
        assert sent["reply"] == {"echo": n, "count": n + 1}
        sessions.append(sent["session_id"])
        with FleetClient(echo_url) as client:
            client.close_session(sent["call_id"], sent["session_id"], wait=5)
    code, out, err = fleet(capsys, "threads", "show", name, "--limit", "2", *url)
    rows = out.partition("\n\n")[2].splitlines()[1:]
    assert code == 0 and [r.split()[1] for r in rows] == sessions[:0:-1]  # newest first
    assert err == "(the newest 2 sessions shown; --all lists them all)\n"
    code, out, err = fleet(capsys, "threads", "show", name, "--all", "--json", *url)
    shown = json.loads(out)
    assert code == 0 and err == "" and shown["next_cursor"] is None
    assert [s["session_id"] for s in shown["sessions"]] == sessions[::-1]


def test_threads_send_without_a_reply_in_time_exits_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[httpx.Request] = []

    def accepted(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {"message_id": "7-0", "call_id": "c", "session_id": "s", "started": True}
        return httpx.Response(202, json=body)

    monkeypatch.setattr(
        cli_ops,
        "make_client",
        lambda args: FleetClient("http://fleet", transport=httpx.MockTransport(accepted)),
    )
    code, out, err = fleet(capsys, "threads", "send", "t", "--data", '"hi"', "--wait", "2")
    assert (code, out, err) == (1, "7-0\n", "fleet: no reply to 7-0 from c/s after 2s\n")
    assert seen[0].url.path == "/threads/t/messages" and seen[0].url.params["wait"] == "2.0"
    assert fleet(capsys, "threads", "send", "t", "--data", '"hi"')[:3] == (0, "7-0\n", "")
