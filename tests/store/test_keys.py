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


@given(ids, ids, st.text(min_size=1, max_size=20), ids, ids, st.text(min_size=1, max_size=20), ids)
def test_idempotency_keys_are_per_call_principal_and_key(
    c1: str, k1: str, p1: str, c2: str, k2: str, p2: str, p3: str
) -> None:
    """Even a principal name outside the id pattern (a custom start hook may return any)
    cannot make two (principal, key) pairs share a key: the key, which cannot hold ``/``,
    comes last."""
    for p in (p1, p2, p3):
        for a, b in [((c1, p, k1), (c2, p, k2)), ((c1, p1, k1), (c2, p2, k2))]:
            if KEYS.idempotency(*a) == KEYS.idempotency(*b):
                assert a == b
    for c, p, k in [(c1, p1, k1), (c2, p3, k2)]:
        key = KEYS.idempotency(c, p, k)
        assert key.startswith("fleet:{") and hash_tag(key) == f"c:{c}"
        assert key not in all_keys(c, k)


@given(st.text(min_size=1, max_size=20), ids, st.text(min_size=1, max_size=20), ids)
def test_thread_keys_are_per_principal_and_thread(p1: str, t1: str, p2: str, t2: str) -> None:
    """A thread's two keys share one slot, and no two (principal, thread) pairs share a
    key, whatever the principal's name (a custom hook may return any): the thread id,
    which cannot hold ``/``, comes last in the tag."""
    for p, t in [(p1, t1), (p2, t2)]:
        record, sessions = KEYS.thread(p, t), KEYS.thread_sessions(p, t)
        assert record.startswith("fleet:{t:") and record != sessions
        assert hash_tag(record) == hash_tag(sessions)
    if KEYS.thread(p1, t1) == KEYS.thread(p2, t2):
        assert (p1, t1) == (p2, t2)
    assert KEYS.thread("a:b", "c") != KEYS.thread("a", "b:c")


def test_idempotency_key_layout_tells_principal_and_key_apart() -> None:
    # ``:`` is an id character: with it as the separator these two would collide.
    assert KEYS.idempotency("c", "a:b", "c") != KEYS.idempotency("c", "a", "b:c")


@given(ids, ids)
def test_refs_round_trip(call: str, sid: str) -> None:
    assert split_ref(make_ref(call, sid)) == (call, sid)


def test_channels_are_per_node() -> None:
    assert KEYS.node_channel("a") != KEYS.node_channel("b")
    assert KEYS.node_channel("a").startswith(KEYS.node_channel_prefix())
