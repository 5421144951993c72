"""Streams in framings other than SSE through the stream processor (issue 15): AWS event
streams (Bedrock ConverseStream) and NDJSON (Ollama), split at every byte offset; a corrupt
frame follows the failure policy."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from extproc.domain.failure import FailureMode, FailurePolicy
from extproc.domain.values import InputCheck
from extproc.eventstream import EventStreamDecoder, event_frame
from tests.stream.test_stream_processor import Harness
from tests.support import FakeGuardrail, request_headers, response_body, response_headers

EVENTS = "application/vnd.amazon.eventstream"
CONVERSE = "/model/anthropic.claude-3-haiku-20240307-v1:0/converse-stream"


def frame(name: str, payload: dict[str, object]) -> bytes:
    return event_frame(name, json.dumps(payload).encode())


def converse(*texts: str) -> bytes:
    frames = [frame("messageStart", {"role": "assistant"})]
    frames += [frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": t}})
               for t in texts]
    frames += [frame("contentBlockStop", {"contentBlockIndex": 0}),
               frame("messageStop", {"stopReason": "end_turn"})]
    return b"".join(frames)


def ollama(*texts: str) -> bytes:
    lines = [{"model": "m", "created_at": "2026-12-06T05:00:00Z",
              "message": {"role": "assistant", "content": t}, "done": False} for t in texts]
    lines.append({"model": "m", "created_at": "2026-12-06T05:00:01Z",
                  "message": {"role": "assistant", "content": ""}, "done": True})
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def guarded(path: str, content_type: str, chunks: Sequence[bytes],
                  **overrides: object) -> Harness:
    h = Harness(FakeGuardrail(), input_check=InputCheck.OFF, **overrides)
    await h.feed(request_headers(path=path), response_headers(content_type=content_type))
    for chunk in chunks:
        await h.feed(response_body(chunk))
        await h.settle()
    await h.feed(response_body(b"", end_of_stream=True))
    for _ in range(10):
        await h.settle()
    return h


def splits(body: bytes) -> list[list[bytes]]:
    return [[body[:cut], body[cut:]] for cut in range(1, len(body))]


@pytest.mark.parametrize(("path", "content_type", "build"), [
    (CONVERSE, EVENTS, converse), ("/api/chat", "application/x-ndjson", ollama)])
async def test_a_clean_stream_split_at_every_offset_passes_byte_for_byte(
        path: str, content_type: str, build: object) -> None:
    body = build("Café ", "au lait ", "costs €3.")  # type: ignore[operator]
    for chunks in splits(body):
        h = await guarded(path, content_type, chunks)
        assert h.client_bytes() == body
        assert h.body_answers()[-1][1]  # ended


async def test_a_blocked_event_stream_split_anywhere_ends_with_one_exception_frame() -> None:
    body = converse("The ", "forbidden ", "word and more text here.")
    for chunks in splits(body):
        h = await guarded(CONVERSE, EVENTS, chunks)
        decoder = EventStreamDecoder()
        frames = list(decoder.feed(h.client_bytes(), end_of_stream=True))
        assert decoder.flush() == b""
        assert b"forbidden" not in b"".join(f.raw for f in frames)
        assert [f.message_type for f in frames].count("exception") == 1
        assert frames[-1].event == "validationException"


@pytest.mark.parametrize("mode", [FailureMode.CLOSED, FailureMode.OPEN])
async def test_a_corrupt_frame_ends_the_stream_whatever_the_failure_policy(
        mode: FailureMode) -> None:
    # An upstream's fault, not the guardrail's: failing open would pass unread what a
    # client's parser may still read (botocore is laxer about header lengths).
    body = converse("Fine ", "text ", "here.")
    first = len(frame("messageStart", {"role": "assistant"}))
    corrupt = bytearray(body)
    corrupt[first + 20] ^= 0xFF  # inside the second frame's headers: its CRC fails
    h = await guarded(CONVERSE, EVENTS, [bytes(corrupt)],
                      failure_mode=FailurePolicy.uniform(mode))
    out = h.client_bytes()
    assert h.body_answers()[-1][1]  # the stream ended, nothing hangs
    frames = list(EventStreamDecoder().feed(out, end_of_stream=True))
    assert frames[-1].message_type == "exception"
    assert frames[-1].event == "serviceUnavailableException"
    assert h.processor.record.to_metadata()["outcome"] == "unavailable"


async def test_bug_a_chunk_frame_without_a_message_type_went_unread() -> None:
    # botocore reads a frame with no (or another) :message-type as an event named by its
    # :event-type; the codec took it for an unknown frame and left its text unread.
    from extproc.eventstream import encode_frame

    bare = encode_frame([(":event-type", "contentBlockDelta"),
                         (":content-type", "application/json")],
                        json.dumps({"contentBlockIndex": 0,
                                    "delta": {"text": "the forbidden word"}}).encode())
    body = frame("messageStart", {"role": "assistant"}) + bare
    h = await guarded(CONVERSE, EVENTS, [body])
    assert b"forbidden" not in h.client_bytes()
    assert h.processor.record.to_metadata()["outcome"] == "block"


async def test_bug_a_utf16_chunk_was_read_as_utf8() -> None:
    # boto3 users json.loads(chunk["bytes"]), which detects UTF-16; the codec read the bytes
    # as UTF-8 and checked "{\x00"\x00o\x00..." instead of the text.
    import base64

    model = json.dumps({"outputText": "the forbidden word"}).encode("utf-16-le")
    chunk = frame("chunk", {"bytes": base64.b64encode(model).decode()})
    h = await guarded("/model/amazon.titan-text-express-v1/invoke-with-response-stream",
                      EVENTS, [chunk])
    assert h.processor.record.to_metadata()["outcome"] == "block"
    assert model not in h.client_bytes()
