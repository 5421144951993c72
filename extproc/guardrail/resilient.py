"""A guardrail client that is more reliable than the calls it guards.

``ResilientGuardrail`` wraps any ``GuardrailClient`` (in production ``BedrockGuardrailClient``
built with ``max_attempts=1``, see ``extproc.guardrail.build_client``) and adds, per ``apply()``:

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
   passed contributes its text unchanged); usage is summed, findings concatenated. Image
   blocks (``ImageBlock``) count no text units; a call holds at most 20 of them (Bedrock's
   limit) and ``splitting.MAX_IMAGE_BYTES_PER_CALL`` of their bytes, and more are split the
   same way (an image is never cut). When one
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
   ``ResilientGuardrail`` per process, and size the rates as quota / replicas; or give it a
   ``Budget`` kept in a store every replica shares, ``extproc.shared.budget``), ApplyGuardrail
   requests per second (``budget_rps``) and text units per second (``budget_text_units_per_s``),
   each holding one second's worth. Every attempt (retries too) takes one request and its text
   units; when the buckets are short, it waits its turn (first come, first served) but only up
   to ``budget_max_wait_s`` and only within the deadline, else ``GuardrailBudgetExhausted`` is
   raised without sending anything, so that load is shaped before AWS throttles.

With a ``tracer`` (``--otlp-endpoint``), each retry, each part of a split call and a first
attempt that failed is a CLIENT span, child of the caller's current span (the call's span;
``extproc.observe.tracing``).

A retry that the breaker or the budget refuses, or that the deadline leaves no room for, raises
the error of the attempt before it: the class says why the call really failed.

Every error ``apply()`` raises carries one of ``extproc.domain.errors.ERROR_CLASSES``; an inner
exception outside the hierarchy becomes ``GuardrailServerError``. What a stream does with each
class (fail closed or open) is decided in ``extproc.domain.decision``.

The mechanics live beside this module: ``breaker`` (the circuit breaker), ``budget`` (the token
buckets), ``splitting`` (cutting and merging), ``config`` (the knobs).

Single event loop: the buckets, breakers and counters are plain attributes, safe because they
are only touched from the loop's thread and never across an ``await``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from extproc.domain.client import Content, GuardrailClient
from extproc.domain.errors import (
    ERROR_CLASSES,
    RETRYABLE_CLASSES,
    GuardrailBudgetExhausted,
    GuardrailCircuitOpen,
    GuardrailError,
    GuardrailInputTooLarge,
    GuardrailServerError,
    GuardrailTimeout,
)
from extproc.domain.values import GuardrailRef, Source
from extproc.domain.verdict import GuardrailVerdict, Outcome
from extproc.guardrail.breaker import CLOSED, OPEN, CircuitBreaker
from extproc.guardrail.budget import Budget, LocalBudget, Reservation
from extproc.guardrail.config import MIN_ATTEMPT_S, ResilienceConfig
from extproc.guardrail.splitting import (
    Part,
    Piece,
    content_units,
    fits_one_call,
    merge_verdicts,
    plan_calls,
    units_of,
)
from extproc.observe.tracing import (
    GEN_AI_PROVIDER_NAME,
    GUARDRAIL_ATTEMPT,
    GUARDRAIL_TEXT_UNITS,
    PROVIDER_AWS_BEDROCK,
    RPC_METHOD,
    RPC_SERVICE,
    RPC_SYSTEM,
    AttributeValue,
    Tracer,
    verdict_attributes,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_BACKSTOP_SLACK_S: Final = 0.01


@dataclass(slots=True)
class _SplitRun:
    guardrail: GuardrailRef
    source: Source
    deadline: float
    semaphore: asyncio.Semaphore
    stop: bool = False


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
        budget: Budget | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._inner = inner
        self._tracer = tracer
        self._config = config or ResilienceConfig()
        self._clock = clock or time.monotonic
        self._sleep = sleep or asyncio.sleep
        self._rng = rng or random.Random()
        self._passes_timeout = _accepts_timeout(inner.apply)
        cfg = self._config
        # ``budget``: a shared one (``--shared-state``); else this process's buckets, if any.
        self._budget: Budget | None = budget
        if budget is None and (cfg.budget_rps or cfg.budget_text_units_per_s):
            self._budget = LocalBudget(cfg.budget_rps, cfg.budget_text_units_per_s,
                                       clock=self._clock)
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
        texts: Sequence[Content],
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

    async def _apply(self, guardrail: GuardrailRef, source: Source, texts: list[Content],
                     deadline: float) -> GuardrailVerdict:
        limit = self._max_units(guardrail, source)
        units = content_units(texts)
        if units <= limit and fits_one_call(texts):
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
        pieces = [Piece(index, text) for index, text in enumerate(texts)]
        parts = await self._check_pieces(run, pieces, limit)
        return merge_verdicts(len(texts), parts)

    async def _check_pieces(self, run: _SplitRun, pieces: Sequence[Piece],
                            limit: int) -> list[Part]:
        calls = plan_calls(pieces, limit)
        self._counters["split_calls"] += len(calls)
        tasks = [asyncio.ensure_future(self._check_call(run, call, limit)) for call in calls]
        results: dict[int, list[Part]] = {}
        error: GuardrailError | None = None
        try:
            pending: set[asyncio.Task[list[Part]]] = set(tasks)
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

    async def _check_call(self, run: _SplitRun, call: list[Piece], limit: int) -> list[Part]:
        async with run.semaphore:
            if run.stop:
                return []
            try:
                verdict = await self._attempts(
                    run.guardrail, run.source, [p.text for p in call], run.deadline,
                    patient=True)
            except GuardrailInputTooLarge:
                units = units_of(call)
                if units <= 1:
                    run.stop = True
                    raise
            except BaseException:
                run.stop = True  # before the semaphore lets a waiting part start
                raise
            else:
                if verdict.outcome is Outcome.BLOCK:
                    run.stop = True
                return [Part(tuple(call), verdict)]
        self._counters["too_large"] += 1
        smaller = max(1, min(limit, units) // 2)
        self._learn(run.guardrail, run.source, smaller)
        return await self._check_pieces(run, call, smaller)

    # -- one call: breaker, budget, attempts, backoff

    async def _attempts(self, guardrail: GuardrailRef, source: Source, texts: list[Content],
                        deadline: float, *, patient: bool = False) -> GuardrailVerdict:
        """One call with its retries; ``patient``: a part of a split input, which may wait for
        budget up to the deadline (a large prompt needs more text units than one second of
        budget holds, and must not fail for that alone)."""
        cfg = self._config
        breaker = self._breaker(guardrail)
        units = content_units(texts)
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
                    raise last  # noqa: B904 - the last attempt's error, with its own cause
                raise
            try:
                reservation = await self._take_budget(units, deadline, patient=patient)
            except GuardrailBudgetExhausted:
                breaker.neutral(probe)
                if last is not None:
                    raise last  # noqa: B904 - the last attempt's error, with its own cause
                raise
            except BaseException:
                breaker.neutral(probe)
                raise
            allowed = min(cfg.attempt_timeout_s, deadline - self._clock())
            if allowed <= 0:
                breaker.neutral(probe)
                if reservation is not None:
                    reservation.refund()
                raise last or GuardrailTimeout("the deadline passed while waiting for budget")
            attempt += 1
            self._counters["attempts"] += 1
            try:
                if self._tracer is None:
                    verdict = await self._attempt(guardrail, source, texts, allowed)
                else:
                    verdict = await self._traced_attempt(
                        self._tracer, guardrail, source, texts, allowed, attempt, units,
                        spanned=patient or attempt > 1)
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

    async def _attempt(self, guardrail: GuardrailRef, source: Source, texts: list[Content],
                       allowed: float) -> GuardrailVerdict:
        try:
            async with asyncio.timeout(allowed):
                if self._passes_timeout:
                    # the seam's optional keyword (see GuardrailClient), checked at __init__
                    return await self._inner.apply(  # type: ignore[call-arg]
                        guardrail, source, texts, timeout=allowed)
                return await self._inner.apply(guardrail, source, texts)
        except TimeoutError:
            raise GuardrailTimeout(f"no ApplyGuardrail answer within {allowed:.3f}s") from None
        except Exception as exc:  # every failure gets a class
            error = _normalize(exc)
            if error is exc:
                raise
            raise error from exc

    async def _traced_attempt(self, tracer: Tracer, guardrail: GuardrailRef, source: Source,
                              texts: list[Content], allowed: float, attempt: int, units: int, *,
                              spanned: bool) -> GuardrailVerdict:
        """``_attempt`` in its own span (counts and the verdict's names; never text); unless
        ``spanned`` (a call's first attempt), only when it fails: the call's span covers a first
        attempt that succeeds (``extproc.observe.tracing``)."""
        # The guardrail, source and mode are the call span's (the parent): an attempt says what
        # is its own, so that a span costs what it must (README "Traces").
        attributes: dict[str, AttributeValue] = {
            RPC_SYSTEM: "aws-api", RPC_SERVICE: "BedrockRuntime", RPC_METHOD: "ApplyGuardrail",
            GEN_AI_PROVIDER_NAME: PROVIDER_AWS_BEDROCK, GUARDRAIL_ATTEMPT: attempt,
            GUARDRAIL_TEXT_UNITS: units,
        }
        if not spanned:
            started = tracer.now()
            try:
                return await self._attempt(guardrail, source, texts, allowed)
            except GuardrailError as exc:
                tracer.past_attempt(attributes, started, exc.error_class)
                raise
        with tracer.attempt_span(attributes) as span:
            try:
                verdict = await self._attempt(guardrail, source, texts, allowed)
            except GuardrailError as exc:
                span.failed(exc.error_class)
                raise
            except asyncio.CancelledError:
                span.failed("cancelled")
                raise
            span.update(verdict_attributes(verdict))
            return verdict

    async def _take_budget(self, units: int, deadline: float, *,
                           patient: bool = False) -> Reservation | None:
        if self._budget is None:
            return None
        reservation = await self._budget.reserve(1, units)
        wait = reservation.wait
        if wait <= 0:
            return reservation
        remaining = deadline - self._clock()
        allowed = remaining if patient else min(self._config.budget_max_wait_s, remaining)
        if wait > allowed:
            reservation.refund()
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
            reservation.refund()
            raise
        return reservation

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
