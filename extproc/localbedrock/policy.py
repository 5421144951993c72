"""Guardrail policy model and evaluation engine of the local ApplyGuardrail endpoint.

This module owns:

* the policy file format (YAML) and its parsing/validation into frozen dataclasses
  (:class:`Policy`, :class:`SourcePolicy` and the rule classes);
* the built-in PII detectors (EMAIL, PHONE, US_SOCIAL_SECURITY_NUMBER,
  CREDIT_DEBIT_CARD_NUMBER, IP_ADDRESS, AWS_ACCESS_KEY);
* the evaluation of one ApplyGuardrail call (:meth:`Policy.evaluate`), producing the
  ``action`` / ``actionReason`` / ``outputs`` / assessment / ``usage`` members with the verdict
  semantics of the real service as described in ``docs/bedrock.md`` A.3 and the text-unit
  accounting of A.6.

It knows nothing about HTTP; :mod:`extproc.localbedrock.server` wraps it.

Policy file format::

    guardrail_ids: ["*"]            # ids served ("*" or absent = any); ARNs are reduced to the id
    guardrail_versions: ["*"]       # optional, versions served ("*" or absent = any)
    blocked_input_message: "..."    # canned message returned on an INPUT block
    blocked_output_message: "..."   # canned message returned on an OUTPUT block
    omit_mask_findings_on_block: true   # drop ANONYMIZED findings from a blocked verdict
    report_applied_guardrail_details: false
    both:   {<rules>}               # rules applied to INPUT and OUTPUT
    input:  {<rules>}               # INPUT only (an entry with the same key overrides ``both``)
    output: {<rules>}               # OUTPUT only

    <rules>:
      words: ["bazinga", {word: "foo bar", action: NONE}]
      topics: [{name: financial-advice, phrases: ["buy this stock"], action: BLOCKED}]
      content_filters: [{type: PROMPT_ATTACK, phrases: [...], action: BLOCKED, strength: HIGH}]
      pii: [{type: EMAIL, action: ANONYMIZED}, {type: NAME, action: BLOCKED, pattern: "..."}]
      regexes: [{name: TicketId, pattern: "TKT-[0-9]{6}", action: ANONYMIZED}]
      images: [{sha256: "<hex digest of the image bytes>", type: VIOLENCE, action: BLOCKED},
               {png_text: "a marker in a PNG tEXt/iTXt chunk", type: HATE}]

Images (``image`` content blocks) are judged by the ``images`` rules only, as Bedrock's image
content filters judge pictures: a rule matches an image by the SHA-256 of its bytes or by a text
in its PNG text chunks, and reports a content filter finding of its ``type``. A source with
``images`` rules has the image modality on: its images are guarded (``guardrailCoverage.images``)
and billed (``usage.contentPolicyImageUnits``, one per image); without, they are counted in
``total`` but not guarded, as on a guardrail whose content filters are text-only.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

__all__ = [
    "ACTION_REASON_BLOCKED",
    "ACTION_REASON_MASKED",
    "ACTION_REASON_NONE",
    "BUILTIN_PII_PATTERNS",
    "CONTENT_FILTER_TYPES",
    "DEFAULT_BLOCKED_MESSAGE",
    "PII_ENTITY_TYPES",
    "ContentFilterRule",
    "Evaluation",
    "ImageRule",
    "PiiRule",
    "Policy",
    "PolicyError",
    "RegexRule",
    "SourcePolicy",
    "TopicRule",
    "WordRule",
    "default_policy",
    "default_policy_text",
    "load_policy",
    "parse_policy",
    "png_texts",
    "text_units",
]

ACTION_REASON_NONE = "No action."
ACTION_REASON_BLOCKED = "Guardrail blocked."
ACTION_REASON_MASKED = "Guardrail masked."
DEFAULT_BLOCKED_MESSAGE = "Sorry, the model cannot answer this question."

SOURCES = ("INPUT", "OUTPUT")
CONTENT_FILTER_TYPES = ("INSULTS", "HATE", "SEXUAL", "VIOLENCE", "MISCONDUCT", "PROMPT_ATTACK")
FILTER_STRENGTHS = ("NONE", "LOW", "MEDIUM", "HIGH")
BLOCK_ACTIONS = ("BLOCKED", "NONE")  # words, topics, content filters
SENSITIVE_ACTIONS = ("ANONYMIZED", "BLOCKED", "NONE")  # PII entities and regexes
# GuardrailPiiEntityType enum of the bedrock-runtime service model (botocore 1.44.5).
PII_ENTITY_TYPES = (
    "ADDRESS", "AGE", "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "CA_HEALTH_NUMBER",
    "CA_SOCIAL_INSURANCE_NUMBER", "CREDIT_DEBIT_CARD_CVV", "CREDIT_DEBIT_CARD_EXPIRY",
    "CREDIT_DEBIT_CARD_NUMBER", "DRIVER_ID", "EMAIL", "INTERNATIONAL_BANK_ACCOUNT_NUMBER",
    "IP_ADDRESS", "LICENSE_PLATE", "MAC_ADDRESS", "NAME", "PASSWORD", "PHONE", "PIN",
    "SWIFT_CODE", "UK_NATIONAL_HEALTH_SERVICE_NUMBER", "UK_NATIONAL_INSURANCE_NUMBER",
    "UK_UNIQUE_TAXPAYER_REFERENCE_NUMBER", "URL", "USERNAME", "US_BANK_ACCOUNT_NUMBER",
    "US_BANK_ROUTING_NUMBER", "US_INDIVIDUAL_TAX_IDENTIFICATION_NUMBER", "US_PASSPORT_NUMBER",
    "US_SOCIAL_SECURITY_NUMBER", "VEHICLE_IDENTIFICATION_NUMBER",
)

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
#: Built-in detectors for the PII types that need no ``pattern`` in the policy file.
BUILTIN_PII_PATTERNS: Mapping[str, str] = MappingProxyType({
    "EMAIL": (
        r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])"
    ),
    "PHONE": (
        r"(?<![\w+])(?:\+?1[ .-]?)?(?:\([0-9]{3}\)|[0-9]{3})[ .-]?[0-9]{3}[ .-]?[0-9]{4}(?!\w)"
        r"|(?<![\w+])\+[2-9][0-9]{0,2}(?:[ .-]?[0-9]{2,4}){2,4}(?!\w)"
    ),
    "US_SOCIAL_SECURITY_NUMBER": (
        r"(?<![\w-])(?!000|666|9[0-9]{2})[0-9]{3}([- ])(?!00)[0-9]{2}\1(?!0000)[0-9]{4}(?![\w-])"
    ),
    "CREDIT_DEBIT_CARD_NUMBER": r"(?<![\w-])[0-9](?:[ -]?[0-9]){12,18}(?![\w-])",
    "IP_ADDRESS": rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?[\w])",
    "AWS_ACCESS_KEY": r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])",
})


def _luhn_ok(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


_BUILTIN_VALIDATORS: Mapping[str, Callable[[str], bool]] = MappingProxyType(
    {"CREDIT_DEBIT_CARD_NUMBER": _luhn_ok})


class PolicyError(ValueError):
    """The policy file (or mapping) is malformed."""


def text_units(text: str) -> int:
    """Text units billed for one content block: one per started 1,000 characters (A.6)."""
    return math.ceil(len(text) / 1000)


def _phrase_regex(phrase: str) -> re.Pattern[str]:
    """Case-insensitive, word-boundary match; inner whitespace matches any whitespace run."""
    tokens = phrase.split()
    if not tokens:
        raise PolicyError(f"empty word/phrase {phrase!r}")
    body = r"\s+".join(re.escape(t) for t in tokens)
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise PolicyError(f"{what}: invalid regular expression {pattern!r}: {exc}") from exc


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class WordRule:
    """A custom blocked word or phrase (word policy)."""

    word: str
    action: str = "BLOCKED"
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_choice(self.action, BLOCK_ACTIONS, f"word {self.word!r} action")
        object.__setattr__(self, "_regex", _phrase_regex(self.word))

    @property
    def key(self) -> str:
        return " ".join(self.word.lower().split())

    def find(self, text: str) -> list[re.Match[str]]:
        return list(self._regex.finditer(text))


@dataclass(frozen=True)
class TopicRule:
    """A deny topic, detected by any of its example phrases (topic policy)."""

    name: str
    phrases: tuple[str, ...]
    action: str = "BLOCKED"
    _regexes: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_choice(self.action, BLOCK_ACTIONS, f"topic {self.name!r} action")
        if not self.phrases:
            raise PolicyError(f"topic {self.name!r} has no phrases")
        object.__setattr__(self, "_regexes", tuple(_phrase_regex(p) for p in self.phrases))

    @property
    def key(self) -> str:
        return self.name

    def detected(self, text: str) -> bool:
        return any(r.search(text) for r in self._regexes)


@dataclass(frozen=True)
class ContentFilterRule:
    """A content filter category, detected by any of its trigger phrases (content policy)."""

    type: str
    phrases: tuple[str, ...]
    action: str = "BLOCKED"
    strength: str = "HIGH"
    _regexes: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_choice(self.type, CONTENT_FILTER_TYPES, "content filter type")
        _check_choice(self.action, BLOCK_ACTIONS, f"content filter {self.type} action")
        _check_choice(self.strength, FILTER_STRENGTHS, f"content filter {self.type} strength")
        if not self.phrases:
            raise PolicyError(f"content filter {self.type} has no phrases")
        object.__setattr__(self, "_regexes", tuple(_phrase_regex(p) for p in self.phrases))

    @property
    def key(self) -> str:
        return self.type

    def detected(self, text: str) -> bool:
        return any(r.search(text) for r in self._regexes)


@dataclass(frozen=True)
class PiiRule:
    """A PII entity type with its action; ``pattern`` overrides the built-in detector."""

    type: str
    action: str = "ANONYMIZED"
    pattern: str | None = None
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _validator: Callable[[str], bool] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_choice(self.type, PII_ENTITY_TYPES, "pii type")
        _check_choice(self.action, SENSITIVE_ACTIONS, f"pii {self.type} action")
        if self.pattern is not None:
            object.__setattr__(self, "_regex", _compile(self.pattern, f"pii {self.type}"))
            object.__setattr__(self, "_validator", None)
        elif self.type in BUILTIN_PII_PATTERNS:
            object.__setattr__(self, "_regex", re.compile(BUILTIN_PII_PATTERNS[self.type]))
            object.__setattr__(self, "_validator", _BUILTIN_VALIDATORS.get(self.type))
        else:
            raise PolicyError(
                f"pii type {self.type} has no built-in detector; give it a `pattern` "
                f"(built-in: {', '.join(sorted(BUILTIN_PII_PATTERNS))})"
            )

    @property
    def key(self) -> str:
        return self.type

    def find(self, text: str) -> list[re.Match[str]]:
        found = [m for m in self._regex.finditer(text) if m.end() > m.start()]
        if self._validator is not None:
            found = [m for m in found if self._validator(m.group(0))]
        return found


@dataclass(frozen=True)
class RegexRule:
    """A custom regex of the sensitive-information policy; ``{name}`` is its mask placeholder."""

    name: str
    pattern: str
    action: str = "ANONYMIZED"
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise PolicyError("regex without a name")
        _check_choice(self.action, SENSITIVE_ACTIONS, f"regex {self.name!r} action")
        object.__setattr__(self, "_regex", _compile(self.pattern, f"regex {self.name!r}"))

    @property
    def key(self) -> str:
        return self.name

    def find(self, text: str) -> list[re.Match[str]]:
        return [m for m in self._regex.finditer(text) if m.end() > m.start()]


def png_texts(data: bytes, limit: int = 64) -> list[str]:
    """The texts of a PNG's ``tEXt``, ``zTXt`` and ``iTXt`` chunks (at most ``limit`` chunks,
    each inflated to at most 64 KiB); an empty list for anything else or a broken chunk walk."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return []
    texts: list[str] = []
    pos = 8
    while pos + 8 <= len(data) and len(texts) < limit:
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length:
            break
        pos += 12 + length
        _, sep, rest = body.partition(b"\x00")
        if not sep:
            continue
        try:
            if kind == b"tEXt":
                texts.append(rest.decode("latin-1"))
            elif kind == b"zTXt" and rest[:1] == b"\x00":
                texts.append(zlib.decompressobj().decompress(rest[1:], 65536).decode("latin-1"))
            elif kind == b"iTXt" and len(rest) >= 2:
                compressed, text = rest[0], rest[2:].split(b"\x00", 2)
                if len(text) == 3:
                    value = text[2]
                    if compressed:
                        value = zlib.decompressobj().decompress(value, 65536)
                    texts.append(value.decode("utf-8", "replace"))
        except zlib.error:
            continue
        if kind == b"IEND":
            break
    return texts


