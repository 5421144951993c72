"""A guardrail client that is more reliable than the calls it guards.

``ResilientGuardrail`` wraps any ``GuardrailClient`` (in production ``BedrockGuardrailClient``
built with ``max_attempts=1``, see ``resilient_bedrock_client``) and adds, per ``apply()``:

1. **A deadline.** The whole call, retries, budget waits and split calls included, never takes
   longer than ``deadline_s`` (or the caller's smaller ``timeout``; a backstop timeout 10 ms
   later guards against a wait that escaped the bookkeeping). Each attempt gets
   ``min(attempt_timeout_s, time left)``, passed to the inner client as ``timeout=`` when it
   accepts one and enforced from outside in any case.
2. **Retries** of the retryable classes only (``throttled``, ``timeout``, ``server_error``), up to
   ``max_attempts`` attempts, with exponential backoff and full jitter: retry *n* sleeps
   ``uniform(0, min(backoff_max_s, base * 2**(n-1)))``, ``base`` being
   ``throttle_backoff_base_s`` after a throttle and ``backoff_base_s`` otherwise. A retry whose
   backoff would leave no time before the deadline is not made: the last error is raised.
   ``rejected`` and ``input_too_large`` are never retried.
3. **Splitting of oversize input.** A call is kept within ``max_chars_per_call`` characters,
   counted as text units (``ceil(len/1000)`` per content block, so 25,000 chars = 25 TU per
   call): larger input is split before it is sent. A block longer than that is cut, at a line
   break or else a whitespace in the last tenth of the piece when there is one (so that words,
   e-mail addresses and ids stay whole), and blocks are packed in order into calls. When Bedrock
   still answers "text units ... exceeds the maximum" (``GuardrailInputTooLarge``), that call is
   split again at half its size (never re-sent as is), down to one text unit per call, and the
   smaller limit is remembered for the guardrail and source for ``learned_limit_ttl_s``. Parts
   run concurrently, at most ``split_concurrency`` at a time, and their verdicts are merged:
   any BLOCK is a BLOCK (the remaining parts are cancelled), else any MASK is a MASK whose
   outputs are the texts of the original blocks rebuilt from their parts' outputs (a part that
   passed contributes its text unchanged); usage is summed, findings concatenated. When one
   part fails, no further part is started, the running ones are awaited (a BLOCK among them
   still wins, so that a fail-open policy never releases text a part blocked), and the error is
   raised.
   Residual risk: a pattern spanning a cut (a multi-word phrase, a name with a space) can be
   missed; cuts happen only for input above the per-call limit.
4. **A circuit breaker per guardrail** (id + version). Closed: each attempt's outcome is
   recorded. It opens after ``breaker_failures`` consecutive retryable failures, or when, over
   the last ``breaker_window_s`` seconds, at least ``breaker_min_calls`` attempts were made and
   the share of retryable failures among them reached ``breaker_failure_ratio`` (80 %: with
   three attempts per call, an apply() then fails about half the time, while slower than
   failing fast; a lower ratio would turn a brownout that retries still absorb into an outage).
   Open: calls fail at once with ``GuardrailCircuitOpen`` for ``breaker_cooldown_s``. Then
   half-open: one probe call goes through (others fail fast); its success closes the breaker,
   a retryable failure re-opens it, any other outcome (rejected, too large, budget, cancelled)
   frees the probe slot for the next call. Rejected errors never count; they are logged at
   ERROR once per guardrail (again after a success).
5. **A client-side budget**: two token buckets shared by all calls of the instance (build one
   ``ResilientGuardrail`` per process, and size the rates as quota / replicas), ApplyGuardrail
   requests per second (``budget_rps``) and text units per second (``budget_text_units_per_s``),
   each holding one second's worth. Every attempt (retries too) takes one request and its text
   units; when the buckets are short, it waits its turn (first come, first served) but only up
   to ``budget_max_wait_s`` and only within the deadline, else ``GuardrailBudgetExhausted`` is
   raised without sending anything, so that load is shaped before AWS throttles.

A retry that the breaker or the budget refuses, or that the deadline leaves no room for, raises
the error of the attempt before it: the class says why the call really failed.

Every error ``apply()`` raises carries one of ``extproc.errors.ERROR_CLASSES``; an inner
exception outside the hierarchy becomes ``GuardrailServerError``. ``FailurePolicy`` maps each
class to fail closed or open; ``parse_failure_policy`` reads it from a setting.

Single event loop: the buckets, breakers and counters are plain attributes, safe because they
are only touched from the loop's thread and never across an ``await``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from extproc.config import GuardrailRef, Settings
from extproc.failure import FailureMode, FailurePolicy, parse_failure_policy  # noqa: F401
from extproc.errors import (
    ERROR_CLASSES,
    RETRYABLE_CLASSES,
    GuardrailBudgetExhausted,
    GuardrailCircuitOpen,
    GuardrailError,
    GuardrailInputTooLarge,
    GuardrailServerError,
    GuardrailTimeout,
)
from extproc.guardrail import BedrockGuardrailClient, GuardrailClient, Source
from extproc.verdict import GuardrailVerdict, Outcome

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "CircuitBreaker",
    "FailurePolicy",
    "ResilienceConfig",
    "ResilientGuardrail",
    "TokenBucket",
    "cut_text",
    "merge_verdicts",
    "parse_failure_policy",
    "plan_calls",
    "resilient_bedrock_client",
    "text_units",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

CHARS_PER_TEXT_UNIT: Final = 1000
#: A retry is only worth making with at least this much time left before the deadline.
MIN_ATTEMPT_S: Final = 0.02

_BACKSTOP_SLACK_S: Final = 0.01

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"


def text_units(text: str) -> int:
    """Text units of one content block: one per started 1,000 characters (bedrock.md A.6)."""
    return -(-len(text) // CHARS_PER_TEXT_UNIT)


# --------------------------------------------------------------------------- configuration


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
        check("max_chars_per_call", integer("max_chars_per_call") >= CHARS_PER_TEXT_UNIT,
              f"at least {CHARS_PER_TEXT_UNIT} (one text unit)")
        check("breaker_failures", integer("breaker_failures") >= 0, "zero or positive")
        check("breaker_min_calls", integer("breaker_min_calls") >= 1, "at least 1")

    @property
    def max_units_per_call(self) -> int:
        """``max_chars_per_call`` in whole text units."""
        return self.max_chars_per_call // CHARS_PER_TEXT_UNIT

    def backoff_cap(self, error_class: str, retry: int) -> float:
        """The upper bound of the sleep before retry number ``retry`` (1 = the first retry)."""
        base = self.throttle_backoff_base_s if error_class == "throttled" else self.backoff_base_s
        return float(min(self.backoff_max_s, base * 2 ** (retry - 1)))


# --------------------------------------------------------------------------- failure policy


# --------------------------------------------------------------------------- token buckets


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


# --------------------------------------------------------------------------- circuit breaker


class CircuitBreaker:
    """closed -> open -> half-open -> closed | open; see the module docstring."""

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


# --------------------------------------------------------------------------- splitting


@dataclass(frozen=True, slots=True)
class _Piece:
    block: int  # index of the original content block
    text: str


@dataclass(frozen=True, slots=True)
class _Part:
    pieces: tuple[_Piece, ...]
    verdict: GuardrailVerdict


def _units(pieces: Iterable[_Piece]) -> int:
    return sum(text_units(p.text) for p in pieces)


def _cut_point(text: str, start: int, end: int) -> int:
    """Where to end the piece ``text[start:end]`` (``end`` being the hard limit): after the last
    line break, else the last whitespace, within the last tenth of the piece."""
    floor = max(start + 1, end - max(1, (end - start) // 10))
    newline = text.rfind("\n", floor - 1, end)
    if newline != -1:
        return newline + 1
    for index in range(end - 1, floor - 2, -1):
        if text[index].isspace():
            return index + 1
    return end


def cut_text(text: str, max_chars: int) -> list[str]:
    """``text`` in pieces of at most ``max_chars`` whose concatenation is ``text``."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        cut = _cut_point(text, start, start + max_chars)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def plan_calls(pieces: Sequence[_Piece], max_units: int) -> list[list[_Piece]]:
    """Cut pieces longer than ``max_units`` text units and pack them, in order, into calls of
    at most ``max_units`` text units each."""
    max_chars = max_units * CHARS_PER_TEXT_UNIT
    cut: list[_Piece] = []
    for piece in pieces:
        if len(piece.text) <= max_chars:
            cut.append(piece)
        else:
            cut.extend(_Piece(piece.block, t) for t in cut_text(piece.text, max_chars))
    calls: list[list[_Piece]] = []
    current: list[_Piece] = []
    used = 0
    for piece in cut:
        units = text_units(piece.text)
        if current and used + units > max_units:
            calls.append(current)
            current, used = [], 0
        current.append(piece)
        used += units
    if current:
        calls.append(current)
    return calls


