"""``fleet workers``, ``fleet sessions migrate`` and ``--worker``: against a real ``fleet
serve`` process that runs two named workers, and, for a migration that moves a session,
against two in-process nodes that share one Redis (fakeredis and a real redis-server)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from fleet.cli import main as cli
from fleet.cli import ops as cli_ops
from fleet.client import FleetClient
from fleet.models import SessionInfo
from fleet.runtime.node import Node
from tests.cli.test_cli import clean_env, fleet  # noqa: F401  (clean_env: a fixture)
from tests.conftest import SettingsFactory, running_node, uvicorn_node, wait_ready
from tests.multinode.harness import LoneNode

BOTH = "counter=fleet.workers.counter:Counter,voice=tests.workers:Voice"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One node that runs the counter (its default) and the voice worker."""
    log = tmp_path_factory.mktemp("cli") / "node.log"
    settings = {
        "FLEET_NODE_ID": "cli-workers",
        "FLEET_WORKER": BOTH,
        "FLEET_DRAIN_TIMEOUT": "0.5",
        "FLEET_CLOSE_GRACE": "1",
    }
    with LoneNode(log, **settings) as node:
        yield node.url


@pytest.fixture
def name() -> str:
    """A call or thread id of the test's own (the node is shared by the module)."""
    return f"cli-{uuid.uuid4().hex[:8]}"


# ---- fleet workers, fleet nodes ---------------------------------------------------------------