@dataclass(frozen=True)
class ImageRule:
    """An image content filter finding for images with this SHA-256, or PNG text."""

    type: str = "VIOLENCE"
    sha256: str | None = None
    png_text: str | None = None
    action: str = "BLOCKED"
    strength: str = "HIGH"

    def __post_init__(self) -> None:
        _check_choice(self.type, CONTENT_FILTER_TYPES, "image rule type")
        _check_choice(self.action, BLOCK_ACTIONS, "image rule action")
        _check_choice(self.strength, FILTER_STRENGTHS, "image rule strength")
        if (self.sha256 is None) == (self.png_text is None):
            raise PolicyError("an image rule needs exactly one of sha256, png_text")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise PolicyError(f"image rule sha256 {self.sha256!r} is not 64 lower-case hex digits")

    @property
    def key(self) -> str:
        return f"sha256:{self.sha256}" if self.sha256 is not None else f"png_text:{self.png_text}"

    def detected(self, data: bytes, digest: str, texts: Sequence[str]) -> bool:
        if self.sha256 is not None:
            return digest == self.sha256
        marker = self.png_text or ""
        return any(marker in text for text in texts)


@dataclass(frozen=True)
class SourcePolicy:
    """The effective rules for one source (INPUT or OUTPUT)."""

    words: tuple[WordRule, ...] = ()
    topics: tuple[TopicRule, ...] = ()
    content_filters: tuple[ContentFilterRule, ...] = ()
    pii: tuple[PiiRule, ...] = ()
    regexes: tuple[RegexRule, ...] = ()
    images: tuple[ImageRule, ...] = ()

    @property
    def enabled_policies(self) -> frozenset[str]:
        """Usage member names of the policies this source evaluates (and bills)."""
        enabled: set[str] = set()
        if self.topics:
            enabled.add("topicPolicyUnits")
        if self.content_filters:
            enabled.add("contentPolicyUnits")
        if self.words:
            enabled.add("wordPolicyUnits")
        if self.pii or self.regexes:
            enabled.add("sensitiveInformationPolicyUnits")
        return frozenset(enabled)

    @property
    def quota_policy_name(self) -> str:
        """Name used in quota error messages: the first enabled policy, content filter first."""
        for attr, label in (
            ("content_filters", "content filter"),
            ("topics", "denied topic"),
            ("pii", "sensitive information filter"),
            ("regexes", "sensitive information filter"),
            ("words", "word filter"),
        ):
            if getattr(self, attr):
                return label
        return "content filter"


