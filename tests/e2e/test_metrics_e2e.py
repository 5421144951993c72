"""Metrics, audit trail and access-log metadata through real Envoy: a clean, a masked and a
blocked stream are each counted exactly once under the right labels on the sidecar's
``/metrics`` (read before and after), the masked and blocked ones leave one audit record each
in the sidecar's log, and in shadow mode a violating stream arrives byte-identical and is
counted and audited as a would-be block."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.domain.cost import DEFAULT_PRICES, LABELS
from testkit.upstream import Script
from tests.e2e.conftest import SMALL_WINDOWS, Stack, StackFactory
from tests.e2e.test_chat_stream import events, post_stream
from tests.support import BLOCK_FRAME, WAIT_S, wait_until

P = "guardrail_extproc_"
FORMAT = "openai.chat_completions"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def metrics_stack(stacks: StackFactory) -> Stack:
    return stacks([*SMALL_WINDOWS, "--metrics-listen", "127.0.0.1:0"])


@pytest.fixture(scope="module")
def shadow_stack(stacks: StackFactory) -> Stack:
    return stacks([*SMALL_WINDOWS, "--shadow", "on", "--metrics-listen", "127.0.0.1:0"])


def scrape(stack: Stack) -> Samples:
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((P + name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The series of ``name`` that changed, by labels."""
    out = {}
    for (sample, labels), value in after.items():
        if sample == P + name and value != before.get((sample, labels), 0.0):
            out[labels] = value - before.get((sample, labels), 0.0)
    return out


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


def finished_total(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == P + "streams_finished_total")


def one_stream(stack: Stack, chunks: tuple[bytes, ...]) -> tuple[Samples, Samples, bytes, str]:
    """Run one stream; returns the scrapes before and after its end was counted, the body
    the client got and the request id Envoy gave it."""
    before = scrape(stack)
    script_id = stack.llm.register(Script(chunks=chunks, delays_ms=20))
    _, body = post_stream(stack, script_id, "http1")
    request_id = stack.llm.record_for_script(script_id, timeout=10).header("x-request-id")
    assert request_id
    # The ext_proc stream ends (and is counted) once Envoy is done with the request.
    after = wait_until(lambda: (s := scrape(stack)) and finished_total(s) > finished_total(
        before) and get(s, "streams_in_flight") == 0 and s, what="the stream's end")
    # Nothing is counted for it later. No event marks the end of "later" (the count is taken
    # once, in the stream's close, before the RPC ends; a second one would be a stray task's),
    # so a short sleep stands in: it can only let this check miss a late count, never fail it
    # falsely (no other stream runs meanwhile).
    time.sleep(0.2)
    assert finished_total(scrape(stack)) == finished_total(before) + 1
    return before, after, body, request_id


