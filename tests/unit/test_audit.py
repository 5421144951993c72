"""``extproc.audit``: one record per intervention, no matched text unless asked (then redacted);
and a ``StreamProcessor`` writing them where it blocks or masks, with the same facts in the
dynamic metadata Envoy logs."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from extproc.domain.values import InputCheck, StreamMode
from extproc.domain.verdict import Finding
from extproc.formats import all_formats
from extproc.observe.audit import EVENT, LOGGER_NAME, AuditLog, finding_key, redact
from extproc.observe.logs import LogFormat, bind_stream, make_handler, unbind_stream
from extproc.stream.processor import StreamProcessor
from extproc.stream.sinks import Outbox
from tests.support import (
    FakeGuardrail,
    chat_request,
    request_body,
    request_headers,
    response_body,
    response_headers,
    settings,
)
from tests.unit.test_metrics import BLOCKED, DETECT_ONLY, MASKED, run_stream


class Records(logging.Handler):
    """The ``audit`` dicts logged on ``extproc.audit``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def audits(self) -> list[dict[str, Any]]:
        return [r.audit for r in self.records if hasattr(r, "audit")]  # type: ignore[attr-defined]


@pytest.fixture
def audit_log() -> Any:
    handler = Records()
    logger = logging.getLogger(LOGGER_NAME)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def record(audit: AuditLog, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        outcome="block", source="output", verdict=BLOCKED, guardrail_id="gr1",
        guardrail_version="3", route="default", fmt="openai.chat_completions", stream="s7",
        request_id="req-9", chars_released=76, tripped_window="0:40-200")
    values.update(overrides)
    return audit.record(**values)


# --------------------------------------------------------------------------- records


def test_a_record_has_every_fact_and_no_matched_text(audit_log: Records) -> None:
    out = record(AuditLog(clock=lambda: 1_700_000_000.25))
    assert out == {
        "event": EVENT,
        "timestamp": "2023-11-14T22:13:20.250Z",
        "outcome": "block",
        "source": "output",
        "guardrail_id": "gr1",
        "guardrail_version": "3",
        "findings": [{"policy": "topic", "name": "finance", "action": "BLOCKED"},
                     {"policy": "word", "name": "custom", "action": "BLOCKED"}],
        "chars_released": 76,
        "tripped_window": "0:40-200",
        "text_units": 7, "cost_usd": 0.0,
        "request_id": "req-9",
        "route": "default",
        "format": "openai.chat_completions",
        "stream": "s7",
    }
    (logged,) = audit_log.records
    assert logged.name == "extproc.audit" and logged.levelno == logging.INFO
    assert logged.audit == out  # type: ignore[attr-defined]
    assert "nightingale" not in json.dumps(out) + logged.getMessage()


def test_detect_only_findings_are_reported_as_detected() -> None:
    out = record(AuditLog(), outcome="mask", verdict=DETECT_ONLY)
    assert out["findings"] == [{"policy": "content", "name": "INSULTS", "action": "DETECTED"},
                               {"policy": "pii", "name": "PHONE", "action": "DETECTED"}]


def test_matches_are_redacted_when_enabled(audit_log: Records) -> None:
    out = record(AuditLog(include_matches=True), outcome="mask", verdict=MASKED)
    assert out["findings"] == [
        {"policy": "pii", "name": "EMAIL", "action": "ANONYMIZED", "match": "j***m"},
        {"policy": "regex", "name": "TicketId", "action": "ANONYMIZED", "match": "T***1"},
    ]
    text = json.dumps(audit_log.audits)
    assert "jane" not in text and "example" not in text and "TKT" not in text


@pytest.mark.parametrize(("match", "shown"), [
    ("jane.doe@example.com", "j***m"), ("abc", "a***c"), ("ab", "**"), ("a", "*"), ("", "")])
def test_redact(match: str, shown: str) -> None:
    assert redact(match) == shown


def test_finding_key() -> None:
    assert finding_key(Finding("word", "custom", "BLOCKED", True, "x")) == "word:custom:BLOCKED"
    assert finding_key(Finding("pii", "PHONE", "NONE", True)) == "pii:PHONE:DETECTED"
    assert finding_key(Finding("regex", "a,b", "ANONYMIZED", True)) == "regex:a_b:ANONYMIZED"


def test_json_log_line_carries_the_record_under_audit() -> None:
    import io

    buffer = io.StringIO()
    logger = logging.getLogger("test.audit.json")
    logger.propagate = False
    logger.addHandler(make_handler(LogFormat.JSON, buffer))
    logger.setLevel(logging.INFO)
    token = bind_stream("s7")
    try:
        out = record(AuditLog(logger=logger))
    finally:
        unbind_stream(token)
    line = json.loads(buffer.getvalue())
    assert line["audit"] == out
    assert line["logger"] == "test.audit.json" and line["stream"] == "s7"


