"""The chat demo worker (``fleet.workers.chat:Chat``) through the API: replies, the answer
streamed word by word, the conversation in the checkpoint and carried on from it. On
fakeredis and on a real redis-server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from redis.asyncio import Redis

from fleet.runtime.node import Node
from fleet.worker import Message, SessionContext
from fleet.workers.chat import Chat
from tests.conftest import SettingsFactory, api_node

CHAT = "fleet.workers.chat:Chat"


async def start(client: httpx.AsyncClient, **params: Any) -> str:
    resp = await client.post("/calls/chat/sessions", json={"params": params})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["session_id"])


async def say(client: httpx.AsyncClient, sid: str, data: Any) -> dict[str, Any]:
    resp = await client.post(
        f"/calls/chat/sessions/{sid}/messages", json={"data": data}, params={"wait": 5}
    )
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def events(node: Node, sid: str, until: int) -> list[tuple[str, Any]]:
    """The session's events (type, data) up to the ``until``-th reply."""
    out: list[tuple[str, Any]] = []
    with node.events.listen("chat", sid) as listener:
        async with asyncio.timeout(5):
            while sum(kind == "reply" for kind, _ in out) < until:
                event = await listener.next(1)
                if event is not None:
                    out.append((event.type, json.loads(event.data)))
    return out


async def test_a_conversation_streams_answers_and_keeps_its_turns(
    make_settings: SettingsFactory, redis: Redis
) -> None:
    async with api_node(make_settings(worker=CHAT), redis) as (client, node):
        sid = await start(client, delay=0)
        first = await say(client, sid, {"text": "hello there"})
        assert first["reply"] == {"text": "#1 you said: hello there", "turn": 1}
        second = await say(client, sid, "and again")
        assert second["reply"] == {"text": "#2 you said: and again", "turn": 2}

        seen = await events(node, sid, until=2)
        tokens = [data for kind, data in seen if kind == "token"]
        first_tokens = [t["text"] for t in tokens if t["message_id"] == first["message_id"]]
        assert first_tokens == ["#1", " you", " said:", " hello", " there"]
        # Each answer's tokens come between its message and its reply.
        kinds = [kind for kind, _ in seen if kind != "session_started"]
        assert kinds == ["message", *["token"] * 5, "reply", "message", *["token"] * 5, "reply"]

        checkpoint = (await client.get(f"/calls/chat/sessions/{sid}/checkpoint")).json()
        assert checkpoint["state"]["count"] == 2
        assert [(t["role"], t["text"]) for t in checkpoint["state"]["turns"]] == [
            ("user", "hello there"),
            ("assistant", "#1 you said: hello there"),
            ("user", "and again"),
            ("assistant", "#2 you said: and again"),
        ]


async def test_bad_params_are_refused(make_settings: SettingsFactory, redis: Redis) -> None:
    async with api_node(make_settings(worker=CHAT), redis) as (client, _):
        for params in ({"delay": -1}, {"delay": "fast"}, {"speed": 1}):
            resp = await client.post("/calls/chat/sessions", json={"params": params})
            assert resp.status_code == 422, (params, resp.text)


class Hooks:
    """A context's runtime side, in memory: the worker run alone, resumed from a state."""

    def __init__(self, messages: list[Any]) -> None:
        self.inbox = list(messages)
        self.emitted: list[tuple[str, Any]] = []
        self.checkpoints: list[Any] = []
        self.replies: list[Any] = []

    async def emit(self, type: str, data: Any) -> None:
        self.emitted.append((type, data))

    async def checkpoint(self, state: Any) -> None:
        self.checkpoints.append(state)

    def touch(self) -> None:
        pass

    async def receive(self, timeout: float | None) -> Any:
        if not self.inbox:
            return None

        async def reply(_: Message, data: Any) -> None:
            self.replies.append(data)

        return Message(id="1-0", type="message", data=self.inbox.pop(0), sent_at=0, replier=reply)


async def test_a_resumed_chat_carries_on_from_its_checkpoint() -> None:
    state = {
        "turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "#1 you said: hi"}],
        "count": 1,
    }
    hooks = Hooks(["still there?"])
    ctx = SessionContext(
        session_id="s",
        call_id="c",
        call_type="default",
        params={"delay": 0},
        node_id="n",
        state=state,
        resumed=True,
        hooks=hooks,
    )
    await Chat().run(ctx)
    assert hooks.replies == [{"text": "#2 you said: still there?", "turn": 2}]
    saved = hooks.checkpoints[-1]
    assert saved["count"] == 2 and [t["text"] for t in saved["turns"]][::2] == [
        "hi",
        "still there?",
    ]
