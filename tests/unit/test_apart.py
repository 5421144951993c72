"""Text some clients show and the official SDKs skip is checked on channels of its own
(``extproc.formats._common.APART``), never glued to the text the SDKs show; masks reach it.
Through real Envoy: ``tests/e2e/test_reading.py``, with the table of cases."""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import Any

import pytest

from extproc.formats.anthropic_messages import AnthropicMessages
from extproc.formats.openai_chat import OpenAIChat
from extproc.sse import SSEDecoder

BOM = b"\xef\xbb\xbf"


def chat_chunk(content: str) -> bytes:
    payload = {"id": "c", "choices": [{"index": 0, "delta": {"content": content}}]}
    return f"data: {json.dumps(payload)}\n\n".encode()


def anthropic_delta(text: str, name: str | None, index: int = 0) -> bytes:
    payload = {"type": "content_block_delta", "index": index,
               "delta": {"type": "text_delta", "text": text}}
    head = f"event: {name}\n" if name is not None else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


@pytest.mark.parametrize(("raw", "expected"), [
    (chat_chunk("a") + b"data: [DONE]\n\n" + chat_chunk("b"),
     [(("content", 0), "a"), (("after_done", "content", 0), "b")]),
    (chat_chunk("a") + b"data: [DONE] trailing\n\n" + chat_chunk("b"),
     [(("content", 0), "a"), (("after_done", "content", 0), "b")]),
    (BOM + chat_chunk("a") + chat_chunk("b"),
     [(("after_bom", "content", 0), "a"), (("content", 0), "b")]),
], ids=["after_done", "after_done_prefix", "bom"])
def test_chat(raw: bytes, expected: list[tuple[Hashable, str]]) -> None:
    codec = OpenAIChat().stream_codec()
    assert [found for event in SSEDecoder().feed(raw) for found in codec.extract(event)] \
        == expected


@pytest.mark.parametrize(("raw", "expected"), [
    (anthropic_delta("a", "content_block_delta") + anthropic_delta("b", "ping"),
     [(("text",), "a"), (("skipped", "text", 0), "b")]),
    (anthropic_delta("a", None) + anthropic_delta("b", "content_block_delta", 1),
     [(("skipped", "text", 0), "a"), (("text",), "b")]),
    # Any other name: the SDK reads the event by its data's type.
    (anthropic_delta("a", "content_block_delta") + anthropic_delta("b", "surprise", 1),
     [(("text",), "a"), (("text",), "b")]),
    (BOM + anthropic_delta("a", "content_block_delta") + anthropic_delta("b", "x"),
     [(("skipped", "text", 0), "a"), (("text",), "b")]),
], ids=["ping", "unnamed", "other_name", "bom"])
def test_anthropic(raw: bytes, expected: list[tuple[Hashable, str]]) -> None:
    codec = AnthropicMessages().stream_codec()
    assert [found for event in SSEDecoder().feed(raw) for found in codec.extract(event)] \
        == expected


def rewritten(codec: Any, raw: bytes, masks: list[dict[Hashable, str]]) -> list[Any]:
    events = SSEDecoder().feed(raw)
    for event in events:
        codec.extract(event)
    return [codec.rewrite(event, mask) for event, mask in zip(events, masks, strict=True)]


def test_masks_reach_text_apart() -> None:
    out = rewritten(OpenAIChat().stream_codec(),
                    chat_chunk("a") + b"data: [DONE]\n\n" + chat_chunk("mail"),
                    [{}, {}, {("after_done", "content", 0): "***"}])
    assert json.loads(out[2][6:])["choices"][0]["delta"]["content"] == "***"
    out = rewritten(AnthropicMessages().stream_codec(), anthropic_delta("mail", "ping"),
                    [{("skipped", "text", 0): "***"}])
    assert json.loads(out[0].split(b"data: ", 1)[1])["delta"]["text"] == "***"


def indexed_chunk(index: int, content: str) -> bytes:
    payload = {"id": "c", "choices": [{"index": index, "delta": {"content": content}}]}
    return f"data: {json.dumps(payload)}\n\n".encode()


def test_one_choice_is_read_once() -> None:
    codec = OpenAIChat().stream_codec()
    raw = indexed_chunk(0, "zor") + indexed_chunk(0, "blax")
    assert [f for e in SSEDecoder().feed(raw) for f in codec.extract(e)] == [
        (("content", 0), "zor"), (("content", 0), "blax")]


def test_a_first_choice_with_another_index_is_read_joined_too() -> None:
    # choices[0] readers show "zorblax"; the SDKs' accumulators "zor" and "blax" apart.
    codec = OpenAIChat().stream_codec()
    raw = indexed_chunk(0, "The word is zor") + indexed_chunk(1, "blax") \
        + indexed_chunk(0, " indeed")
    assert [f for e in SSEDecoder().feed(raw) for f in codec.extract(e)] == [
        (("content", 0), "The word is zor"),
        (("content", 1), "blax"), (("joined", "content"), "The word is zorblax"),
        (("content", 0), " indeed"), (("joined", "content"), " indeed")]


def test_interleaved_choices_keep_their_own_reading() -> None:
    # n > 1: each index's text joined by index (a phrase split by another choice's chunk).
    codec = OpenAIChat().stream_codec()
    raw = indexed_chunk(0, "Project ") + indexed_chunk(1, "Other ") \
        + indexed_chunk(0, "Nightingale")
    found = [f for e in SSEDecoder().feed(raw) for f in codec.extract(e)]
    assert "".join(t for c, t in found if c == ("content", 0)) == "Project Nightingale"
    assert "".join(t for c, t in found if c == ("joined", "content")) \
        == "Project Other Nightingale"


def test_a_masked_joined_piece_goes_to_its_choice() -> None:
    codec = OpenAIChat().stream_codec()
    events = SSEDecoder().feed(indexed_chunk(0, "Mail jane@") + indexed_chunk(1, "example.com"))
    for event in events:
        codec.extract(event)
    assert codec.rewrite(events[0], {}) == events[0].raw
    out = codec.rewrite(events[1], {("joined", "content"): "Mail {EMAIL}"})
    # The history ("Mail jane@") went out before; the mask's replacement starts inside it, so
    # this choice's piece is the placeholder.
    assert json.loads(out[6:])["choices"][0]["delta"]["content"] == "{EMAIL}"
