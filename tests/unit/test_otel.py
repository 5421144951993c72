"""The OpenTelemetry tracer's own behaviour (``extproc.observe.otel``): what a stream records
is tested in ``tests/stream/test_tracing.py`` and ``tests/e2e/test_tracing.py``."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from extproc.observe.otel import build_tracer


class StuckExporter(SpanExporter):
    """A collector that never answers until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exporting = threading.Event()
        self.exported: list[str] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exporting.set()
        self.release.wait()
        self.exported.extend(span.name for span in spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_shutdown_with_a_collector_that_never_answers_returns() -> None:
    # The SDK's own shutdown would wait for the exporter (its force_flush has no timeout at
    # all); the sidecar's exit must not hang on a dead collector.
    exporter = StuckExporter()
    tracer = build_tracer("http://127.0.0.1:4317", exporter=exporter)
    span = tracer.stream_span((), {})
    span.end()
    flushing = threading.Thread(target=tracer.force_flush, daemon=True)
    flushing.start()
    assert exporter.exporting.wait(30)
    tracer.shutdown(timeout_s=0.01)
    assert exporter.exported == []  # still stuck, and shutdown returned
    exporter.release.set()
    flushing.join(30)
    assert exporter.exported == ["guardrail.stream"]


def test_a_span_ends_without_waiting_for_the_collector() -> None:
    # BatchSpanProcessor: ending a span only queues it.
    exporter = StuckExporter()
    tracer = build_tracer("http://127.0.0.1:4317", exporter=exporter)
    first = tracer.stream_span((), {})
    first.end()
    flushing = threading.Thread(target=tracer.force_flush, daemon=True)
    flushing.start()
    assert exporter.exporting.wait(30)
    second = tracer.stream_span((), {"guardrail.route": "default"})
    second.end()  # returns while the exporter is stuck
    exporter.release.set()
    flushing.join(30)
    assert tracer.force_flush()
    assert exporter.exported == ["guardrail.stream", "guardrail.stream"]
    tracer.shutdown()
