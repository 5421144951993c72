"""``extproc.verdict``: what an ApplyGuardrail answer means (bedrock.md A.2 shapes, A.3 rules).

The responses below are shaped like the dicts boto3 returns for ``apply_guardrail`` (top-level
``usage``, ``action``, ``actionReason``, ``outputs``, ``assessments``, ``guardrailCoverage``;
per assessment the policy sections plus ``invocationMetrics`` and ``appliedGuardrailDetails``).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from extproc.domain.verdict import Finding, GuardrailVerdict, Outcome, classify, iter_findings

BLOCKED_MESSAGE = "Sorry, the model cannot answer this question."

# --------------------------------------------------------------------------- builders


def usage(**overrides: int) -> dict[str, int]:
    values = {
        "topicPolicyUnits": 1,
        "contentPolicyUnits": 1,
        "wordPolicyUnits": 1,
        "sensitiveInformationPolicyUnits": 1,
        "sensitiveInformationPolicyFreeUnits": 0,
        "contextualGroundingPolicyUnits": 0,
    }
    values.update(overrides)
    return values


def assessment(**policies: Any) -> dict[str, Any]:
    """One assessment with the given policy sections plus the metadata Bedrock adds."""
    entry: dict[str, Any] = dict(policies)
    entry["invocationMetrics"] = {
        "guardrailProcessingLatency": 212,
        "usage": usage(),
        "guardrailCoverage": {"textCharacters": {"guarded": 42, "total": 42}},
    }
    entry["appliedGuardrailDetails"] = {
        "guardrailId": "gr0abc123xyz",
        "guardrailVersion": "DRAFT",
        "guardrailArn": "arn:aws:bedrock:us-east-1:123456789012:guardrail/gr0abc123xyz",
        "guardrailOrigin": ["REQUEST"],
        "guardrailOwnership": "SELF",
    }
    return entry


def response(
    action: Any,
    assessments: Any = (),
    *,
    outputs: Any = None,
    reason: str | None = None,
    usage_: Any = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ResponseMetadata": {"RequestId": "6c1c9b6e-0000-4000-8000-000000000000",
                             "HTTPStatusCode": 200, "RetryAttempts": 0},
        "usage": usage() if usage_ is None else usage_,
        "action": action,
        "outputs": [] if outputs is None else outputs,
        "assessments": list(assessments) if isinstance(assessments, tuple) else assessments,
        "guardrailCoverage": {"textCharacters": {"guarded": 42, "total": 42}},
    }
    if reason is not None:
        body["actionReason"] = reason
    return body


# One finding of each of the seven kinds, by action.
def topic(action: str, detected: bool | None = True) -> dict[str, Any]:
    entry = {"name": "Investment advice", "type": "DENY", "action": action}
    if detected is not None:
        entry["detected"] = detected
    return {"topicPolicy": {"topics": [entry]}}


def content_filter(action: str, detected: bool | None = True) -> dict[str, Any]:
    entry = {"type": "VIOLENCE", "confidence": "HIGH", "filterStrength": "HIGH",
             "action": action}
    if detected is not None:
        entry["detected"] = detected
    return {"contentPolicy": {"filters": [entry]}}


def custom_word(action: str, detected: bool | None = True) -> dict[str, Any]:
    entry = {"match": "project-bluebird", "action": action}
    if detected is not None:
        entry["detected"] = detected
    return {"wordPolicy": {"customWords": [entry]}}


def managed_word(action: str, detected: bool | None = True) -> dict[str, Any]:
    entry = {"match": "damn", "type": "PROFANITY", "action": action}
    if detected is not None:
        entry["detected"] = detected
    return {"wordPolicy": {"managedWordLists": [entry]}}


def pii(action: str, detected: bool | None = True, type_: str = "EMAIL",
        match: str = "jane.doe@example.com") -> dict[str, Any]:
    entry = {"match": match, "type": type_, "action": action}
    if detected is not None:
        entry["detected"] = detected
    return {"sensitiveInformationPolicy": {"piiEntities": [entry]}}


def regex(action: str, detected: bool | None = True) -> dict[str, Any]:
    entry = {"name": "TicketId", "match": "TCK-48213", "regex": "TCK-[0-9]{5}",
             "action": action}
    if detected is not None:
        entry["detected"] = detected
    return {"sensitiveInformationPolicy": {"regexes": [entry]}}


def grounding(action: str, detected: bool | None = True) -> dict[str, Any]:
    entry = {"type": "GROUNDING", "threshold": 0.75, "score": 0.12, "action": action}
    if detected is not None:
        entry["detected"] = detected
    return {"contextualGroundingPolicy": {"filters": [entry]}}


KINDS = {
    "topic": (topic, "topic", "Investment advice", None),
    "content": (content_filter, "content", "VIOLENCE", None),
    "word": (custom_word, "word", "custom", "project-bluebird"),
    "managed_word": (managed_word, "managed_word", "PROFANITY", "damn"),
    "pii": (pii, "pii", "EMAIL", "jane.doe@example.com"),
    "regex": (regex, "regex", "TicketId", "TCK-48213"),
    "grounding": (grounding, "grounding", "GROUNDING", None),
}


def merged(*sections: dict[str, Any]) -> dict[str, Any]:
    """Several policy sections in one assessment (lists of the same section concatenated)."""
    out: dict[str, Any] = {}
    for section in sections:
        for key, lists in section.items():
            target = out.setdefault(key, {})
            for list_key, entries in lists.items():
                target.setdefault(list_key, []).extend(entries)
    return assessment(**out)


# --------------------------------------------------------------------------- the decision table

CASES: list[tuple[str, dict[str, Any], Outcome]] = [
    ("none-no-findings",
     response("NONE", [assessment()], reason="No action."), Outcome.PASS),
    ("none-empty-assessments", response("NONE", []), Outcome.PASS),
    ("none-detect-mode-content",
     response("NONE", [assessment(**content_filter("NONE", detected=True))],
              reason="No action."), Outcome.PASS),
    ("none-detect-mode-all-kinds",
     response("NONE", [merged(*(make("NONE") for make, *_ in KINDS.values()))]),
     Outcome.PASS),
    # Rule 1 is first: a NONE action passes whatever the findings claim.
    ("none-wins-over-blocked-finding",
     response("NONE", [assessment(**topic("BLOCKED"))]), Outcome.PASS),
    *[
        (f"intervened-blocked-{name}",
         response("GUARDRAIL_INTERVENED", [assessment(**make("BLOCKED"))],
                  outputs=[{"text": BLOCKED_MESSAGE}], reason="Guardrail blocked."),
         Outcome.BLOCK)
        for name, (make, *_) in KINDS.items()
    ],
    ("intervened-blocked-only-in-second-assessment",
     response("GUARDRAIL_INTERVENED",
              [assessment(**content_filter("NONE", detected=False)),
               assessment(**custom_word("BLOCKED"))],
              outputs=[{"text": BLOCKED_MESSAGE}]), Outcome.BLOCK),
    ("intervened-blocked-second-assessment-after-anonymized-first",
     response("GUARDRAIL_INTERVENED",
              [assessment(**pii("ANONYMIZED")), assessment(**regex("BLOCKED"))],
              outputs=[{"text": BLOCKED_MESSAGE}]), Outcome.BLOCK),
    ("intervened-anonymized-pii",
     response("GUARDRAIL_INTERVENED", [assessment(**pii("ANONYMIZED"))],
              outputs=[{"text": "Write to {EMAIL} for details."}],
              reason="Guardrail masked."), Outcome.MASK),
    ("intervened-anonymized-regex",
     response("GUARDRAIL_INTERVENED", [assessment(**regex("ANONYMIZED"))],
              outputs=[{"text": "Your ticket is {TicketId}."}],
              reason="Guardrail masked."), Outcome.MASK),
    ("intervened-anonymized-pii-and-regex",
     response("GUARDRAIL_INTERVENED", [merged(pii("ANONYMIZED"), regex("ANONYMIZED"))],
              outputs=[{"text": "{EMAIL} about {TicketId}"}]), Outcome.MASK),
    ("intervened-anonymized-with-detect-only-others",
     response("GUARDRAIL_INTERVENED",
              [merged(pii("ANONYMIZED"), content_filter("NONE"), topic("NONE", False))],
              outputs=[{"text": "{EMAIL}"}]), Outcome.MASK),
    ("intervened-anonymized-without-detected-flag",
     response("GUARDRAIL_INTERVENED", [assessment(**pii("ANONYMIZED", detected=None))],
              outputs=[{"text": "{EMAIL}"}]), Outcome.MASK),
    ("intervened-mixed-blocked-and-anonymized-same-assessment",
     response("GUARDRAIL_INTERVENED",
              [merged(pii("ANONYMIZED"), pii("BLOCKED", type_="US_SOCIAL_SECURITY_NUMBER",
                                             match="123-45-6789"))],
              outputs=[{"text": BLOCKED_MESSAGE}]), Outcome.BLOCK),
    ("intervened-mixed-anonymized-and-blocked-topic",
     response("GUARDRAIL_INTERVENED", [merged(regex("ANONYMIZED"), topic("BLOCKED"))],
              outputs=[{"text": BLOCKED_MESSAGE}]), Outcome.BLOCK),
    ("intervened-only-none-actions-fail-safe",
     response("GUARDRAIL_INTERVENED",
              [merged(*(make("NONE") for make, *_ in KINDS.values()))]), Outcome.BLOCK),
    ("intervened-empty-assessments-fail-safe",
     response("GUARDRAIL_INTERVENED", []), Outcome.BLOCK),
    ("intervened-assessment-without-policies-fail-safe",
     response("GUARDRAIL_INTERVENED", [assessment()]), Outcome.BLOCK),
    ("intervened-no-assessments-key-fail-safe",
     {"action": "GUARDRAIL_INTERVENED", "usage": usage(), "outputs": []}, Outcome.BLOCK),
    ("intervened-unknown-finding-action-fail-safe",
     response("GUARDRAIL_INTERVENED", [assessment(**pii("REDACTED"))]), Outcome.BLOCK),
    ("unknown-action-no-findings", response("SOMETHING_NEW", []), Outcome.BLOCK),
    ("unknown-action-anonymized-only",
     response("SOMETHING_NEW", [assessment(**pii("ANONYMIZED"))]), Outcome.BLOCK),
    ("lowercase-none-is-unknown", response("none", []), Outcome.BLOCK),
    ("empty-action", response("", []), Outcome.BLOCK),
    ("null-action", response(None, []), Outcome.BLOCK),
    ("missing-action", {"usage": usage(), "outputs": [], "assessments": []}, Outcome.BLOCK),
    ("empty-response", {}, Outcome.BLOCK),
    # actionReason is a hint, never the contract.
    ("reason-masked-but-blocked-finding",
     response("GUARDRAIL_INTERVENED", [assessment(**topic("BLOCKED"))],
              outputs=[{"text": BLOCKED_MESSAGE}], reason="Guardrail masked."), Outcome.BLOCK),
    ("reason-blocked-but-anonymized-only",
     response("GUARDRAIL_INTERVENED", [assessment(**pii("ANONYMIZED"))],
              outputs=[{"text": "{EMAIL}"}], reason="Guardrail blocked."), Outcome.MASK),
    ("reason-no-action-but-intervened-blocked",
     response("GUARDRAIL_INTERVENED", [assessment(**content_filter("BLOCKED"))],
              reason="No action."), Outcome.BLOCK),
    ("reason-blocked-but-action-none",
     response("NONE", [], reason="Guardrail blocked."), Outcome.PASS),
    ("reason-masked-but-intervened-with-nothing",
     response("GUARDRAIL_INTERVENED", [], reason="Guardrail masked."), Outcome.BLOCK),
]


@pytest.mark.parametrize(("body", "expected"), [(b, e) for _, b, e in CASES],
                         ids=[name for name, _, _ in CASES])
def test_classify_table(body: dict[str, Any], expected: Outcome) -> None:
    original = copy.deepcopy(body)
    verdict = classify(body)
    assert isinstance(verdict, GuardrailVerdict)
    assert verdict.outcome is expected
    assert verdict.action == str(body.get("action", ""))
    assert body == original, "classify must not mutate the response"


def test_table_covers_every_outcome_and_kind() -> None:
    outcomes = {expected for _, _, expected in CASES}
    assert outcomes == set(Outcome)
    blocked_kinds = {name.removeprefix("intervened-blocked-") for name, _, _ in CASES
                     if name.startswith("intervened-blocked-") and "assessment" not in name}
    assert blocked_kinds == set(KINDS) and len(KINDS) == 7


# --------------------------------------------------------------------------- findings


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("action", ["BLOCKED", "ANONYMIZED", "NONE"])
def test_iter_findings_maps_each_kind(kind: str, action: str) -> None:
    make, policy, name, match = KINDS[kind]
    findings = list(iter_findings([assessment(**make(action))]))
    assert findings == [Finding(policy=policy, name=name, action=action, detected=True,
                                match=match)]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_blocked_in_each_kind_blocks_with_the_finding_reported(kind: str) -> None:
    make, policy, name, _ = KINDS[kind]
    verdict = classify(response("GUARDRAIL_INTERVENED", [assessment(**make("BLOCKED"))],
                                outputs=[{"text": BLOCKED_MESSAGE}],
                                reason="Guardrail blocked."))
    assert verdict.outcome is Outcome.BLOCK
    assert len(verdict.findings) == 1
    assert verdict.findings[0].policy == policy
    assert verdict.findings[0].name == name
    assert verdict.findings[0].action == "BLOCKED"
    assert verdict.outputs == (BLOCKED_MESSAGE,)
    assert verdict.detected_only == ()


def test_iter_findings_walks_every_assessment_in_order() -> None:
    first = merged(topic("NONE", detected=False), content_filter("NONE"))
    second = merged(pii("ANONYMIZED"), regex("BLOCKED"))
    third = assessment(**grounding("BLOCKED"))
    findings = list(iter_findings([first, second, third]))
    assert [(f.policy, f.action) for f in findings] == [
        ("topic", "NONE"),
        ("content", "NONE"),
        ("pii", "ANONYMIZED"),
        ("regex", "BLOCKED"),
        ("grounding", "BLOCKED"),
    ]


def test_iter_findings_order_within_an_assessment_follows_policy_order() -> None:
    everything = merged(*(make("NONE") for make, *_ in reversed(list(KINDS.values()))))
    policies = [f.policy for f in iter_findings([everything])]
    assert policies == ["topic", "content", "word", "managed_word", "pii", "regex",
                        "grounding"]


def test_iter_findings_keeps_every_entry_of_a_list() -> None:
    section = {"sensitiveInformationPolicy": {"piiEntities": [
        {"match": "jane.doe@example.com", "type": "EMAIL", "action": "ANONYMIZED",
         "detected": True},
        {"match": "+1 206 555 0100", "type": "PHONE", "action": "ANONYMIZED",
         "detected": True},
        {"match": "123-45-6789", "type": "US_SOCIAL_SECURITY_NUMBER", "action": "BLOCKED",
         "detected": True},
    ]}}
    findings = list(iter_findings([assessment(**section)]))
    assert [(f.name, f.action, f.match) for f in findings] == [
        ("EMAIL", "ANONYMIZED", "jane.doe@example.com"),
        ("PHONE", "ANONYMIZED", "+1 206 555 0100"),
        ("US_SOCIAL_SECURITY_NUMBER", "BLOCKED", "123-45-6789"),
    ]


def test_iter_findings_defaults_for_missing_members() -> None:
    section = {
        "topicPolicy": {"topics": [{}]},
        "sensitiveInformationPolicy": {"regexes": [{"action": "ANONYMIZED"}]},
        "wordPolicy": {"customWords": [{"action": "BLOCKED", "detected": False}]},
    }
    findings = list(iter_findings([section]))
    assert findings == [
        Finding(policy="topic", name="", action="NONE", detected=None, match=None),
        Finding(policy="word", name="custom", action="BLOCKED", detected=False, match=None),
        Finding(policy="regex", name="", action="ANONYMIZED", detected=None, match=None),
    ]


def test_iter_findings_is_lazy_and_empty_for_nothing() -> None:
    assert list(iter_findings([])) == []
    assert list(iter_findings([assessment()])) == []
    it = iter_findings([assessment(**topic("BLOCKED"))])
    assert next(it).policy == "topic"
    with pytest.raises(StopIteration):
        next(it)


def test_finding_and_verdict_are_frozen() -> None:
    verdict = classify(response("GUARDRAIL_INTERVENED", [assessment(**topic("BLOCKED"))]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.outcome = Outcome.PASS  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.findings[0].action = "NONE"  # type: ignore[misc]
    assert isinstance(verdict.findings, tuple)
    assert isinstance(verdict.outputs, tuple)


# --------------------------------------------------------------------------- detect mode


def test_detect_mode_passes_and_lists_detected_findings() -> None:
    body = response(
        "NONE",
        [merged(content_filter("NONE", detected=True),
                topic("NONE", detected=True),
                # outputScope FULL: checked but not detected; not a violation.
                pii("NONE", detected=False),
                regex("NONE", detected=None))],
        reason="No action.",
    )
    verdict = classify(body)
    assert verdict.outcome is Outcome.PASS
    assert verdict.action == "NONE"
    assert len(verdict.findings) == 4
    assert [(f.policy, f.name) for f in verdict.detected_only] == [
        ("topic", "Investment advice"),
        ("content", "VIOLENCE"),
    ]
    assert all(f.action == "NONE" and f.detected is True for f in verdict.detected_only)


def test_detect_mode_across_assessments() -> None:
    verdict = classify(response("NONE", [assessment(**managed_word("NONE")),
                                         assessment(**grounding("NONE"))]))
    assert verdict.outcome is Outcome.PASS
    assert [f.policy for f in verdict.detected_only] == ["managed_word", "grounding"]


def test_detected_only_excludes_acted_on_findings() -> None:
    verdict = classify(response("GUARDRAIL_INTERVENED",
                                [merged(topic("BLOCKED"), pii("ANONYMIZED"),
                                        content_filter("NONE", detected=True))]))
    assert verdict.outcome is Outcome.BLOCK
    assert [f.policy for f in verdict.detected_only] == ["content"]


def test_no_findings_means_nothing_detected() -> None:
    verdict = classify(response("NONE", [assessment()], reason="No action."))
    assert verdict.findings == ()
    assert verdict.detected_only == ()


# --------------------------------------------------------------------------- outputs, usage


def test_outputs_of_a_mask_are_the_rewritten_texts_in_order() -> None:
    verdict = classify(response(
        "GUARDRAIL_INTERVENED", [merged(pii("ANONYMIZED"), regex("ANONYMIZED"))],
        outputs=[{"text": "Mail {EMAIL}."}, {"text": "Ticket {TicketId}."}, {"text": ""}],
        reason="Guardrail masked.",
    ))
    assert verdict.outcome is Outcome.MASK
    assert verdict.outputs == ("Mail {EMAIL}.", "Ticket {TicketId}.", "")


def test_outputs_of_a_block_hold_the_canned_message() -> None:
    verdict = classify(response("GUARDRAIL_INTERVENED", [assessment(**topic("BLOCKED"))],
                                outputs=[{"text": BLOCKED_MESSAGE}]))
    assert verdict.outputs == (BLOCKED_MESSAGE,)


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        (None, ()),
        ([], ()),
        ([{"text": "a"}, "junk", None, 3, {"text": "b"}], ("a", "b")),
        ([{}], ("",)),
        ([{"text": 7}], ("7",)),
    ],
    ids=["null", "empty", "non-dict-entries-skipped", "missing-text", "non-str-text"],
)
def test_outputs_extraction(outputs: Any, expected: tuple[str, ...]) -> None:
    body = response("NONE", [])
    body["outputs"] = outputs
    assert classify(body).outputs == expected


def test_outputs_missing_key() -> None:
    body = response("NONE", [])
    del body["outputs"]
    assert classify(body).outputs == ()


def test_text_units_sums_every_units_member() -> None:
    verdict = classify(response("NONE", [], usage_={
        "topicPolicyUnits": 2,
        "contentPolicyUnits": 3,
        "wordPolicyUnits": 5,
        "sensitiveInformationPolicyUnits": 7,
        "sensitiveInformationPolicyFreeUnits": 11,
        "contextualGroundingPolicyUnits": 13,
        "contentPolicyImageUnits": 17,
        "automatedReasoningPolicyUnits": 19,
        "automatedReasoningPolicies": 1000,  # a policy count, not units
    }))
    assert verdict.text_units == 2 + 3 + 5 + 7 + 11 + 13 + 17 + 19
    assert verdict.usage["automatedReasoningPolicies"] == 1000
    assert verdict.usage["contentPolicyUnits"] == 3
    assert len(verdict.usage) == 9


def test_text_units_of_the_default_usage() -> None:
    assert classify(response("NONE", [])).text_units == 4
    assert classify(response("NONE", [], usage_=usage(contextualGroundingPolicyUnits=2))
                    ).text_units == 6


@pytest.mark.parametrize(
    ("raw", "units", "kept"),
    [
        (None, 0, {}),
        ({}, 0, {}),
        ({"topicPolicyUnits": "3", "wordPolicyUnits": 2}, 2, {"wordPolicyUnits": 2}),
        ({"topicPolicyUnits": 1.5, "contentPolicyUnits": 1}, 1, {"contentPolicyUnits": 1}),
        ({"topicPolicyUnits": None, "note": "x"}, 0, {}),
    ],
    ids=["null", "empty", "string-value-skipped", "float-value-skipped", "null-and-text"],
)
def test_usage_non_int_values_are_ignored(raw: Any, units: int, kept: dict[str, int]) -> None:
    body = response("NONE", [])
    body["usage"] = raw
    verdict = classify(body)
    assert verdict.text_units == units
    assert dict(verdict.usage) == kept


def test_usage_missing_key() -> None:
    body = response("NONE", [])
    del body["usage"]
    verdict = classify(body)
    assert verdict.text_units == 0
    assert dict(verdict.usage) == {}


def test_nested_invocation_metrics_usage_is_not_double_counted() -> None:
    verdict = classify(response("GUARDRAIL_INTERVENED",
                                [assessment(**topic("BLOCKED")), assessment()],
                                usage_=usage(topicPolicyUnits=1, contentPolicyUnits=0,
                                             wordPolicyUnits=0,
                                             sensitiveInformationPolicyUnits=0)))
    assert verdict.text_units == 1


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "assessments",
    [
        None,
        [],
        [None, "assessment", 7, 1.5, ["topicPolicy"], b"bytes"],
        [{"topicPolicy": None}, {"topicPolicy": "BLOCKED"}, {"topicPolicy": ["x"]}],
        [{"topicPolicy": {"topics": None}}, {"topicPolicy": {"topics": 3}},
         {"contentPolicy": {"filters": {"type": "VIOLENCE", "action": "BLOCKED"}}}],
        [{"topicPolicy": {"topics": "BLOCKED"}}, {"wordPolicy": {"customWords": b"BLOCKED"}}],
        [{"sensitiveInformationPolicy": {"piiEntities": [None, "BLOCKED", 5, ["BLOCKED"]]}}],
        [{"contextualGroundingPolicy": "BLOCKED", "wordPolicy": 0,
          "sensitiveInformationPolicy": []}],
    ],
    ids=["null", "empty", "non-dict-assessments", "non-dict-sections", "non-list-sections",
         "string-sections", "non-dict-entries", "mixed"],
)
@pytest.mark.parametrize("action", ["NONE", "GUARDRAIL_INTERVENED"])
def test_malformed_assessments_do_not_crash(assessments: Any, action: str) -> None:
    body = response(action, [])
    body["assessments"] = assessments
    verdict = classify(body)
    assert verdict.findings == ()
    # Nothing usable was found: NONE passes, an intervention fails safe.
    assert verdict.outcome is (Outcome.PASS if action == "NONE" else Outcome.BLOCK)


def test_malformed_entries_do_not_hide_valid_ones() -> None:
    body = response("GUARDRAIL_INTERVENED", [
        None,
        "junk",
        {"topicPolicy": "junk", "contentPolicy": {"filters": None}},
        {"sensitiveInformationPolicy": {"piiEntities": [None, 3, pii("ANONYMIZED")[
            "sensitiveInformationPolicy"]["piiEntities"][0]], "regexes": "junk"}},
    ], outputs=[{"text": "{EMAIL}"}])
    verdict = classify(body)
    assert verdict.outcome is Outcome.MASK
    assert [(f.policy, f.action) for f in verdict.findings] == [("pii", "ANONYMIZED")]


def test_malformed_blocked_entry_after_junk_still_blocks() -> None:
    body = response("GUARDRAIL_INTERVENED", [
        {"wordPolicy": {"customWords": ["junk", {"match": "x", "action": "BLOCKED"}],
                        "managedWordLists": 12}},
    ])
    verdict = classify(body)
    assert verdict.outcome is Outcome.BLOCK
    assert verdict.findings == (Finding("word", "custom", "BLOCKED", None, "x"),)


def test_tuple_assessments_accepted() -> None:
    body = response("GUARDRAIL_INTERVENED", [])
    body["assessments"] = (assessment(**topic("BLOCKED")),)
    assert classify(body).outcome is Outcome.BLOCK
