"""Splitting input over the per-call limit, and merging the verdicts of the parts.

Pure: ``cut_text`` cuts one text at a line break or whitespace near the limit, ``plan_calls``
packs pieces into calls of at most ``max_units`` text units, ``merge_verdicts`` rebuilds one
verdict for the original blocks (any BLOCK wins, else any MASK, outputs rebuilt from the
parts). ``ResilientGuardrail`` runs the calls; ``extproc.guardrail.resilient`` describes it all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from extproc.domain.errors import GuardrailServerError
from extproc.domain.verdict import GuardrailVerdict, Outcome
from extproc.domain.windows import TEXT_UNIT_CHARS, text_units


@dataclass(frozen=True, slots=True)
class Piece:
    block: int  # index of the original content block
    text: str


@dataclass(frozen=True, slots=True)
class Part:
    pieces: tuple[Piece, ...]
    verdict: GuardrailVerdict


def units_of(pieces: Iterable[Piece]) -> int:
    return sum(text_units(len(p.text)) for p in pieces)


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
        if len(piece.text) <= max_chars:
            cut.append(piece)
        else:
            cut.extend(Piece(piece.block, t) for t in cut_text(piece.text, max_chars))
    calls: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for piece in cut:
        units = text_units(len(piece.text))
        if current and used + units > max_units:
            calls.append(current)
            current, used = [], 0
        current.append(piece)
        used += units
    if current:
        calls.append(current)
    return calls


def merge_verdicts(block_count: int, parts: Sequence[Part]) -> GuardrailVerdict:
    """One verdict for the original blocks from the verdicts of their parts (in order)."""
    findings = tuple(f for part in parts for f in part.verdict.findings)
    usage: dict[str, int] = {}
    for part in parts:
        for key, value in part.verdict.usage.items():
            usage[key] = usage.get(key, 0) + value
    units = sum(part.verdict.text_units for part in parts)
    for part in parts:
        if part.verdict.outcome is Outcome.BLOCK:
            return GuardrailVerdict(
                outcome=Outcome.BLOCK, action=part.verdict.action, findings=findings,
                outputs=part.verdict.outputs, text_units=units, usage=usage,
            )
    if not any(part.verdict.outcome is Outcome.MASK for part in parts):
        return GuardrailVerdict(
            outcome=Outcome.PASS, action="NONE", findings=findings, outputs=(),
            text_units=units, usage=usage,
        )
    rebuilt: list[list[str]] = [[] for _ in range(block_count)]
    for part in parts:
        verdict = part.verdict
        if verdict.outcome is Outcome.MASK:
            if len(verdict.outputs) != len(part.pieces):
                raise GuardrailServerError(
                    f"masked answer with {len(verdict.outputs)} outputs for "
                    f"{len(part.pieces)} blocks"
                )
            texts: Sequence[str] = verdict.outputs
        else:
            texts = [piece.text for piece in part.pieces]
        for piece, text in zip(part.pieces, texts, strict=True):
            rebuilt[piece.block].append(text)
    return GuardrailVerdict(
        outcome=Outcome.MASK, action="GUARDRAIL_INTERVENED", findings=findings,
        outputs=tuple("".join(chunks) for chunks in rebuilt), text_units=units, usage=usage,
    )
