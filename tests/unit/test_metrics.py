"""``extproc.metrics``: the series a ``PrometheusRecorder`` writes for synthetic verdicts and
streams, their bounded labels, the scrape-time gauges and collectors, the HTTP endpoint; and a
``StreamProcessor`` reporting to it."""

from __future__ import annotations

import asyncio
import gc
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.domain.errors import GuardrailThrottled, GuardrailTimeout
from extproc.domain.failure import FailurePolicy
from extproc.domain.values import InputCheck, Source, UnknownTraffic
from extproc.domain.verdict import GuardrailVerdict, classify
from extproc.formats import all_formats
from extproc.guardrail.config import ResilienceConfig
from extproc.guardrail.resilient import ResilientGuardrail
from extproc.observe.audit import AuditLog
from extproc.observe.metrics import (
    NULL_RECORDER,
    STREAM_OUTCOMES,
    PrometheusRecorder,
    Recorder,
    start_metrics_server,
    usage_policy,
    verdict_action,
)
from extproc.stream.processor import StreamProcessor
from extproc.stream.record import StreamRecord
from extproc.stream.sinks import Outbox
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

P = "guardrail_extproc_"

USAGE = {"topicPolicyUnits": 1, "contentPolicyUnits": 2, "wordPolicyUnits": 1,
         "sensitiveInformationPolicyUnits": 3, "sensitiveInformationPolicyFreeUnits": 0,
         "contextualGroundingPolicyUnits": 0, "automatedReasoningPolicies": 7}


def bedrock(action: str, assessments: list[dict[str, Any]],
            outputs: Sequence[str] = ()) -> GuardrailVerdict:
    return classify({"action": action, "usage": USAGE, "assessments": assessments,
                     "outputs": [{"text": t} for t in outputs]})


BLOCKED = bedrock("GUARDRAIL_INTERVENED", [{
    "wordPolicy": {"customWords": [{"match": "nightingale", "action": "BLOCKED",
                                    "detected": True}]},
    "topicPolicy": {"topics": [{"name": "finance", "type": "DENY", "action": "BLOCKED",
                                "detected": True}]},
}], ["Sorry."])
MASKED = bedrock("GUARDRAIL_INTERVENED", [{
    "sensitiveInformationPolicy": {
        "piiEntities": [{"match": "jane@example.com", "type": "EMAIL", "action": "ANONYMIZED",
                         "detected": True}],
        "regexes": [{"name": "TicketId", "match": "TKT-1", "regex": "TKT-[0-9]",
                     "action": "ANONYMIZED", "detected": True}]},
}], ["{EMAIL} {TicketId}"])
DETECT_ONLY = bedrock("NONE", [{
    "sensitiveInformationPolicy": {"piiEntities": [
        {"match": "555-0100", "type": "PHONE", "action": "NONE", "detected": True}]},
    "contentPolicy": {"filters": [
        {"type": "INSULTS", "confidence": "HIGH", "action": "NONE", "detected": True},
        {"type": "HATE", "confidence": "NONE", "action": "NONE", "detected": False}]},
}])
PASSED = bedrock("NONE", [])


def value(recorder: PrometheusRecorder, metric: str, /, **labels: str) -> float:
    found = recorder.registry.get_sample_value(P + metric, labels)
    return 0.0 if found is None else found


