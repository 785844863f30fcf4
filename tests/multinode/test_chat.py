"""The chat demo worker on real ``fleet serve`` processes: kill -9 of the owner in the
middle of a conversation, and the next message's reply carries the whole conversation on,
from another node."""

from __future__ import annotations

import signal
from typing import Any

from tests.multinode.harness import LocalFleet, NodeProcess


def _say(fleet: LocalFleet, sid: str, text: str, via: NodeProcess, **kw: Any) -> dict[str, Any]:
    resp = fleet.request(
        "POST",
        f"/calls/chat/sessions/{sid}/messages",
        via,
        json={"data": {"text": text}, **kw},
        params={"wait": 20},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def test_a_chat_carries_on_after_its_node_is_killed() -> None:
    with LocalFleet(2, FLEET_WORKER="fleet.workers.chat:Chat", FLEET_NODE_TTL="2") as fleet:
        victim, survivor = fleet.nodes
        sid = fleet.start("chat", node=victim, params={"delay": 0})["session_id"]
        assert _say(fleet, sid, "hello", survivor)["reply"]["turn"] == 1
        assert _say(fleet, sid, "how are you", victim)["reply"]["turn"] == 2

        victim.signal(signal.SIGKILL)
        # Sent while the session's owner is dead: the message waits in the inbox, and the
        # run resumed on the survivor answers it.
        after = _say(fleet, sid, "still there?", survivor, id="m-3")
        assert after["reply"] == {"text": "#3 you said: still there?", "turn": 3}

        info = fleet.session("chat", sid, survivor)
        assert info["node_id"] == survivor.name and info["epoch"] == 2, info
        checkpoint = fleet.request("GET", f"/calls/chat/sessions/{sid}/checkpoint", survivor)
        turns = checkpoint.json()["state"]["turns"]
        assert [t["text"] for t in turns if t["role"] == "user"] == [
            "hello",
            "how are you",
            "still there?",
        ]
