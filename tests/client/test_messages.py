"""``send`` and ``ask`` through both clients against in-process nodes (on fakeredis and on
a real redis-server), and ``send``'s retries: the same message id on every attempt, so
a retry never puts a message in the inbox twice."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from fleet.api import create_app
from fleet.client import (
    AsyncFleetClient,
    FleetAPIError,
    FleetClient,
    FleetConnectionError,
    MessageAccepted,
    MessageReply,
    NoReply,
)
from fleet.errors import FleetError
from fleet.runtime.node import Node
from tests.client.test_client import Api, serve
from tests.client.test_retries import LoseFirstAnswer, pauses  # noqa: F401  (a fixture)
from tests.conftest import SettingsFactory, wait_ready


@pytest.fixture(params=["sync", "async"])
async def echo(
    request: pytest.FixtureRequest, make_settings: SettingsFactory, redis: Redis
) -> AsyncIterator[Api]:
    """A node whose worker answers each message (``tests.workers:Echo``)."""
    async with serve(request.param, make_settings(worker="tests.workers:Echo"), redis) as api:
        yield api


@pytest.fixture(params=["sync", "async"])
async def quiet(
    request: pytest.FixtureRequest, make_settings: SettingsFactory, redis: Redis
) -> AsyncIterator[Api]:
    """A node whose worker never reads its messages (``tests.workers:Quiet``)."""
    async with serve(request.param, make_settings(worker="tests.workers:Quiet"), redis) as api:
        yield api


async def start(api: Api) -> str:
    sid: str = (await api("start_session", "chat")).session_id
    return sid


async def heard(api: Api, sid: str) -> Any:
    return (await api("get_checkpoint", "chat", sid)).state["heard"]


async def test_send_and_ask(echo: Api) -> None:
    sid = await start(echo)
    accepted = await echo("send", "chat", sid, "hello")
    assert isinstance(accepted, MessageAccepted) and accepted.message_id
    replied = await echo("send", "chat", sid, {"n": 2}, wait=5)
    assert isinstance(replied, MessageReply)
    assert replied.reply == {"echo": {"n": 2}, "count": 2}
    assert replied.message_id > accepted.message_id
    assert await echo("ask", "chat", sid, [3], timeout=5) == {"echo": [3], "count": 3}
    assert await heard(echo, sid) == ["hello", {"n": 2}, [3]]


async def test_a_given_id_dedupes_and_the_type_is_sent(echo: Api) -> None:
    sid = await start(echo)
    one = await echo("send", "chat", sid, "once", id="order-42", type="note")
    two = await echo("send", "chat", sid, "once", id="order-42", type="note")
    assert one == two
    await echo("ask", "chat", sid, "after", timeout=5)
    assert await heard(echo, sid) == ["once", "after"]


async def test_ask_without_a_reply_raises_no_reply(quiet: Api) -> None:
    sid = await start(quiet)
    with pytest.raises(NoReply) as raised:
        await quiet("ask", "chat", sid, "anyone?", timeout=0.2)
    assert isinstance(raised.value, FleetError) and raised.value.code == "no_reply"
    assert raised.value.message_id and raised.value.waited == 0.2
    late = await quiet("send", "chat", sid, "still?", wait=0.2)
    assert isinstance(late, MessageAccepted)


async def test_refusals_raise_api_errors(echo: Api) -> None:
    with pytest.raises(FleetAPIError) as missing:
        await echo("send", "chat", "nope", "hi")
    assert missing.value.status == 404
    sid = await start(echo)
    await echo("close_session", "chat", sid, wait=5)
    with pytest.raises(FleetAPIError) as ended:
        await echo("ask", "chat", sid, "hi", timeout=1)
    assert (ended.value.status, ended.value.code) == (409, "session_ended")


# ---- retries ------------------------------------------------------------------------------


def is_send(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.endswith("/messages")


async def test_a_send_whose_answer_was_lost_is_in_the_inbox_once(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    settings = make_settings(worker="tests.workers:Echo")
    node = Node(settings, redis=redis)
    app = create_app(settings, node)
    async with app.router.lifespan_context(app):
        await wait_ready(node)
        transport = LoseFirstAnswer(httpx.ASGITransport(app=app), is_send)
        async with AsyncFleetClient("http://fleet", transport=transport) as client:
            sid = (await client.start_session("chat")).session_id
            sent = await client.send("chat", sid, "once")
            assert isinstance(sent, MessageAccepted)
            await client.ask("chat", sid, "after", timeout=5)
            checkpoint = await client.get_checkpoint("chat", sid)
    assert checkpoint.state["heard"] == ["once", "after"]
    first, retry, ask = body_ids(transport.hits)  # the lost send, its retry, the ask
    assert first == retry != ask


Answer = httpx.Response | Exception


def accepted() -> httpx.Response:
    return httpx.Response(202, json={"message_id": "1-0"})


def scripted(answers: list[Answer], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0) if answers else accepted()
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handle)


def body_ids(seen: list[httpx.Request]) -> list[str]:
    return [json.loads(r.content)["id"] for r in seen]


def send_both(
    answers: Callable[[], list[Answer]], **kw: Any
) -> list[tuple[list[httpx.Request], object]]:
    """The same script (a fresh copy each: a response is read once) against each client:
    (requests, outcome)."""
    runs: list[tuple[list[httpx.Request], object]] = []
    for kind in ("sync", "async"):
        seen: list[httpx.Request] = []
        transport = scripted(answers(), seen)
        outcome: object
        try:
            if kind == "sync":
                with FleetClient("http://fleet", transport=transport) as client:
                    outcome = client.send("c", "s", {"x": 1}, **kw)
            else:

                async def go(t: httpx.MockTransport = transport) -> object:
                    async with AsyncFleetClient("http://fleet", transport=t) as client:
                        return await client.send("c", "s", {"x": 1}, **kw)

                outcome = asyncio.run(go())
        except Exception as exc:
            outcome = exc
        runs.append((seen, outcome))
    return runs


@pytest.mark.usefixtures("pauses")
def test_sends_are_retried_with_the_same_id() -> None:
    def answers() -> list[Answer]:
        return [
            httpx.ConnectError("refused"),
            httpx.Response(502, text="bad gateway"),
            httpx.ReadTimeout("slow"),
        ]

    for seen, outcome in send_both(answers, wait=2):
        assert outcome == MessageAccepted(message_id="1-0")
        assert len(seen) == 4 and len(set(body_ids(seen))) == 1
        assert all(r.url.params["wait"] == "2" for r in seen)
        assert str(uuid.UUID(body_ids(seen)[0])) == body_ids(seen)[0]
    for seen, outcome in send_both(lambda: [httpx.Response(504) for _ in range(5)], id="mine"):
        assert isinstance(outcome, FleetAPIError) and outcome.status == 504
        assert body_ids(seen) == ["mine"] * 4  # the first and three more
    for seen, outcome in send_both(lambda: [httpx.ReadTimeout("slow")] * 5):
        assert isinstance(outcome, FleetConnectionError) and len(seen) == 4


@pytest.mark.usefixtures("pauses")
def test_refused_sends_are_not_retried() -> None:
    for status, code in [(409, "busy"), (429, "inbox_full"), (409, "session_ended"), (413, "x")]:
        body = {"detail": "no", "code": code}

        def refused(status: int = status, body: dict[str, str] = body) -> list[Answer]:
            return [httpx.Response(status, json=body)]

        for seen, outcome in send_both(refused):
            assert isinstance(outcome, FleetAPIError) and outcome.code == code
            assert len(seen) == 1


def test_each_send_has_an_id_of_its_own_and_waits_long_enough() -> None:
    seen: list[httpx.Request] = []
    replied = httpx.Response(200, json={"message_id": "2-0", "reply": None})
    with FleetClient(
        "http://fleet", transport=scripted([accepted(), accepted(), replied], seen)
    ) as c:
        c.send("c", "s", 1)
        c.send("c", "s", 2)
        assert c.ask("c", "s", 3, timeout=60) is None  # a null reply is a reply
    first, second, third = body_ids(seen)
    assert len({first, second, third}) == 3
    assert seen[2].url.params["wait"] == "60"
    assert seen[2].extensions["timeout"]["read"] >= 60
    assert "wait" not in seen[0].url.params
