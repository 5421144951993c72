"""The guardrail seam: what the stream code needs from anything that applies a guardrail.

Implementations live in ``extproc.guardrail`` (Bedrock through boto3, the resilient wrapper)
and in the tests (fakes); the stream code only ever sees this Protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from extproc.domain.values import GuardrailRef, Source
from extproc.domain.verdict import GuardrailVerdict


@dataclass(frozen=True, slots=True)
class ImageBlock:
    """An image content block: Bedrock's ``{"image": {"format": ..., "source": {"bytes":
    ...}}}``. ``format`` is the sniffed one (``extproc.images``), ``png`` or ``jpeg``."""

    format: str
    data: bytes = field(repr=False)


#: One content block of a call: a text, or an image.
Content: TypeAlias = "str | ImageBlock"


def texts_of(content: Sequence[Content]) -> list[str]:
    """The text blocks of ``content``, in order."""
    return [item for item in content if isinstance(item, str)]


def images_of(content: Sequence[Content]) -> list[ImageBlock]:
    """The image blocks of ``content``, in order."""
    return [item for item in content if isinstance(item, ImageBlock)]


class GuardrailClient(Protocol):
    """Anything that can apply a guardrail to texts (Bedrock, the tests' fakes).

    An implementation may also accept a keyword-only ``timeout`` (seconds, or None for its
    own default) bounding this one call; ``ResilientGuardrail`` passes the time left of its
    deadline when it does, and enforces the bound from outside either way.
    """

    async def apply(
        self, guardrail: GuardrailRef, source: Source, texts: Sequence[Content]
    ) -> GuardrailVerdict:
        """Check ``texts`` (one content block each: a text or an ``ImageBlock``); raise
        ``GuardrailError`` on failure. A masked verdict's ``outputs`` are the text blocks'."""
        ...

    def close(self) -> None:
        """Release threads and connections."""
        ...
