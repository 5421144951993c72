"""Carrying a guardrail's masked text back onto the pieces the original text arrived in.

ApplyGuardrail masks a whole block at once (``jane.doe@example.com`` becomes ``{EMAIL}``), but
the text reached us as many SSE deltas, and an entity may straddle several of them or the edge
of the region being released. ``map_region`` aligns the original and the masked block, cuts the
masked text where the original was cut, gives a replaced span whole to the piece where it
starts, and reports when a replaced span runs past the end of the region, so that the next
region starts after it. Pure: strings in, strings out. ``map_channel`` applies it to the held
deltas of one channel of the output guard (``extproc.stream.channels``).

Alignment: masked text is the original with some spans replaced by ``{NAME}`` placeholders, so
the literal runs between placeholders must appear in the original in order, each placeholder
standing for a non-empty span. A regular expression built from the masked text finds that
alignment exactly. A longest-common-subsequence diff would match a cut-off entity at the end of
a block (``bob@exa``) against the same letters inside an earlier, masked one. ``difflib`` is
only the fallback for masked text that is not of that form.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from difflib import SequenceMatcher

from extproc.domain.windows import Block
from extproc.stream.channels import Channel, Delta, Held

_PLACEHOLDER = re.compile(r"\{[A-Za-z0-9_\-]+\}")

Opcode = tuple[str, int, int, int, int]


def align(original: str, masked: str) -> Sequence[Opcode]:
    """Opcodes (``difflib`` style) turning ``original`` into ``masked``."""
    if original == masked:
        return [("equal", 0, len(original), 0, len(masked))]
    literals: list[tuple[int, int]] = []  # spans of literal text in ``masked``
    pattern: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(masked):
        literals.append((position, match.start()))
        pattern.append(re.escape(masked[position:match.start()]))
        pattern.append("(.+?)")
        position = match.end()
    literals.append((position, len(masked)))
    pattern.append(re.escape(masked[position:]))
    found = None
    if len(literals) > 1 and len(masked) <= 100_000:
        found = re.fullmatch("".join(pattern), original, re.DOTALL)
    if found is None:
        return SequenceMatcher(None, original, masked, autojunk=False).get_opcodes()
    opcodes: list[Opcode] = []
    i = 0
    for index, (low, high) in enumerate(literals):
        if high > low:
            opcodes.append(("equal", i, i + (high - low), low, high))
            i += high - low
        if index < len(literals) - 1:
            span_start, span_end = found.span(index + 1)
            placeholder_end = literals[index + 1][0]
            opcodes.append(("replace", span_start, span_end, high, placeholder_end))
            i = span_end
    return opcodes


def shift_offset(opcodes: Sequence[Opcode], offset: int, *, end: bool = False) -> int:
    """Where character ``offset`` of the original text is in the masked one (``align``'s
    ``opcodes``): inside a masked span, its start, or its end for the ``end`` of a range.
    An offset past the original moves by the difference in length."""
    for tag, i1, i2, j1, j2 in opcodes:
        if offset <= i2:
            if tag == "equal":
                return j1 + (offset - i1)
            if offset == i1:
                return j1
            return j2 if end or offset == i2 else j1
    if not opcodes:
        return offset
    _, _, i2, _, j2 = opcodes[-1]
    return j2 + (offset - i2)


def map_region(
    original: str, masked: str, start: int, cuts: Sequence[int], end: int
) -> tuple[list[str], int]:
    """Masked text for ``original[start:end]`` cut at ``cuts`` (increasing, inside the region).

    Returns ``len(cuts) + 1`` pieces and the position in ``original`` where the next region
    must start: ``end``, or the end of a replaced span that runs past ``end`` (its replacement
    is already in a piece, or, if it started before ``start``, was released in part and must
    not be released any further). The part of a replaced span that started before ``start``
    and lies inside the region is dropped.
    """
    bounds = [start, *cuts, end]
    pieces = [""] * (len(bounds) - 1)
    carry = end
    if original == masked:
        for index in range(len(pieces)):
            pieces[index] = original[bounds[index]:bounds[index + 1]]
        return pieces, carry

    def piece_of(position: int) -> int:
        index = 0
        while index + 1 < len(pieces) and bounds[index + 1] <= position:
            index += 1
        return index

    for tag, i1, i2, j1, j2 in align(original, masked):
        if tag == "equal":
            low, high = max(i1, start), min(i2, end)
            position = low
            while position < high:
                index = piece_of(position)
                stop = min(high, bounds[index + 1])
                pieces[index] += masked[j1 + (position - i1): j1 + (stop - i1)]
                position = stop
        elif start <= i1 < end or i1 == i2 == start < end:
            pieces[piece_of(i1)] += masked[j1:j2]
            if i2 > end:
                carry = max(carry, i2)
        elif i1 < start < i2 and i2 > end:
            carry = max(carry, i2)
    return pieces, carry


def map_channel(channel: Channel, index: int, held: Sequence[Held], block: Block, original: str,
                masked: str, limit: int) -> bool:
    """Give each held delta of ``channel`` (number ``index``) in [its limit, ``limit``) its
    text to release, from ``masked``, the checked text of ``block`` (``original``). Returns
    True when a replaced span runs past ``limit`` (the rest of it is dropped)."""
    start = max(channel.limit, channel.mask_from)
    deltas: list[Delta] = [d for item in held for d in item.deltas
                           if d.channel == index
                           and d.start + len(d.text) > channel.limit and d.start < limit]
    base = block.start
    cuts = sorted({d.start - base for d in deltas if start < d.start < limit}
                  | {d.start + len(d.text) - base for d in deltas
                     if start < d.start + len(d.text) < limit})
    region_start, region_end = start - base, max(limit, start) - base
    carried = False
    if region_end > region_start or masked != original:
        pieces, carry = map_region(original, masked, region_start,
                                   cuts if region_end > region_start else [], region_end)
        if region_end > region_start:
            bounds = [region_start, *cuts]
            # Pieces and deltas are both in text order: one pass over each.
            cursor = 0
            for piece, low in zip(pieces, bounds, strict=True):
                position = base + low
                while cursor < len(deltas) and (
                        deltas[cursor].start + len(deltas[cursor].text) <= position):
                    cursor += 1
                if cursor < len(deltas) and deltas[cursor].start <= position:
                    delta = deltas[cursor]
                    if delta.mapped is None:
                        delta.mapped = [piece]
                    else:
                        delta.mapped.append(piece)
        if base + carry > channel.mask_from:
            channel.mask_from = base + carry
            # An entity runs past what is released now: the rest of it is dropped.
            carried = base + carry > limit
    for delta in deltas:
        delta.mapped_to = max(delta.mapped_to, min(limit, delta.start + len(delta.text)))
    return carried