# --------------------------------------------------------------------------- evaluation

USAGE_KEYS = (
    "topicPolicyUnits",
    "contentPolicyUnits",
    "wordPolicyUnits",
    "sensitiveInformationPolicyUnits",
    "sensitiveInformationPolicyFreeUnits",
    "contextualGroundingPolicyUnits",
)


@dataclass(frozen=True)
class Evaluation:
    """The verdict for one call, in ApplyGuardrailResponse terms (JSON-ready values)."""

    action: str
    action_reason: str
    outputs: tuple[str, ...]
    policies: Mapping[str, Any]  # assessment members: topicPolicy, contentPolicy, ...
    usage: Mapping[str, int]
    characters_total: int
    characters_guarded: int
    text_units: int  # sum over blocks of ceil(len/1000), not multiplied by policies
    images_total: int = 0
    images_guarded: int = 0

    @property
    def blocked(self) -> bool:
        return self.action == "GUARDRAIL_INTERVENED" and self.action_reason == ACTION_REASON_BLOCKED

    @property
    def masked(self) -> bool:
        return self.action == "GUARDRAIL_INTERVENED" and self.action_reason == ACTION_REASON_MASKED


def _mask(text: str, spans: list[tuple[int, int, str]]) -> str:
    """Replace non-overlapping spans (earliest start, then longest, wins) by ``{placeholder}``."""
    spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    out: list[str] = []
    pos = 0
    for start, end, placeholder in spans:
        if start < pos:
            continue
        out.append(text[pos:start])
        out.append("{" + placeholder + "}")
        pos = end
    out.append(text[pos:])
    return "".join(out)


