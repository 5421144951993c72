"""The ``Tracer`` of ``extproc.observe.tracing`` on the OpenTelemetry SDK, exporting OTLP over
gRPC. The only module that imports ``opentelemetry``; the composition root imports it only when
``--otlp-endpoint`` is set.

Spans go to a ``BatchSpanProcessor``: ending a span puts it in a queue and returns, and a
background thread exports the queue in batches, so a guardrail call or a stream never waits on
the collector (a full queue drops spans, counted by the SDK, never blocks).

The SDK reads its standard variables itself, once, when ``build_tracer`` runs at start-up
(README "Tracing"): ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the resource;
the service name defaults to ``guardrail-extproc`` here), ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` (default ``parentbased_always_on``: a request Envoy sampled is
traced, one it did not sample is not), ``OTEL_BSP_*`` (the batch processor's delay, queue and
batch sizes), ``OTEL_EXPORTER_OTLP_*`` / ``OTEL_EXPORTER_OTLP_TRACES_*`` (TLS certificate and
client key, ``INSECURE``, headers, compression, timeout) and ``OTEL_PROPAGATORS`` (default
``tracecontext,baggage``: the W3C headers). The endpoint itself is ``--otlp-endpoint``'s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from extproc.observe.tracing import (
    ATTEMPT_SPAN,
    ERROR_TYPE,
    STREAM_SPAN,
    Attributes,
    AttributeValue,
    Span,
)

#: The resource's ``service.name`` unless ``OTEL_SERVICE_NAME`` (or ``service.name`` in
#: ``OTEL_RESOURCE_ATTRIBUTES``) says otherwise.
DEFAULT_SERVICE_NAME: Final = "guardrail-extproc"
INSTRUMENTATION: Final = "extproc"
#: Seconds ``shutdown`` waits for what is left to be exported.
SHUTDOWN_TIMEOUT_S: Final = 5.0


class OtelSpan:
    """A ``Span`` over an SDK span."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def set(self, key: str, value: AttributeValue) -> None:
        self.span.set_attribute(key, value)

    def update(self, attributes: Attributes) -> None:
        self.span.set_attributes(attributes)

    def failed(self, error_type: str) -> None:
        self.span.set_attribute(ERROR_TYPE, error_type)
        self.span.set_status(Status(StatusCode.ERROR, error_type))

    def end(self) -> None:
        self.span.end()  # the SDK ignores (and warns about) a second end; we never make one


class OtelTracer:
    """A ``Tracer`` on an SDK ``TracerProvider`` (see the module docstring)."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION)

    def stream_span(self, carriers: Sequence[Mapping[str, str]],
                    attributes: Attributes) -> Span:
        parent = None
        for carrier in carriers:
            if "traceparent" not in carrier:
                continue
            found = propagate.extract(carrier)
            if trace.get_current_span(found).get_span_context().is_valid:
                parent = found
                break
        span = self._tracer.start_span(STREAM_SPAN, context=parent, kind=SpanKind.SERVER,
                                       attributes=attributes)
        return OtelSpan(span)

    @contextmanager
    def check_span(self, parent: Span, name: str, attributes: Attributes) -> Iterator[Span]:
        assert isinstance(parent, OtelSpan), "BUG: a span of another tracer"
        context = trace.set_span_in_context(parent.span)
        span = self._tracer.start_span(name, context=context, kind=SpanKind.CLIENT,
                                       attributes=attributes)
        # Current for the block: the attempts below start their spans from the current context
        # (asyncio tasks created inside copy it).
        token = otel_context.attach(trace.set_span_in_context(span, context))
        try:
            yield OtelSpan(span)
        finally:
            otel_context.detach(token)
            span.end()

    @contextmanager
    def attempt_span(self, attributes: Attributes) -> Iterator[Span]:
        span = self._tracer.start_span(ATTEMPT_SPAN, kind=SpanKind.CLIENT,
                                       attributes=attributes)
        try:
            yield OtelSpan(span)
        finally:
            span.end()

    def now(self) -> int:
        return time.time_ns()  # the SDK's own clock for span times

    def past_attempt(self, attributes: Attributes, started: int, error_type: str) -> None:
        span = self._tracer.start_span(ATTEMPT_SPAN, kind=SpanKind.CLIENT,
                                       attributes=attributes, start_time=started)
        span.set_attribute(ERROR_TYPE, error_type)
        span.set_status(Status(StatusCode.ERROR, error_type))
        span.end()

    def force_flush(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
        """Export every ended span now (tests, benchmarks)."""
        return self._provider.force_flush(int(timeout_s * 1000))

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        # The SDK's shutdown exports what is queued, but bounds it only by the exporter's own
        # timeout and retries (and its force_flush not at all): a collector that is down must
        # not hold the exit, so the wait is ours.
        stopping = threading.Thread(target=self._provider.shutdown, name="otel-shutdown",
                                    daemon=True)
        stopping.start()
        stopping.join(timeout_s)


def build_tracer(endpoint: str, exporter: SpanExporter | None = None) -> OtelTracer:
    """The tracer that exports to ``endpoint`` (``http://`` plaintext, ``https://`` TLS; a bare
    ``host:port`` follows ``OTEL_EXPORTER_OTLP_INSECURE``); ``exporter`` replaces the OTLP
    exporter (tests). The SDK reads its ``OTEL_*`` variables here."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # ours: ``shutdown``
    provider.add_span_processor(BatchSpanProcessor(
        exporter if exporter is not None else OTLPSpanExporter(endpoint=endpoint)))
    return OtelTracer(provider)
