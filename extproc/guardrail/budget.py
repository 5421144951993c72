"""The client-side budget: token buckets for ApplyGuardrail requests and text units per second.

``ResilientGuardrail`` takes one request and a call's text units from its buckets before every
attempt; see ``extproc.guardrail.resilient`` for how waits and refusals are decided.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens per second, holding at most ``capacity`` (default: one second's worth).

    ``reserve`` takes the tokens at once, letting the level go negative, and says how long the
    caller must wait for them: reservations are served in the order they were made.
    """

    def __init__(self, rate: float, capacity: float | None = None, *,
                 clock: Clock = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        self.rate = float(rate)
        self.capacity = float(rate if capacity is None else capacity)
        if not self.capacity > 0:
            raise ValueError(f"capacity must be positive, got {capacity!r}")
        self._clock = clock
        self._tokens = self.capacity
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._stamp:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` tokens would be available (no reservation)."""
        self._refill()
        return max(0.0, (amount - self._tokens) / self.rate)

    def reserve(self, amount: float) -> float:
        """Take ``amount`` tokens now; returns the seconds to wait before using them."""
        self._refill()
        self._tokens -= amount
        return max(0.0, -self._tokens / self.rate)

    def refund(self, amount: float) -> None:
        """Give back a reservation that will not be used."""
        self._refill()
        self._tokens = min(self.capacity, self._tokens + amount)
