"""The node side of bench/capacity.py: one process running several real ``Node`` objects
(no HTTP), each with its own Redis Cluster client, driven over stdin/stdout.

``python -m bench.capacity_fleet --url URL --prefix P --nodes N --first K`` starts nodes
``cap-K`` … ``cap-(K+N-1)`` (``node.start()``, as ``fleet serve`` does, then the same GC
settings) and answers one JSON line on stdout for each JSON line on stdin:

* ``{"op": "start", "count": C, "worker": W, "params": {...}, "tag": T, "concurrency": M,
  "rate": R}``: every node starts C sessions of worker W on itself (``node.start_session``,
  at most M in flight per node, R a second per node if R is given), each in a call of its
  own (``T-<node>-<i>``); answers how many started, the refusals by error code, and the
  seconds it took;
* ``{"op": "send", "rate": R, "seconds": S}``: R messages a second in all, for S seconds,
  each from node i to a session of node i + 1 (``node.conversations.send``), round-robin
  over the sessions of worker ``paced`` that listen;
* ``{"op": "close"}``: every node closes its sessions (``node.close_session``);
* ``{"op": "count"}``: the sessions each node runs, by state;

every answer but ``quit``'s also says how late (``lag``, seconds) a 100 ms timer fired at
worst on the process's event loop since the last answer;
* ``{"op": "quit"}``: stop every node (``node.stop()``) and exit.

The process is the fault domain of bench/capacity.py's failover: SIGKILL stops every node
in it at once, without a word to Redis, as a crashed pod would.

``Paced`` is a worker whose Redis work is set by its params, to measure each kind apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import sys
import time
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleet.errors import FleetError
from fleet.worker import SessionContext

WORKERS = "counter=fleet.workers.counter:Counter,paced=bench.capacity_fleet:Paced"


class Paced:
    """Every ``interval`` seconds (from a random phase): an ``emit``, a ``checkpoint`` and a
    change of ``ctx.metrics``, each only if its param says so. With ``listen``, it also
    takes each message as it comes and consumes it with a checkpoint."""

    resumable = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        interval: float = Field(default=1.0, gt=0)
        emit: bool = True
        checkpoint: bool = True
        metrics: bool = True
        listen: bool = False

    async def run(self, ctx: SessionContext) -> None:
        p = self.Params.model_validate(ctx.params)
        state = ctx.state if isinstance(ctx.state, dict) else {}
        n, m = int(state.get("n", 0)), int(state.get("m", 0))
        loop = asyncio.get_running_loop()
        due = loop.time() + random.uniform(0, p.interval)
        while not ctx.closing.is_set():
            left = due - loop.time()
            if p.listen:
                message = await ctx.receive(timeout=max(left, 0.0))
                if message is not None:
                    m += 1
                    await ctx.checkpoint({"n": n, "m": m})
                    continue
            elif left > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await ctx.closing.wait()
            if ctx.closing.is_set() or loop.time() < due:
                continue
            due += p.interval
            n += 1
            if p.emit:
                await ctx.emit("tick", {"n": n})
            if p.checkpoint:
                await ctx.checkpoint({"n": n, "m": m})
            if p.metrics:
                ctx.metrics["ticks"] = n


def wide_client(url: str, settings: Any, pool: int) -> Any:
    """What ``fleet.store.topology.connect_topology`` builds for a ``redis+cluster://`` URL
    (same timeouts, same retries), with ``pool`` connections per shard: a node with more
    than 100 commands in flight to one shard (redis-py's default) gets
    ``MaxConnectionsError`` at once instead of a wait."""
    from redis.asyncio import RedisCluster
    from redis.asyncio.cluster import ClusterNode

    from fleet.store import command_retry

    timeout = min(5.0, max(0.5, settings.node_ttl / 3))  # fleet.store.connect._timeout
    hosts = [h.rsplit(":", 1) for h in url.split("://", 1)[1].split(",")]
    return RedisCluster(
        startup_nodes=[ClusterNode(h, int(p)) for h, p in hosts],
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=command_retry(),
        max_connections=pool,
    )


class Lag:
    """How late a 100 ms timer fires on this process's event loop: the worst since the
    last look (as ``fleet_event_loop_lag_seconds`` does for one node)."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 0.1
            await asyncio.sleep(0.1)
            self.worst = max(self.worst, loop.time() - due)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst


class Fleet:
    """The nodes of this process."""

    def __init__(
        self, url: str, prefix: str, count: int, first: int, env: dict[str, Any], pool: int
    ) -> None:
        """``pool``: 0 for fleet's own client (``connect``); else a Cluster client like it
        whose pools hold ``pool`` connections per shard instead of redis-py's 100."""
        from pydantic import SecretStr

        from fleet.runtime.node import Node
        from fleet.settings import Settings
        from fleet.store.connect import connect

        self.nodes: list[Node] = []
        self.lag = Lag()
        for i in range(first, first + count):
            settings = Settings(
                redis_url=SecretStr(url),
                node_id=f"cap-{i}",
                key_prefix=prefix,
                worker=WORKERS,
                log_level="warning",
                **env,
            )
            # One client per node, as separate processes would have: connect() is what
            # Node does by itself; called here only to make that explicit.
            client = connect(settings) if not pool else wide_client(url, settings, pool)
            self.nodes.append(Node(settings, redis=client))

    async def start(self) -> None:
        from fleet.serve import gc_tuning

        await asyncio.gather(*(node.start() for node in self.nodes))
        await asyncio.gather(*(node.wait_ready(30) for node in self.nodes))
        gc_tuning.settle()

    async def start_sessions(self, cmd: dict[str, Any]) -> dict[str, Any]:
        count, tag = int(cmd["count"]), str(cmd["tag"])
        worker, params = str(cmd["worker"]), dict(cmd["params"])
        gate = int(cmd.get("concurrency", 8))
        refused: Counter[str] = Counter()
        began = time.monotonic()

        pace = float(cmd.get("rate", 0.0))  # starts a second per node; 0: as fast as it goes

        async def on(node: Any) -> int:
            started = 0
            lanes = asyncio.Semaphore(gate)
            loop = asyncio.get_running_loop()
            t0 = loop.time() + random.uniform(0, 1 / pace) if pace else 0.0

            async def one(i: int) -> None:
                nonlocal started
                if pace:
                    await asyncio.sleep(max(0.0, t0 + i / pace - loop.time()))
                async with lanes:
                    try:
                        await node.start_session(
                            f"{tag}-{node.node_id}-{i}", "default", params, worker=worker
                        )
                        started += 1
                    except FleetError as exc:
                        refused[exc.code] += 1
                    except Exception as exc:  # Redis errors: counted, not raised
                        refused[type(exc).__name__] += 1

            await asyncio.gather(*(one(i) for i in range(count)))
            return started

        done = await asyncio.gather(*(on(node) for node in self.nodes))
        return {
            "started": sum(done),
            "refused": dict(refused),
            "seconds": time.monotonic() - began,
            "lag": self.lag.take(),
        }

    async def send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        rate, seconds = float(cmd["rate"]), float(cmd["seconds"])
        pairs = []  # (sender, target session) with the sender the next node over
        for i, node in enumerate(self.nodes):
            sender = self.nodes[(i - 1) % len(self.nodes)]
            for s in node.sessions.values():
                if s.record.worker == "paced" and s.record.params.get("listen"):
                    pairs.append((sender, s.record.call_id, s.record.session_id))
        if not pairs:
            return {"sent": 0, "refused": {}}
        random.shuffle(pairs)
        refused: Counter[str] = Counter()
        sent = 0
        loop = asyncio.get_running_loop()
        began = loop.time()
        tasks: set[asyncio.Task[None]] = set()

        async def one(sender: Any, call_id: str, session_id: str) -> None:
            nonlocal sent
            try:
                await sender.conversations.send(call_id, session_id, "message", '{"x":1}')
                sent += 1
            except FleetError as exc:
                refused[exc.code] += 1
            except Exception as exc:
                refused[type(exc).__name__] += 1

        k = 0
        while (now := loop.time()) < began + seconds:
            while k < (now - began) * rate:  # paced by the clock, not by the answers
                task = asyncio.create_task(one(*pairs[k % len(pairs)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                k += 1
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return {"sent": sent, "refused": dict(refused)}

    async def close(self) -> dict[str, Any]:
        async def on(node: Any) -> None:
            refs = [(s.record.call_id, s.record.session_id) for s in node.sessions.values()]
            lanes = asyncio.Semaphore(16)

            async def one(call_id: str, session_id: str) -> None:
                async with lanes:
                    with contextlib.suppress(Exception):
                        await node.close_session(call_id, session_id, wait=10)

            await asyncio.gather(*(one(*ref) for ref in refs))

        await asyncio.gather(*(on(node) for node in self.nodes))
        return await self.count()

    async def count(self) -> dict[str, Any]:
        return {
            "sessions": {
                node.node_id: dict(Counter(s.record.state for s in node.sessions.values()))
                for node in self.nodes
            },
            "lag": self.lag.take(),
        }

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)


async def serve(fleet: Fleet) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await fleet.start()
    probe = asyncio.create_task(fleet.lag.run())
    answer({"ready": [n.node_id for n in fleet.nodes]})
    while True:
        line = await reader.readline()
        if not line:  # the benchmark is gone: so are we, as a crash would
            os._exit(0)
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        try:
            if op == "start":
                answer(await fleet.start_sessions(cmd))
            elif op == "send":
                answer(await fleet.send(cmd))
            elif op == "close":
                answer(await fleet.close())
            elif op == "count":
                answer(await fleet.count())
            else:
                answer({"error": f"unknown op {op!r}"})
        except Exception as exc:
            logging.getLogger("bench").exception("command %s failed", op)
            answer({"error": f"{type(exc).__name__}: {exc}"})
    probe.cancel()
    await fleet.stop()
    answer({"stopped": True})


def answer(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def main() -> None:
    from fleet import logs

    parser = argparse.ArgumentParser(prog="python -m bench.capacity_fleet")
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--settings", default="{}", help="more Settings fields, as JSON")
    parser.add_argument("--pool", type=int, default=0, help="connections per shard (0: fleet's)")
    args = parser.parse_args()
    logs.configure("warning")
    settings = json.loads(args.settings)
    fleet = Fleet(args.url, args.prefix, args.nodes, args.first, settings, args.pool)
    asyncio.run(serve(fleet))


if __name__ == "__main__":
    main()
