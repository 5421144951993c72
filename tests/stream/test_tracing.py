"""Traces of a guarded stream (``--otlp-endpoint``), exported by the real OTLP exporter to a real
OTLP/gRPC receiver in the test: the stream's span is parented on the trace context Envoy sent,
each guardrail call is its child and each attempt (retries too) the call's child; the attributes
name ids, enums, counts and policies, never prompt, answer or matched text."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from extproc.domain.cache import NO_CACHE, MemoryVerdictCache, VerdictCache
from extproc.domain.errors import GuardrailThrottled
from extproc.domain.values import GuardrailRef, Source, StreamMode
from extproc.domain.verdict import GuardrailVerdict
from extproc.formats import all_formats
from extproc.guardrail.config import ResilienceConfig
from extproc.guardrail.resilient import ResilientGuardrail
from extproc.observe.otel import OtelTracer, build_tracer
from extproc.observe.tracing import ATTEMPT_SPAN, CHECK_SPAN, STREAM_SPAN
from extproc.stream.processor import StreamProcessor
from extproc.stream.sinks import Outbox
from testkit.otlp import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, OtlpReceiver
from tests.support import (
    FakeGuardrail,
    chat_request,
    chunk_event,
    request_body,
    request_headers,
    response_body,
    response_headers,
    settings,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
ENVOY_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
PROMPT = "Tell me about lighthouses, mail the keeper Zebediah at a@b.c"
ANSWER = ["Lighthouses ", "guide ships; ", "Quixotic ", "forbidden"]
SECRET_WORDS = ("lighthouses", "zebediah", "guide ships", "a@b.c", "quixotic", "forbidden")


@dataclass
class FlakyGuardrail(FakeGuardrail):
    """The fake, but its first ``throttles`` calls are throttled."""

    throttles: int = 0

    async def apply(self, guardrail: GuardrailRef, source: Source,
                    texts: Sequence[str]) -> GuardrailVerdict:
        if self.throttles > 0:
            self.throttles -= 1
            await asyncio.sleep(0)
            raise GuardrailThrottled("throttled (test)")
        return await super().apply(guardrail, source, texts)


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as server:
        yield server


@pytest.fixture
def tracer(receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> Iterator[OtelTracer]:
    for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SERVICE_NAME",
                 "OTEL_RESOURCE_ATTRIBUTES", "OTEL_PROPAGATORS", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    built = build_tracer(receiver.endpoint)
    yield built
    built.shutdown()


async def run_stream(tracer: OtelTracer, guardrail: Any, *, headers: Sequence[tuple[str, str]],
                     carrier: dict[str, str] | None = None, answer: Sequence[str] = ANSWER,
                     verdict_cache: VerdictCache = NO_CACHE,
                     **overrides: Any) -> StreamProcessor:
    """One streamed chat completion through a processor with tracing on, then the RPC's end."""
    async def write(message: Any) -> None:
        pass

    processor = StreamProcessor(
        settings(**overrides), guardrail, all_formats(), Outbox(write), "t1",
        tracer=tracer, trace_carrier=carrier, verdict_cache=verdict_cache,
    )
    await processor.handle(request_headers(extra=headers))
    await processor.handle(request_body(chat_request(PROMPT)))
    await processor.handle(response_headers())
    for piece in answer:
        await processor.handle(response_body(chunk_event(piece)))
    await processor.handle(response_body(b"data: [DONE]\n\n", end_of_stream=True))
    for _ in range(50):
        await asyncio.sleep(0)
    processor.close()
    assert tracer.force_flush()
    return processor


def resilient(inner: FakeGuardrail, tracer: OtelTracer) -> ResilientGuardrail:
    return ResilientGuardrail(inner, ResilienceConfig(budget_rps=0, budget_text_units_per_s=0),
                              sleep=no_sleep, tracer=tracer)


def assert_no_text(spans: Sequence[Any]) -> None:
    for span in spans:
        for key, value in span.attributes.items():
            text = " ".join(value) if isinstance(value, tuple) else str(value)
            for word in SECRET_WORDS:
                assert word not in text.lower(), (span.name, key, value)


