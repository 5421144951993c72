"""``extproc.heap``: the start-up heap is frozen and full collections are rarer."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from extproc import heap
from extproc.config import load_settings
from extproc.errors import ConfigError


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_the_heap_and_sets_the_full_collection_interval(restore_gc: None) -> None:
    survivor = [object()]  # a container alive at start-up
    young, middle, _ = gc.get_threshold()
    heap.settle(100)
    assert gc.get_freeze_count() > 1000
    assert gc.get_threshold() == (young, middle, 100)  # younger generations unchanged
    # Frozen objects are no longer walked by collections: gc.get_objects() skips them.
    assert not any(o is survivor for o in gc.get_objects())


def test_settle_without_an_interval_keeps_the_thresholds(restore_gc: None) -> None:
    before = gc.get_threshold()
    heap.settle()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() > 0


def test_cycles_made_after_settle_are_still_collected(restore_gc: None) -> None:
    heap.settle(100)

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    del a, b
    assert gc.collect() >= 2


def test_gc_full_every_setting() -> None:
    base = ["--guardrail-id", "g1"]
    assert load_settings(base + ["--gc-full-every", "10"], {}).gc_full_every == 10
    assert load_settings(base, {"EXTPROC_GC_FULL_EVERY": "1000"}).gc_full_every == 1000
    assert load_settings(base + ["--gc-full-every", "0"], {}).gc_full_every == 0  # hands off
    with pytest.raises(ConfigError, match="--gc-full-every"):
        load_settings(base + ["--gc-full-every", "-1"], {})

