"""OpenAI legacy Completions through the official ``openai`` SDK."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

from extproc.formats import ErrorKind, PromptScope, StreamCodec
from extproc.formats.openai_completions import OpenAICompletions
from extproc.formats.whole import PromptUnreadable
from tests.unit.test_formats_common import (
    SOFT_MESSAGE,
    UNAVAILABLE_MESSAGE,
    VIOLATION_MESSAGE,
    decode,
    extract_all,
    fixture,
    joined,
    openai_client,
    release,
    sse_payloads,
)

FMT = OpenAICompletions()
RAW = fixture("completions.sse")
EVENTS = decode(RAW, chunk_size=5)
TEXT = ("\n\nZürich is the largest city in Switzerland (スイス), known for its banks 🏦.")
COMPLETION_ID = "cmpl-B2kQ7LtVf0aRw3NcYp8HdZs1Ex9"


def stream_of(released: int, end: Callable[[StreamCodec], bytes]) -> bytes:
    codec = FMT.stream_codec()
    extract_all(codec, EVENTS)
    return b"".join(codec.rewrite(e, {}) for e in EVENTS[:released]) + end(codec)


def completions(body: bytes) -> Any:
    return openai_client(body).completions.create(model="gpt-3.5-turbo-instruct",
                                                  prompt="Zürich", stream=True)


def test_recorded_stream_channels() -> None:
    found = extract_all(FMT.stream_codec(), EVENTS)
    assert joined(found) == {("text", 0): TEXT}
    assert len(found) == 7


@pytest.mark.parametrize(("kind", "message"), [(ErrorKind.VIOLATION, VIOLATION_MESSAGE),
                                               (ErrorKind.UNAVAILABLE, UNAVAILABLE_MESSAGE)])
@pytest.mark.parametrize("released", [0, 3, 7])
def test_terminal_frame_raises_in_the_sdk(kind: str, message: str, released: int) -> None:
    body = stream_of(released, lambda c: c.terminal_frame(kind))
    assert body.endswith(b"data: [DONE]\n\n")
    texts = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in completions(body):
            texts.append(chunk.choices[0].text)
    assert caught.value.message == message
    assert caught.value.type == kind
    assert len(texts) == released
    assert TEXT.startswith("".join(texts))


@pytest.mark.parametrize("released", [0, 1, 4, 7])
def test_soft_block_ends_the_stream_normally(released: int) -> None:
    body = stream_of(released, lambda c: c.soft_block_frame(SOFT_MESSAGE))
    chunks = list(completions(body))
    text = "".join(ch.choices[0].text for ch in chunks)
    assert text.endswith(SOFT_MESSAGE)
    assert TEXT.startswith(text[:-len(SOFT_MESSAGE)])
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert {ch.id for ch in chunks} == {COMPLETION_ID}
    assert {ch.object for ch in chunks} == {"text_completion"}


def test_soft_block_with_nothing_seen() -> None:
    chunks = list(completions(FMT.stream_codec().soft_block_frame(SOFT_MESSAGE)))
    assert "".join(ch.choices[0].text for ch in chunks) == SOFT_MESSAGE
    assert chunks[-1].choices[0].finish_reason == "content_filter"


def test_masking_reaches_the_sdk() -> None:
    body = release(FMT.stream_codec(), EVENTS, lambda ch, text: text.replace("Zürich", "{CITY}"))
    text = "".join(ch.choices[0].text for ch in completions(body))
    assert text == TEXT.replace("Zürich", "{CITY}")
    payloads = [p for _, p in sse_payloads(body)]
    assert payloads[-1] == "[DONE]"


def test_error_body_in_the_sdk() -> None:
    status, body = FMT.error_body(ErrorKind.VIOLATION)
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(body, status=status, json_body=True).completions.create(
            model="m", prompt="x")
    assert caught.value.type == "guardrail_violation"
    assert caught.value.body["message"] == VIOLATION_MESSAGE  # type: ignore[index]


ANSWER: dict[str, Any] = {
    "id": COMPLETION_ID, "object": "text_completion", "created": 1741569952,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [
        {"text": "Call jane at 555-0100", "index": 0, "finish_reason": "stop",
         "logprobs": {"tokens": ["Call", " jane"], "token_logprobs": [-0.1, -0.2],
                      "top_logprobs": None, "text_offset": [0, 4]}},
        {"text": "Second", "index": 1, "finish_reason": "length", "logprobs": None},
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11},
}


def test_non_streamed_texts_rewrite_and_soft_block() -> None:
    body = json.dumps(ANSWER).encode()
    assert FMT.response_texts(body) == [(("text", 0), "Call jane at 555-0100"),
                                        (("text", 1), "Second")]
    rewritten = FMT.rewrite_response(body, {("text", 0): "Call {NAME} at {PHONE}"})
    completion = openai_client(rewritten, json_body=True).completions.create(
        model="m", prompt="x")
    assert completion.choices[0].text == "Call {NAME} at {PHONE}"
    assert completion.choices[0].logprobs is None  # would repeat the original tokens
    assert completion.choices[1].text == "Second"
    soft = FMT.soft_block_response(body, SOFT_MESSAGE)
    completion = openai_client(soft, json_body=True).completions.create(model="m", prompt="x")
    assert [c.text for c in completion.choices] == [SOFT_MESSAGE, SOFT_MESSAGE]
    assert {c.finish_reason for c in completion.choices} == {"content_filter"}
    assert completion.usage is not None and completion.usage.total_tokens == 11
    bare = FMT.soft_block_response(None, SOFT_MESSAGE)
    completion = openai_client(bare, json_body=True).completions.create(model="m", prompt="x")
    assert completion.choices[0].text == SOFT_MESSAGE


@pytest.mark.parametrize("scope", PromptScope.VALUES)
@pytest.mark.parametrize(("prompt", "expected"), [
    ("Once upon a time in Zürich", ["Once upon a time in Zürich"]),
    (["first", "", "second"], ["first", "second"]),
    ([[1, 2, 3], [4]], []),
    ([1, 2, 3], []),
    (None, []),
])
def test_prompt_every_scope(scope: str, prompt: Any, expected: list[str]) -> None:
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    if scope == PromptScope.WHOLE_REQUEST and not expected:
        if prompt is None:
            assert FMT.prompt_texts(body, scope) == []
            assert FMT.rewrite_prompt(body, scope, []) is None
        else:  # token ids: what the model reads, the guardrail cannot
            with pytest.raises(PromptUnreadable, match="token ids"):
                FMT.prompt_texts(body, scope)
        return
    assert FMT.prompt_texts(body, scope) == expected
    rewritten = FMT.rewrite_prompt(body, scope, [t.upper() for t in expected])
    assert rewritten is not None
    assert FMT.prompt_texts(rewritten, scope) == [t.upper() for t in expected]
    if isinstance(prompt, list) and "" in prompt:
        assert json.loads(rewritten)["prompt"] == ["FIRST", "", "SECOND"]
