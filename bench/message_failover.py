"""message_failover: a conversation's owner killed with SIGKILL while messages pour in.

Three nodes (``FLEET_NODE_TTL=3``, ``FLEET_MAINTENANCE_INTERVAL=0.5``), worker
``tests.workers:Echo`` (it appends each message's data to the ``heard`` list of its
checkpoint, checkpointing after every message, then replies). Each run, on a fresh
fleet: 100 sessions are started on node A; then 10,000 messages (message ``k`` to session
``k % 100``, data ``k``, client id ``m<k>``) are sent by 32 concurrent senders,
round-robin over the three nodes. After 3,000 sends have been answered, A gets SIGKILL. A
send that fails (transport error or a status other than 202) is retried through the next
node with the same id, as a client behind a load balancer would, 100 ms later.

Then the benchmark polls the sessions' latest checkpoints in Redis until every ``heard``
list holds all the messages sent to it (or 60 s pass), and counts:

* lost: messages answered 202 but not in the final checkpointed ``heard``;
* applied twice: messages in a ``heard`` list more than once;
* the time from the kill until every message is in a checkpoint, and from the last
  send answered.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench import common

NAME = "message_failover"
TITLE = "message_failover: kill -9 of the owner mid-conversation"
SETTINGS = {
    "FLEET_WORKER": "tests.workers:Echo",
    "FLEET_NODE_TTL": "3",
    "FLEET_MAINTENANCE_INTERVAL": "0.5",
    "FLEET_LOG_LEVEL": "warning",
}
SESSIONS, MESSAGES = 100, 10_000
QUICK_SESSIONS, QUICK_MESSAGES = 20, 2_000
KILL_AFTER = 0.3  # of the messages answered
CONCURRENCY = 32
WAIT_LIMIT = 60.0
MAX_ATTEMPTS = 100


@dataclass
class Run:
    sent: int = 0
    failed_sends: int = 0  # gave up after MAX_ATTEMPTS
    retries: int = 0
    retry_statuses: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    twice: int = 0
    out_of_order: int = 0  # sessions whose heard list is not increasing
    all_in: float = float("nan")  # kill -> every message checkpointed
    after_last_send: float = float("nan")  # last send answered -> every message checkpointed
    send_seconds: float = float("nan")
    epochs: Counter[str] = field(default_factory=Counter)


def heard_lists(r: Any, keys: Any, refs: list[tuple[str, str]]) -> list[list[int]]:
    pipe = r.pipeline(transaction=False)
    for call, sid in refs:
        pipe.lindex(keys.checkpoint(call, sid), 0)
    return [list(json.loads(raw)["state"]["heard"]) if raw else [] for raw in pipe.execute()]


async def send_all(fleet: Any, refs: list[tuple[str, str]], messages: int, out: Run) -> float:
    """Send every message; returns the kill's time (monotonic)."""
    nodes = fleet.nodes
    victim = nodes[0]
    answered = 0
    killed_at = float("nan")
    kill_at = int(messages * KILL_AFTER)

    dead: set[int] = set()  # ports that refused a connection: a load balancer drops them

    async def one(k: int, conn: common.RawHTTP) -> bool:
        nonlocal answered, killed_at
        call, sid = refs[k % len(refs)]
        path = f"/calls/{call}/sessions/{sid}/messages"
        body = {"data": k, "id": f"m{k}"}
        status, text = -1, b""  # -1: not tried (its node is known dead)
        if conn.port not in dead:
            try:
                status, text = await conn.request("POST", path, body)
            except Exception as exc:
                status, text = 0, type(exc).__name__.encode()
                await conn.__aexit__()  # the lane's next request connects afresh
                if isinstance(exc, ConnectionRefusedError):
                    dead.add(conn.port)
        attempt = 0
        while status != 202:
            attempt += 1
            if status != -1:
                out.retries += 1
                out.retry_statuses[f"{status} {text[:40]!r}" if status else text.decode()] += 1
                if attempt >= MAX_ATTEMPTS:
                    out.failed_sends += 1
                    return False
                await asyncio.sleep(0.1)
            alive = [n for n in nodes if n.port not in dead] or nodes
            node = alive[(k + attempt) % len(alive)]
            try:
                async with common.RawHTTP("127.0.0.1", node.port) as other:
                    status, text = await other.request("POST", path, body)
            except Exception as exc:
                status, text = 0, type(exc).__name__.encode()
                if isinstance(exc, ConnectionRefusedError):
                    dead.add(node.port)
        answered += 1
        if answered == kill_at:
            victim.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            common.progress(f"{answered:,} answered: SIGKILL to {victim.name}")
        return True

    began = time.monotonic()
    done = await common.fan_out([n.port for n in nodes], messages, CONCURRENCY, one)
    out.send_seconds = time.monotonic() - began
    out.sent = sum(1 for d in done if d is True)
    return killed_at


