"""Several short prompt texts in one content block, and the masked block split back.

Bedrock bills every content block by the started thousand characters (a text unit): ten
messages of 100 characters are ten units as ten blocks, one as one block, and an answer of
1,500 characters with a question of 300 is four units apart, two together. ``pack`` puts
consecutive texts into blocks of at most ``unit`` characters (ten text units: the rounding
wastes at most one unit in ten, and a block stays well under a call's size limit), separated
by a blank line (a longer text goes alone); ``unpack`` gives each text its part of the
guardrail's outputs, or None when a masked span crosses two texts (the caller then blocks).
Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extproc.formats.whole import map_masked

SEPARATOR = "\n\n"
#: Characters of one block at most (ten text units), unless one text is longer.
UNIT = 10_000


@dataclass(frozen=True, slots=True)
class Packed:
    """``blocks[i]`` holds the texts ``members[i]`` (indexes into ``pack``'s argument)."""

    blocks: tuple[str, ...]
    members: tuple[tuple[int, ...], ...]


def pack(texts: Sequence[str], unit: int = UNIT) -> Packed:
    blocks: list[str] = []
    members: list[tuple[int, ...]] = []
    current: list[int] = []
    size = 0
    for index, text in enumerate(texts):
        if current and size + len(SEPARATOR) + len(text) <= unit:
            current.append(index)
            size += len(SEPARATOR) + len(text)
            continue
        if current:
            blocks.append(SEPARATOR.join(texts[i] for i in current))
            members.append(tuple(current))
        current, size = [index], len(text)
    if current:
        blocks.append(SEPARATOR.join(texts[i] for i in current))
        members.append(tuple(current))
    return Packed(tuple(blocks), tuple(members))


def unpack(packed: Packed, texts: Sequence[str], outputs: Sequence[str]) -> list[str] | None:
    """The output of each text, from the outputs of the blocks (same order and count as
    ``packed.blocks``); None when they cannot be split back."""
    if len(outputs) != len(packed.blocks):
        return None
    result: list[str | None] = [None] * len(texts)
    for block, members, output in zip(packed.blocks, packed.members, outputs, strict=True):
        if len(members) == 1:
            result[members[0]] = output
            continue
        spans: list[tuple[int, int, int]] = []
        start = 0
        for number, index in enumerate(members):
            spans.append((number, start, start + len(texts[index])))
            start += len(texts[index]) + len(SEPARATOR)
        parts = map_masked(block, spans, output, len(members)) if output != block \
            else [texts[index] for index in members]
        if parts is None or SEPARATOR.join(parts) != output:
            return None
        for index, part in zip(members, parts, strict=True):
            result[index] = part
    if any(text is None for text in result):
        return None
    return [text for text in result if text is not None]
