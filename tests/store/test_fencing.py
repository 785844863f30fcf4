"""Property test on a real redis-server: concurrent claimers and a stale owner racing the
claim and checkpoint scripts. Whatever the interleaving, one claimer wins, and checkpoints
are accepted from one owner at a time, in order."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from fleet.models import SessionRecord
from fleet.settings import Settings
from fleet.store.keys import make_ref
from fleet.store.registry import Registry
from fleet.store.scripts import FENCED, ReapResult
from tests.redis_server import RedisServer


async def _race(url: str, claimers: int, stale_writes: int, seed: int) -> None:
    rng = random.Random(seed)
    client = Redis.from_url(url, decode_responses=True)
    reg = Registry(client, Settings(key_prefix=f"p{uuid.uuid4().hex[:8]}", node_ttl=1.0))
    await reg.load()
    try:
        ref = make_ref("call", "s")
        await reg.heartbeat("old", {})
        await reg.admit("old", "call", "s")
        old = SessionRecord(
            session_id="s", call_id="call", call_type="default", node_id="old",
            started_at=time.time(), state="running",
        )  # fmt: skip
        await reg.create(old)
        assert await reg.checkpoint(old, '{"by":"old","i":0}', 100) == 1
        old.checkpoint_version = 1
        # The old owner's lease lapses; the claimers are live.
        await client.zadd(reg.keys.nodes(), {"old": 0})
        names = [f"n{i}" for i in range(claimers)]
        for name in names:
            await reg.heartbeat(name, {})

        async def jitter() -> None:
            await asyncio.sleep(rng.random() * 0.002)

        async def claimer(name: str) -> str | None:
            await jitter()
            if await reg.reap("old", ref, name, None) is not ReapResult.MOVED:
                return None
            await jitter()
            epoch = await reg.claim(ref, "old", name, "resume")
            assert epoch == 2, epoch
            mine = await reg.get("call", "s")  # as a resume reads it
            assert mine is not None and (mine.node_id, mine.epoch) == (name, 2)
            for i in range(3):
                await jitter()
                version = await reg.checkpoint(mine, json.dumps({"by": name, "i": i}), 100)
                assert version > mine.checkpoint_version
                mine.checkpoint_version = version
            return name

        async def stale_owner() -> list[int]:
            results = []
            for i in range(stale_writes):
                await jitter()
                result = await reg.checkpoint(old, json.dumps({"by": "old", "i": i}), 100)
                if result > 0:  # as a session does: the next write makes the next version
                    old.checkpoint_version = result
                results.append(result)
            return results

        outcome = await asyncio.gather(stale_owner(), *(claimer(n) for n in names))
        stale_results = cast(list[int], outcome[0])
        winners = [w for w in outcome[1:] if isinstance(w, str)]
        assert len(winners) == 1, winners
        record = await reg.get("call", "s")
        assert record is not None and record.node_id == winners[0] and record.epoch == 2

        kept = [json.loads(e) for e in reversed(await reg.checkpoints("call", "s"))]
        versions = [c["version"] for c in kept]
        assert versions == list(range(1, len(kept) + 1))  # gap-free, in order
        epochs = [c["epoch"] for c in kept]
        assert epochs == sorted(epochs)  # never back to an old owner once moved on
        for c in kept:
            assert c["state"]["by"] == ("old" if c["epoch"] == 1 else winners[0])
        accepted_stale = [r for r in stale_results if r != FENCED]
        assert len(accepted_stale) == epochs.count(1) - 1
        assert epochs.count(2) == 3
    finally:
        await client.aclose()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    claimers=st.integers(min_value=2, max_value=6),
    stale_writes=st.integers(min_value=0, max_value=8),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_one_owner_at_a_time(
    redis_server: RedisServer, claimers: int, stale_writes: int, seed: int
) -> None:
    asyncio.run(_race(redis_server.url, claimers, stale_writes, seed))
