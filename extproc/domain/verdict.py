"""What an ApplyGuardrail answer means: pass, mask or block (bedrock.md, section A.3).

Pure: takes the parsed response dict boto3 returns, gives a ``GuardrailVerdict``. Must not
call AWS, log, or look at anything but the response. The rules, in order:

1. ``action == NONE`` passes, also when findings say ``detected`` (detect-only policies).
2. ``GUARDRAIL_INTERVENED`` and any finding in any assessment with ``action == BLOCKED`` is a
   hard block (topics, content filters, custom words, managed word lists, PII entities,
   regexes, contextual grounding: every assessment, every policy).
3. ``GUARDRAIL_INTERVENED`` with ``ANONYMIZED`` findings only is masking.
4. ``GUARDRAIL_INTERVENED`` with neither is a block: fail safe.

``actionReason`` is a hint only and never decides.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class Outcome(enum.Enum):
    PASS = "pass"
    MASK = "mask"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class Finding:
    """One policy entry of an assessment; ``match`` is the matched text (never logged)."""

    policy: str  # topic | content | word | managed_word | pii | regex | grounding
    name: str  # topic name, filter type, PII type, regex name, or "custom"/list type for words
    action: str  # BLOCKED | ANONYMIZED | NONE
    detected: bool | None
    match: str | None = None


@dataclass(frozen=True, slots=True)
class GuardrailVerdict:
    """The meaning of one ApplyGuardrail answer."""

    outcome: Outcome
    action: str
    findings: tuple[Finding, ...]
    outputs: tuple[str, ...]
    text_units: int
    usage: Mapping[str, int]
    #: ``guardrailCoverage.images.guarded``: the images the guardrail screened (fewer than were
    #: sent when its content filters do not have the image modality on); None when the answer
    #: says nothing about images.
    images_guarded: int | None = None

    @property
    def detected_only(self) -> tuple[Finding, ...]:
        """Findings that were detected but not acted on (detect mode)."""
        return tuple(f for f in self.findings if f.action == "NONE" and f.detected)


# (assessment key, list key, policy label, name field or None)
_FINDING_LISTS: tuple[tuple[str, str, str, str | None], ...] = (
    ("topicPolicy", "topics", "topic", "name"),
    ("contentPolicy", "filters", "content", "type"),
    ("wordPolicy", "customWords", "word", None),
    ("wordPolicy", "managedWordLists", "managed_word", "type"),
    ("sensitiveInformationPolicy", "piiEntities", "pii", "type"),
    ("sensitiveInformationPolicy", "regexes", "regex", "name"),
    ("contextualGroundingPolicy", "filters", "grounding", "type"),
)


def iter_findings(assessments: Sequence[Mapping[str, Any]]) -> Iterator[Finding]:
    """Every finding of every assessment, in a flat, typed form."""
    for assessment in assessments:
        if not isinstance(assessment, Mapping):
            continue
        for key, list_key, policy, name_field in _FINDING_LISTS:
            section = assessment.get(key)
            if not isinstance(section, Mapping):
                continue
            entries = section.get(list_key)
            if not isinstance(entries, Sequence):
                continue
            for entry in entries:
                if not isinstance(entry, Mapping):
                    continue
                name = str(entry.get(name_field, "")) if name_field else "custom"
                detected = entry.get("detected")
                match = entry.get("match")
                yield Finding(
                    policy=policy,
                    name=name,
                    action=str(entry.get("action", "NONE")),
                    detected=bool(detected) if detected is not None else None,
                    match=str(match) if match is not None else None,
                )


def _text_units(usage: Mapping[str, Any]) -> int:
    return sum(int(v) for k, v in usage.items() if k.endswith("Units") and isinstance(v, int))


def _images_guarded(response: Mapping[str, Any]) -> int | None:
    coverage = response.get("guardrailCoverage")
    images = coverage.get("images") if isinstance(coverage, Mapping) else None
    guarded = images.get("guarded") if isinstance(images, Mapping) else None
    return guarded if isinstance(guarded, int) and not isinstance(guarded, bool) else None


def classify(response: Mapping[str, Any]) -> GuardrailVerdict:
    """Classify a parsed ApplyGuardrail response (the dict boto3 returns)."""
    action = str(response.get("action", ""))
    assessments = response.get("assessments") or ()
    findings = tuple(iter_findings(assessments))
    outputs = tuple(
        str(o.get("text", "")) for o in (response.get("outputs") or ()) if isinstance(o, Mapping)
    )
    usage_raw = response.get("usage") or {}
    usage = {k: int(v) for k, v in usage_raw.items() if isinstance(v, int)}
    if action == "NONE":
        outcome = Outcome.PASS
    elif any(f.action == "BLOCKED" for f in findings):
        outcome = Outcome.BLOCK
    elif action == "GUARDRAIL_INTERVENED" and any(f.action == "ANONYMIZED" for f in findings):
        outcome = Outcome.MASK
    else:
        # Intervened with neither a block nor a mask finding, or an unknown action: fail safe.
        outcome = Outcome.BLOCK
    return GuardrailVerdict(
        outcome=outcome,
        action=action,
        findings=findings,
        outputs=outputs,
        text_units=_text_units(usage_raw),
        usage=usage,
        images_guarded=_images_guarded(response),
    )
