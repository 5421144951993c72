"""A circuit breaker per guardrail: closed -> open -> half-open -> closed | open.

The rules (consecutive failures, failure ratio over a sliding window, cooldown, one probe) are
described in ``extproc.guardrail.resilient``; the knobs are ``ResilienceConfig``'s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from extproc.domain.errors import GuardrailCircuitOpen
from extproc.guardrail.config import ResilienceConfig

Clock = Callable[[], float]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"


class CircuitBreaker:
    """closed -> open -> half-open -> closed | open; see ``extproc.guardrail.resilient``."""

    def __init__(self, name: str, config: ResilienceConfig, *, clock: Clock,
                 on_transition: Callable[[str, str, str, str], None] | None = None) -> None:
        self.name = name
        self._config = config
        self._clock = clock
        self._on_transition = on_transition
        self.state = CLOSED
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()
        self._window_failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    # -- what the caller does

    def acquire(self) -> bool:
        """Before an attempt: raises ``GuardrailCircuitOpen`` when calls must fail fast;
        returns True when this attempt is the half-open probe."""
        if self.state == OPEN:
            left = self._opened_at + self._config.breaker_cooldown_s - self._clock()
            if left > 0:
                raise GuardrailCircuitOpen(
                    f"circuit open for guardrail {self.name}: failing fast for {left:.1f}s more"
                )
            self._transition(HALF_OPEN, "cooldown over")
        if self.state == HALF_OPEN:
            if self._probe_in_flight:
                raise GuardrailCircuitOpen(
                    f"circuit half-open for guardrail {self.name}: a probe call is in flight"
                )
            self._probe_in_flight = True
            return True
        return False

    def success(self, probe: bool) -> None:
        if probe:
            self._probe_in_flight = False
            if self.state == HALF_OPEN:
                self._transition(CLOSED, "probe succeeded")
            return
        if self.state == CLOSED:
            self._consecutive = 0
            self._record(False)

    def failure(self, probe: bool, error_class: str) -> None:
        """A retryable failure."""
        if probe:
            self._probe_in_flight = False
            if self.state == HALF_OPEN:
                self._transition(OPEN, f"probe failed ({error_class})")
            return
        if self.state != CLOSED:
            return  # a late answer to a call started before the breaker opened
        self._consecutive += 1
        self._record(True)
        limit = self._config.breaker_failures
        if limit and self._consecutive >= limit:
            self._transition(OPEN, f"{self._consecutive} consecutive failures, last {error_class}")
            return
        ratio = self._config.breaker_failure_ratio
        total = len(self._window)
        if ratio and total >= self._config.breaker_min_calls \
                and self._window_failures >= ratio * total:
            self._transition(
                OPEN, f"{self._window_failures} of {total} attempts failed in "
                f"{self._config.breaker_window_s:g}s, last {error_class}")

    def neutral(self, probe: bool) -> None:
        """An outcome that says nothing about the service's health (rejected, too large,
        budget, cancelled): frees the probe slot."""
        if probe:
            self._probe_in_flight = False

    # -- internals

    def _record(self, failed: bool) -> None:
        now = self._clock()
        self._window.append((now, failed))
        self._window_failures += failed
        horizon = now - self._config.breaker_window_s
        while self._window and (self._window[0][0] < horizon or len(self._window) > 100_000):
            _, old = self._window.popleft()
            self._window_failures -= old

    def _transition(self, new: str, why: str) -> None:
        old, self.state = self.state, new
        if new == OPEN:
            self._opened_at = self._clock()
            self._probe_in_flight = False
        if new in (OPEN, CLOSED):
            self._consecutive = 0
            self._window.clear()
            self._window_failures = 0
        if self._on_transition is not None:
            self._on_transition(self.name, old, new, why)