def merge_verdicts(block_count: int, parts: Sequence[_Part]) -> GuardrailVerdict:
    """One verdict for the original blocks from the verdicts of their parts (in order)."""
    findings = tuple(f for part in parts for f in part.verdict.findings)
    usage: dict[str, int] = {}
    for part in parts:
        for key, value in part.verdict.usage.items():
            usage[key] = usage.get(key, 0) + value
    units = sum(part.verdict.text_units for part in parts)
    for part in parts:
        if part.verdict.outcome is Outcome.BLOCK:
            return GuardrailVerdict(
                outcome=Outcome.BLOCK, action=part.verdict.action, findings=findings,
                outputs=part.verdict.outputs, text_units=units, usage=usage,
            )
    if not any(part.verdict.outcome is Outcome.MASK for part in parts):
        return GuardrailVerdict(
            outcome=Outcome.PASS, action="NONE", findings=findings, outputs=(),
            text_units=units, usage=usage,
        )
    rebuilt: list[list[str]] = [[] for _ in range(block_count)]
    for part in parts:
        verdict = part.verdict
        if verdict.outcome is Outcome.MASK:
            if len(verdict.outputs) != len(part.pieces):
                raise GuardrailServerError(
                    f"masked answer with {len(verdict.outputs)} outputs for "
                    f"{len(part.pieces)} blocks"
                )
            texts: Sequence[str] = verdict.outputs
        else:
            texts = [piece.text for piece in part.pieces]
        for piece, text in zip(part.pieces, texts, strict=True):
            rebuilt[piece.block].append(text)
    return GuardrailVerdict(
        outcome=Outcome.MASK, action="GUARDRAIL_INTERVENED", findings=findings,
        outputs=tuple("".join(chunks) for chunks in rebuilt), text_units=units, usage=usage,
    )


