"""The guardrail seam: what the stream code needs from anything that applies a guardrail.

Implementations live in ``extproc.guardrail`` (Bedrock through boto3, the resilient wrapper)
and in the tests (fakes); the stream code only ever sees this Protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from extproc.domain.values import GuardrailRef, Source
from extproc.domain.verdict import GuardrailVerdict


class GuardrailClient(Protocol):
    """Anything that can apply a guardrail to texts (Bedrock, the tests' fakes).

    An implementation may also accept a keyword-only ``timeout`` (seconds, or None for its
    own default) bounding this one call; ``ResilientGuardrail`` passes the time left of its
    deadline when it does, and enforces the bound from outside either way.
    """

    async def apply(
        self, guardrail: GuardrailRef, source: Source, texts: Sequence[str]
    ) -> GuardrailVerdict:
        """Check ``texts`` (one content block each); raise ``GuardrailError`` on failure."""
        ...

    def close(self) -> None:
        """Release threads and connections."""
        ...
