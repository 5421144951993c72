"""Plain values shared by every layer: which guardrail, which source, when and how to check.

Pure: enums, frozen dataclasses and ``NewType`` aliases; no I/O, no imports of the package.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

GuardrailId = NewType("GuardrailId", str)
GuardrailVersion = NewType("GuardrailVersion", str)


@dataclass(frozen=True, slots=True)
class GuardrailRef:
    """Which guardrail to apply."""

    id: GuardrailId
    version: GuardrailVersion


class Source(enum.Enum):
    """ApplyGuardrail's ``source``: a prompt (INPUT) or an answer (OUTPUT)."""

    INPUT = "INPUT"
    OUTPUT = "OUTPUT"


class InputCheck(enum.Enum):
    """When the prompt is checked with source INPUT."""

    OFF = "off"
    PRE_CALL = "pre_call"  # checked before the request goes upstream (a block never reaches it)
    PARALLEL = "parallel"  # checked while the upstream call runs; the answer waits until it passes


class UnknownTraffic(enum.Enum):
    """What a guarded route does with a request no format recognises."""

    GENERIC = "generic"  # every string of its JSON checked, by rule (``extproc.formats.generic``)
    REJECT = "reject"  # refused before the upstream (403 guardrail_unrecognised_request)
    PASS = "pass"  # let through unchecked: an explicit opt-out, logged and counted


class Api(enum.Enum):
    """Which API a route's requests speak: ``auto`` (each request's method and path say), or
    one named for the whole route (``mcp``: every request is MCP, whatever its path)."""

    AUTO = "auto"
    MCP = "mcp"


class PoisonedTools(enum.Enum):
    """What an MCP ``tools/list`` answer with a tool the guardrail blocks becomes."""

    REMOVE = "remove"  # the tools that block are removed from the list (each checked alone)
    REFUSE = "refuse"  # the answer is refused: a JSON-RPC error for its id


class UncheckedImages(enum.Enum):
    """What a guarded route does with a prompt image the guardrail cannot be given: a remote
    URL or file id (the sidecar fetches nothing), GIF or WebP, over Bedrock's size limits,
    undecodable (``extproc.images``)."""

    REJECT = "reject"  # refused before the upstream (400 in the API's shape)
    PASS = "pass"  # let through unchecked: an explicit opt-out, logged and counted


class SignedPromptMask(enum.Enum):
    """What a masked prompt does on a request the client signed with AWS SigV4 (Bedrock
    Runtime through boto3): a rewritten body would fail the signature upstream."""

    REFUSE = "refuse"  # blocked before the upstream (the masked text must not go up)
    PASS = "pass"  # sent unmasked: an explicit opt-out, logged and counted


class PromptScope(enum.Enum):
    """Which prompt text is checked (``extproc.formats.PromptScope``)."""

    WHOLE_REQUEST = "whole_request"
    LAST_USER = "last_user"
    ALL = "all"
    ALL_WITH_SYSTEM = "all_with_system"


class StreamMode(enum.Enum):
    """Bedrock's own names (``streamProcessingMode``)."""

    SYNC = "sync"  # no text reaches the client before a passing check covered it
    ASYNC = "async"  # events go out as they arrive; a block ends the stream at the next event


class Gate(enum.Enum):
    """The prompt verdict as the output side sees it."""

    OPEN = "open"  # passed, or not checked
    PENDING = "pending"
    BLOCKED = "blocked"
    FAILED = "failed"  # no verdict, failure mode closed