@dataclass(slots=True)
class _SplitRun:
    guardrail: GuardrailRef
    source: Source
    deadline: float
    semaphore: asyncio.Semaphore
    stop: bool = False


# --------------------------------------------------------------------------- the wrapper


def _accepts_timeout(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        (p.name == "timeout" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        or p.kind is p.VAR_KEYWORD
        for p in parameters
    )


def _normalize(exc: BaseException) -> GuardrailError:
    """Any exception of an inner client as an error with one of ``ERROR_CLASSES``."""
    if isinstance(exc, GuardrailError) and exc.error_class in ERROR_CLASSES:
        return exc
    if isinstance(exc, GuardrailError):
        error = GuardrailServerError(f"{type(exc).__name__}: {exc}")
    else:
        log.warning("guardrail client raised %s; counted as a server error",
                    type(exc).__name__, exc_info=exc)
        error = GuardrailServerError(f"unexpected {type(exc).__name__}: {exc}")
    return error


class ResilientGuardrail:
    """A ``GuardrailClient`` around another one: deadline, retries, splitting, circuit breaker,
    budget (see the module docstring). ``clock``, ``sleep`` and ``rng`` are for tests."""

    def __init__(
        self,
        inner: GuardrailClient,
        config: ResilienceConfig | None = None,
        *,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._inner = inner
        self._config = config or ResilienceConfig()
        self._clock = clock or time.monotonic
        self._sleep = sleep or asyncio.sleep
        self._rng = rng or random.Random()
        self._passes_timeout = _accepts_timeout(inner.apply)
        cfg = self._config
        self._rps = TokenBucket(cfg.budget_rps, clock=self._clock) if cfg.budget_rps else None
        self._tups = (TokenBucket(cfg.budget_text_units_per_s, clock=self._clock)
                      if cfg.budget_text_units_per_s else None)
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._learned: dict[tuple[str, str, str], tuple[int, float]] = {}
        self._rejected_logged: set[tuple[str, str]] = set()
        self._counters: dict[str, Any] = {
            "calls": 0, "verdicts": 0, "attempts": 0, "retries": 0,
            "breaker_fast_fails": 0, "budget_waits": 0, "budget_wait_s": 0.0,
            "budget_rejections": 0, "splits": 0, "split_calls": 0, "too_large": 0,
        }
        self._attempt_errors: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._transitions: dict[str, int] = {}

    @property
    def inner(self) -> GuardrailClient:
        return self._inner

    @property
    def config(self) -> ResilienceConfig:
        return self._config

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (a new plain dict each time)."""
        snapshot = dict(self._counters)
        snapshot["attempt_errors"] = dict(self._attempt_errors)
        snapshot["failures"] = dict(self._failures)
        snapshot["breaker_transitions"] = dict(self._transitions)
        snapshot["breaker_states"] = {b.name: b.state for b in self._breakers.values()}
        now = self._clock()
        snapshot["learned_max_units"] = {
            f"{gid}:{version}:{source}": units
            for (gid, version, source), (units, expires) in self._learned.items()
            if expires > now
        }
        return snapshot

    def breaker_state(self, guardrail: GuardrailRef) -> str:
        breaker = self._breakers.get((guardrail.id, guardrail.version))
        return breaker.state if breaker is not None else CLOSED

    def close(self) -> None:
        self._inner.close()

    # -- apply

    async def apply(
        self,
        guardrail: GuardrailRef,
        source: Source,
        texts: Sequence[str],
        *,
        timeout: float | None = None,
    ) -> GuardrailVerdict:
        """Check ``texts`` within ``min(deadline_s, timeout)`` seconds; see the module
        docstring. Raises ``GuardrailError`` with an ``error_class`` of ``ERROR_CLASSES``."""
        self._counters["calls"] += 1
        allowed = self._config.deadline_s if timeout is None else min(
            self._config.deadline_s, timeout)
        deadline = self._clock() + allowed
        try:
            try:
                # Backstop only: every wait inside is bounded by the deadline already (the
                # slack lets the attempt's own timeout, which is counted, fire first).
                async with asyncio.timeout(max(0.0, allowed) + _BACKSTOP_SLACK_S):
                    verdict = await self._apply(guardrail, source, list(texts), deadline)
            except TimeoutError:
                raise GuardrailTimeout(
                    f"no verdict within the deadline of {allowed:.3f}s") from None
        except GuardrailError as exc:
            error = _normalize(exc)
            self._failures[error.error_class] = self._failures.get(error.error_class, 0) + 1
            if error is exc:
                raise
            raise error from exc
        self._counters["verdicts"] += 1
        return verdict

    async def _apply(self, guardrail: GuardrailRef, source: Source, texts: list[str],
                     deadline: float) -> GuardrailVerdict:
        limit = self._max_units(guardrail, source)
        units = sum(text_units(t) for t in texts)
        if units <= limit:
            try:
                return await self._attempts(guardrail, source, texts, deadline)
            except GuardrailInputTooLarge:
                if units <= 1:
                    raise
                self._counters["too_large"] += 1
                limit = units // 2
                self._learn(guardrail, source, limit)
        self._counters["splits"] += 1
        run = _SplitRun(guardrail, source, deadline,
                        asyncio.Semaphore(self._config.split_concurrency))
        pieces = [_Piece(index, text) for index, text in enumerate(texts)]
        parts = await self._check_pieces(run, pieces, limit)
        return merge_verdicts(len(texts), parts)

    async def _check_pieces(self, run: _SplitRun, pieces: Sequence[_Piece],
                            limit: int) -> list[_Part]:
        calls = plan_calls(pieces, limit)
        self._counters["split_calls"] += len(calls)
        tasks = [asyncio.ensure_future(self._check_call(run, call, limit)) for call in calls]
        results: dict[int, list[_Part]] = {}
        error: GuardrailError | None = None
        try:
            pending: set[asyncio.Future[list[_Part]]] = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.cancelled():
                        continue
                    exc = task.exception()
                    if exc is not None:
                        if error is None:
                            error = _normalize(exc)
                            run.stop = True  # start no further part; wait for running ones
                        continue
                    parts = task.result()
                    results[tasks.index(task)] = parts
                    if any(p.verdict.outcome is Outcome.BLOCK for p in parts):
                        run.stop = True  # decided: cancel the rest (finally)
                        return [p for i in sorted(results) for p in results[i]]
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if error is not None:
            raise error
        return [p for i in sorted(results) for p in results[i]]

    async def _check_call(self, run: _SplitRun, call: list[_Piece], limit: int) -> list[_Part]:
        async with run.semaphore:
            if run.stop:
                return []
            try:
                verdict = await self._attempts(
                    run.guardrail, run.source, [p.text for p in call], run.deadline,
                    patient=True)
            except GuardrailInputTooLarge:
                units = _units(call)
                if units <= 1:
                    run.stop = True
                    raise
            except BaseException:
                run.stop = True  # before the semaphore lets a waiting part start
                raise
            else:
                if verdict.outcome is Outcome.BLOCK:
                    run.stop = True
                return [_Part(tuple(call), verdict)]
        self._counters["too_large"] += 1
        smaller = max(1, min(limit, units) // 2)
        self._learn(run.guardrail, run.source, smaller)
        return await self._check_pieces(run, call, smaller)

    # -- one call: breaker, budget, attempts, backoff

    async def _attempts(self, guardrail: GuardrailRef, source: Source, texts: list[str],
                        deadline: float, *, patient: bool = False) -> GuardrailVerdict:
        """One call with its retries; ``patient``: a part of a split input, which may wait for
        budget up to the deadline (a large prompt needs more text units than one second of
        budget holds, and must not fail for that alone)."""
        cfg = self._config
        breaker = self._breaker(guardrail)
        units = sum(text_units(t) for t in texts)
        last: GuardrailError | None = None
        attempt = 0
        while True:
            if deadline - self._clock() <= 0:
                raise last or GuardrailTimeout("the deadline passed before the call was made")
            try:
                probe = breaker.acquire()
            except GuardrailCircuitOpen:
                self._counters["breaker_fast_fails"] += 1
                if last is not None:
                    raise last  # keeps its own cause
                raise
            try:
                await self._take_budget(units, deadline, patient=patient)
            except GuardrailBudgetExhausted:
                breaker.neutral(probe)
                if last is not None:
                    raise last  # keeps its own cause
                raise
            except BaseException:
                breaker.neutral(probe)
                raise
            allowed = min(cfg.attempt_timeout_s, deadline - self._clock())
            if allowed <= 0:
                breaker.neutral(probe)
                self._refund_budget(units)
                raise last or GuardrailTimeout("the deadline passed while waiting for budget")
            attempt += 1
            self._counters["attempts"] += 1
            try:
                verdict = await self._attempt(guardrail, source, texts, allowed)
            except GuardrailError as exc:
                error = exc
            except BaseException:
                breaker.neutral(probe)
                raise
            else:
                breaker.success(probe)
                self._rejected_logged.discard((guardrail.id, guardrail.version))
                return verdict
            name = error.error_class
            self._attempt_errors[name] = self._attempt_errors.get(name, 0) + 1
            if name in RETRYABLE_CLASSES:
                breaker.failure(probe, name)
            else:
                breaker.neutral(probe)
                if name == "rejected":
                    self._log_rejected(guardrail, error)
                raise error
            last = error
            if attempt >= cfg.max_attempts:
                raise error
            delay = self._rng.random() * cfg.backoff_cap(name, attempt)
            if deadline - self._clock() - delay < MIN_ATTEMPT_S:
                raise error
            self._counters["retries"] += 1
            log.debug("ApplyGuardrail attempt %d failed (%s); retrying in %.3fs",
                      attempt, name, delay)
            if delay > 0:
                await self._sleep(delay)

    async def _attempt(self, guardrail: GuardrailRef, source: Source, texts: list[str],
                       allowed: float) -> GuardrailVerdict:
        try:
            async with asyncio.timeout(allowed):
                if self._passes_timeout:
                    return await self._inner.apply(  # type: ignore[call-arg]
                        guardrail, source, texts, timeout=allowed)
                return await self._inner.apply(guardrail, source, texts)
        except TimeoutError:
            raise GuardrailTimeout(f"no ApplyGuardrail answer within {allowed:.3f}s") from None
        except Exception as exc:  # noqa: BLE001 - every failure gets a class
            error = _normalize(exc)
            if error is exc:
                raise
            raise error from exc

    async def _take_budget(self, units: int, deadline: float, *, patient: bool = False) -> None:
        waits = []
        if self._rps is not None:
            waits.append(self._rps.reserve(1))
        if self._tups is not None:
            waits.append(self._tups.reserve(units))
        wait = max(waits, default=0.0)
        if wait <= 0:
            return
        remaining = deadline - self._clock()
        allowed = remaining if patient else min(self._config.budget_max_wait_s, remaining)
        if wait > allowed:
            self._refund_budget(units)
            self._counters["budget_rejections"] += 1
            raise GuardrailBudgetExhausted(
                f"client-side budget ({self._config.budget_rps:g} requests/s, "
                f"{self._config.budget_text_units_per_s:g} text units/s) has no room for "
                f"{wait:.3f}s, longer than the {max(allowed, 0):.3f}s this call may wait"
            )
        self._counters["budget_waits"] += 1
        self._counters["budget_wait_s"] += wait
        try:
            await self._sleep(wait)
        except BaseException:
            self._refund_budget(units)
            raise

    def _refund_budget(self, units: int) -> None:
        if self._rps is not None:
            self._rps.refund(1)
        if self._tups is not None:
            self._tups.refund(units)

    # -- bookkeeping

    def _breaker(self, guardrail: GuardrailRef) -> CircuitBreaker:
        key = (guardrail.id, guardrail.version)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = CircuitBreaker(f"{guardrail.id}:{guardrail.version}", self._config,
                                     clock=self._clock, on_transition=self._on_transition)
            self._breakers[key] = breaker
        return breaker

    def _on_transition(self, name: str, old: str, new: str, why: str) -> None:
        key = f"{old}->{new}"
        self._transitions[key] = self._transitions.get(key, 0) + 1
        if new == OPEN:
            log.warning("guardrail %s: circuit %s -> open (%s); failing fast for %gs",
                        name, old, why, self._config.breaker_cooldown_s)
        else:
            log.info("guardrail %s: circuit %s -> %s (%s)", name, old, new, why)

    def _log_rejected(self, guardrail: GuardrailRef, error: GuardrailError) -> None:
        key = (guardrail.id, guardrail.version)
        if key in self._rejected_logged:
            return
        self._rejected_logged.add(key)
        log.error(
            "guardrail %s version %s: Bedrock rejected the call (%s). This is a configuration "
            "or permission problem (IAM bedrock:ApplyGuardrail, guardrail id/version/region, "
            "quota) that retries cannot fix; calls will keep failing until it is fixed",
            guardrail.id, guardrail.version, error,
        )

    def _max_units(self, guardrail: GuardrailRef, source: Source) -> int:
        limit = self._config.max_units_per_call
        key = (guardrail.id, guardrail.version, source.value)
        learned = self._learned.get(key)
        if learned is not None:
            units, expires = learned
            if expires > self._clock():
                return min(limit, units)
            del self._learned[key]
        return limit

    def _learn(self, guardrail: GuardrailRef, source: Source, units: int) -> None:
        key = (guardrail.id, guardrail.version, source.value)
        current = self._max_units(guardrail, source)
        if units < current:
            log.info("guardrail %s:%s %s: a call was too large; splitting at %d text units "
                     "per call for %gs", guardrail.id, guardrail.version, source.value, units,
                     self._config.learned_limit_ttl_s)
        self._learned[key] = (min(units, current),
                              self._clock() + self._config.learned_limit_ttl_s)


def resilient_bedrock_client(settings: Settings,
                             config: ResilienceConfig | None = None) -> ResilientGuardrail:
    """The production client: Bedrock with a single botocore attempt, wrapped."""
    config = config or ResilienceConfig()
    inner = BedrockGuardrailClient(settings, max_attempts=1,
                                   attempt_timeout_s=config.attempt_timeout_s)
    return ResilientGuardrail(inner, config)
