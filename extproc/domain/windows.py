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
from collections.abc import Sequence
from dataclasses import dataclass

TEXT_UNIT_CHARS = 1000


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
    #: the first check releases its text at once, but for its ``held_tail`` (at most
    #: ``overlap_chars``; time to first token: one round trip after the first word boundary)
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
    """Text units one content block of ``length`` characters costs per policy: one per started
    1,000 characters (``shared/docs/bedrock.md`` A.6). The one copy of the rule."""
    return -(-length // TEXT_UNIT_CHARS) if length > 0 else 0


def held_tail(text: str) -> int:
    """Characters at the end of ``text`` that a first window holds back: its trailing run of
    ASCII characters other than whitespace, the part of a word, number, address or URL that
    may go on in the next delta (an e-mail address cut at ``jane.doe@exam`` is held whole).
    Text without spaces between words (Chinese, Japanese) is not held."""
    end = len(text)
    while end and text[end - 1].isascii() and not text[end - 1].isspace():
        end -= 1
    return len(text) - end


def should_check(
    *,
    pending_chars: int,
    first_check_done: bool,
    upstream_done: bool,
    policy: WindowPolicy,
    first_releasable: bool = True,
) -> bool:
    """Whether to start a call now (no call is in flight). The fast first check starts as
    soon as the text holds something it may release (``first_releasable``: more than its
    ``held_tail``); else, like later checks, when ``min_chars`` wait."""
    if pending_chars <= 0:
        return False
    if upstream_done:
        return True
    if not first_check_done and policy.fast_first_window and first_releasable:
        return True
    return pending_chars >= policy.min_chars


def estimated_units(blocks: Sequence[Block]) -> int:
    """Text units per policy that these blocks will cost."""
    return sum(text_units(block.end - block.start) for block in blocks)
