"""``fleet run``: one session of a worker, in this console, on the embedded Redis."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

from fleet.runtime.node import Node
from fleet.settings import Settings
from fleet.store.keys import make_ref

READY_TIMEOUT = 10.0  # seconds; past it the start says why the node is not ready


async def run_one(settings: Settings, call_id: str, params: dict[str, Any]) -> int:
    node = Node(settings)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.wait_ready(READY_TIMEOUT)  # if not, the start below says why
        record = await node.start_session(call_id, "default", params)
        print(
            f"session {record.session_id} running on {node.node_id} (Ctrl-C to close)",
            file=sys.stderr,
        )
        session = node.sessions[make_ref(call_id, record.session_id)]
        stopping = asyncio.create_task(stop.wait())
        with node.events.listen(
            call_id, record.session_id, started_at=record.started_at
        ) as listener:
            while not listener.done:
                event = await listener.next(0.2)
                if event is not None:
                    print(
                        json.dumps(
                            {"id": event.id, "event": event.type, "data": json.loads(event.data)}
                        ),
                        flush=True,
                    )
                elif session.done.is_set():
                    listener.finish()  # what Redis still holds, in case session_ended is lost
                if stopping.done() and not session.closing:
                    await node.close_session(call_id, record.session_id)
        failed = session.final is not None and session.final.end_reason == "failed"
        return 1 if failed else 0
    finally:
        await node.stop()
