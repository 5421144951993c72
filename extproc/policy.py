"""Pure decisions about *when* to call the guardrail and *on which text*.

The cost model (``shared/docs/bedrock.md`` A.6): Bedrock bills text units (TU) of up to 1,000
characters per content block, per enabled policy, rounded up. Re-checking the whole answer every
few hundred characters therefore costs the square of its length. The windowed strategy checks
only new text plus an overlap tail. With the defaults, 800 new and 200 overlap characters, every
block is at most 1,000 characters: 1 TU per policy. A phrase of up to ``overlap`` characters split
across two windows is still seen whole. The cumulative strategy re-checks the whole answer, for
policies that need full context. A per-stream TU cap sends it back to windows once reached.

The first check of a stream goes out as soon as any text exists, so the first token waits for
one round trip only. Later checks wait until ``min_chars`` new characters exist, or until the
text ends (the end of the body, or the event saying the answer is complete). No I/O here;
positions are character offsets in one channel's text.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

TEXT_UNIT_CHARS = 1000


class StreamMode(enum.Enum):
    """Bedrock's own names (``streamProcessingMode``)."""

    SYNC = "sync"  # no text reaches the client before a passing check covered it
    ASYNC = "async"  # events go out as they arrive; a block ends the stream at the next event


class Strategy(enum.Enum):
    WINDOWED = "windowed"
    CUMULATIVE = "cumulative"


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    """How a stream's text is cut into guardrail calls."""

    strategy: Strategy = Strategy.WINDOWED
    window_chars: int = 800
    overlap_chars: int = 200
    min_chars: int = 800
    max_blocks_per_call: int = 8
    max_stream_text_units: int = 100  # cumulative only: per policy, then windows take over
    fast_first_window: bool = True


@dataclass(frozen=True, slots=True)
class Block:
    """One content block of a call: ``text[start:end]`` of one channel; ``new_from`` is where
    the text not covered by an earlier check begins."""

    channel_index: int
    start: int
    new_from: int
    end: int


def text_units(length: int) -> int:
    """Text units one content block of ``length`` characters costs per policy."""
    return max(1, math.ceil(length / TEXT_UNIT_CHARS)) if length > 0 else 0


def should_check(
    *,
    pending_chars: int,
    first_check_done: bool,
    upstream_done: bool,
    policy: WindowPolicy,
) -> bool:
    """Whether to start a call now (no call is in flight)."""
    if pending_chars <= 0:
        return False
    if upstream_done:
        return True
    if not first_check_done and policy.fast_first_window:
        return True
    return pending_chars >= policy.min_chars


def plan_windows(
    checked: Sequence[int],
    lengths: Sequence[int],
    policy: WindowPolicy,
    *,
    upstream_done: bool,
) -> list[Block]:
    """Blocks covering every channel's unchecked text: each at most ``window_chars`` new
    characters, preceded by up to ``overlap_chars`` already-checked ones. Without the end of the
    stream, a last block shorter than ``min_chars`` is left for later, unless it is the only one
    (the first window). At most ``max_blocks_per_call`` blocks."""
    blocks: list[Block] = []
    for index, (done, length) in enumerate(zip(checked, lengths, strict=True)):
        position = done
        while position < length and len(blocks) < policy.max_blocks_per_call:
            end = min(length, position + policy.window_chars)
            short = end - position < policy.min_chars
            if short and not upstream_done and blocks:
                break
            blocks.append(Block(index, max(0, position - policy.overlap_chars), position, end))
            position = end
    return blocks


def plan_cumulative(lengths: Sequence[int]) -> list[Block]:
    """One block per channel with the whole text so far."""
    return [Block(index, 0, 0, length) for index, length in enumerate(lengths) if length > 0]


def estimated_units(blocks: Sequence[Block]) -> int:
    """Text units per policy that these blocks will cost."""
    return sum(text_units(block.end - block.start) for block in blocks)
