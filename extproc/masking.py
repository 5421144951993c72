"""Carrying a guardrail's masked text back onto the pieces the original text arrived in.

ApplyGuardrail masks a whole block at once (``jane.doe@example.com`` becomes ``{EMAIL}``), but
the text reached us as many SSE deltas, and an entity may straddle several of them or the edge
of the region being released. ``map_region`` aligns the original and the masked block, cuts the
masked text where the original was cut, gives a replaced span whole to the piece where it
starts, and reports when a replaced span runs past the end of the region, so that the next
region starts after it. Pure: strings in, strings out.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import SequenceMatcher


def map_region(
    original: str, masked: str, start: int, cuts: Sequence[int], end: int
) -> tuple[list[str], int]:
    """Masked text for ``original[start:end]`` cut at ``cuts`` (increasing, inside the region).

    Returns ``len(cuts) + 1`` pieces and the position in ``original`` where the next region
    must start: ``end``, or the end of a replaced span that starts inside the region and runs
    past ``end`` (its replacement is already in the last piece). A replaced span that starts
    before ``start`` and runs into the region belongs to the previous region: its part inside
    this one is dropped.
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

    matcher = SequenceMatcher(None, original, masked, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            low, high = max(i1, start), min(i2, end)
            position = low
            while position < high:
                index = piece_of(position)
                stop = min(high, bounds[index + 1])
                pieces[index] += masked[j1 + (position - i1): j1 + (stop - i1)]
                position = stop
        elif start <= i1 < end or (i1 == i2 == end == start):
            pieces[piece_of(i1)] += masked[j1:j2]
            if i2 > end:
                carry = i2
    return pieces, carry
