"""The nasty-stream corpus (``tests/corpus``) through the state machine, every file cut every way:
a clean stream arrives byte-identical; with a blocked phrase, the released events (a prefix of
the stream, whole events) are followed by exactly one terminal frame. The same matrix through
real Envoy costs minutes; ``tests/e2e/test_hostile.py`` keeps one cut per file there."""

from __future__ import annotations

import asyncio

import pytest

from extproc.domain.values import InputCheck
from extproc.domain.windows import WindowPolicy
from extproc.formats import all_formats
from extproc.stream.processor import StreamProcessor
from extproc.stream.sinks import Outbox
from tests.corpus import (
    BLOCKED,
    CORPUS,
    INJECT_AT,
    assert_blocked_body,
    chunkings,
    corpus_files,
    cut,
)
from tests.support import (
    FakeGuardrail,
    body_of,
    request_headers,
    response_body,
    response_headers,
    settings,
)

# The end-to-end tests' small windows (tests/e2e/conftest.py SMALL_WINDOWS).
WINDOW = WindowPolicy(window_chars=120, overlap_chars=40, min_chars=60)


async def replay(chunks: list[bytes]) -> bytes:
    """The bytes the client gets for an SSE answer sent in ``chunks``."""
    sent: list[bytes] = []

    async def write(message: object) -> None:
        if message.WhichOneof("response") == "response_body":  # type: ignore[attr-defined]
            sent.append(body_of(message)[0])  # type: ignore[arg-type]

    guardrail = FakeGuardrail(blocked=(BLOCKED.decode().lower(),))
    processor = StreamProcessor(settings(input_check=InputCheck.OFF, window=WINDOW), guardrail,
                                all_formats(), Outbox(write), "corpus")
    try:
        await processor.handle(request_headers())
        await processor.handle(response_headers())
        for number, chunk in enumerate(chunks):
            await processor.handle(response_body(chunk))
            for _ in range(number % 3):  # verdicts land at varying points
                await asyncio.sleep(0)
        await processor.handle(response_body(b"", end_of_stream=True))
        for _ in range(200):
            if processor.record.outcome is not None:
                break
            await asyncio.sleep(0)
    finally:
        processor.close()
    assert processor.record.outcome is not None, "the stream did not end"
    return b"".join(sent)


CLEAN = [pytest.param(path.name, name, id=f"{path.stem}-{name}")
         for path in corpus_files() for name in chunkings(path.read_bytes())]
BLOCKED_CASES = [
    pytest.param(path.name, name, id=f"{path.stem}-{name}")
    for path in corpus_files() if INJECT_AT in path.read_bytes()
    for name in chunkings(path.read_bytes().replace(INJECT_AT, BLOCKED))]


@pytest.mark.parametrize(("name", "chunking"), CLEAN)
async def test_corpus_clean_stream_arrives_byte_identical(name: str, chunking: str) -> None:
    data = (CORPUS / name).read_bytes()
    assert await replay(cut(data, chunkings(data)[chunking])) == data


@pytest.mark.parametrize(("name", "chunking"), BLOCKED_CASES)
async def test_corpus_stream_with_blocked_phrase_ends_with_one_frame(name: str,
                                                                     chunking: str) -> None:
    data = (CORPUS / name).read_bytes().replace(INJECT_AT, BLOCKED)
    assert_blocked_body(await replay(cut(data, chunkings(data)[chunking])), data)