async def test_a_streams_guardrail_calls_and_retries_are_children_of_envoys_span(
        receiver: OtlpReceiver, tracer: OtelTracer) -> None:
    inner = FlakyGuardrail(masked=("a@b.c",), throttles=1)
    await run_stream(tracer, resilient(inner, tracer),
                     headers=[("traceparent", TRACEPARENT), ("x-request-id", "r-1")],
                     )
    spans = receiver.wait_for(
        lambda got: any(s.name == STREAM_SPAN for s in got), what="the stream span")
    [stream] = [s for s in spans if s.name == STREAM_SPAN]
    checks = [s for s in spans if s.name.startswith(CHECK_SPAN + " ")]
    attempts = [s for s in spans if s.name == ATTEMPT_SPAN]

    # One trace, the client's; the stream's parent is the span of the traceparent.
    assert {s.trace_id for s in spans} == {TRACE_ID}
    assert stream.parent_span_id == CLIENT_SPAN
    assert stream.kind == KIND_SERVER
    assert stream.service_name == "guardrail-extproc"
    assert stream.resource["deployment.environment"] == "test"
    # Every call is the stream's child; every attempt a call's child.
    assert checks and all(c.parent_span_id == stream.span_id for c in checks)
    assert all(c.kind == KIND_CLIENT for c in checks)
    by_id = {c.span_id: c for c in checks}
    assert attempts and all(a.parent_span_id in by_id for a in attempts)
    assert all(a.kind == KIND_CLIENT for a in attempts)
    # Attempt spans only where there was more than one attempt: the prompt's call.
    assert len(attempts) == 2

    # The prompt's call: throttled once, then retried, both attempts under the one call.
    [prompt] = [c for c in checks if c.attributes["guardrail.source"] == "INPUT"]
    tries = sorted((a for a in attempts if a.parent_span_id == prompt.span_id),
                   key=lambda a: a.attributes["guardrail.attempt"])
    assert [a.attributes["guardrail.attempt"] for a in tries] == [1, 2]
    assert tries[0].attributes["error.type"] == "throttled"
    assert tries[0].status_code == STATUS_ERROR
    assert "error.type" not in tries[1].attributes
    assert tries[1].attributes["guardrail.outcome"] == "mask"
    assert tries[1].attributes["rpc.method"] == "ApplyGuardrail"
    assert tries[0].attributes["rpc.method"] == "ApplyGuardrail"
    assert tries[0].attributes["guardrail.text_units"] == 1
    assert prompt.attributes["guardrail.outcome"] == "mask"
    assert prompt.attributes["guardrail.policies"] == ("pii:EMAIL:ANONYMIZED",)

    for check in checks:
        attrs = check.attributes
        assert check.name == f"{CHECK_SPAN} testguardrail"
        assert attrs["gen_ai.operation.name"] == "apply_guardrail"
        assert attrs["gen_ai.provider.name"] == "aws.bedrock"
        assert attrs["aws.bedrock.guardrail.id"] == "testguardrail"
        assert attrs["guardrail.version"] == "1"
        assert attrs["guardrail.mode"] == "sync"
        assert attrs["guardrail.shadow"] is False
        assert attrs["guardrail.action"] in ("NONE", "GUARDRAIL_INTERVENED")
        assert attrs["guardrail.text_units"] >= 1
        assert attrs["guardrail.usage.text_units"] == 1
    outputs = [c for c in checks if c.attributes["guardrail.source"] == "OUTPUT"]
    assert "block" in {c.attributes["guardrail.outcome"] for c in outputs}
    policies = {p for c in checks for p in c.attributes.get("guardrail.policies", ())}
    assert policies == {"pii:EMAIL:ANONYMIZED", "word:custom:BLOCKED"}

    assert stream.attributes["guardrail.outcome"] == "block"
    assert stream.attributes["guardrail.route"] == "default"
    assert stream.attributes["guardrail.format"] == "openai.chat_completions"
    assert stream.attributes["guardrail.request_id"] == "r-1"
    assert stream.attributes["guardrail.checks"] == len(outputs)  # the answer's, as logged
    assert set(stream.attributes["guardrail.policies"]) == policies
    assert_no_text(spans)


async def test_envoys_ext_proc_span_in_the_grpc_metadata_is_the_parent(
        receiver: OtlpReceiver, tracer: OtelTracer) -> None:
    # With Envoy tracing, its span for the ext_proc call comes in the RPC's metadata; it is a
    # child of the request's span and a better parent than the client's in the headers.
    await run_stream(tracer, FakeGuardrail(), headers=[("traceparent", TRACEPARENT)],
                     carrier={"traceparent": f"00-{TRACE_ID}-{ENVOY_SPAN}-01"},
                     answer=["Calm seas."])
    spans = receiver.wait_for(lambda got: any(s.name == STREAM_SPAN for s in got))
    [stream] = [s for s in spans if s.name == STREAM_SPAN]
    assert stream.parent_span_id == ENVOY_SPAN
    assert {s.trace_id for s in spans} == {TRACE_ID}
    assert stream.attributes["guardrail.outcome"] == "pass"


async def test_without_a_traceparent_the_stream_starts_a_trace(
        receiver: OtlpReceiver, tracer: OtelTracer) -> None:
    await run_stream(tracer, FakeGuardrail(), headers=[], carrier={"x-other": "1"},
                     answer=["Calm seas."], stream_mode=StreamMode.ASYNC)
    spans = receiver.wait_for(lambda got: any(s.name == STREAM_SPAN for s in got))
    [stream] = [s for s in spans if s.name == STREAM_SPAN]
    assert stream.parent_span_id == ""
    assert {s.trace_id for s in spans} == {stream.trace_id}
    checks = [s for s in spans if s.name.startswith(CHECK_SPAN)]
    assert checks and {c.attributes["guardrail.mode"] for c in checks} == {"async"}


