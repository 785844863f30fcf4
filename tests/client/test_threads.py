"""``send_to_thread``, ``thread`` and ``delete_thread`` through both clients against a node
(on fakeredis and on a real redis-server), and the retries of a send to a thread: the
same message id every time, so the thread's session hears it once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from fleet.api import create_app
from fleet.client import (
    AsyncFleetClient,
    FleetAPIError,
    FleetClient,
    ThreadInfo,
    ThreadMessageAccepted,
    ThreadMessageReply,
)
from fleet.models import State
from fleet.runtime.node import Node
from tests.client.test_client import Api, serve
from tests.client.test_retries import LoseFirstAnswer, pauses  # noqa: F401  (a fixture)
from tests.conftest import SettingsFactory, wait_ready

ECHO = "tests.workers:Echo"


@pytest.fixture(params=["sync", "async"])
async def echo(
    request: pytest.FixtureRequest, make_settings: SettingsFactory, redis: Redis
) -> AsyncIterator[Api]:
    """A node whose worker answers each message and keeps what it heard."""
    async with serve(request.param, make_settings(worker=ECHO), redis) as api:
        yield api


async def test_send_to_thread_starts_a_session_then_reuses_it(echo: Api) -> None:
    first = await echo("send_to_thread", "t1", "hello", wait=5)
    assert isinstance(first, ThreadMessageReply)
    assert first.started is True and first.call_id == "t1"  # the call defaults to the thread
    assert first.reply == {"echo": "hello", "count": 1}
    second = await echo("send_to_thread", "t1", {"n": 2}, wait=5)
    assert isinstance(second, ThreadMessageReply) and second.started is False
    assert second.session_id == first.session_id and second.reply["count"] == 2
    # Without a wait: in the inbox, no reply here.
    third = await echo("send_to_thread", "t1", "three")
    assert isinstance(third, ThreadMessageAccepted) and not isinstance(third, ThreadMessageReply)
    assert third.session_id == first.session_id and third.message_id > second.message_id

    # Another thread, in a call of its own, with params.
    other = await echo("send_to_thread", "t2", "hi", call_id="room", params={}, wait=5)
    assert other.started and other.call_id == "room" and other.session_id != first.session_id
    info = await echo("get_session", "room", other.session_id)
    assert info.thread_id == "t2"


async def test_a_given_message_id_is_heard_once(echo: Api) -> None:
    one = await echo("send_to_thread", "t1", "once", id="m-1", type="note", wait=5)
    two = await echo("send_to_thread", "t1", "once", id="m-1", type="note", wait=5)
    assert one.message_id == two.message_id and one.session_id == two.session_id
    await echo("send_to_thread", "t1", "after", wait=5)
    assert (await echo("thread", "t1")).state == {"heard": ["once", "after"]}


async def test_thread_shows_its_state_live_session_and_sessions(echo: Api) -> None:
    with pytest.raises(FleetAPIError) as missing:
        await echo("thread", "t1")
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    first = await echo("send_to_thread", "t1", "hello", wait=5)
    thread = await echo("thread", "t1")
    assert isinstance(thread, ThreadInfo) and thread.thread_id == "t1"
    assert thread.state == {"heard": ["hello"]} and thread.checkpoint_version == 1
    assert thread.live_session is not None
    assert thread.live_session.session_id == first.session_id
    assert [s.session_id for s in thread.sessions] == [first.session_id]
    assert thread.sessions[0].state == State.RUNNING and thread.next_cursor is None

    await echo("close_session", "t1", first.session_id, wait=5)
    again = await echo("send_to_thread", "t1", "next day", wait=5)
    assert again.started and again.reply["count"] == 2  # from the thread's state
    page = await echo("thread", "t1", limit=1)
    assert [s.session_id for s in page.sessions] == [again.session_id]  # newest first
    assert page.next_cursor is not None
    rest = await echo("thread", "t1", limit=1, cursor=page.next_cursor)
    assert [s.session_id for s in rest.sessions] == [first.session_id]
    assert rest.sessions[0].end_reason == "closed" and rest.next_cursor is None


async def test_delete_thread_is_refused_while_a_session_runs_on_it(echo: Api) -> None:
    sent = await echo("send_to_thread", "t1", "hello", wait=5)
    with pytest.raises(FleetAPIError) as busy:
        await echo("delete_thread", "t1")
    assert (busy.value.status, busy.value.code) == (409, "thread_busy")
    assert sent.session_id in busy.value.detail
    assert (await echo("thread", "t1")).state == {"heard": ["hello"]}  # still there

    await echo("close_session", "t1", sent.session_id, wait=5)
    assert await echo("delete_thread", "t1") is None
    with pytest.raises(FleetAPIError) as gone:
        await echo("thread", "t1")
    assert gone.value.status == 404
    with pytest.raises(FleetAPIError) as again:
        await echo("delete_thread", "t1")
    assert again.value.code == "not_found"
    # A new conversation on the same name starts from nothing.
    fresh = await echo("send_to_thread", "t1", "who?", wait=5)
    assert fresh.started and fresh.reply == {"echo": "who?", "count": 1}


# ---- retries ------------------------------------------------------------------------------


def is_thread_send(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.startswith("/threads/")


async def test_a_thread_send_whose_answer_was_lost_is_heard_once(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    """The first attempt starts the thread's session and delivers the message; its answer
    is lost. The retry reaches that session with the same id: no second session, no
    second message."""
    settings = make_settings(worker=ECHO)
    node = Node(settings, redis=redis)
    app = create_app(settings, node)
    async with app.router.lifespan_context(app):
        await wait_ready(node)
        transport = LoseFirstAnswer(httpx.ASGITransport(app=app), is_thread_send)
        async with AsyncFleetClient("http://fleet", transport=transport) as client:
            sent = await client.send_to_thread("t1", "once")
            replied = await client.send_to_thread("t1", "after", wait=5)
            thread = await client.thread("t1")
    assert replied.session_id == sent.session_id
    assert [s.session_id for s in thread.sessions] == [sent.session_id]
    assert thread.state == {"heard": ["once", "after"]}
    first, retry, after = (json.loads(r.content)["id"] for r in transport.hits)
    assert first == retry != after


@pytest.mark.usefixtures("pauses")
def test_thread_sends_are_retried_with_one_id_and_refusals_are_not() -> None:
    seen: list[httpx.Request] = []
    answers: list[httpx.Response | Exception] = [
        httpx.ConnectError("refused"),
        httpx.Response(502, text="bad gateway"),
        httpx.Response(
            200,
            json={
                "message_id": "1-0",
                "call_id": "c",
                "session_id": "s",
                "started": True,
                "reply": None,
            },
        ),  # fmt: skip
        httpx.Response(409, json={"detail": "a session starts", "code": "thread_busy"}),
    ]

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with FleetClient("http://fleet", transport=httpx.MockTransport(handle)) as client:
        replied = client.send_to_thread("t", {"q": 1}, call_id="c", params={"p": 2}, wait=90)
        assert isinstance(replied, ThreadMessageReply) and replied.reply is None
        with pytest.raises(FleetAPIError) as busy:
            client.send_to_thread("t", "again")
    assert busy.value.code == "thread_busy"
    bodies = [json.loads(r.content) for r in seen]
    assert len({b["id"] for b in bodies[:3]}) == 1 and bodies[3]["id"] != bodies[0]["id"]
    assert bodies[0] == {
        "type": "message", "data": {"q": 1}, "id": bodies[0]["id"], "call_id": "c",
        "params": {"p": 2},
    }  # fmt: skip
    assert set(bodies[3]) == {"type", "data", "id"}  # the node's defaults, unless given
    assert all(r.url.params["wait"] == "90" for r in seen[:3])
    assert seen[0].extensions["timeout"]["read"] >= 90 and "wait" not in seen[3].url.params
    assert [r.url.path for r in seen] == ["/threads/t/messages"] * 4
