"""The audit trail: one structured record per guardrail intervention, on the ``extproc.audit``
logger (kept at INFO by ``extproc.observe.logs.configure_logging`` whatever ``--log-level`` says).

An intervention is a block, a mask, or in shadow mode a would-be block or mask, of a prompt
(source ``input``) or an answer (``output``). The stream code calls ``AuditLog.record`` once
at the point where it acts on the verdict; the record says which guardrail decided, what it
found (policy type, name, action), how much of the answer the client already had, which window
tripped, and which request, route and format it was::

    {"event": "guardrail_intervention", "timestamp": "2025-06-01T12:00:00.123Z",
     "outcome": "block", "source": "output", "guardrail_id": "gr1", "guardrail_version": "3",
     "findings": [{"policy": "word", "name": "custom", "action": "BLOCKED"}],
     "chars_released": 76, "tripped_window": "0:40-200", "text_units": 1,
     "request_id": "5f0c…", "route": "default", "format": "openai_chat", "stream": "s12"}

Matched text is never part of a record unless ``include_matches`` is on, and then only its
first and last character (``j***m``). Must not see prompts or answers otherwise, and must not
decide anything. Envoy gets the same facts as dynamic metadata (``finding_key`` builds the
summary the stream puts there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

from extproc.domain.verdict import Finding, GuardrailVerdict
from extproc.observe.logs import AUDIT_LOGGER, iso_timestamp

LOGGER_NAME: Final = AUDIT_LOGGER
EVENT: Final = "guardrail_intervention"

#: The outcomes a record can have.
OUTCOMES: Final = frozenset({
    "block", "soft_block", "mask", "mask_unapplied", "shadow_would_block", "shadow_would_mask",
})


def redact(match: str) -> str:
    """Matched text cut to its first and last character; short matches entirely starred."""
    if len(match) <= 2:
        return "*" * len(match)
    return f"{match[0]}***{match[-1]}"


def finding_action(finding: Finding) -> str:
    """Bedrock's action, or ``DETECTED`` for a detect-only finding (action NONE, detected)."""
    if finding.action == "NONE" and finding.detected:
        return "DETECTED"
    return finding.action


def reported(finding: Finding) -> bool:
    """A finding worth reporting: acted on, or detected."""
    return finding.action != "NONE" or bool(finding.detected)


def finding_key(finding: Finding) -> str:
    """``policy:name:ACTION`` for Envoy's metadata summary (commas in names replaced)."""
    name = finding.name.replace(",", "_")
    return f"{finding.policy}:{name}:{finding_action(finding)}"


class AuditLog:
    """Writes audit records to the ``extproc.audit`` logger (one INFO record per event)."""

    def __init__(self, include_matches: bool = False, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.include_matches = include_matches
        self._logger = logger if logger is not None else logging.getLogger(LOGGER_NAME)
        self._clock = clock

    def record(
        self,
        *,
        outcome: str,
        source: str,
        verdict: GuardrailVerdict,
        guardrail_id: str,
        guardrail_version: str,
        route: str,
        fmt: str,
        stream: str,
        request_id: str | None = None,
        chars_released: int = 0,
        tripped_window: str | None = None,
        cost_usd: float = 0.0,
        mcp_method: str | None = None,
        mcp_tool: str | None = None,
    ) -> dict[str, Any]:
        """Log one intervention; returns the record."""
        findings = []
        for finding in verdict.findings:
            if not reported(finding):
                continue
            entry: dict[str, Any] = {"policy": finding.policy, "name": finding.name,
                                     "action": finding_action(finding)}
            if self.include_matches and finding.match is not None:
                entry["match"] = redact(finding.match)
            findings.append(entry)
        record: dict[str, Any] = {
            "event": EVENT,
            "timestamp": iso_timestamp(self._clock()),
            "outcome": outcome,
            "source": source,
            "guardrail_id": guardrail_id,
            "guardrail_version": guardrail_version,
            "findings": findings,
            "chars_released": chars_released,
            "tripped_window": tripped_window,
            "text_units": verdict.text_units,
            "cost_usd": cost_usd,  # the stream's guardrail calls so far, this one included
            "request_id": request_id,
            "route": route,
            "format": fmt,
            "stream": stream,
        }
        if mcp_method is not None:  # (an MCP route: the JSON-RPC method and the tool called)
            record["mcp_method"] = mcp_method
            record["mcp_tool"] = mcp_tool
        self._logger.info("guardrail %s (%s)", outcome, source, extra={"audit": record})
        return record
