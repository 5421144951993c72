"""Nasty SSE streams (``*.sse``, see README.md) and the ways the tests cut them into chunks:
replayed through the state machine (``tests/stream/test_corpus.py``, every cut) and through
real Envoy (``tests/e2e/test_hostile.py``, one cut each)."""

from __future__ import annotations

import random
from pathlib import Path

from extproc.sse import SSEDecoder
from tests.support import BLOCK_FRAME

CORPUS = Path(__file__).parent
#: Every text-bearing corpus file has it once per channel, in one delta.
INJECT_AT = b"harbour"
#: An OUTPUT phrase the demo policy (and the stream tier's fake guardrail) blocks.
BLOCKED = b"Project Nightingale"


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.sse"))


def chunkings(data: bytes) -> dict[str, list[int]]:
    """Cut positions: the whole body in one write, every 7 bytes, at random (seeded), and
    inside every multi-byte UTF-8 character."""
    rng = random.Random(len(data))
    random_cuts: list[int] = []
    position = 0
    while position < len(data):
        position += rng.randint(1, 97)
        random_cuts.append(position)
    inside = [i for i, byte in enumerate(data) if 0x80 <= byte < 0xC0]  # continuation bytes
    cuts = {"whole": [], "random": random_cuts}
    if len(data) <= 64 * 1024:
        cuts["every7"] = list(range(7, len(data), 7))
    else:  # enormous files: 7-byte pieces around the big events, bigger pieces elsewhere
        cuts["every7"] = list(range(7, 4096, 7)) + list(range(4096, len(data), 4093))
    if inside:
        cuts["inside_utf8"] = inside[:2000]
    return cuts


def assert_blocked_body(body: bytes, original: bytes) -> None:
    """Released events (a prefix of ``original``, whole events), then exactly one OpenAI-style
    terminal frame; nothing of the blocked phrase."""
    assert body.endswith(BLOCK_FRAME), body[-300:]
    assert body.count(BLOCK_FRAME) == 1
    assert body.count(b"data: [DONE]") == 1
    assert BLOCKED not in body and b"Nightingale" not in body
    released = body[: -len(BLOCK_FRAME)]
    assert original.startswith(released), "released bytes are not a prefix of the original"
    decoder = SSEDecoder()  # whole events, whatever the line endings
    decoder.feed(released, end_of_stream=True)
    assert decoder.flush() == b"", "the frame does not follow a whole event"


def cut(data: bytes, positions: list[int]) -> list[bytes]:
    """``data`` in pieces at ``positions``."""
    bounds = [0, *(p for p in positions if 0 < p < len(data)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
