"""Sessions driven from a script, with no HTTP at all: a counter that completes by itself,
and a conversation with the chat worker. Run it with ``python -m
examples.embedding.script``; without ``FLEET_REDIS_URL`` each Fleet runs on an embedded,
in-process Redis."""

from __future__ import annotations

import asyncio
from typing import Any

from fleet import Fleet
from fleet.api.routes.messages import MessageReply
from fleet.models import SessionInfo, State
from fleet.settings import Settings


async def count_to_three(settings: Settings) -> Any:
    """Start a counter (fleet's default worker), wait for its end, return its result."""
    fleet = Fleet(settings)
    async with fleet.lifespan():
        started = await fleet.start_session("demo", params={"limit": 3, "interval": 0.01})
        session = await fleet.get_session("demo", started.session_id)
        while session.state != State.ENDED:
            await asyncio.sleep(0.05)
            session = await fleet.get_session("demo", started.session_id)
        print(session.end_reason, session.result)  # completed {'n': 3}
        return session.result


async def chat(settings: Settings) -> Any:
    """Say hello to the chat worker, return its reply, and close the session."""
    fleet = Fleet(settings.model_copy(update={"worker": "fleet.workers.chat:Chat"}))
    async with fleet.lifespan():
        session = await fleet.start_session("support", params={"delay": 0})
        answer = await fleet.send_message("support", session.session_id, {"text": "hello"}, wait=5)
        assert isinstance(answer, MessageReply), "no reply within 5 s"
        print(answer.reply)  # {'text': '#1 you said: hello', 'turn': 1}
        ended = await fleet.close_session("support", session.session_id, wait=5)
        assert isinstance(ended, SessionInfo), "still closing after 5 s"
        print(ended.state, ended.end_reason)  # ended closed
        return answer.reply


async def main() -> None:
    settings = Settings()  # FLEET_* from the environment
    await count_to_three(settings)
    await chat(settings)


if __name__ == "__main__":
    asyncio.run(main())