def test_workers_table_and_json(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = fleet(capsys, "workers", "--url", url)
    assert code == 0 and err == ""
    header, counter, voice = out.splitlines()
    assert header.split() == ["NAME", "NODES", "RESUMABLE", "MIGRATABLE", "INBOX", "DESCRIPTION"]
    assert counter.split()[:5] == ["counter", "1", "yes", "no", "queue"]
    assert voice.split()[:5] == ["voice", "1", "yes", "no", "queue"]
    assert voice.index("A worker with a Params model") == header.index("DESCRIPTION")

    code, out, _ = fleet(capsys, "workers", "--json", "--url", url)
    listed = json.loads(out)["workers"]
    assert code == 0 and [w["name"] for w in listed] == ["counter", "voice"]
    assert listed[1]["nodes"] == ["cli-workers"]
    assert listed[1]["params_schema"]["required"] == ["language"]

    code, out, _ = fleet(capsys, "nodes", "--url", url)
    assert code == 0 and out.splitlines()[1].split()[-1] == "counter,voice"


def test_no_live_nodes_no_workers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = httpx.MockTransport(lambda r: httpx.Response(200, json={"workers": []}))
    monkeypatch.setattr(
        cli_ops, "make_client", lambda args: FleetClient("http://fleet", transport=empty)
    )
    assert fleet(capsys, "workers") == (0, "", "no workers: no live nodes\n")


# ---- --worker -----------------------------------------------------------------------------


def test_invoke_and_threads_send_run_the_worker_named(
    url: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    counted = ["--params", '{"interval": 0.01, "limit": 2}', "--json", "--url", url]
    code, out, err = fleet(capsys, "invoke", name, "--worker", "counter", *counted)
    done = json.loads(out)
    assert (code, err) == (0, "") and (done["worker"], done["result"]) == ("counter", {"n": 2})

    argv = ["invoke", name, "--worker", "voice", "--params", '{"language": "en"}', "--url", url]
    code, out, err = fleet(capsys, *argv, "--wait", "0.2", "--json")
    running = json.loads(out)
    assert code == 1 and running["worker"] == "voice" and "still runs after 0.2s" in err
    code, out, _ = fleet(capsys, "sessions", "show", name, running["session_id"], "--url", url)
    assert code == 0 and "\nworker      voice\n" in out

    argv = ["threads", "send", name, "--data", '"hi"', "--worker", "voice", "--json"]
    code, out, err = fleet(capsys, *argv, "--params", '{"language": "fr"}', "--url", url)
    sent = json.loads(out)
    assert (code, err) == (0, "") and sent["started"] is True
    with FleetClient(url) as client:
        assert client.get_session(sent["call_id"], sent["session_id"]).worker == "voice"
        for sid in (running["session_id"], sent["session_id"]):
            client.close_session(name, sid, wait=5)


def test_unknown_worker_and_bad_params_are_one_line_and_exit_1(
    url: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = fleet(capsys, "invoke", name, "--worker", "coder", "--url", url)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("fleet: no live node runs a worker named 'coder'; known: counter, voice")
    assert err.endswith("[422 unknown_worker] (fleet workers lists the workers the fleet runs)\n")

    argv = ["threads", "send", name, "--data", "1", "--worker", "voice", "--url", url]
    code, out, err = fleet(capsys, *argv, "--params", '{"language": "English"}')
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("fleet: params.language: String should match pattern")
    assert err.endswith(
        "[422 invalid_params] (fleet workers --json shows each worker's params schema)\n"
    )


# ---- fleet sessions migrate -----------------------------------------------------------------


def test_migrate_refusals_are_one_line_and_exit_1(
    url: str, name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with FleetClient(url) as client:
        sid = client.start_session(name, {"interval": 5}).session_id
    code, out, err = fleet(capsys, "sessions", "migrate", name, sid, "--url", url)
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert (
        err == "fleet: no other node that runs worker 'counter' has room for it [409 no_target]\n"
    )
    code, out, err = fleet(capsys, "sessions", "migrate", name, "nope", "--url", url)
    assert code == 1 and out == "" and err.endswith("[404 not_found]\n")

    def forbid(request: httpx.Request) -> httpx.Response:
        detail = "moving sessions between nodes is for the admin principal"
        return httpx.Response(403, json={"detail": detail, "code": "forbidden"})

    monkeypatch.setattr(
        cli_ops,
        "make_client",
        lambda args: FleetClient("http://fleet", transport=httpx.MockTransport(forbid)),
    )
    code, out, err = fleet(capsys, "sessions", "migrate", "c", "s")
    assert code == 1 and out == ""
    assert err == (
        "fleet: moving sessions between nodes is for the admin principal [403 forbidden] "
        "(this token may not do that)\n"
    )


async def moved_to(client: FleetClient, call: str, sid: str, node_id: str) -> SessionInfo:
    for _ in range(250):
        info = await asyncio.to_thread(client.get_session, call, sid)
        if info.node_id == node_id and info.state == "running":
            return info
        await asyncio.sleep(0.02)
    raise AssertionError(f"session {sid} did not move to {node_id}: {info}")


async def test_migrate_moves_a_session_between_two_nodes(
    make_settings: SettingsFactory, redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_node(make_settings(node_id="n1", worker=BOTH), redis) as other:
        await wait_ready(other)
        node = Node(make_settings(node_id="n0", worker=BOTH), redis=redis)
        async with uvicorn_node(node) as url:
            with FleetClient(url) as client:
                params = {"language": "en", "tick": 0.02}
                info = await asyncio.to_thread(client.start_session, "c", params, worker="voice")
                sid = info.session_id
                argv = ["sessions", "migrate", "c", sid, "--url", url]
                code = await asyncio.to_thread(cli.main, argv)
                out, err = capsys.readouterr()
                assert (code, out, err) == (0, f"c/{sid} migrating away from n0\n", "")
                assert (await moved_to(client, "c", sid, "n1")).resumed_count == 1

                code = await asyncio.to_thread(cli.main, [*argv, "--json"])
                out, err = capsys.readouterr()
                assert code == 0 and err == ""
                assert json.loads(out) == {"state": "migrating", "node_id": "n1"}
                back = await moved_to(client, "c", sid, "n0")
                assert (back.worker, back.resumed_count) == ("voice", 2)
                await asyncio.to_thread(client.close_session, "c", sid, 5)