def audit_records(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    out = []
    text = stack.sidecar.log_path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record["logger"] == "extproc.audit" and record["audit"]["request_id"] == request_id:
            out.append(record["audit"])
    return out


def access_log_metadata(stack: Stack, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        # Envoy writes its access log out every 10 s; reopening the log writes it at once.
        # (Was: a wait for that timer, up to 10 s of the WAIT_S each time.)
        urllib.request.urlopen(urllib.request.Request(
            f"{stack.envoy.admin_url}/reopen_logs", method="POST"), timeout=WAIT_S).close()
        text = stack.envoy.log_path.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            if line.startswith("{") and request_id in line:
                entry = json.loads(line)
                if entry.get("request_id") == request_id:
                    guardrail: dict[str, Any] = entry["guardrail"]
                    return guardrail
        return None

    found: dict[str, Any] = wait_until(find, what="the access log line", interval=0.1)
    return found


def violating(filler: int = 20) -> tuple[bytes, ...]:
    parts = ["Alpha beta gamma. ", "Delta epsilon. ", "It is Project ", "Nightingale, ",
             "yes. "] + [f"more words {i}. " for i in range(filler)]
    return tuple(events(*parts))


def test_clean_masked_and_blocked_streams_are_each_counted_once(metrics_stack: Stack) -> None:
    stack = metrics_stack
    default = {"route": "default", "format": FORMAT}

    # Clean.
    before, after, body, request_id = one_stream(stack, tuple(events("Hello ", "there.")))
    assert body == b"".join(events("Hello ", "there."))
    assert delta(before, after, "streams_started_total") == {labels(**default): 1}
    assert delta(before, after, "streams_finished_total") == {
        labels(**default, outcome="pass"): 1}
    assert delta(before, after, "verdicts_total").get(
        labels(source="input", action="pass")) == 1
    assert delta(before, after, "verdicts_total").get(
        labels(source="output", action="pass"), 0) >= 1
    assert delta(before, after, "findings_total") == {}
    assert delta(before, after, "response_body_mode_total") == {
        labels(mode="full_duplex_streamed"): 1}
    units = delta(before, after, "text_units_total")
    assert units
    # Cost (issue 18): each policy's units times AWS's price, per route.
    costs = delta(before, after, "cost_usd_total")
    assert costs and all(dict(key)["route"] == "default" for key in costs)
    for key, usd in costs.items():
        policy = dict(key)["policy"]
        billed = sum(v for k, v in units.items() if dict(k)["policy"] == policy)
        assert usd == pytest.approx(billed * DEFAULT_PRICES[LABELS[policy]] / 1000)
    assert get(after, "guardrail_call_duration_seconds_count", source="output") > get(
        before, "guardrail_call_duration_seconds_count", source="output")
    assert get(after, "bedrock_calls_total") > get(before, "bedrock_calls_total")
    assert audit_records(stack, request_id) == []

    # Masked.
    chunks = tuple(events("Write to ", "jane.doe@example.com", " any time."))
    before, after, body, request_id = one_stream(stack, chunks)
    assert b"{EMAIL}" in body and b"jane" not in body
    assert delta(before, after, "streams_finished_total") == {
        labels(**default, outcome="mask"): 1}
    assert delta(before, after, "verdicts_total").get(
        labels(source="output", action="mask"), 0) >= 1
    assert delta(before, after, "findings_total").get(
        labels(policy="pii", name="EMAIL", action="anonymized"), 0) >= 1
    masks = audit_records(stack, request_id)
    assert masks and all(r["outcome"] == "mask" and r["source"] == "output" for r in masks)
    assert {"policy": "pii", "name": "EMAIL", "action": "ANONYMIZED"} in masks[0]["findings"]
    assert (masks[0]["route"], masks[0]["format"]) == ("default", FORMAT)
    assert (masks[0]["guardrail_id"], masks[0]["guardrail_version"]) == ("demoguardrail", "1")
    metadata = access_log_metadata(stack, request_id)
    assert metadata["outcome"] == "pass" and metadata["masked"] >= 1
    assert "pii:EMAIL:ANONYMIZED" in metadata["findings"]

    # Blocked.
    chunks = violating()
    before, after, body, request_id = one_stream(stack, chunks)
    assert body.endswith(BLOCK_FRAME) and b"Nightingale" not in body
    assert delta(before, after, "streams_finished_total") == {
        labels(**default, outcome="block"): 1}
    assert delta(before, after, "verdicts_total").get(
        labels(source="output", action="block")) == 1
    assert delta(before, after, "findings_total").get(
        labels(policy="word", name="custom", action="blocked")) == 1
    assert delta(before, after, "chars_released_before_block_count") == {frozenset(): 1}
    (block,) = audit_records(stack, request_id)
    released = body[: -len(BLOCK_FRAME)]
    released_text = "".join(
        json.loads(b[6:])["choices"][0]["delta"].get("content") or ""
        for b in released.split(b"\n\n") if b.startswith(b"data: {"))
    assert block["outcome"] == "block" and block["source"] == "output"
    assert block["chars_released"] == len(released_text)
    assert block["tripped_window"]
    assert block["findings"] == [{"policy": "word", "name": "custom", "action": "BLOCKED"}]
    assert "match" not in json.dumps(block)
    metadata = access_log_metadata(stack, request_id)
    assert metadata["outcome"] == "block"
    assert metadata["findings"] == "word:custom:BLOCKED"
    assert metadata["chars_released"] == len(released_text)
    assert metadata["tripped_window"] == block["tripped_window"]
    assert metadata["request_id"] == request_id
    assert (metadata["guardrail_id"], metadata["guardrail_version"]) == ("demoguardrail", "1")
    assert metadata["text_units"] > 0 and metadata["checks"] >= 1
    assert metadata["cost_usd"] > 0 and 0 < block["cost_usd"] <= metadata["cost_usd"]

    log = stack.sidecar.log_path.read_text(encoding="utf-8")
    for text in ("Nightingale", "jane.doe", "example.com", "Alpha beta"):
        assert text not in log, text


def test_shadow_counts_and_audits_a_would_be_block(shadow_stack: Stack) -> None:
    chunks = violating(filler=5)
    before, after, body, request_id = one_stream(shadow_stack, chunks)
    assert body == b"".join(chunks)
    assert delta(before, after, "streams_finished_total") == {
        labels(route="default", format=FORMAT, outcome="shadow_would_block"): 1}
    # Overlapping windows may each see the phrase: verdicts count them all, the audit trail
    # the one that would have ended the stream.
    assert delta(before, after, "verdicts_total").get(
        labels(source="output", action="block"), 0) >= 1
    assert delta(before, after, "chars_released_before_block_count") == {}
    records = audit_records(shadow_stack, request_id)
    assert [(r["source"], r["outcome"]) for r in records] == [("output", "shadow_would_block")]
    assert records[0]["findings"] == [{"policy": "word", "name": "custom", "action": "BLOCKED"}]
