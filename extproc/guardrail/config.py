"""``ResilienceConfig``: the knobs of ``extproc.guardrail.resilient.ResilientGuardrail`` (and of
the breaker and budget it runs). A frozen value, validated on construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from extproc.domain.windows import TEXT_UNIT_CHARS

#: A retry is only worth making with at least this much time left before the deadline.
MIN_ATTEMPT_S: Final = 0.02


@dataclass(frozen=True, slots=True)
class ResilienceConfig:
    """Knobs of ``ResilientGuardrail``; the defaults suit one sidecar in us-east-1."""

    #: Whole apply(), retries included (the sidecar's --guardrail-timeout).
    deadline_s: float = 5.0
    #: One attempt; below the deadline so that a hung connection still leaves time to retry.
    #: Bedrock answers in ~0.1-0.6 s (bedrock.md A.5).
    attempt_timeout_s: float = 2.0
    #: Attempts per call (and per split part), the first one included.
    max_attempts: int = 3
    #: Backoff base after timeouts and server errors: retries come quickly, jittered.
    backoff_base_s: float = 0.05
    #: Backoff base after a throttle: spreads the retries over the quota's one-second window.
    throttle_backoff_base_s: float = 0.25
    #: Upper bound of any one backoff sleep.
    backoff_max_s: float = 1.0
    #: Characters per call (counted as text units, 1,000 chars each): 25 TU, the per-policy
    #: quota outside us-east-1/us-west-2 and the size at which Bedrock was seen to answer 429.
    max_chars_per_call: int = 25_000
    #: Split parts in flight at once for one apply().
    split_concurrency: int = 4
    #: How long a smaller per-call limit learned from a too-large answer is kept.
    learned_limit_ttl_s: float = 600.0
    #: Consecutive retryable failures that open the breaker (0: this trigger off).
    breaker_failures: int = 5
    #: Share of retryable failures in the window that opens the breaker (0: this trigger off).
    breaker_failure_ratio: float = 0.8
    #: Sliding window of the ratio trigger, seconds.
    breaker_window_s: float = 30.0
    #: Attempts the window must hold before the ratio counts.
    breaker_min_calls: int = 20
    #: Seconds an open breaker fails calls fast before a probe is let through.
    breaker_cooldown_s: float = 10.0
    #: ApplyGuardrail requests per second for this process (0: unlimited). us-east-1 quota: 50.
    budget_rps: float = 50.0
    #: Text units per second for this process (0: unlimited); the smallest per-policy quota of
    #: the policies enabled (content/PII/words: 200 in us-east-1, denied topics 50).
    budget_text_units_per_s: float = 200.0
    #: Longest wait for budget tokens before giving up with GuardrailBudgetExhausted.
    budget_max_wait_s: float = 0.25

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            return value

        for name in ("deadline_s", "attempt_timeout_s", "breaker_cooldown_s",
                     "breaker_window_s", "learned_limit_ttl_s"):
            check(name, number(name) > 0, "positive")
        for name in ("backoff_base_s", "throttle_backoff_base_s", "backoff_max_s",
                     "budget_rps", "budget_text_units_per_s", "budget_max_wait_s"):
            check(name, number(name) >= 0, "zero or positive")
        check("breaker_failure_ratio", 0 <= number("breaker_failure_ratio") <= 1,
              "between 0 and 1")
        check("max_attempts", integer("max_attempts") >= 1, "at least 1")
        check("split_concurrency", integer("split_concurrency") >= 1, "at least 1")
        check("max_chars_per_call", integer("max_chars_per_call") >= TEXT_UNIT_CHARS,
              f"at least {TEXT_UNIT_CHARS} (one text unit)")
        check("breaker_failures", integer("breaker_failures") >= 0, "zero or positive")
        check("breaker_min_calls", integer("breaker_min_calls") >= 1, "at least 1")

    @property
    def max_units_per_call(self) -> int:
        """``max_chars_per_call`` in whole text units."""
        return self.max_chars_per_call // TEXT_UNIT_CHARS

    def backoff_cap(self, error_class: str, retry: int) -> float:
        """The upper bound of the sleep before retry number ``retry`` (1 = the first retry)."""
        base = self.throttle_backoff_base_s if error_class == "throttled" else self.backoff_base_s
        return float(min(self.backoff_max_s, base * 2 ** (retry - 1)))
