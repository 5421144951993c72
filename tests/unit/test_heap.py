"""``extproc.heap``: the start-up heap is frozen and full collections are rarer."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from extproc.domain.errors import ConfigError
from extproc.observe import heap
from extproc.settings.options import load_settings


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


def test_settle_sets_the_young_threshold_and_collects_generation_1_every_third(
        restore_gc: None) -> None:
    _, _, full = gc.get_threshold()
    heap.settle(young=10_000)
    assert gc.get_threshold() == (10_000, heap.MIDDLE_EVERY, full)
    heap.settle(100, young=5_000)
    assert gc.get_threshold() == (5_000, 3, 100)


def test_young_collections_follow_the_threshold(restore_gc: None) -> None:
    heap.settle(young=10_000)
    collected: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collected.append(info["generation"])

    gc.callbacks.append(count)
    try:
        held = [[] for _ in range(25_000)]  # 25,000 more containers than freed: two collections
    finally:
        gc.callbacks.remove(count)
    assert len(held) == 25_000
    assert collected.count(0) == 2, collected


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
    assert load_settings(base + ["--gc-full-every", "10"], {}).runtime.gc_full_every == 10
    assert load_settings(base, {"EXTPROC_GC_FULL_EVERY": "1000"}).runtime.gc_full_every == 1000
    assert load_settings(base + ["--gc-full-every", "0"], {}).runtime.gc_full_every == 0  # hands off
    with pytest.raises(ConfigError, match="--gc-full-every"):
        load_settings(base + ["--gc-full-every", "-1"], {})


def test_gc_young_threshold_setting() -> None:
    base = ["--guardrail-id", "g1"]
    assert load_settings(base, {}).runtime.gc_young_threshold == 10_000
    assert load_settings(base + ["--gc-young-threshold", "700"], {}).runtime.gc_young_threshold == 700
    assert load_settings(base, {"EXTPROC_GC_YOUNG_THRESHOLD": "0"}).runtime.gc_young_threshold == 0
    with pytest.raises(ConfigError, match="--gc-young-threshold"):
        load_settings(base + ["--gc-young-threshold", "-5"], {})

