"""Key builders: no two distinct ids share a key, no id escapes its prefix or slot."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from fleet.settings import ID_PATTERN
from fleet.store.keys import Keys, make_ref, split_ref

ids = st.from_regex(ID_PATTERN, fullmatch=True)
KEYS = Keys("fleet")


def all_keys(call: str, sid: str) -> list[str]:
    return [
        KEYS.session(call, sid),
        KEYS.checkpoint(call, sid),
        KEYS.events(call, sid),
        KEYS.call_live(call),
        KEYS.call_ended(call),
        KEYS.node_info(sid),
        KEYS.node_sessions(sid),
    ]


def hash_tag(key: str) -> str:
    match = re.search(r"\{([^}]*)\}", key)
    assert match, key
    return match.group(1)


@given(ids, ids, ids, ids)
def test_distinct_ids_never_share_a_key(c1: str, s1: str, c2: str, s2: str) -> None:
    first, second = all_keys(c1, s1), all_keys(c2, s2)
    for i, a in enumerate(first):
        for j, b in enumerate(second):
            if a == b:
                assert i == j and (i >= 3 or (c1, s1) == (c2, s2)), (a, i, j)
                if i in (3, 4):
                    assert c1 == c2
                if i in (5, 6):
                    assert s1 == s2


@given(ids, ids)
def test_keys_stay_under_prefix_and_in_their_slot(call: str, sid: str) -> None:
    for key in all_keys(call, sid):
        assert key.startswith("fleet:{")
    for key in all_keys(call, sid)[:5]:
        assert hash_tag(key) == f"c:{call}"  # all keys of a session share the call's slot
    for key in all_keys(call, sid)[5:]:
        assert hash_tag(key) == "g"


@given(ids, ids)
def test_refs_round_trip(call: str, sid: str) -> None:
    assert split_ref(make_ref(call, sid)) == (call, sid)


def test_channels_are_per_node() -> None:
    assert KEYS.node_channel("a") != KEYS.node_channel("b")
    assert KEYS.node_channel("a").startswith(KEYS.node_channel_prefix())
