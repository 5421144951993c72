"""``StreamContext``: what the parts of one stream share (the prompt side, the answer check,
the output guard): its route policy and limits, its record, the prompt gate, its outbox, and
the three things each part may do beyond its own state: call the guardrail (``check``), report
an intervention (``intervened``), and take a decision when there is no verdict
(``no_verdict``).

``check`` is the only way the stream code calls the guardrail: it times the call and reports the
verdict or the error to the metrics ``Recorder`` and adds the findings to the record. With tracing
on (a ``tracer`` and the stream's ``span``), each call is a span, child of the stream's
(``extproc.observe.tracing``); with it off, one test of ``span`` is all it costs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence

from extproc.domain.cache import NO_CACHE, VerdictCache
from extproc.domain.client import Content, GuardrailClient
from extproc.domain.cost import cost_usd, policy_label, unpriced
from extproc.domain.decision import Action, decide_error
from extproc.domain.errors import GuardrailError, GuardrailServerError
from extproc.domain.values import Gate, Source
from extproc.domain.verdict import GuardrailVerdict
from extproc.domain.windows import text_units
from extproc.formats import is_reasoning
from extproc.observe.audit import AuditLog
from extproc.observe.metrics import Recorder
from extproc.observe.tracing import (
    AWS_BEDROCK_GUARDRAIL_ID,
    CHECK_SPAN,
    GEN_AI_OPERATION_NAME,
    GEN_AI_PROVIDER_NAME,
    GUARDRAIL_CONTENT_BLOCKS,
    GUARDRAIL_DECISION,
    GUARDRAIL_MODE,
    GUARDRAIL_SHADOW,
    GUARDRAIL_SOURCE,
    GUARDRAIL_TEXT_UNITS,
    GUARDRAIL_VERSION,
    OPERATION_APPLY_GUARDRAIL,
    PROVIDER_AWS_BEDROCK,
    Span,
    Tracer,
    verdict_attributes,
)
from extproc.settings.values import RoutePolicy, StreamSettings
from extproc.stream.record import StreamRecord
from extproc.stream.sinks import Outbox

log = logging.getLogger(__name__)
_UNPRICED: set[str] = set()  # usage members without a price, warned about once per process


def as_guardrail_error(exc: Exception, what: str) -> GuardrailError:
    """A failed check's exception as a guardrail error: itself, or (a bug of ours, logged with
    its trace as ``BUG in <what>``) a server error, so that the failure policy decides."""
    if isinstance(exc, GuardrailError):
        return exc
    log.error("BUG in %s", what, exc_info=exc)
    return GuardrailServerError(f"internal: {type(exc).__name__}")


class StreamContext:
    """The shared state and services of one stream; see the module docstring."""

    __slots__ = ("route", "limits", "call_timeout_s", "record", "outbox", "gate", "_guardrail",
                 "_recorder", "_audit", "verdict_cache", "tracer", "span")

    def __init__(self, route: RoutePolicy, limits: StreamSettings, call_timeout_s: float,
                 record: StreamRecord, outbox: Outbox, guardrail: GuardrailClient,
                 recorder: Recorder, audit: AuditLog,
                 verdict_cache: VerdictCache = NO_CACHE, tracer: Tracer | None = None,
                 span: Span | None = None) -> None:
        self.route = route
        self.limits = limits
        self.call_timeout_s = call_timeout_s  # one guardrail call, retries included
        self.record = record
        self.outbox = outbox
        self.gate = Gate.OPEN  # the prompt verdict as the output side sees it
        self._guardrail = guardrail
        self._recorder = recorder
        self._audit = audit
        self.verdict_cache = verdict_cache  # prompt texts known to pass
        self.tracer = tracer
        self.span = span  # the stream's span (tracing on)

    async def check(self, source: Source, texts: Sequence[Content]) -> GuardrailVerdict:
        """One guardrail call, timed and reported to the recorder; its findings go into the
        record; traced when tracing is on."""
        tracer, span = self.tracer, self.span
        if tracer is None or span is None:
            return await self._check(source, texts)
        route = self.route
        guardrail = route.guardrail
        with tracer.check_span(span, f"{CHECK_SPAN} {guardrail.id}", {
            GEN_AI_OPERATION_NAME: OPERATION_APPLY_GUARDRAIL,
            GEN_AI_PROVIDER_NAME: PROVIDER_AWS_BEDROCK,
            AWS_BEDROCK_GUARDRAIL_ID: guardrail.id, GUARDRAIL_VERSION: guardrail.version,
            GUARDRAIL_SOURCE: source.value, GUARDRAIL_MODE: route.stream_mode.value,
            GUARDRAIL_SHADOW: route.shadow, GUARDRAIL_CONTENT_BLOCKS: len(texts),
            GUARDRAIL_TEXT_UNITS: sum(text_units(len(t)) for t in texts if isinstance(t, str)),
        }) as call:
            try:
                verdict = await self._check(source, texts)
            except Exception as exc:
                error_class = (exc.error_class if isinstance(exc, GuardrailError)
                               else "server_error")
                call.failed(error_class)
                call.set(GUARDRAIL_DECISION, "open" if decide_error(error_class, route)
                         is Action.RELEASE_UNCHECKED else "closed")
                raise
            except BaseException:
                call.failed("cancelled")
                raise
            call.update(verdict_attributes(verdict))
            return verdict

    async def _check(self, source: Source, texts: Sequence[Content]) -> GuardrailVerdict:
        started = time.monotonic()
        try:
            verdict = await self._guardrail.apply(self.route.guardrail, source, texts)
        except Exception as exc:
            # The stream treats anything but a GuardrailError as a server error (a bug).
            error_class = exc.error_class if isinstance(exc, GuardrailError) else "server_error"
            action = decide_error(error_class, self.route)
            self._recorder.guardrail_error(
                source.value, error_class,
                "open" if action is Action.RELEASE_UNCHECKED else "closed",
                time.monotonic() - started)
            raise
        self._recorder.verdict(source.value, verdict, time.monotonic() - started)
        if verdict.usage:
            self._cost(verdict)
        if verdict.findings:
            self.record.add_findings(verdict.findings)
        return verdict

    def _cost(self, verdict: GuardrailVerdict) -> None:
        """The call's dollar cost: added to the stream's ``cost_usd`` and the route's metric."""
        prices = self.limits.prices
        costs = cost_usd(verdict.usage, prices)
        if costs:
            record = self.record
            record.cost_usd = round((record.cost_usd or 0.0) + sum(costs.values()), 9)
            for key, usd in costs.items():
                self._recorder.cost(record.route, policy_label(key), usd)
        missing = unpriced(verdict.usage, prices)
        if missing and not _UNPRICED.issuperset(missing):
            _UNPRICED.update(missing)
            log.warning("no price for guardrail usage %s: counted as free (--price-table)",
                        ", ".join(missing))

    def unchecked_reasoning(self, found: Sequence[tuple[Hashable, str]]
                            ) -> list[tuple[Hashable, str]]:
        """``found`` without its reasoning text when the route opts out of checking it
        (``--reasoning-check off``): what is left out is logged once per stream and counted
        (characters: the stream's ``reasoning_unchecked``, the route's metric)."""
        if self.route.reasoning_check:
            return list(found)
        kept = [(channel, text) for channel, text in found if not is_reasoning(channel)]
        if len(kept) < len(found):
            chars = sum(len(text) for channel, text in found if is_reasoning(channel))
            if not self.record.reasoning_unchecked:
                log.info("reasoning text passed unchecked (reasoning_check off for route %s)",
                         self.record.route)
            self.record.count("reasoning_unchecked", chars)
            self._recorder.reasoning_unchecked(self.record.route, chars)
        return kept

    def mcp_poisoned_tools(self, action: str, count: int) -> None:
        """``count`` tools of an MCP ``tools/list`` answer blocked: ``removed``, or the answer
        ``refused``."""
        self._recorder.mcp_poisoned_tools(self.record.route, action, count)

    def images_unchecked(self, reason: str, count: int, *, rejected: bool) -> None:
        """``count`` prompt images the guardrail could not screen (``reason``: an
        ``extproc.images.Reason`` value, or ``not_guarded``): counted for the route, and in the
        stream's ``images_unchecked`` when they passed."""
        for _ in range(count):
            self._recorder.images_unchecked(self.record.route, reason,
                                            "rejected" if rejected else "passed")
        if not rejected:
            self.record.count("images_unchecked", count)

    def no_verdict(self, error: GuardrailError) -> Action:
        """There is no verdict (``error``): record its class, and whether the text goes on
        unchecked (``RELEASE_UNCHECKED``, recorded as a fail-open) or the stream gets
        ``guardrail_unavailable`` (``UNAVAILABLE``)."""
        self.record.error_class = error.error_class
        action = decide_error(error, self.route)
        if action is Action.RELEASE_UNCHECKED:
            self.record.failed_open = True
        return action

    def intervened(self, source: Source, outcome: str, verdict: GuardrailVerdict,
                   chars_released: int = 0, window: str | None = None) -> None:
        """One audit record for a block or mask acted on (or, shadow, one that would be)."""
        self._audit.record(
            outcome=outcome, source=source.value.lower(), verdict=verdict,
            chars_released=chars_released, tripped_window=window,
            cost_usd=self.record.cost_usd or 0.0, **self.record.identity())
