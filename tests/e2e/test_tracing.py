"""Traces through real Envoy: the sidecar process with ``--otlp-endpoint`` exports to a real
OTLP/gRPC receiver in the test (``testkit.otlp``), a client sends a W3C ``traceparent``.

* the shipped ``envoy/envoy.yaml`` (Envoy does not trace): the sidecar's stream span is the
  child of the client's span that Envoy forwarded in the request headers;
* the shipped ``envoy/envoy-tracing.yaml``: Envoy traces to the same receiver, and the
  sidecar's spans hang below Envoy's span for the request (through Envoy's span for its
  ext_proc call, whose context Envoy sends in the call's gRPC metadata): one trace per
  request, guardrail calls as children.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest

from extproc.observe.tracing import ATTEMPT_SPAN, CHECK_SPAN, STREAM_SPAN
from testkit.otlp import KIND_CLIENT, KIND_SERVER, OtlpReceiver, ReceivedSpan
from testkit.stack import REPO_ROOT
from tests.e2e.conftest import GUARDRAIL_ID, SMALL_WINDOWS, Stack, StackFactory
from tests.support import chat_request

#: Distinctive words of the prompt: none may appear in any attribute.
PROMPT = "Zebediah keeps the Quillfeather lighthouse; tell me about lighthouses"
#: The sidecar exports a batch 50 ms after its first span instead of the SDK's 5 s.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "guardrail-test"}
WAIT_S = 60.0
#: Envoy names its span for a gRPC call after the method.
EXT_PROC_METHOD = "envoy.service.ext_proc.v3.ExternalProcessor.Process"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as server:
        yield server


def traceparent() -> tuple[str, str, str]:
    """A fresh sampled W3C trace context: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def post(stack: Stack, header: str, prompt: str = PROMPT) -> bytes:
    with httpx.Client(timeout=30) as http, http.stream(
        "POST", f"{stack.url}/v1/chat/completions", content=chat_request(prompt),
        headers={"content-type": "application/json", "traceparent": header},
    ) as response:
        assert response.status_code == 200
        return b"".join(response.iter_raw())