@dataclass(frozen=True)
class Policy:
    """A guardrail: the ids it answers for, canned messages and per-source rules."""

    input: SourcePolicy = SourcePolicy()
    output: SourcePolicy = SourcePolicy()
    guardrail_ids: tuple[str, ...] = ("*",)
    guardrail_versions: tuple[str, ...] = ("*",)
    blocked_input_message: str = DEFAULT_BLOCKED_MESSAGE
    blocked_output_message: str = DEFAULT_BLOCKED_MESSAGE
    omit_mask_findings_on_block: bool = True
    report_applied_guardrail_details: bool = False
    name: str = "local"

    def for_source(self, source: str) -> SourcePolicy:
        if source == "INPUT":
            return self.input
        if source == "OUTPUT":
            return self.output
        raise ValueError(f"unknown source {source!r}")

    def blocked_message(self, source: str) -> str:
        return self.blocked_input_message if source == "INPUT" else self.blocked_output_message

    def serves(self, guardrail_id: str, version: str) -> bool:
        """True when this policy answers for ``guardrail_id`` (bare id) and ``version``."""
        ids_ok = "*" in self.guardrail_ids or guardrail_id in self.guardrail_ids
        versions_ok = "*" in self.guardrail_versions or version in self.guardrail_versions
        return ids_ok and versions_ok

    def evaluate(self, source: str, texts: Sequence[str], *,
                 full_scope: bool = False, images: Sequence[bytes] = ()) -> Evaluation:
        """Apply the ``source`` rules to all content blocks and return the verdict.

        Semantics (docs/bedrock.md A.3): any BLOCKED finding -> GUARDRAIL_INTERVENED,
        "Guardrail blocked.", one output with the canned message; else any ANONYMIZED finding ->
        GUARDRAIL_INTERVENED, "Guardrail masked.", one rewritten output per block; else
        (nothing, or detect-only findings with action NONE) -> NONE, "No action.", no outputs.
        ``images``: the bytes of the image blocks, judged by the ``images`` rules (a masked
        verdict's outputs are the text blocks' only).
        ``full_scope`` (outputScope=FULL) also lists configured topics and content filters that
        were not detected (``detected: false``); like AWS, not words or regexes.
        """
        rules = self.for_source(source)
        topics: dict[str, dict[str, Any]] = {}
        filters: dict[str, dict[str, Any]] = {}
        words: list[dict[str, Any]] = []
        pii: list[dict[str, Any]] = []
        regexes: list[dict[str, Any]] = []
        masked_texts: list[str] = []
        any_masked = False

        for text in texts:
            for topic in rules.topics:
                if topic.name not in topics and topic.detected(text):
                    topics[topic.name] = {
                        "name": topic.name, "type": "DENY", "action": topic.action,
                        "detected": True,
                    }
            for cf in rules.content_filters:
                if cf.type not in filters and cf.detected(text):
                    filters[cf.type] = {
                        "type": cf.type, "confidence": "HIGH", "filterStrength": cf.strength,
                        "action": cf.action, "detected": True,
                    }
            for word in rules.words:
                for m in word.find(text):
                    words.append({"match": m.group(0), "action": word.action, "detected": True})
            spans: list[tuple[int, int, str]] = []
            for rule in rules.pii:
                for m in rule.find(text):
                    pii.append({"match": m.group(0), "type": rule.type, "action": rule.action,
                                "detected": True})
                    if rule.action == "ANONYMIZED":
                        spans.append((m.start(), m.end(), rule.type))
            for rx in rules.regexes:
                for m in rx.find(text):
                    regexes.append({
                        "name": rx.name, "match": m.group(0), "regex": rx.pattern,
                        "action": rx.action, "detected": True,
                    })
                    if rx.action == "ANONYMIZED":
                        spans.append((m.start(), m.end(), rx.name))
            any_masked = any_masked or bool(spans)
            masked_texts.append(_mask(text, spans) if spans else text)

        for data in images if rules.images else ():
            digest = hashlib.sha256(data).hexdigest()
            chunks = png_texts(data)
            for image_rule in rules.images:
                if image_rule.detected(data, digest, chunks):
                    entry = filters.get(image_rule.type)
                    if entry is None or (entry["action"] == "NONE"
                                         and image_rule.action == "BLOCKED"):
                        filters[image_rule.type] = {
                            "type": image_rule.type, "confidence": "HIGH",
                            "filterStrength": image_rule.strength,
                            "action": image_rule.action, "detected": True,
                        }

        found = [*topics.values(), *filters.values(), *words, *pii, *regexes]
        any_blocked = any(f["action"] == "BLOCKED" for f in found)

        if full_scope:
            for topic in rules.topics:
                topics.setdefault(topic.name, {"name": topic.name, "type": "DENY", "action": "NONE",
                                               "detected": False})
            for cf in rules.content_filters:
                filters.setdefault(cf.type, {
                    "type": cf.type, "confidence": "NONE", "filterStrength": cf.strength,
                    "action": "NONE", "detected": False,
                })

        if any_blocked:
            action, reason = "GUARDRAIL_INTERVENED", ACTION_REASON_BLOCKED
            outputs: tuple[str, ...] = (self.blocked_message(source),)
            if self.omit_mask_findings_on_block:
                pii = [f for f in pii if f["action"] != "ANONYMIZED"]
                regexes = [f for f in regexes if f["action"] != "ANONYMIZED"]
        elif any_masked:
            action, reason = "GUARDRAIL_INTERVENED", ACTION_REASON_MASKED
            outputs = tuple(masked_texts)
        else:
            action, reason = "NONE", ACTION_REASON_NONE
            outputs = ()

        policies: dict[str, Any] = {}
        if topics:
            policies["topicPolicy"] = {"topics": list(topics.values())}
        if filters:
            policies["contentPolicy"] = {"filters": list(filters.values())}
        if words:
            policies["wordPolicy"] = {"customWords": words, "managedWordLists": []}
        if pii or regexes:
            policies["sensitiveInformationPolicy"] = {"piiEntities": pii, "regexes": regexes}

        units = sum(text_units(t) for t in texts)
        enabled = rules.enabled_policies
        usage = {key: (units if key in enabled else 0) for key in USAGE_KEYS}
        guarded_images = len(images) if rules.images else 0
        if images:
            usage["contentPolicyImageUnits"] = guarded_images
        chars = sum(len(t) for t in texts)
        return Evaluation(
            action=action,
            action_reason=reason,
            outputs=outputs,
            policies=policies,
            usage=usage,
            characters_total=chars,
            characters_guarded=chars,
            text_units=units,
            images_total=len(images),
            images_guarded=guarded_images,
        )


