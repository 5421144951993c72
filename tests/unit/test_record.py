"""``extproc.stream.record.StreamRecord``: the one place a stream's facts become Envoy
metadata, audit identity and metric labels."""

from __future__ import annotations

from extproc.domain.verdict import Finding
from extproc.stream.record import MAX_FINDING_KEYS, StreamRecord


def test_unset_fields_are_left_out_of_the_metadata() -> None:
    record = StreamRecord("gr1", "3", route="canary", stream="s1")
    assert record.to_metadata() == {"guardrail_id": "gr1", "guardrail_version": "3"}


def test_counters_count_from_zero_when_first_touched() -> None:
    record = StreamRecord("gr1", "3")
    record.count("text_units", 0)
    record.count("checks")
    record.count("checks")
    record.chars_released = 0
    record.failed_open = True
    assert record.to_metadata() == {"guardrail_id": "gr1", "guardrail_version": "3",
                                    "failed_open": True, "checks": 2, "text_units": 0,
                                    "chars_released": 0}


def test_findings_are_summarised_once_each_and_bounded() -> None:
    record = StreamRecord("gr1", "3")
    record.add_findings((Finding("word", "custom", "BLOCKED", True),
                         Finding("pii", "EMAIL", "NONE", False),  # not reported
                         Finding("word", "custom", "BLOCKED", True)))
    assert record.to_metadata()["findings"] == "word:custom:BLOCKED"
    record.add_findings(tuple(Finding("topic", f"t{i}", "BLOCKED", True) for i in range(40)))
    assert len(record.to_metadata()["findings"].split(",")) == MAX_FINDING_KEYS


def test_identity_names_the_stream_for_its_audit_records() -> None:
    record = StreamRecord("gr1", "3", route="canary", stream="s9")
    assert record.identity() == {"guardrail_id": "gr1", "guardrail_version": "3",
                                 "route": "canary", "fmt": "none", "stream": "s9",
                                 "request_id": None, "mcp_method": None, "mcp_tool": None}
    record.format, record.request_id = "openai.chat_completions", "r-1"
    assert record.identity()["fmt"] == "openai.chat_completions"
    assert record.identity()["request_id"] == "r-1"
    assert "route" not in record.to_metadata() and "stream" not in record.to_metadata()