# --------------------------------------------------------------------------- in a stream


async def test_a_blocked_stream_writes_one_record_and_the_metadata(audit_log: Records) -> None:
    run = await run_stream(FakeGuardrail(), ["Safe start. ", "now forbidden", "tail"],
                           route_name="canary")
    (out,) = audit_log.audits
    stats = run.processor.record.to_metadata()
    assert out["outcome"] == "block" and out["source"] == "output"
    assert out["chars_released"] == len("Safe start. ") == stats["chars_released"]
    assert out["tripped_window"] == stats["tripped_window"]
    assert out["request_id"] == "req-1" == stats["request_id"]
    assert (out["route"], out["format"], out["stream"]) == (
        "canary", "openai.chat_completions", "t1")
    assert (out["guardrail_id"], out["guardrail_version"]) == ("testguardrail", "1")
    assert out["findings"] == [{"policy": "word", "name": "custom", "action": "BLOCKED"}]
    # Envoy gets the same facts as dynamic metadata on the last body answer.
    last = run.sent[-1].dynamic_metadata["guardrail"]
    metadata = {key: last[key] for key in last}
    for key in ("outcome", "findings", "chars_released", "tripped_window", "request_id",
                "guardrail_id", "guardrail_version", "text_units", "checks"):
        assert key in metadata, key
    assert metadata["outcome"] == "block"
    assert metadata["findings"] == "word:custom:BLOCKED"
    assert metadata["chars_released"] == len("Safe start. ")


async def test_a_masked_stream_writes_one_record_per_mask(audit_log: Records) -> None:
    run = await run_stream(FakeGuardrail(masked=("secret",), detected=("phone",)),
                           ["a phone ", "the secret ", "is out"], input_check=InputCheck.OFF)
    masks = [a for a in audit_log.audits if a["outcome"] == "mask"]
    assert len(masks) == run.processor.record.to_metadata()["masked"] >= 1
    assert len(audit_log.audits) == len(masks)  # a detect-only verdict is not an intervention
    assert masks[0]["findings"] == [{"policy": "pii", "name": "EMAIL", "action": "ANONYMIZED"}]
    assert "a@b.c" not in json.dumps(audit_log.audits)
    assert set(run.processor.record.to_metadata()["findings"].split(",")) == {
        "pii:PHONE:DETECTED", "pii:EMAIL:ANONYMIZED"}


async def test_async_masks_are_recorded_as_unapplied(audit_log: Records) -> None:
    await run_stream(FakeGuardrail(masked=("secret",)), ["the secret"],
                     input_check=InputCheck.OFF, stream_mode=StreamMode.ASYNC)
    assert [a["outcome"] for a in audit_log.audits] == ["mask_unapplied"]


async def test_shadow_would_block_is_recorded_and_the_stream_passes(audit_log: Records) -> None:
    run = await run_stream(FakeGuardrail(), ["Safe start. ", "now forbidden"], shadow=True,
                           prompt="forbidden prompt")
    outcomes = sorted((a["source"], a["outcome"]) for a in audit_log.audits)
    assert outcomes == [("input", "shadow_would_block"), ("output", "shadow_would_block")]
    assert run.processor.record.to_metadata()["outcome"] == "pass"


async def test_a_blocked_prompt_is_recorded_as_an_input_block(audit_log: Records) -> None:
    run = await run_stream(FakeGuardrail(), ["never sent"], prompt="a forbidden prompt")
    (out,) = audit_log.audits
    assert (out["source"], out["outcome"], out["chars_released"]) == ("input", "block", 0)
    assert run.processor.record.to_metadata()["outcome"] == "input_block"
    assert run.processor.record.to_metadata()["chars_released"] == 0


def chat_json(content: str) -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop", "message": {
                           "role": "assistant", "content": content}}]}).encode()


@pytest.mark.parametrize(("content", "guardrail", "outcome"), [
    ("a forbidden answer", FakeGuardrail(), "block"),
    ("a secret answer", FakeGuardrail(masked=("secret",)), "mask"),
    ("a clean answer", FakeGuardrail(), None),
])
async def test_a_non_streamed_answer_is_recorded(audit_log: Records, content: str,
                                                 guardrail: FakeGuardrail,
                                                 outcome: str | None) -> None:
    sent: list[Any] = []

    async def write(message: Any) -> None:
        sent.append(message)

    processor = StreamProcessor(settings(), guardrail, all_formats(), Outbox(write), "t1")
    await processor.handle(request_headers())
    await processor.handle(request_body(chat_request("hi", stream=False)))
    await asyncio.sleep(0)
    await processor.handle(response_headers(content_type="application/json"))
    await processor.handle(response_body(chat_json(content), end_of_stream=True))
    for _ in range(20):
        await asyncio.sleep(0)
    processor.close()
    assert [a["outcome"] for a in audit_log.audits] == ([outcome] if outcome else [])
