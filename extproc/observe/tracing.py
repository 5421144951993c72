"""The tracing seam: what the stream code and the resilient client need to trace a guarded
request, and the names of the spans and attributes they record.

Tracing is off by default (``--otlp-endpoint``). When off, nothing here is called: the stream
code holds ``None`` instead of a ``Tracer`` and tests it once per guardrail call, and this
module imports nothing of OpenTelemetry. The implementation (``extproc.observe.otel``, the only
importer of ``opentelemetry``) is imported by the composition root only when tracing is on.

The spans of one guarded request (README "Tracing"):

* ``STREAM_SPAN`` (kind SERVER): one per guarded ext_proc stream, started at the request
  headers and ended when the stream ends; its parent is the W3C ``traceparent`` (and
  ``tracestate``) of the ext_proc RPC's gRPC metadata (Envoy's own span for the ext_proc call,
  when Envoy traces) or else of the HTTP request headers Envoy forwards (the client's span).
* ``CHECK_SPAN`` (kind CLIENT, the GenAI client span): one per ApplyGuardrail call the stream
  makes, child of the stream span; retries, split parts and budget waits happen inside it.
* ``ATTEMPT_SPAN`` (kind CLIENT): child of its call span, one per retry and per part of a split
  call, and one for a first attempt that failed (recorded when it failed, from its start). A
  call whose first attempt succeeds, the common case, has none: its call span is that
  attempt, and every span costs (about 50 µs of CPU with the OTLP export).

Never an attribute with text from the prompt, the answer or a match: only ids, enums,
counts and policy names (a finding's name is the topic, filter, PII type or regex name of
the guardrail's configuration; a custom word's finding is named ``custom``, not the word).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Final, Protocol

from extproc.domain.verdict import GuardrailVerdict
from extproc.observe.audit import finding_key, reported

AttributeValue = str | bool | int | float | Sequence[str]
Attributes = Mapping[str, AttributeValue]

#: Span names.
STREAM_SPAN: Final = "guardrail.stream"
CHECK_SPAN: Final = "apply_guardrail"  # + " {guardrail id}", the GenAI spans' naming
ATTEMPT_SPAN: Final = "BedrockRuntime/ApplyGuardrail"  # the AWS SDK spans' naming

# OpenTelemetry semantic conventions (GenAI, AWS Bedrock, RPC, errors).
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
AWS_BEDROCK_GUARDRAIL_ID: Final = "aws.bedrock.guardrail.id"
ERROR_TYPE: Final = "error.type"
RPC_SYSTEM: Final = "rpc.system"
RPC_SERVICE: Final = "rpc.service"
RPC_METHOD: Final = "rpc.method"
#: ``gen_ai.operation.name`` of a guardrail call: no predefined value fits, so the operation's
#: own name (the conventions allow a system-specific value).
OPERATION_APPLY_GUARDRAIL: Final = "apply_guardrail"
PROVIDER_AWS_BEDROCK: Final = "aws.bedrock"

# This project's attributes (README "Tracing").
GUARDRAIL_VERSION: Final = "guardrail.version"
GUARDRAIL_SOURCE: Final = "guardrail.source"  # INPUT | OUTPUT
GUARDRAIL_MODE: Final = "guardrail.mode"  # the route's stream mode: sync | async
GUARDRAIL_SHADOW: Final = "guardrail.shadow"
GUARDRAIL_ROUTE: Final = "guardrail.route"
GUARDRAIL_FORMAT: Final = "guardrail.format"
GUARDRAIL_REQUEST_ID: Final = "guardrail.request_id"
GUARDRAIL_OUTCOME: Final = "guardrail.outcome"  # pass | mask | block (call); the stream's label
GUARDRAIL_ACTION: Final = "guardrail.action"  # Bedrock's: NONE | GUARDRAIL_INTERVENED
GUARDRAIL_DECISION: Final = "guardrail.decision"  # no verdict: open (unchecked) | closed
GUARDRAIL_TEXT_UNITS: Final = "guardrail.text_units"  # sent: ceil(chars / 1000) per block
GUARDRAIL_USAGE_TEXT_UNITS: Final = "guardrail.usage.text_units"  # billed, all policies
GUARDRAIL_CONTENT_BLOCKS: Final = "guardrail.content_blocks"
GUARDRAIL_POLICIES: Final = "guardrail.policies"  # policy:name:ACTION of reported findings
GUARDRAIL_ATTEMPT: Final = "guardrail.attempt"  # 1, 2, ... within its call
GUARDRAIL_CHECKS: Final = "guardrail.checks"
GUARDRAIL_FAILED_OPEN: Final = "guardrail.failed_open"
GUARDRAIL_COST_USD: Final = "guardrail.cost_usd"
GUARDRAIL_CACHED_TEXTS: Final = "guardrail.cached_texts"  # prompt texts the cache knew to pass


class Span(Protocol):
    """One span, recording until ``end``."""

    def set(self, key: str, value: AttributeValue) -> None:
        """Set one attribute."""
        ...

    def update(self, attributes: Attributes) -> None:
        """Set several attributes (one call: cheaper than one ``set`` each)."""
        ...

    def failed(self, error_type: str) -> None:
        """The operation failed: ``error.type`` and an error status."""
        ...

    def end(self) -> None:
        """End the span (once; later calls do nothing)."""
        ...


class Tracer(Protocol):
    """Starts the three kinds of span (see the module docstring)."""

    def stream_span(self, carriers: Sequence[Mapping[str, str]],
                    attributes: Attributes) -> Span:
        """A stream's span, its parent read from the first carrier (gRPC metadata, request
        headers) that holds a valid trace context; a new trace when none does."""
        ...

    def check_span(self, parent: Span, name: str,
                   attributes: Attributes) -> AbstractContextManager[Span]:
        """A guardrail call's span, child of ``parent``, current while the block runs (so that
        the attempts made inside it are its children); ended when the block exits."""
        ...

    def attempt_span(self, attributes: Attributes) -> AbstractContextManager[Span]:
        """An attempt's span, child of the current span; ended when the block exits."""
        ...

    def now(self) -> int:
        """The tracer's clock (nanoseconds since the epoch), for ``past_attempt``."""
        ...

    def past_attempt(self, attributes: Attributes, started: int, error_type: str) -> None:
        """An attempt's span after the fact: it started at ``started`` (``now()``), failed with
        ``error_type`` and ended now; child of the current span."""
        ...

    def shutdown(self) -> None:
        """Export what is left (bounded) and stop the exporter."""
        ...


def verdict_attributes(verdict: GuardrailVerdict) -> dict[str, AttributeValue]:
    """A verdict's attributes: outcome, Bedrock's action, billed text units, the findings by
    policy and name (never their matched text)."""
    attributes: dict[str, AttributeValue] = {
        GUARDRAIL_OUTCOME: verdict.outcome.value,
        GUARDRAIL_ACTION: verdict.action,
        GUARDRAIL_USAGE_TEXT_UNITS: verdict.text_units,
    }
    policies = list(dict.fromkeys(finding_key(f) for f in verdict.findings if reported(f)))
    if policies:
        attributes[GUARDRAIL_POLICIES] = policies
    return attributes
