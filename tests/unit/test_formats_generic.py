"""Traffic no format recognises, read by rule (``extproc.formats.generic``)."""

from __future__ import annotations

import json

import pytest

from extproc.formats.generic import DATA_CHANNEL, GENERIC, GenericCodec
from extproc.sse import SSEDecoder


def events(raw: bytes) -> list:  # type: ignore[type-arg]
    decoder = SSEDecoder()
    return [*decoder.feed(raw)]


def test_a_prompt_is_the_whole_request() -> None:
    body = json.dumps({"model": "x", "contents": [{"role": "user", "parts": [
        {"text": "hello"}]}], "systemInstruction": {"parts": [{"text": "be brief"}]}}).encode()
    assert GENERIC.prompt_texts(body, "last_user") == ["hello", "be brief"]


def test_a_json_answer_is_checked_and_masked_by_group() -> None:
    body = json.dumps({"id": "r1", "candidates": [{"content": {"parts": [
        {"text": "mail a@b.c"}]}, "finishReason": "STOP"}], "modelVersion": "m"}).encode()
    pairs = GENERIC.response_texts(body)
    assert pairs == [(0, "mail a@b.c\nSTOP"), (1, "m")]
    masked = GENERIC.rewrite_response(body, {0: "mail {EMAIL}\nSTOP"})
    assert json.loads(masked)["candidates"][0]["content"]["parts"][0]["text"] == "mail {EMAIL}"
    with pytest.raises(ValueError):
        GENERIC.rewrite_response(body, {0: "{X}"})  # the separator is gone: cannot be put back
    with pytest.raises(ValueError):
        GENERIC.rewrite_response(body, {7: "x"})


def test_a_stream_continues_each_path_as_one_channel() -> None:
    codec = GenericCodec()
    raw = (b'data: {"candidates":[{"content":{"parts":[{"text":"baz"}]}}]}\n\n'
           b'data: {"candidates":[{"content":{"parts":[{"text":"inga"}]}}]}\n\n'
           b"data: plain words\n\n"
           b"data: [DONE]\n\n")
    found = [codec.extract(event) for event in events(raw)]
    path = ("candidates", 0, "content", "parts", 0, "text")
    assert found == [[(path, "baz")], [(path, "inga")], [(DATA_CHANNEL, "plain words")], []]
    first, _, plain, done = events(raw)
    assert codec.rewrite(first, {}) == first.raw
    assert json.loads(codec.rewrite(first, {path: "b**"})[6:]) == {
        "candidates": [{"content": {"parts": [{"text": "b**"}]}}]}
    assert codec.rewrite(plain, {DATA_CHANNEL: "plain *****"}) == b"data: plain *****\n\n"
    assert codec.rewrite(done, {}) == done.raw
    assert codec.terminal_frame("guardrail_violation").endswith(b"data: [DONE]\n\n")
    assert b'"guardrail_violation"' in codec.soft_block_frame("no")


def test_ids_and_urls_in_a_stream_are_not_text() -> None:
    codec = GenericCodec()
    (event,) = events(b'data: {"id":"x1","model":"m","url":"https://a","delta":"hi"}\n\n')
    assert codec.extract(event) == [(("delta",), "hi")]
