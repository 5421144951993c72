"""``StreamRecord``: what one stream did, typed, and the one place that turns it into what
others read: Envoy's dynamic metadata (``to_metadata``, for the access log), the identity of
its audit records (``identity``) and its metric labels (``outcome_label``).

Fields that were never set are left out of the metadata, exactly as Envoy sees a key that is
missing; counters start unset and count from zero when first touched. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Final

from extproc.domain.verdict import Finding
from extproc.observe.audit import finding_key, reported

#: Distinct findings kept in the metadata summary of one stream.
MAX_FINDING_KEYS: Final = 16

#: The outcomes that end a stream; any of them wins over what else the stream saw.
TERMINAL_OUTCOMES: Final = frozenset({
    "block", "soft_block", "input_block", "unavailable", "too_large", "unreadable", "invalid"})


@dataclass(slots=True)
class StreamRecord:
    """The facts of one guarded stream (see the module docstring). The metadata keys are the
    field names; ``route``, ``stream`` and the finding set are not metadata."""

    guardrail_id: str
    guardrail_version: str
    route: str = field(default="default", metadata={"metadata": False})
    stream: str = field(default="", metadata={"metadata": False})
    request_id: str | None = None
    format: str | None = None
    mcp_method: str | None = None  # an MCP request's JSON-RPC method (a bounded label)
    mcp_tool: str | None = None  # the tool a tools/call names (cut to 64 characters)
    mcp_tools_removed: int | None = None  # poisoned tools taken out of a tools/list answer
    body_mode: str | None = None
    mode: str | None = None
    strategy: str | None = None
    input: str | None = None
    outcome: str | None = None
    error_class: str | None = None
    failed_open: bool = False
    would_block_input: bool = False
    input_masked: bool = False
    # A prompt masked on a SigV4-signed request: "refused" or "passed" (unmasked)
    signed_mask: str | None = None
    cumulative_cap_reached: bool = False
    checks: int | None = None
    text_units: int | None = None
    cost_usd: float | None = None  # the guardrail calls' cost (``extproc.domain.cost``)
    cached_texts: int | None = None  # prompt texts the verdict cache knew to pass
    max_policy_text_units: int | None = None
    detected: int | None = None
    errors: int | None = None
    keepalives: int | None = None
    masked: int | None = None
    mask_unapplied: int | None = None
    reasoning_unchecked: int | None = None  # characters of reasoning text not checked
    images: int | None = None  # prompt images sent to the guardrail
    cached_images: int | None = None  # prompt images the verdict cache knew to pass
    images_unchecked: int | None = None  # prompt images passed unchecked (unchecked_images pass)
    mask_carried: int | None = None
    would_block: int | None = None
    would_mask: int | None = None
    tripped_window: str | None = None
    chars_released: int | None = None
    findings: str | None = None
    finding_keys: dict[str, None] = field(default_factory=dict, metadata={"metadata": False})

    def count(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to the counter ``name`` (unset counts as zero)."""
        setattr(self, name, (getattr(self, name) or 0) + amount)

    def add_findings(self, findings: tuple[Finding, ...]) -> None:
        """Add the reported findings to the summary (``policy:name:ACTION``, at most
        ``MAX_FINDING_KEYS`` distinct ones)."""
        keys = self.finding_keys
        if len(keys) >= MAX_FINDING_KEYS:
            return
        before = len(keys)
        for finding in findings:
            if reported(finding) and len(keys) < MAX_FINDING_KEYS:
                keys.setdefault(finding_key(finding))
        if len(keys) > before:
            self.findings = ",".join(keys)

    def to_metadata(self) -> dict[str, Any]:
        """The stream's facts as Envoy's dynamic metadata (unset fields left out)."""
        out: dict[str, Any] = {}
        for name in _METADATA_FIELDS:
            value = getattr(self, name)
            if value is not None and value is not False:
                out[name] = value
        return out

    def identity(self) -> dict[str, Any]:
        """Who this stream is, for its audit records."""
        return {"guardrail_id": self.guardrail_id, "guardrail_version": self.guardrail_version,
                "route": self.route, "fmt": self.format or "none", "stream": self.stream,
                "request_id": self.request_id, "mcp_method": self.mcp_method,
                "mcp_tool": self.mcp_tool}

    def outcome_label(self, *, guarded: bool, unfinished: bool) -> str:
        """What became of the stream, for metrics: the terminal outcome if there is one, else
        a shadow would-be verdict, a mask, a fail-open, a pass. ``guarded``: it was an LLM call;
        ``unfinished``: the RPC ended while its answer was still being guarded."""
        if not guarded:
            return "skipped"
        outcome = self.outcome
        if outcome is not None and outcome in TERMINAL_OUTCOMES:
            return outcome
        if self.would_block or self.would_block_input:
            return "shadow_would_block"
        if self.would_mask:
            return "shadow_would_mask"
        if outcome is None and unfinished:
            return "cancelled"
        if self.masked or self.input_masked:
            return "mask"
        if self.failed_open:
            return "failed_open"
        return "pass"


_METADATA_FIELDS: Final = tuple(
    f.name for f in fields(StreamRecord) if f.metadata.get("metadata", True))