async def test_an_unsampled_request_is_not_traced(
        receiver: OtlpReceiver, tracer: OtelTracer) -> None:
    # parentbased_always_on (the SDK's default sampler): Envoy's "not sampled" is honoured.
    await run_stream(tracer, FakeGuardrail(), answer=["Calm seas."],
                     headers=[("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-00")])
    await run_stream(tracer, FakeGuardrail(), answer=["Calm seas."],
                     headers=[("traceparent", TRACEPARENT)])
    spans = receiver.wait_for(lambda got: any(s.name == STREAM_SPAN for s in got))
    assert [s.name for s in spans].count(STREAM_SPAN) == 1


async def test_a_failed_call_records_its_error_class_and_the_decision(
        receiver: OtlpReceiver, tracer: OtelTracer) -> None:
    inner = FlakyGuardrail(throttles=100)
    await run_stream(tracer, resilient(inner, tracer), headers=[("traceparent", TRACEPARENT)],
                     answer=["Calm seas."])
    spans = receiver.wait_for(lambda got: any(s.name == STREAM_SPAN for s in got))
    [stream] = [s for s in spans if s.name == STREAM_SPAN]
    [prompt] = [s for s in spans if s.name.startswith(CHECK_SPAN)]
    assert prompt.attributes["error.type"] == "throttled"
    assert prompt.attributes["guardrail.decision"] == "closed"
    assert prompt.status_code == STATUS_ERROR
    attempts = [s for s in spans if s.name == ATTEMPT_SPAN]
    assert sorted(a.attributes["guardrail.attempt"] for a in attempts) == [1, 2, 3]
    assert all(a.parent_span_id == prompt.span_id for a in attempts)
    assert all(a.attributes["error.type"] == "throttled" for a in attempts)
    assert stream.attributes["error.type"] == "throttled"
    assert stream.attributes["guardrail.outcome"] == "unavailable"


async def test_each_part_of_a_split_call_is_an_attempt_span(
        receiver: OtlpReceiver, tracer: OtelTracer) -> None:
    guardrail = ResilientGuardrail(
        FakeGuardrail(), ResilienceConfig(budget_rps=0, budget_text_units_per_s=0,
                                          max_chars_per_call=1000),
        sleep=no_sleep, tracer=tracer)

    async def write(message: Any) -> None:
        pass

    processor = StreamProcessor(settings(), guardrail, all_formats(), Outbox(write), "t1",
                                tracer=tracer)
    await processor.handle(request_headers(extra=[("traceparent", TRACEPARENT)]))
    await processor.handle(request_body(chat_request("calm seas " * 250)))  # 2,500 characters
    for _ in range(50):
        await asyncio.sleep(0)
    processor.close()
    assert tracer.force_flush()
    spans = receiver.wait_for(lambda got: any(s.name == STREAM_SPAN for s in got))
    [prompt] = [s for s in spans if s.name.startswith(CHECK_SPAN)]
    parts = [s for s in spans if s.name == ATTEMPT_SPAN]
    assert len(parts) == 3
    assert all(p.parent_span_id == prompt.span_id for p in parts)
    assert all(p.attributes["guardrail.text_units"] == 1 for p in parts)
    assert prompt.attributes["guardrail.text_units"] == 3


async def test_a_prompt_the_cache_knew_is_counted_on_the_stream_not_called(
        receiver: OtlpReceiver, tracer: OtelTracer) -> None:
    cache = MemoryVerdictCache(100, 60.0, clock=lambda: 0.0)
    for _ in range(2):
        await run_stream(tracer, FakeGuardrail(), headers=[], answer=["Calm seas."],
                         verdict_cache=cache)
    spans = receiver.wait_for(lambda got: [s.name for s in got].count(STREAM_SPAN) == 2)
    first, second = sorted((s for s in spans if s.name == STREAM_SPAN),
                           key=lambda s: "guardrail.cached_texts" in s.attributes)
    inputs = [s for s in spans if s.name.startswith(CHECK_SPAN)
              and s.attributes["guardrail.source"] == "INPUT"]
    assert [s.trace_id for s in inputs] == [first.trace_id]
    assert second.attributes["guardrail.cached_texts"] == 1


async def test_a_malformed_traceparent_starts_a_new_trace(
        receiver: OtlpReceiver, tracer: OtelTracer) -> None:
    await run_stream(tracer, FakeGuardrail(), answer=["Calm seas."],
                     headers=[("traceparent", "00-zz-not-a-context-01"),
                              ("tracestate", "=;=")],
                     carrier={"traceparent": f"00-{'0' * 32}-{ENVOY_SPAN}-01"})
    spans = receiver.wait_for(lambda got: any(s.name == STREAM_SPAN for s in got))
    [stream] = [s for s in spans if s.name == STREAM_SPAN]
    assert stream.parent_span_id == ""
    assert stream.trace_id != "0" * 32
    assert stream.attributes["guardrail.outcome"] == "pass"
