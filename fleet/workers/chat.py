"""The chat: fleet's conversation demo worker. Each message (``{"text": "..."}`` or a plain
string) is answered with an echo, streamed word by word as ``token`` events
(``{"message_id", "text"}``; their texts joined are the answer) and then sent whole as the
message's reply ``{"text", "turn"}``. The conversation (its turns) is kept in the checkpoint, so a
session that resumes on another node carries on where it was. Params: ``delay`` (seconds
between streamed words, default 0.05).

A message is consumed by the checkpoint written after its answer: if the node dies before
that, the resumed run answers it again (its tokens may then be seen twice); once written,
the turn is in the conversation exactly once.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fleet.worker import Message, SessionContext

#: Turns kept in the checkpoint (the oldest are dropped beyond it): a long chat must not
#: grow its checkpoint towards FLEET_MAX_CHECKPOINT_BYTES.
HISTORY = 200


def text_of(data: Any) -> str:
    """What the user said: ``{"text": ...}``, a string, or any other JSON as written."""
    if isinstance(data, dict) and isinstance(data.get("text"), str):
        return str(data["text"])
    return data if isinstance(data, str) else repr(data)


class Chat:
    resumable = True

    @staticmethod
    def validate_params(params: dict[str, Any]) -> None:
        delay = params.get("delay", 0.05)
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not math.isfinite(delay)
            or not 0 <= delay <= 10
        ):
            raise ValueError("params.delay must be a number of seconds in [0, 10]")
        unknown = set(params) - {"delay"}
        if unknown:
            raise ValueError(f"unknown params for the chat: {', '.join(sorted(unknown))}")

    async def run(self, ctx: SessionContext) -> None:
        delay = float(ctx.params.get("delay", 0.05))
        state = ctx.state if isinstance(ctx.state, dict) else {}
        turns: list[dict[str, Any]] = list(state.get("turns", []))
        count = int(state.get("count", 0))  # user turns in all, also those dropped
        async for message in ctx.messages:
            count += 1
            said = text_of(message.data)
            answer = f"#{count} you said: {said}"
            await self._stream(ctx, message, answer, delay)
            turns += [
                {"role": "user", "text": said, "message_id": message.id},
                {"role": "assistant", "text": answer},
            ]
            turns = turns[-HISTORY:]
            await ctx.checkpoint({"turns": turns, "count": count})
            await message.reply({"text": answer, "turn": count})

    @staticmethod
    async def _stream(ctx: SessionContext, message: Message, answer: str, delay: float) -> None:
        """The answer word by word, as a model would produce it. A close cuts the pauses
        short, not the answer."""
        for i, word in enumerate(answer.split(" ")):
            if i and delay and not ctx.closing.is_set():
                try:
                    async with asyncio.timeout(delay):
                        await ctx.closing.wait()
                except TimeoutError:
                    pass
            # The tokens' texts, joined, are the answer (a space leads every word but the first).
            await ctx.emit("token", {"message_id": message.id, "text": f" {word}" if i else word})
