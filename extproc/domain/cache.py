"""Prompt verdicts already known: the texts a guardrail passed, so that a conversation's
history is checked once, not once per turn.

A key is the guardrail (id and version), the source and a SHA-256 of the text (of the bytes,
for an image): a new guardrail
version, or the other source, is a new key. Only clean passes are kept (no intervention, no
finding): a text that was masked, blocked or detected is checked again every time, so its
audit record and metrics stay whole. ``VerdictCache`` is the interface a shared backend
implements (``extproc.shared.cache``: Redis or Valkey behind this process's own cache);
``MemoryVerdictCache`` is one process's: bounded in entries, least recently used first out,
each entry kept ``ttl_s`` seconds. No I/O here; the clock is injected.

A stream asks with ``lookup`` (a coroutine: a shared cache asks the store for what the local
one does not know) and tells with ``remember`` (returns at once: a shared cache writes the
store in the background).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from extproc.domain.values import GuardrailRef, Source

Key = tuple[str, str, str, bytes]


def verdict_key(guardrail: GuardrailRef, source: Source, text: str) -> Key:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return (guardrail.id, guardrail.version, source.value, digest)


def image_key(guardrail: GuardrailRef, source: Source, data: bytes) -> Key:
    """The key of an image: a SHA-256 of its bytes (a source of its own: no text's key)."""
    digest = hashlib.sha256(data).digest()
    return (guardrail.id, guardrail.version, source.value + ":image", digest)


class VerdictCache(Protocol):
    """Which texts a guardrail is known to pass."""

    def passed(self, key: Key) -> bool:
        """True when the text of ``key`` passed within the time to live (this process's
        knowledge only)."""
        ...

    async def lookup(self, keys: Sequence[Key]) -> list[bool]:
        """``passed`` for each of ``keys``, asking a shared store for those this process does
        not know."""
        ...

    def remember(self, keys: Iterable[Key], text_units: int = 0) -> None:
        """The texts of ``keys`` passed just now, in a call that billed ``text_units``."""
        ...


class NoCache:
    """Nothing is ever known: every text is checked (``--verdict-cache-entries 0``)."""

    def passed(self, key: Key) -> bool:
        return False

    async def lookup(self, keys: Sequence[Key]) -> list[bool]:
        return [False] * len(keys)

    def remember(self, keys: Iterable[Key], text_units: int = 0) -> None:
        return None


NO_CACHE: VerdictCache = NoCache()


def verdict_cache(entries: int, ttl_s: float) -> VerdictCache:
    """The cache of ``--verdict-cache-entries`` and ``--verdict-cache-ttl``."""
    return MemoryVerdictCache(entries, ttl_s) if entries > 0 else NO_CACHE


class MemoryVerdictCache:
    """At most ``max_entries`` passes, each for ``ttl_s`` seconds, least recently used out
    first. About 200 bytes an entry."""

    __slots__ = ("_entries", "_max", "_ttl", "_clock", "hits", "misses")

    def __init__(self, max_entries: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("a verdict cache needs at least one entry and a positive ttl")
        self._entries: OrderedDict[Key, float] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl_s
        self._clock = clock
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def passed(self, key: Key) -> bool:
        expires = self._entries.get(key)
        if expires is None:
            self.misses += 1
            return False
        if expires <= self._clock():
            del self._entries[key]
            self.misses += 1
            return False
        self._entries.move_to_end(key)
        self.hits += 1
        return True

    async def lookup(self, keys: Sequence[Key]) -> list[bool]:
        return [self.passed(key) for key in keys]

    def remember(self, keys: Iterable[Key], text_units: int = 0, *,
                 ttl_s: float | None = None) -> None:
        """``ttl_s``: less than the cache's time to live (a pass learnt from a shared store
        keeps the time it has left there)."""
        entries = self._entries
        expires = self._clock() + (self._ttl if ttl_s is None else min(ttl_s, self._ttl))
        for key in keys:
            entries[key] = expires
            entries.move_to_end(key)
        while len(entries) > self._max:
            entries.popitem(last=False)
