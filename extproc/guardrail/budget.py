"""The client-side budget: token buckets for ApplyGuardrail requests and text units per second.

``ResilientGuardrail`` takes one request and a call's text units from its ``Budget`` before
every attempt; see ``extproc.guardrail.resilient`` for how waits and refusals are decided.
``LocalBudget`` is one process's pair of buckets; ``extproc.shared.budget.SharedBudget`` keeps
them in Redis or Valkey for every replica (``--shared-state``), this process's buckets taking
over while the store does not answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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

    def set_rate(self, rate: float) -> None:
        """A new rate, and a capacity of one second's worth of it (a shared budget's local
        share changes with the number of replicas)."""
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        self._refill()
        self.rate = float(rate)
        self.capacity = float(rate)
        self._tokens = min(self._tokens, self.capacity)


class Reservation(Protocol):
    """Budget taken for one attempt: ``wait`` seconds before it may be used; ``refund`` gives
    it back when it will not be."""

    @property
    def wait(self) -> float: ...

    def refund(self) -> None: ...


class Budget(Protocol):
    """The requests and text units per second all calls of a client share (one process's
    buckets, or buckets in a store shared by every replica: ``extproc.shared.budget``)."""

    async def reserve(self, requests: int, units: int) -> Reservation:
        """Take ``requests`` and ``units`` now; the reservation says how long to wait."""
        ...


@dataclass(frozen=True, slots=True)
class LocalReservation:
    budget: LocalBudget
    requests: int
    units: int
    wait: float

    def refund(self) -> None:
        self.budget.refund(self.requests, self.units)


class LocalBudget:
    """One process's budget: a ``TokenBucket`` of requests and one of text units per second
    (either may be None: unlimited). ``reserve`` never suspends."""

    def __init__(self, rps: float, text_units_per_s: float, *,
                 clock: Clock = time.monotonic) -> None:
        self.requests = TokenBucket(rps, clock=clock) if rps else None
        self.units = TokenBucket(text_units_per_s, clock=clock) if text_units_per_s else None

    def take(self, requests: int, units: int) -> LocalReservation:
        """``reserve`` without the coroutine."""
        wait = 0.0
        if self.requests is not None:
            wait = self.requests.reserve(requests)
        if self.units is not None:
            wait = max(wait, self.units.reserve(units))
        return LocalReservation(self, requests, units, wait)

    async def reserve(self, requests: int, units: int) -> Reservation:
        return self.take(requests, units)

    def refund(self, requests: int, units: int) -> None:
        if self.requests is not None:
            self.requests.refund(requests)
        if self.units is not None:
            self.units.refund(units)

    def deficit(self) -> tuple[float, float]:
        """Requests and units taken beyond what the buckets hold when full (0 when full)."""
        return tuple(  # type: ignore[return-value]
            max(0.0, bucket.capacity - bucket.tokens) if bucket is not None else 0.0
            for bucket in (self.requests, self.units))

    def share(self, rps: float, text_units_per_s: float) -> None:
        """New rates (a shared budget's share of this replica)."""
        if self.requests is not None and rps > 0:
            self.requests.set_rate(rps)
        if self.units is not None and text_units_per_s > 0:
            self.units.set_rate(text_units_per_s)
