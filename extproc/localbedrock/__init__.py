"""Local ApplyGuardrail-compatible endpoint ("local-bedrock"): public API.

An embedded stand-in for AWS Bedrock's ``ApplyGuardrail`` (rest-json, parsed by boto3's unmodified
``bedrock-runtime`` client) driven by a small YAML guardrail policy, with knobs for latency and
error injection. Used as the default backend of the demo and by the tests.

    from extproc.localbedrock import LocalBedrock, default_policy
    with LocalBedrock(default_policy()) as lb:
        client = boto3.client("bedrock-runtime", endpoint_url=lb.url, region_name="us-east-1",
                              aws_access_key_id="x", aws_secret_access_key="x")
        client.apply_guardrail(guardrailIdentifier="demo", guardrailVersion="DRAFT",
                               source="INPUT", content=[{"text": {"text": "hello"}}])
"""

from __future__ import annotations

from .policy import (
    ACTION_REASON_BLOCKED,
    ACTION_REASON_MASKED,
    ACTION_REASON_NONE,
    BUILTIN_PII_PATTERNS,
    ContentFilterRule,
    Evaluation,
    PiiRule,
    Policy,
    PolicyError,
    RegexRule,
    SourcePolicy,
    TopicRule,
    WordRule,
    default_policy,
    default_policy_text,
    load_policy,
    parse_policy,
    text_units,
)
from .server import (
    DEFAULT_ERROR_MARKER_PREFIX,
    DEFAULT_MAX_TEXT_UNITS_PER_CALL,
    ERROR_KINDS,
    ErrorInjection,
    LocalBedrock,
    RecordedCall,
    Stats,
    error_marker,
)

__all__ = [
    "ACTION_REASON_BLOCKED",
    "ACTION_REASON_MASKED",
    "ACTION_REASON_NONE",
    "BUILTIN_PII_PATTERNS",
    "DEFAULT_ERROR_MARKER_PREFIX",
    "DEFAULT_MAX_TEXT_UNITS_PER_CALL",
    "ERROR_KINDS",
    "ContentFilterRule",
    "ErrorInjection",
    "Evaluation",
    "LocalBedrock",
    "PiiRule",
    "Policy",
    "PolicyError",
    "RecordedCall",
    "RegexRule",
    "SourcePolicy",
    "Stats",
    "TopicRule",
    "WordRule",
    "default_policy",
    "default_policy_text",
    "error_marker",
    "load_policy",
    "parse_policy",
    "text_units",
]