def series(recorder: PrometheusRecorder, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of one counter family, by its sorted labels."""
    out = {}
    for metric in recorder.registry.collect():
        if metric.name == P + family:
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


# --------------------------------------------------------------------------- verdicts


def test_verdicts_are_counted_by_source_and_action() -> None:
    r = PrometheusRecorder()
    r.verdict("OUTPUT", BLOCKED, 0.2)
    r.verdict("OUTPUT", MASKED, 0.1)
    r.verdict("INPUT", DETECT_ONLY, 0.05)
    r.verdict("INPUT", PASSED, 0.05)
    assert value(r, "verdicts_total", source="output", action="block") == 1
    assert value(r, "verdicts_total", source="output", action="mask") == 1
    assert value(r, "verdicts_total", source="input", action="detect_only") == 1
    assert value(r, "verdicts_total", source="input", action="pass") == 1
    assert sum(series(r, "verdicts").values()) == 4


def test_findings_by_policy_name_and_action_including_detect_only() -> None:
    r = PrometheusRecorder()
    for verdict in (BLOCKED, MASKED, DETECT_ONLY, PASSED):
        r.verdict("OUTPUT", verdict, 0.1)
    assert series(r, "findings") == {
        (("action", "blocked"), ("name", "custom"), ("policy", "word")): 1,
        (("action", "blocked"), ("name", "finance"), ("policy", "topic")): 1,
        (("action", "anonymized"), ("name", "EMAIL"), ("policy", "pii")): 1,
        (("action", "anonymized"), ("name", "TicketId"), ("policy", "regex")): 1,
        (("action", "detected"), ("name", "PHONE"), ("policy", "pii")): 1,
        (("action", "detected"), ("name", "INSULTS"), ("policy", "content")): 1,
    }  # the HATE filter was neither acted on nor detected: not a finding


def test_text_units_per_policy_from_usage() -> None:
    r = PrometheusRecorder()
    r.verdict("OUTPUT", MASKED, 0.1)
    r.verdict("OUTPUT", PASSED, 0.1)
    r.verdict("INPUT", PASSED, 0.1)
    assert series(r, "text_units") == {
        (("policy", "topic"), ("source", "output")): 2,
        (("policy", "content"), ("source", "output")): 4,
        (("policy", "word"), ("source", "output")): 2,
        (("policy", "sensitive_information"), ("source", "output")): 6,
        (("policy", "topic"), ("source", "input")): 1,
        (("policy", "content"), ("source", "input")): 2,
        (("policy", "word"), ("source", "input")): 1,
        (("policy", "sensitive_information"), ("source", "input")): 3,
    }  # zero members are not counted; automatedReasoningPolicies is not text units


@pytest.mark.parametrize(("key", "label"), [
    ("topicPolicyUnits", "topic"),
    ("sensitiveInformationPolicyFreeUnits", "sensitive_information_free"),
    ("contextualGroundingPolicyUnits", "contextual_grounding"),
    ("contentPolicyImageUnits", "content_image"),
])
def test_usage_policy_labels(key: str, label: str) -> None:
    assert usage_policy(key) == label


def test_finding_names_are_capped_per_policy_and_overflow_to_other() -> None:
    r = PrometheusRecorder(max_names=3)
    for i in range(10):
        r.verdict("OUTPUT", bedrock("GUARDRAIL_INTERVENED", [{"topicPolicy": {"topics": [
            {"name": f"topic-{i}", "type": "DENY", "action": "BLOCKED", "detected": True}]}}]),
            0.1)
    r.verdict("OUTPUT", BLOCKED, 0.1)  # another policy type has its own budget
    topics = {dict(labels)["name"]: n for labels, n in series(r, "findings").items()
              if dict(labels)["policy"] == "topic"}
    assert topics == {"topic-0": 1, "topic-1": 1, "topic-2": 1, "other": 8}
    assert value(r, "findings_total", policy="word", name="custom", action="blocked") == 1
    # An admitted name keeps its own series.
    r.verdict("OUTPUT", bedrock("GUARDRAIL_INTERVENED", [{"topicPolicy": {"topics": [
        {"name": "topic-1", "type": "DENY", "action": "BLOCKED", "detected": True}]}}]), 0.1)
    assert value(r, "findings_total", policy="topic", name="topic-1", action="blocked") == 2


def test_long_finding_names_are_cut() -> None:
    r = PrometheusRecorder()
    r.verdict("OUTPUT", bedrock("GUARDRAIL_INTERVENED", [{"sensitiveInformationPolicy": {
        "regexes": [{"name": "r" * 300, "action": "BLOCKED", "detected": True}]}}]), 0.1)
    (labels,) = series(r, "findings")
    assert dict(labels)["name"] == "r" * 64


@pytest.mark.parametrize(("verdict", "action"), [
    (BLOCKED, "block"), (MASKED, "mask"), (DETECT_ONLY, "detect_only"), (PASSED, "pass")])
def test_verdict_action(verdict: GuardrailVerdict, action: str) -> None:
    assert verdict_action(verdict) == action


def test_latency_histogram_by_source_counts_errors_too() -> None:
    r = PrometheusRecorder()
    r.verdict("OUTPUT", PASSED, 0.03)
    r.verdict("OUTPUT", PASSED, 0.3)
    r.guardrail_error("INPUT", "throttled", "open", 2.0)
    name = "guardrail_call_duration_seconds"
    assert value(r, name + "_count", source="output") == 2
    assert value(r, name + "_bucket", source="output", le="0.05") == 1
    assert value(r, name + "_sum", source="output") == pytest.approx(0.33)
    assert value(r, name + "_count", source="input") == 1


def test_errors_by_class_and_failure_mode() -> None:
    r = PrometheusRecorder()
    r.guardrail_error("OUTPUT", "timeout", "closed", 5.0)
    r.guardrail_error("OUTPUT", "timeout", "closed", 5.0)
    r.guardrail_error("INPUT", "throttled", "open", 0.1)
    r.guardrail_error("INPUT", "surprise", "sideways", 0.1)
    assert series(r, "guardrail_errors") == {
        (("error_class", "timeout"), ("failure_mode", "closed"), ("source", "output")): 2,
        (("error_class", "throttled"), ("failure_mode", "open"), ("source", "input")): 1,
        (("error_class", "other"), ("failure_mode", "other"), ("source", "input")): 1,
    }


# --------------------------------------------------------------------------- streams


def test_streams_started_finished_and_in_flight() -> None:
    r = PrometheusRecorder()
    r.stream_started("default", "openai.chat_completions")
    r.stream_started("canary", "openai.chat_completions")
    assert value(r, "streams_in_flight") == 2
    r.stream_finished("default", "openai.chat_completions", "block")
    r.stream_finished("canary", "openai.chat_completions", "not-an-outcome")
    assert value(r, "streams_in_flight") == 0
    assert value(r, "streams_started_total", route="canary",
                 format="openai.chat_completions") == 1
    assert series(r, "streams_finished") == {
        (("format", "openai.chat_completions"), ("outcome", "block"), ("route", "default")): 1,
        (("format", "openai.chat_completions"), ("outcome", "other"), ("route", "canary")): 1,
    }


def test_body_modes_and_released_chars() -> None:
    r = PrometheusRecorder()
    r.body_mode("full_duplex_streamed")
    r.body_mode("streamed")
    r.body_mode("streamed")
    r.body_mode("unknown")
    assert value(r, "response_body_mode_total", mode="full_duplex_streamed") == 1
    assert value(r, "response_body_mode_total", mode="streamed") == 2
    assert value(r, "response_body_mode_total", mode="buffered") == 0
    r.released_before_block(76)
    assert value(r, "chars_released_before_block_count") == 1
    assert value(r, "chars_released_before_block_bucket", le="100.0") == 1
    assert value(r, "chars_released_before_block_bucket", le="50.0") == 0


@dataclass(eq=False)
class Holder:
    held_bytes: int


def test_held_bytes_is_summed_at_scrape_time() -> None:
    r = PrometheusRecorder()
    a, b = Holder(100), Holder(20)
    r.track_held(a)
    r.track_held(b)
    assert value(r, "held_bytes") == 120
    a.held_bytes = 5
    assert value(r, "held_bytes") == 25
    r.untrack_held(a)
    r.untrack_held(a)
    assert value(r, "held_bytes") == 20


@pytest.mark.parametrize(("stats", "guarded", "unfinished", "expected"), [
    ({}, False, False, "skipped"),
    ({"outcome": "pass"}, True, False, "pass"),
    ({"outcome": "block", "masked": 1}, True, False, "block"),
    ({"outcome": "soft_block"}, True, False, "soft_block"),
    ({"outcome": "input_block"}, True, False, "input_block"),
    ({"outcome": "unavailable"}, True, False, "unavailable"),
    ({"outcome": "pass", "masked": 2}, True, False, "mask"),
    ({"input_masked": True}, True, False, "mask"),
    ({"outcome": "pass", "would_block": 1}, True, False, "shadow_would_block"),
    ({"would_block_input": True}, True, False, "shadow_would_block"),
    ({"outcome": "pass", "would_mask": 1}, True, False, "shadow_would_mask"),
    ({"outcome": "pass", "failed_open": True}, True, False, "failed_open"),
    ({}, True, True, "cancelled"),
    ({}, True, False, "pass"),  # e.g. a non-SSE answer after a passing prompt
])
def test_stream_outcome(stats: dict[str, Any], guarded: bool, unfinished: bool,
                        expected: str) -> None:
    record = StreamRecord("g", "1", **stats)
    assert record.outcome_label(guarded=guarded, unfinished=unfinished) == expected
    assert expected in STREAM_OUTCOMES


# --------------------------------------------------------------------------- resilience


async def test_resilience_counters_are_read_at_scrape_time() -> None:
    inner = FakeGuardrail(error=GuardrailThrottled("429"))
    client = ResilientGuardrail(inner, ResilienceConfig(
        max_attempts=2, breaker_failures=2, backoff_base_s=0, throttle_backoff_base_s=0,
        budget_rps=0, budget_text_units_per_s=0))
    r = PrometheusRecorder()
    r.watch_resilience(lambda: client.stats)
    with pytest.raises(GuardrailThrottled):
        await client.apply(settings().guardrail, Source.OUTPUT, ["hi"])
    assert value(r, "bedrock_calls_total") == 1
    assert value(r, "bedrock_attempts_total") == 2
    assert value(r, "bedrock_retries_total") == 1
    assert value(r, "bedrock_attempt_errors_total", error_class="throttled") == 2
    assert value(r, "bedrock_call_failures_total", error_class="throttled") == 1
    assert value(r, "breaker_transitions_total", from_state="closed", to_state="open") == 1
    assert value(r, "breaker_state", guardrail="testguardrail:1", state="open") == 1
    assert value(r, "breaker_state", guardrail="testguardrail:1", state="closed") == 0
    assert value(r, "budget_rejections_total") == 0


def test_resilience_snapshot_racing_the_loop_is_retried() -> None:
    calls = []

    def flaky() -> dict[str, Any]:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("dictionary changed size during iteration")
        return {"calls": 4}

    r = PrometheusRecorder()
    r.watch_resilience(flaky)
    assert value(r, "bedrock_calls_total") == 4


# --------------------------------------------------------------------------- the endpoint


def test_metrics_endpoint_serves_the_registry_on_port_0() -> None:
    r = PrometheusRecorder(standard_collectors=True)
    r.stream_started("default", "openai.chat_completions")
    server = start_metrics_server(r.registry, "127.0.0.1", 0)
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as a:
            text = a.read().decode()
    finally:
        server.close()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert P + "streams_started" in families
    assert "process_cpu_seconds" in families or "python_info" in families
    assert 'route="default"' in text
    r.close()


def test_gc_pauses_are_timed_per_generation_until_closed() -> None:
    r = PrometheusRecorder(standard_collectors=True)
    try:
        before = r.registry.get_sample_value(P + "gc_pause_seconds_count",
                                             {"generation": "2"}) or 0
        gc.collect()
        gc.collect(0)
        count = r.registry.get_sample_value(P + "gc_pause_seconds_count", {"generation": "2"})
        assert count is not None and count >= before + 1
        assert (r.registry.get_sample_value(P + "gc_pause_seconds_count",
                                            {"generation": "0"}) or 0) >= 1
        assert (r.registry.get_sample_value(P + "gc_pause_seconds_sum",
                                            {"generation": "2"}) or 0) > 0
    finally:
        r.close()
    assert not any(getattr(cb, "__self__", None) is not None
                   and type(cb.__self__).__name__ == "GCPauses" for cb in gc.callbacks)
    after = r.registry.get_sample_value(P + "gc_pause_seconds_count", {"generation": "2"})
    gc.collect()
    assert r.registry.get_sample_value(P + "gc_pause_seconds_count",
                                       {"generation": "2"}) == after


def test_null_recorder_is_a_recorder() -> None:
    recorder: Recorder = NULL_RECORDER
    recorder.stream_started("default", "x")
    recorder.verdict("OUTPUT", BLOCKED, 0.1)
    recorder.track_held(Holder(1))


# --------------------------------------------------------------------------- a stream


@dataclass
class Run:
    processor: StreamProcessor
    sent: list[Any]


async def run_stream(guardrail: FakeGuardrail, pieces: Sequence[str], *,
                     recorder: Recorder = NULL_RECORDER, audit: AuditLog | None = None,
                     prompt: str = "hi", request_id: str = "req-1", route_name: str = "default",
                     close: bool = True, **overrides: Any) -> Run:
    """One streamed chat completion through a ``StreamProcessor``, to its end."""
    sent: list[Any] = []

    async def write(message: Any) -> None:
        sent.append(message)

    processor = StreamProcessor(settings(**overrides), guardrail, all_formats(), Outbox(write),
                                "t1", route_name=route_name, recorder=recorder, audit=audit)

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    await processor.handle(request_headers(extra=(("x-request-id", request_id),)))
    await processor.handle(request_body(chat_request(prompt)))
    await settle()
    await processor.handle(response_headers())
    for piece in pieces:
        await processor.handle(response_body(chunk_event(piece)))
        await settle()
    await processor.handle(response_body(b"data: [DONE]\n\n", end_of_stream=True))
    await settle()
    if close:
        processor.close()
    return Run(processor, sent)


async def test_a_stream_reports_its_outcome_once() -> None:
    r = PrometheusRecorder()
    fmt = "openai.chat_completions"
    await run_stream(FakeGuardrail(), ["Hello ", "there."], recorder=r)
    await run_stream(FakeGuardrail(masked=("secret",)), ["the secret ", "is out"], recorder=r)
    blocked = await run_stream(FakeGuardrail(), ["Safe start. ", "forbidden"], recorder=r,
                               route_name="canary")
    assert series(r, "streams_finished") == {
        (("format", fmt), ("outcome", "pass"), ("route", "default")): 1,
        (("format", fmt), ("outcome", "mask"), ("route", "default")): 1,
        (("format", fmt), ("outcome", "block"), ("route", "canary")): 1,
    }
    assert value(r, "streams_in_flight") == 0
    assert value(r, "chars_released_before_block_count") == 1
    assert value(r, "chars_released_before_block_sum") == len("Safe start. ")
    assert blocked.processor.record.to_metadata()["chars_released"] == len("Safe start. ")
    assert value(r, "response_body_mode_total", mode="full_duplex_streamed") == 3
    assert value(r, "verdicts_total", source="input", action="pass") == 3
    assert value(r, "verdicts_total", source="output", action="mask") >= 1
    assert value(r, "verdicts_total", source="output", action="block") == 1
    assert value(r, "findings_total", policy="pii", name="EMAIL", action="anonymized") >= 1
    assert value(r, "findings_total", policy="word", name="custom", action="blocked") == 1
    assert value(r, "held_bytes") == 0
    blocked.processor.close()  # a second close does not count twice
    assert value(r, "streams_finished_total", route="canary", format=fmt, outcome="block") == 1


async def test_unrecognised_streams_let_through_are_counted_as_skipped() -> None:
    r = PrometheusRecorder()
    processor = StreamProcessor(settings(unknown_traffic=UnknownTraffic.PASS), FakeGuardrail(),
                                all_formats(), Outbox(lambda m: asyncio.sleep(0)), "t1",
                                recorder=r)
    await processor.handle(request_headers(path="/healthz", method="GET", end_of_stream=True))
    processor.close()
    assert value(r, "streams_started_total", route="default", format="unrecognised") == 1
    assert value(r, "streams_finished_total", route="default", format="none",
                 outcome="skipped") == 1


async def test_a_stream_closed_mid_answer_is_cancelled_and_its_held_bytes_released() -> None:
    r = PrometheusRecorder()
    hold = asyncio.Event()
    guardrail = FakeGuardrail(hold=hold)
    run = await run_stream(guardrail, ["waiting for a verdict"], recorder=r, close=False,
                           input_check=InputCheck.OFF)
    assert value(r, "held_bytes") > 0  # the answer waits for a check that never returns
    run.processor.close()
    assert value(r, "held_bytes") == 0
    assert value(r, "streams_finished_total", route="default",
                 format="openai.chat_completions", outcome="cancelled") == 1


async def test_guardrail_errors_are_counted_with_the_failure_mode() -> None:
    r = PrometheusRecorder()
    await run_stream(FakeGuardrail(error=GuardrailTimeout("slow")), ["Hello"], recorder=r,
                     failure_mode=FailurePolicy.uniform("open"))
    assert value(r, "guardrail_errors_total", source="input", error_class="timeout",
                 failure_mode="open") == 1
    assert value(r, "guardrail_errors_total", source="output", error_class="timeout",
                 failure_mode="open") >= 1
    assert value(r, "streams_finished_total", route="default",
                 format="openai.chat_completions", outcome="failed_open") == 1
