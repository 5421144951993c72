"""The verdict cache: bounded, timed, keyed by guardrail, version, source and text."""

from __future__ import annotations

from extproc.domain.cache import MemoryVerdictCache, NoCache, verdict_cache, verdict_key
from extproc.domain.values import GuardrailRef, Source

G1 = GuardrailRef("g1", "1")
G2 = GuardrailRef("g1", "2")


def test_keys_separate_guardrail_versions_and_sources() -> None:
    keys = {verdict_key(G1, Source.INPUT, "t"), verdict_key(G2, Source.INPUT, "t"),
            verdict_key(G1, Source.OUTPUT, "t"), verdict_key(G1, Source.INPUT, "u")}
    assert len(keys) == 4
    assert verdict_key(G1, Source.INPUT, "t") == verdict_key(G1, Source.INPUT, "t")


def test_least_recently_used_goes_first() -> None:
    cache = MemoryVerdictCache(2, 60.0, clock=lambda: 0.0)
    a, b, c = (verdict_key(G1, Source.INPUT, t) for t in "abc")
    cache.remember([a, b])
    assert cache.passed(a)  # a is now the most recent
    cache.remember([c])
    assert len(cache) == 2
    assert cache.passed(a) and cache.passed(c) and not cache.passed(b)
    assert (cache.hits, cache.misses) == (3, 1)


def test_an_entry_expires() -> None:
    now = [0.0]
    cache = MemoryVerdictCache(10, 5.0, clock=lambda: now[0])
    key = verdict_key(G1, Source.INPUT, "t")
    cache.remember([key])
    now[0] = 4.9
    assert cache.passed(key)
    now[0] = 5.0
    assert not cache.passed(key)
    assert len(cache) == 0


def test_zero_entries_is_no_cache() -> None:
    cache = verdict_cache(0, 60.0)
    assert isinstance(cache, NoCache)
    key = verdict_key(G1, Source.INPUT, "t")
    cache.remember([key])
    assert not cache.passed(key)