def one_run(sessions: int, messages: int) -> Run:
    from fleet.store.keys import Keys

    out = Run()
    with common.local_fleet(3, **SETTINGS) as fleet:
        a = fleet.nodes[0]
        refs = []
        for i in range(sessions):
            call = f"conv-{i % 10}"
            refs.append((call, fleet.start(call, node=a)["session_id"]))
        killed_at = asyncio.run(send_all(fleet, refs, messages, out))
        last_send = time.monotonic()
        keys = Keys(fleet.prefix)
        r = common.redis_client(fleet.redis.url)
        expected = [{k for k in range(messages) if k % sessions == i} for i in range(sessions)]
        try:
            while True:
                lists = heard_lists(r, keys, refs)
                if all(set(h) >= e for h, e in zip(lists, expected, strict=True)):
                    now = time.monotonic()
                    out.all_in = now - killed_at
                    out.after_last_send = now - last_send
                    break
                if time.monotonic() - last_send > WAIT_LIMIT:
                    break
                time.sleep(0.05)
            time.sleep(1.0)  # anything applied twice shows up by now
            lists = heard_lists(r, keys, refs)
            pipe = r.pipeline(transaction=False)
            for call, sid in refs:
                pipe.hget(keys.session(call, sid), "epoch")
            out.epochs.update(str(e) for e in pipe.execute())
        finally:
            r.close()
    for heard, want in zip(lists, expected, strict=True):
        counts = Counter(heard)
        out.lost += len(want - set(counts))
        out.twice += sum(1 for n in counts.values() if n > 1)
        out.out_of_order += heard != sorted(heard)
    return out


def run(opts: common.Options) -> common.Report:
    sessions = QUICK_SESSIONS if opts.quick else SESSIONS
    messages = QUICK_MESSAGES if opts.quick else MESSAGES
    load_before = common.load_average()
    runs: list[Run] = []
    for i in range(opts.runs):
        common.progress(f"run {i + 1}/{opts.runs}: {messages:,} messages to {sessions} sessions")
        r = one_run(sessions, messages)
        common.progress(
            f"run {i + 1}: lost {r.lost}, applied twice {r.twice}; all checkpointed "
            f"{r.all_in:.2f}s after the kill; {r.retries} retries"
        )
        runs.append(r)
    return report(opts, runs, sessions, messages, load_before)


def report(
    opts: common.Options, runs: list[Run], sessions: int, messages: int, load_before: str
) -> common.Report:
    lost = sum(r.lost for r in runs)
    twice = sum(r.twice for r in runs)
    all_in = common.Agg.of(r.all_in for r in runs)
    after = common.Agg.of(r.after_last_send for r in runs)
    statuses: Counter[str] = Counter()
    epochs: Counter[str] = Counter()
    for r in runs:
        statuses.update(r.retry_statuses)
        epochs.update(r.epochs)
    rows = [
        ["messages answered 202", common.Agg.of(r.sent for r in runs).fmt("", 0), ""],
        ["**lost** (answered, not in the final checkpoint), all runs", str(lost),
         f"0: {common.verdict(lost == 0)}"],
        ["**applied twice** (in a `heard` list more than once), all runs", str(twice),
         f"0: {common.verdict(twice == 0)}"],
        ["sessions whose `heard` is out of send order, all runs",
         str(sum(r.out_of_order for r in runs)), "not a target (senders are concurrent)"],
        ["sends retried (per run)", common.Agg.of(r.retries for r in runs).fmt("", 0), ""],
        ["sends given up after 100 attempts, all runs", str(sum(r.failed_sends for r in runs)),
         ""],
        ["time to send them all", common.Agg.of(r.send_seconds for r in runs).fmt(" s"), ""],
        ["**kill -> every message in a checkpoint**", all_in.fmt(" s"), ""],
        ["last send answered -> every message in a checkpoint", after.fmt(" s"), ""],
    ]  # fmt: skip
    body = [
        f"{opts.runs} runs, each on a fresh fleet of 3 nodes (`FLEET_NODE_TTL=3`, "
        "`FLEET_MAINTENANCE_INTERVAL=0.5`), worker `tests.workers:Echo` (appends each "
        "message's data to `heard` in its checkpoint, checkpointing after every message). "
        f"{sessions} sessions on node A; {messages:,} messages (each with its own client "
        f"`id`) sent by {CONCURRENCY} concurrent senders round-robin over the 3 nodes; "
        f"SIGKILL to A after {int(messages * KILL_AFTER):,} sends were answered. A failed "
        "send is retried 100 ms later through the next node with the same `id`; a node "
        "that refused a connection gets no more sends. Targets: "
        "0 lost, 0 applied twice.",
        "",
        *common.table(["figure", "value", "target"], rows),
        "",
        f"Why sends were retried, all runs: {dict(statuses) or 'none'}. Epochs at the end, "
        f"all sessions of all runs: {dict(epochs)}.",
    ]
    notes = [
        "Sends to a session whose owner is dead are accepted (202): the message waits in "
        "the inbox in Redis, and the session's next owner reads it from the position of "
        "the last checkpoint. Retries are for sends that reached A as it died.",
        "The time until every message is checkpointed has two parts: A's sessions are "
        "claimed once its lease (3 s) has expired and a maintenance pass (every 0.5 s) has "
        "seen it; and the client is still sending (the Python client, three nodes and "
        "Redis share two cores). Where the sending ends last, *last send answered -> every "
        "message in a checkpoint* is the part fleet adds: the new owners had caught up.",
        common.load_note(load_before),
    ]
    summary = (
        f"{messages:,} messages to {sessions} sessions, owner killed mid-way: {lost} lost, "
        f"{twice} applied twice (targets 0 and 0: {common.verdict(lost == 0 and twice == 0)});"
        f" every message checkpointed {all_in.fmt(' s')} after the kill."
    )
    return common.Report(NAME, TITLE, summary, body, notes)