# --------------------------------------------------------------------------- parsing

_RULE_KEYS = ("words", "topics", "content_filters", "pii", "regexes", "images")
_TOP_KEYS = frozenset({
    "name", "guardrail_ids", "guardrail_versions", "blocked_input_message",
    "blocked_output_message", "omit_mask_findings_on_block", "report_applied_guardrail_details",
    "input", "output", "both",
})


def _check_choice(value: object, choices: Iterable[str], what: str) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise PolicyError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def _check_keys(entry: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    unknown = set(entry) - set(allowed)
    if unknown:
        raise PolicyError(f"{what}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")


def _as_list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{what} must be a list")
    return value


def _as_mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(f"{what} must be a mapping, got {type(value).__name__}")
    return value


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    items = _as_list(value, what)
    if not all(isinstance(i, str) and i for i in items):
        raise PolicyError(f"{what} must be a list of non-empty strings")
    return tuple(items)


def _action(entry: Mapping[str, Any], default: str) -> str:
    value = entry.get("action", default)
    return str(value).upper() if isinstance(value, str) else value


def _parse_rules(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    """Parse one rules section into {kind: {key: rule}} (ordered)."""
    section = _as_mapping(raw if raw is not None else {}, where)
    _check_keys(section, _RULE_KEYS, where)
    out: dict[str, dict[str, Any]] = {k: {} for k in _RULE_KEYS}
    try:
        for i, item in enumerate(_as_list(section.get("words"), f"{where}.words")):
            if isinstance(item, str):
                rule = WordRule(item)
            else:
                entry = _as_mapping(item, f"{where}.words[{i}]")
                _check_keys(entry, ("word", "action"), f"{where}.words[{i}]")
                if not isinstance(entry.get("word"), str):
                    raise PolicyError(f"{where}.words[{i}] needs `word`")
                rule = WordRule(entry["word"], _action(entry, "BLOCKED"))
            out["words"][rule.key] = rule
        for i, item in enumerate(_as_list(section.get("topics"), f"{where}.topics")):
            entry = _as_mapping(item, f"{where}.topics[{i}]")
            _check_keys(entry, ("name", "phrases", "action"), f"{where}.topics[{i}]")
            if not isinstance(entry.get("name"), str) or not entry["name"]:
                raise PolicyError(f"{where}.topics[{i}] needs `name`")
            topic = TopicRule(
                entry["name"], _str_tuple(entry.get("phrases"), f"{where}.topics[{i}].phrases"),
                _action(entry, "BLOCKED"),
            )
            out["topics"][topic.key] = topic
        filters = _as_list(section.get("content_filters"), f"{where}.content_filters")
        for i, item in enumerate(filters):
            entry = _as_mapping(item, f"{where}.content_filters[{i}]")
            _check_keys(entry, ("type", "phrases", "action", "strength"),
                        f"{where}.content_filters[{i}]")
            cf = ContentFilterRule(
                str(entry.get("type", "")).upper(),
                _str_tuple(entry.get("phrases"), f"{where}.content_filters[{i}].phrases"),
                _action(entry, "BLOCKED"),
                str(entry.get("strength", "HIGH")).upper(),
            )
            out["content_filters"][cf.key] = cf
        for i, item in enumerate(_as_list(section.get("pii"), f"{where}.pii")):
            entry = _as_mapping(item, f"{where}.pii[{i}]")
            _check_keys(entry, ("type", "action", "pattern"), f"{where}.pii[{i}]")
            pattern = entry.get("pattern")
            if pattern is not None and not isinstance(pattern, str):
                raise PolicyError(f"{where}.pii[{i}].pattern must be a string")
            pr = PiiRule(str(entry.get("type", "")).upper(), _action(entry, "ANONYMIZED"), pattern)
            out["pii"][pr.key] = pr
        for i, item in enumerate(_as_list(section.get("regexes"), f"{where}.regexes")):
            entry = _as_mapping(item, f"{where}.regexes[{i}]")
            _check_keys(entry, ("name", "pattern", "action"), f"{where}.regexes[{i}]")
            if not isinstance(entry.get("pattern"), str):
                raise PolicyError(f"{where}.regexes[{i}] needs `pattern`")
            rx = RegexRule(str(entry.get("name", "")), entry["pattern"],
                           _action(entry, "ANONYMIZED"))
            out["regexes"][rx.key] = rx
        for i, item in enumerate(_as_list(section.get("images"), f"{where}.images")):
            entry = _as_mapping(item, f"{where}.images[{i}]")
            _check_keys(entry, ("type", "sha256", "png_text", "action", "strength"),
                        f"{where}.images[{i}]")
            digest, marker = entry.get("sha256"), entry.get("png_text")
            if (digest is not None and not isinstance(digest, str)) or (
                    marker is not None and (not isinstance(marker, str) or not marker)):
                raise PolicyError(f"{where}.images[{i}]: sha256 and png_text are strings")
            image_rule = ImageRule(str(entry.get("type", "VIOLENCE")).upper(),
                                   digest.lower() if digest is not None else None, marker,
                                   _action(entry, "BLOCKED"),
                                   str(entry.get("strength", "HIGH")).upper())
            out["images"][image_rule.key] = image_rule
    except PolicyError as exc:
        if str(exc).startswith(where):
            raise
        raise PolicyError(f"{where}: {exc}") from exc
    return out


def _merge(both: Mapping[str, Mapping[str, Any]],
           specific: Mapping[str, Mapping[str, Any]]) -> SourcePolicy:
    merged = {kind: tuple({**both[kind], **specific[kind]}.values()) for kind in _RULE_KEYS}
    return SourcePolicy(**merged)


def parse_policy(data: Mapping[str, Any] | None) -> Policy:
    """Build a :class:`Policy` from a parsed YAML/JSON mapping; raises :class:`PolicyError`."""
    data = _as_mapping(data if data is not None else {}, "policy")
    _check_keys(data, _TOP_KEYS, "policy")
    both = _parse_rules(data.get("both"), "both")
    inp = _merge(both, _parse_rules(data.get("input"), "input"))
    out = _merge(both, _parse_rules(data.get("output"), "output"))
    ids = (_str_tuple(data["guardrail_ids"], "guardrail_ids")
           if data.get("guardrail_ids") is not None else ("*",))
    versions_raw = data.get("guardrail_versions")
    versions = (tuple(str(v) for v in _as_list(versions_raw, "guardrail_versions"))
                if versions_raw is not None else ("*",))
    kwargs: dict[str, Any] = {}
    for key in ("blocked_input_message", "blocked_output_message", "name"):
        if key in data:
            if not isinstance(data[key], str) or not data[key]:
                raise PolicyError(f"{key} must be a non-empty string")
            kwargs[key] = data[key]
    for key in ("omit_mask_findings_on_block", "report_applied_guardrail_details"):
        if key in data:
            if not isinstance(data[key], bool):
                raise PolicyError(f"{key} must be true or false")
            kwargs[key] = data[key]
    return Policy(
        input=inp,
        output=out,
        guardrail_ids=ids or ("*",),
        guardrail_versions=versions or ("*",),
        **kwargs,
    )


def load_policy(path: str | Path) -> Policy:
    """Load and validate a YAML policy file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PolicyError(f"{p}: invalid YAML: {exc}") from exc
    try:
        policy = parse_policy(data)
    except PolicyError as exc:
        raise PolicyError(f"{p}: {exc}") from exc
    named = isinstance(data, Mapping) and "name" in data
    return policy if named else replace(policy, name=p.stem)


def default_policy_text() -> str:
    """The packaged demo policy file (``default_policy.yaml``) as text."""
    return resources.files(__package__).joinpath("default_policy.yaml").read_text(encoding="utf-8")


def default_policy() -> Policy:
    """The packaged demo policy (see ``default_policy.yaml`` for what each entry demonstrates)."""
    return parse_policy(yaml.safe_load(default_policy_text()))