def of_trace(spans: Sequence[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def sidecar_spans_done(trace_id: str) -> Any:
    """The stream span has ended (it is the last sidecar span of a stream to end)."""
    return lambda spans: any(s.name == STREAM_SPAN for s in of_trace(spans, trace_id))


def assert_guardrail_tree(spans: Sequence[ReceivedSpan], parent_id: str) -> ReceivedSpan:
    """The sidecar's spans of one trace: one stream span under ``parent_id``, the calls under
    it (no retries), the expected attributes and no prompt text."""
    sidecar = [s for s in spans if s.service_name == "guardrail-test"]
    [stream] = [s for s in sidecar if s.name == STREAM_SPAN]
    assert stream.parent_span_id == parent_id
    assert stream.kind == KIND_SERVER
    checks = [s for s in sidecar if s.name == f"{CHECK_SPAN} {GUARDRAIL_ID}"]
    attempts = [s for s in sidecar if s.name == ATTEMPT_SPAN]
    assert {s.span_id for s in sidecar} == {stream.span_id} | {
        s.span_id for s in checks} | {s.span_id for s in attempts}
    assert {c.attributes["guardrail.source"] for c in checks} == {"INPUT", "OUTPUT"}
    assert all(c.parent_span_id == stream.span_id for c in checks)
    assert all(c.kind == KIND_CLIENT for c in checks)
    # Every call's first attempt succeeded: the call's span is that attempt, no span of its own.
    assert attempts == []
    for check in checks:
        attrs = check.attributes
        assert attrs["gen_ai.operation.name"] == "apply_guardrail"
        assert attrs["gen_ai.provider.name"] == "aws.bedrock"
        assert attrs["aws.bedrock.guardrail.id"] == GUARDRAIL_ID
        assert attrs["guardrail.version"] == "1"
        assert attrs["guardrail.mode"] == "sync"
        assert attrs["guardrail.outcome"] == "pass"
        assert attrs["guardrail.action"] == "NONE"
        assert attrs["guardrail.text_units"] >= 1
    assert stream.attributes["guardrail.outcome"] == "pass"
    assert stream.attributes["guardrail.format"] == "openai.chat_completions"
    for span in sidecar:
        for key, value in span.attributes.items():
            text = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
            for word in ("zebediah", "quillfeather", "lighthouse"):
                assert word not in text.lower(), (span.name, key, value)
    return stream


def test_each_request_is_one_trace_under_the_clients_span(
        stacks: StackFactory, receiver: OtlpReceiver) -> None:
    stack = stacks([*SMALL_WINDOWS, "--otlp-endpoint", receiver.endpoint], env=FAST_EXPORT)
    contexts = [traceparent() for _ in range(2)]
    for number, (header, _, _) in enumerate(contexts):
        # (another prompt each time: a prompt known to pass is not checked again)
        assert b"data: [DONE]" in post(stack, header, f"{PROMPT} #{number}")
    for _, trace_id, client_span in contexts:
        spans = receiver.wait_for(sidecar_spans_done(trace_id), WAIT_S, f"trace {trace_id}")
        # Envoy (not tracing) forwards the client's traceparent: the client's span is the parent.
        assert_guardrail_tree(of_trace(spans, trace_id), client_span)


def test_with_envoy_tracing_the_guardrail_spans_join_envoys_trace(
        stacks: StackFactory, receiver: OtlpReceiver) -> None:
    def collector(config: dict[str, Any]) -> None:
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "otel_collector":
                endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
                endpoint["endpoint"]["address"]["socket_address"]["port_value"] = receiver.port
        # Envoy's exporter sends every span at once instead of batching for 5 s.
        config["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {
            "tracing.opentelemetry.flush_interval_ms": 100,
            "tracing.opentelemetry.min_flush_spans": 1}}]}

    stack = stacks([*SMALL_WINDOWS, "--otlp-endpoint", receiver.endpoint], collector,
                   env=FAST_EXPORT, envoy_config=REPO_ROOT / "envoy" / "envoy-tracing.yaml")
    # One request whose client sends a trace context, one whose trace Envoy starts.
    header, client_trace, client_span = traceparent()
    assert b"data: [DONE]" in post(stack, header, f"{PROMPT} (traced client)")
    with httpx.Client(timeout=30) as http:
        answer = http.post(f"{stack.url}/v1/chat/completions",
                           content=chat_request(f"{PROMPT} (plain client)"),
                           headers={"content-type": "application/json"})
    assert answer.status_code == 200

    def envoy_roots(spans: Sequence[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.service_name == "envoy-llm" and s.kind == KIND_SERVER
                and s.parent_span_id in ("", client_span)]

    def complete(spans: list[ReceivedSpan]) -> bool:
        roots = envoy_roots(spans)
        return len(roots) == 2 and all(
            sidecar_spans_done(root.trace_id)(spans) for root in roots)

    received = receiver.wait_for(complete, WAIT_S, "Envoy's and the sidecar's spans")
    roots = envoy_roots(received)
    assert {r.trace_id for r in roots} >= {client_trace} and len({r.trace_id for r in roots}) == 2
    for request in roots:
        spans = of_trace(received, request.trace_id)
        # Envoy's span for the request: the client's child, or the root of a trace Envoy began.
        assert request.parent_span_id == (client_span if request.trace_id == client_trace
                                          else "")
        # The sidecar's stream span is the child of Envoy's span for its ext_proc call (sent in
        # the call's gRPC metadata), itself the child of the request's; every guardrail span is
        # in the tree below; one stream span per trace.
        by_id = {s.span_id: s for s in spans}
        [stream] = [s for s in spans if s.name == STREAM_SPAN]
        ext_proc = by_id[stream.parent_span_id]
        assert ext_proc.service_name == "envoy-llm"
        assert ext_proc.name == f"async {EXT_PROC_METHOD} egress"
        assert ext_proc.kind == KIND_CLIENT
        assert ext_proc.parent_span_id == request.span_id
        assert_guardrail_tree(spans, ext_proc.span_id)
