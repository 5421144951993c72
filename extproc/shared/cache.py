"""The verdict cache shared by every replica: the store behind this process's own cache.

A text one replica's guardrail passed is not checked again by another: ``lookup`` asks this
process's ``MemoryVerdictCache`` first, then the store for the keys it does not know (one
round trip: a pipeline of ``GET`` and ``PTTL`` per key); a pass found there is kept locally for
the time it has left in the store. ``remember`` writes the local cache at once and the store in
the background (``SET`` with ``EX --verdict-cache-ttl``, one pipeline), so no stream waits for
the write. When the store does not answer (``extproc.shared.store``), the local cache alone
answers and the write is dropped (counted as ``cache_get`` / ``cache_put`` fallbacks).

Keys: ``<prefix>verdict:<guardrail id>:<version>:<source>:<SHA-256 of the text, hex>``
(``extproc.domain.cache.verdict_key``); values: JSON ``{"outcome": "pass", "text_units": N}``
(N: the text units of the call that passed it). Never the text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aredis

from extproc.domain.cache import NO_CACHE, Key, MemoryVerdictCache, VerdictCache
from extproc.shared.store import SharedState, Unavailable


class SharedVerdictCache:
    """``VerdictCache``: ``local`` in front of the store (see the module docstring)."""

    def __init__(self, state: SharedState, local: MemoryVerdictCache, ttl_s: float) -> None:
        self._state = state
        self.local = local
        self._ttl_ms = max(1000, int(ttl_s * 1000))
        self.hits = 0  # passes found in the store

    def store_key(self, key: Key) -> str:
        guardrail_id, version, source, digest = key
        return self._state.key("verdict", guardrail_id, version, source, digest.hex())

    def passed(self, key: Key) -> bool:
        return self.local.passed(key)

    async def lookup(self, keys: Sequence[Key]) -> list[bool]:
        known = [self.local.passed(key) for key in keys]
        missing = [index for index, passed in enumerate(known) if not passed]
        if not missing:
            return known
        names = [self.store_key(keys[index]) for index in missing]
        try:
            found = await self._state.run("cache_get", lambda redis: self._get(redis, names))
        except Unavailable:
            return known
        for index, ttl_ms in zip(missing, found, strict=True):
            if ttl_ms is not None:
                known[index] = True
                self.hits += 1
                self.local.remember((keys[index],), ttl_s=ttl_ms / 1000)
        return known

    @staticmethod
    async def _get(redis: aredis.Redis, names: list[str]) -> list[int | None]:
        """Per name: the milliseconds its pass has left, or None (absent, or not a pass)."""
        async with redis.pipeline(transaction=False) as pipe:
            for name in names:
                _ = pipe.get(name)
                _ = pipe.pttl(name)
            replies: list[Any] = await pipe.execute()
        out: list[int | None] = []
        for value, ttl in zip(replies[::2], replies[1::2], strict=True):
            out.append(int(ttl) if value is not None and _is_pass(value) and ttl > 0 else None)
        return out

    def remember(self, keys: Iterable[Key], text_units: int = 0) -> None:
        keys = list(keys)
        if not keys:
            return
        self.local.remember(keys)
        value = json.dumps({"outcome": "pass", "text_units": text_units})
        names = [self.store_key(key) for key in keys]
        self._state.spawn("cache_put", lambda redis: self._put(redis, names, value))

    async def _put(self, redis: aredis.Redis, names: list[str], value: str) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for name in names:
                _ = pipe.set(name, value, px=self._ttl_ms)
            await pipe.execute()


def _is_pass(value: bytes | str) -> bool:
    try:
        data = json.loads(value)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("outcome") == "pass"


def shared_verdict_cache(state: SharedState, entries: int, ttl_s: float) -> VerdictCache:
    """The cache of ``--verdict-cache-entries`` and ``--verdict-cache-ttl`` with the store
    behind it (0 entries: no cache, shared or not)."""
    if entries <= 0:
        return NO_CACHE
    return SharedVerdictCache(state, MemoryVerdictCache(entries, ttl_s), ttl_s)
