"""``fleet run``: one session of a worker, in this console, on the embedded Redis."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

from fleet.keys import make_ref
from fleet.node import Node
from fleet.settings import Settings


async def run_one(settings: Settings, call_id: str, params: dict[str, Any]) -> int:
    node = Node(settings)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        record = await node.start_session(call_id, "default", params)
        print(
            f"session {record.session_id} running on {node.node_id} (Ctrl-C to close)",
            file=sys.stderr,
        )
        session = node.sessions[make_ref(call_id, record.session_id)]
        last = "0-0"
        done = asyncio.create_task(session.done.wait())
        stopping = asyncio.create_task(stop.wait())
        while True:
            events = await node.registry.read_events(call_id, record.session_id, last, 200)
            for entry_id, type_, data in events:
                last = entry_id
                print(
                    json.dumps({"id": entry_id, "event": type_, "data": json.loads(data)}),
                    flush=True,
                )
                if type_ == "session_ended":
                    failed = session.final is not None and session.final.end_reason == "failed"
                    return 1 if failed else 0
            if stopping.done() and not session.closing:
                await node.close_session(call_id, record.session_id)
            if done.done() and not events:
                return 0
    finally:
        await node.stop()
