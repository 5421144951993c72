"""Splitting input over the per-call limit, and merging the verdicts of the parts.

Pure: ``cut_text`` cuts one text at a line break or whitespace near the limit, ``plan_calls``
packs pieces into calls of at most ``max_units`` text units, ``merge_verdicts`` rebuilds one
verdict for the original blocks (any BLOCK wins, else any MASK, outputs rebuilt from the
parts). ``ResilientGuardrail`` runs the calls; ``extproc.guardrail.resilient`` describes it all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from extproc.domain.client import Content, ImageBlock
from extproc.domain.errors import GuardrailServerError
from extproc.domain.verdict import GuardrailVerdict, Outcome
from extproc.domain.windows import TEXT_UNIT_CHARS, text_units
from extproc.images import MAX_IMAGES_PER_CALL

#: Image bytes in one call at most (the call process's frames carry them in base64).
MAX_IMAGE_BYTES_PER_CALL = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Piece:
    block: int  # index of the original content block
    text: Content  # a text (or a piece of one), or an image (never cut)


@dataclass(frozen=True, slots=True)
class Part:
    pieces: tuple[Piece, ...]
    verdict: GuardrailVerdict


def _units(item: Content) -> int:
    return text_units(len(item)) if isinstance(item, str) else 0


def content_units(content: Iterable[Content]) -> int:
    """Text units of a call's content (images count none)."""
    return sum(_units(item) for item in content)


def units_of(pieces: Iterable[Piece]) -> int:
    return content_units(p.text for p in pieces)


def fits_one_call(content: Sequence[Content]) -> bool:
    """Whether the images of ``content`` fit one call (count and bytes)."""
    images = [item for item in content if isinstance(item, ImageBlock)]
    return (len(images) <= MAX_IMAGES_PER_CALL
            and sum(len(image.data) for image in images) <= MAX_IMAGE_BYTES_PER_CALL)


def cut_point(text: str, start: int, end: int) -> int:
    """Where to end the piece ``text[start:end]`` (``end`` being the hard limit): after the last
    line break, else the last whitespace, within the last tenth of the piece."""
    floor = max(start + 1, end - max(1, (end - start) // 10))
    newline = text.rfind("\n", floor - 1, end)
    if newline != -1:
        return newline + 1
    for index in range(end - 1, floor - 2, -1):
        if text[index].isspace():
            return index + 1
    return end


def cut_text(text: str, max_chars: int) -> list[str]:
    """``text`` in pieces of at most ``max_chars`` whose concatenation is ``text``."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        cut = cut_point(text, start, start + max_chars)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def plan_calls(pieces: Sequence[Piece], max_units: int) -> list[list[Piece]]:
    """Cut pieces longer than ``max_units`` text units and pack them, in order, into calls of
    at most ``max_units`` text units each."""
    max_chars = max_units * TEXT_UNIT_CHARS
    cut: list[Piece] = []
    for piece in pieces:
        text = piece.text
        if not isinstance(text, str) or len(text) <= max_chars:
            cut.append(piece)
        else:
            cut.extend(Piece(piece.block, t) for t in cut_text(text, max_chars))
    calls: list[list[Piece]] = []
    current: list[Piece] = []
    used = images = image_bytes = 0
    for piece in cut:
        units = _units(piece.text)
        size = len(piece.text.data) if isinstance(piece.text, ImageBlock) else -1
        if current and (used + units > max_units or (size >= 0 and (
                images + 1 > MAX_IMAGES_PER_CALL
                or image_bytes + size > MAX_IMAGE_BYTES_PER_CALL))):
            calls.append(current)
            current, used, images, image_bytes = [], 0, 0, 0
        current.append(piece)
        used += units
        if size >= 0:
            images += 1
            image_bytes += size
    if current:
        calls.append(current)
    return calls


def merge_verdicts(block_count: int, parts: Sequence[Part]) -> GuardrailVerdict:
    """One verdict for the original blocks from the verdicts of their parts (in order). A
    masked verdict's outputs are its text blocks' (images have none): one per original text
    block."""
    findings = tuple(f for part in parts for f in part.verdict.findings)
    usage: dict[str, int] = {}
    for part in parts:
        for key, value in part.verdict.usage.items():
            usage[key] = usage.get(key, 0) + value
    units = sum(part.verdict.text_units for part in parts)
    counted = [part.verdict.images_guarded for part in parts
               if part.verdict.images_guarded is not None]
    guarded = sum(counted) if counted else None
    for part in parts:
        if part.verdict.outcome is Outcome.BLOCK:
            return GuardrailVerdict(
                outcome=Outcome.BLOCK, action=part.verdict.action, findings=findings,
                outputs=part.verdict.outputs, text_units=units, usage=usage,
                images_guarded=guarded,
            )
    if not any(part.verdict.outcome is Outcome.MASK for part in parts):
        return GuardrailVerdict(
            outcome=Outcome.PASS, action="NONE", findings=findings, outputs=(),
            text_units=units, usage=usage, images_guarded=guarded,
        )
    rebuilt: list[list[str] | None] = [None] * block_count
    for part in parts:
        verdict = part.verdict
        pieces = [piece for piece in part.pieces if isinstance(piece.text, str)]
        if verdict.outcome is Outcome.MASK:
            if len(verdict.outputs) != len(pieces):
                raise GuardrailServerError(
                    f"masked answer with {len(verdict.outputs)} outputs for "
                    f"{len(pieces)} blocks"
                )
            texts: Sequence[str] = verdict.outputs
        else:
            texts = [piece.text for piece in pieces if isinstance(piece.text, str)]
        for piece, text in zip(pieces, texts, strict=True):
            chunks = rebuilt[piece.block]
            if chunks is None:
                chunks = rebuilt[piece.block] = []
            chunks.append(text)
    return GuardrailVerdict(
        outcome=Outcome.MASK, action="GUARDRAIL_INTERVENED", findings=findings,
        outputs=tuple("".join(chunks) for chunks in rebuilt if chunks is not None),
        text_units=units, usage=usage, images_guarded=guarded,
    )
