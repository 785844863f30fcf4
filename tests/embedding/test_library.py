"""The operations of ``fleet.Fleet`` without HTTP: the API's models, its checks (raised as the
``fleet.errors`` the API answers with 4xx), its ownership rule, idempotency and threads;
and its lifespan."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fleet import Fleet
from fleet.api.auth import Principal
from fleet.api.routes.messages import MessageAccepted, MessageReply
from fleet.errors import (
    IdempotencyMismatch,
    InvalidParams,
    InvalidRequest,
    MessageTooLarge,
    SessionEnded,
    SessionNotFound,
    ThreadBusy,
    UnknownWorker,
)
from fleet.models import CloseAccepted, EndReason, SessionInfo, State
from tests.conftest import SettingsFactory

ECHO = "tests.workers:Echo"


@pytest.fixture
async def fleet(make_settings: SettingsFactory) -> AsyncIterator[Fleet]:
    """A Fleet on the embedded Redis, running."""
    running = Fleet(make_settings())
    async with running.lifespan():
        yield running


@pytest.fixture
async def echo(make_settings: SettingsFactory) -> AsyncIterator[Fleet]:
    running = Fleet(make_settings(worker=ECHO))
    async with running.lifespan():
        yield running


async def test_start_read_close_with_the_apis_models(fleet: Fleet) -> None:
    started = await fleet.start_session("c", params={"interval": 0.01})
    assert isinstance(started, SessionInfo) and started.state == State.RUNNING
    read = await fleet.get_session("c", started.session_id)
    assert read.session_id == started.session_id and read.node_id == fleet.node.node_id
    closed = await fleet.close_session("c", started.session_id, wait=5)
    assert isinstance(closed, SessionInfo)
    assert closed.state == State.ENDED and closed.end_reason == EndReason.CLOSED


async def test_close_without_wait_answers_closing(fleet: Fleet) -> None:
    started = await fleet.start_session("c")
    assert await fleet.close_session("c", started.session_id) == CloseAccepted()


async def test_invoke_answers_once_the_session_ended(fleet: Fleet) -> None:
    ended = await fleet.start_session("c", params={"limit": 3, "interval": 0.01}, wait=5)
    assert ended.state == State.ENDED and ended.end_reason == EndReason.COMPLETED
    assert ended.result == {"n": 3}


async def test_messages_and_replies(echo: Fleet) -> None:
    sid = (await echo.start_session("c")).session_id
    replied = await echo.send_message("c", sid, {"text": "hi"}, wait=5, id="m1")
    assert isinstance(replied, MessageReply)
    assert replied.reply == {"echo": {"text": "hi"}, "count": 1}
    again = await echo.send_message("c", sid, {"text": "hi"}, wait=5, id="m1")
    assert again.message_id == replied.message_id  # a retry is not sent twice
    accepted = await echo.send_message("c", sid, "no wait")
    assert isinstance(accepted, MessageAccepted)
    await echo.close_session("c", sid, wait=5)
    with pytest.raises(SessionEnded):
        await echo.send_message("c", sid, "too late")


async def test_principals_see_only_their_own(echo: Fleet) -> None:
    sid = (await echo.start_session("c", principal="alice")).session_id
    for bob in ("bob", Principal("bob")):
        with pytest.raises(SessionNotFound):
            await echo.get_session("c", sid, principal=bob)
        with pytest.raises(SessionNotFound):
            await echo.send_message("c", sid, "hi", principal=bob)
        with pytest.raises(SessionNotFound):
            await echo.close_session("c", sid, principal=bob)
    # Its owner, the admin and the default principal (anonymous, with every right) see it.
    for who in ("alice", "admin", Principal("ops", admin=True)):
        assert (await echo.get_session("c", sid, principal=who)).session_id == sid
    assert (await echo.get_session("c", sid)).session_id == sid
    assert (await echo.close_session("c", sid, principal="alice", wait=5)).state == State.ENDED


async def test_idempotency_keys_and_threads_are_the_apis(fleet: Fleet) -> None:
    first = await fleet.start_session("c", idempotency_key="k1", principal="alice")
    again = await fleet.start_session("c", idempotency_key="k1", principal="alice")
    assert again.session_id == first.session_id
    other = await fleet.start_session("c", idempotency_key="k1", principal="bob")
    assert other.session_id != first.session_id  # keys are per principal
    with pytest.raises(IdempotencyMismatch):
        await fleet.start_session("c", idempotency_key="k1", principal="alice", call_type="x")
    on_thread = await fleet.start_session("c", thread_id="t1", principal="alice")
    assert on_thread.thread_id == "t1"
    with pytest.raises(ThreadBusy):
        await fleet.start_session("c", thread_id="t1", principal="alice")
    # Bob's thread t1 is another thread.
    assert (await fleet.start_session("c", thread_id="t1", principal="bob")).thread_id == "t1"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ({"call_id": "bad id"}, InvalidRequest),
        ({"call_type": "bad type"}, InvalidRequest),
        ({"thread_id": ""}, InvalidRequest),
        ({"resumable": "yes"}, InvalidRequest),
        ({"params": ["not", "an", "object"]}, InvalidRequest),
        ({"idempotency_key": "bad key"}, InvalidRequest),
        ({"wait": 301}, InvalidRequest),
        ({"principal": ""}, InvalidRequest),
        ({"principal": "alice@example.com"}, InvalidRequest),
        ({"params": {"interval": -1}}, InvalidParams),  # the worker refuses them
        ({"params": {"x": "a" * 20_000}}, InvalidParams),  # FLEET_MAX_PARAMS_BYTES
        ({"params": {"when": object()}}, InvalidParams),  # not JSON
    ],
)
async def test_starts_are_checked_as_the_api_checks_them(
    fleet: Fleet, call: dict[str, Any], error: type[Exception]
) -> None:
    arguments: dict[str, Any] = {"call_id": "c", **call}
    with pytest.raises(error) as raised:
        await fleet.start_session(**arguments)
    name = next(iter(call))
    if error is InvalidRequest and name not in ("principal", "params"):
        assert name in str(raised.value), raised.value  # the message names the field


async def test_reads_closes_and_sends_are_checked(echo: Fleet) -> None:
    sid = (await echo.start_session("c")).session_id
    with pytest.raises(InvalidRequest, match="session_id"):
        await echo.get_session("c", "bad/id")
    with pytest.raises(InvalidRequest, match="call_id"):
        await echo.close_session("", sid)
    with pytest.raises(InvalidRequest, match="wait"):
        await echo.close_session("c", sid, wait=-1)
    with pytest.raises(InvalidRequest, match="type"):
        await echo.send_message("c", sid, "hi", type="bad type")
    with pytest.raises(InvalidRequest, match="id"):
        await echo.send_message("c", sid, "hi", id="bad id")
    with pytest.raises(InvalidRequest, match="JSON"):
        await echo.send_message("c", sid, {"when": object()})
    with pytest.raises(MessageTooLarge):
        await echo.send_message("c", sid, "a" * (echo.settings.max_message_bytes + 1))
    with pytest.raises(SessionNotFound):
        await echo.send_message("c", "nope", "hi")


async def test_a_start_names_its_worker(make_settings: SettingsFactory) -> None:
    named = Fleet(
        make_settings(worker="counter=fleet.workers.counter:Counter,voice=tests.workers:Voice")
    )
    async with named.lifespan():
        assert (await named.start_session("c")).worker == "counter"
        voice = await named.start_session("c", worker="voice", params={"language": "en"})
        assert voice.worker == "voice" and voice.state is State.RUNNING
        with pytest.raises(UnknownWorker, match="counter, voice"):
            await named.start_session("c", worker="coder")
        with pytest.raises(InvalidParams) as refused:
            await named.start_session("c", worker="voice", params={"language": "English"})
        assert refused.value.errors[0]["loc"] == ["params", "language"]


async def test_a_fleet_runs_its_node_once(make_settings: SettingsFactory) -> None:
    fleet = Fleet(make_settings())
    async with fleet.lifespan():
        # Entered as a script's context, the node is ready once inside.
        assert fleet.node.readiness() == (True, "ok")
        with pytest.raises(RuntimeError, match="entered already"):
            async with fleet.lifespan():
                pass
    assert fleet.node.draining


def test_import_fleet_stays_cheap() -> None:
    """``import fleet`` loads neither the API nor the runtime; ``fleet.Fleet`` does."""
    code = (
        "import sys, fleet\n"
        "assert not [m for m in sys.modules if m.startswith(('fleet.', 'fastapi'))], sys.modules\n"
        "from fleet import Fleet\n"
        "assert Fleet.__module__ == 'fleet.api.library'\n"
        "assert fleet.Fleet is Fleet and 'Fleet' in fleet.__all__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
