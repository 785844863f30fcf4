"""``gc_tuning.settle``: start-up is frozen, and what comes later is still collected."""

from __future__ import annotations

import gc
import weakref
from collections import deque
from collections.abc import Iterator

import pytest

from fleet.serve import gc_tuning


class Cyclic:
    """Stands for a session: a few objects that point at each other."""

    def __init__(self) -> None:
        self.me = self
        self.parts = [self, {"owner": self}]


@pytest.fixture
def settled() -> Iterator[None]:
    thresholds = gc.get_threshold()
    gc_tuning.settle()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_settle_freezes_what_exists_and_nothing_made_later(settled: None) -> None:
    frozen = gc.get_freeze_count()
    assert frozen > 0
    assert gc.get_threshold() == gc_tuning.THRESHOLDS
    later = [Cyclic() for _ in range(1000)]
    gc.collect()
    assert gc.get_freeze_count() == frozen
    assert all(gc.is_tracked(x) for x in later)


def test_old_cyclic_garbage_is_collected_without_an_explicit_collect(settled: None) -> None:
    """Sessions that live a while and then end (cycles in the oldest generation) are
    freed by the automatic full collections, which the thresholds make rarer, not
    absent: the garbage waiting for one stays bounded."""
    live: deque[Cyclic] = deque()
    ended: deque[weakref.ref[Cyclic]] = deque()
    waiting_most = 0
    for i in range(400_000):
        live.append(Cyclic())
        if len(live) > 2_000:  # a node with 2,000 live sessions and steady churn
            ended.append(weakref.ref(live.popleft()))
        if i % 1_000 == 0:
            while ended and ended[0]() is None:
                ended.popleft()
            waiting_most = max(waiting_most, sum(1 for r in ended if r() is not None))
    collected = 400_000 - 2_000 - sum(1 for r in ended if r() is not None)
    assert collected > 150_000  # full collections ran by themselves
    # One full collection at least every 700 * 10 * 100 net allocations of containers; an
    # iteration makes 4 (the object, its list and dict, the weak reference).
    assert waiting_most < 250_000
