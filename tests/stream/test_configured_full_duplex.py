"""Envoy's response body mode *configured* as FULL_DUPLEX_STREAMED (not switched to it per
request): Envoy then ignores every mode override (``shared/docs/ext_proc.md`` 5), so every
response body streams through the sidecar, chunk by chunk, and each must be answered with
``streamed_response`` or the request hangs (FULL_DUPLEX has no timer). Regression (session 3):
bodies the sidecar did not guard were ignored, and a JSON answer got a plain body answer,
which Envoy rejects in this mode."""

from __future__ import annotations

import json
from typing import Any

from extproc._pb.envoy.service.ext_proc.v3.external_processor_pb2 import ProtocolConfiguration
from extproc.domain.values import InputCheck
from extproc.envoy import ProcessingMode
from tests.stream.test_stream_processor import Harness
from tests.support import (
    FakeGuardrail,
    chat_request,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED


def configured_headers(*args: Any, **kwargs: Any) -> Any:
    headers = request_headers(*args, **kwargs)
    headers.protocol_config.CopyFrom(ProtocolConfiguration(
        request_body_mode=ProcessingMode.BUFFERED, response_body_mode=FULL_DUPLEX))
    return headers


def streamed_answers(h: Harness) -> list[tuple[bytes, bool]]:
    """Every response body answer, each of which must be a streamed_response."""
    out = []
    for message in h.sent:
        if message.WhichOneof("response") != "response_body":
            continue
        mutation = message.response_body.response.body_mutation
        assert mutation.WhichOneof("mutation") == "streamed_response", message
        out.append((mutation.streamed_response.body, mutation.streamed_response.end_of_stream))
    return out


async def test_a_body_the_sidecar_does_not_guard_is_passed_through_chunk_by_chunk() -> None:
    h = Harness(FakeGuardrail(), input_check=InputCheck.OFF, output_check=False)
    await h.feed(configured_headers(), response_headers())
    chunks = [b"data: one\n\n", b"data: two\n\n", b""]
    for index, chunk in enumerate(chunks):
        await h.feed(response_body(chunk, end_of_stream=index == len(chunks) - 1))
    await h.settle()
    assert streamed_answers(h) == [(b"data: one\n\n", False), (b"data: two\n\n", False),
                                   (b"", True)]


async def test_a_non_llm_request_is_passed_through() -> None:
    h = Harness(FakeGuardrail())
    await h.feed(configured_headers(path="/healthz", method="GET", end_of_stream=True),
                 response_headers(content_type="text/plain"),
                 response_body(b"ok", end_of_stream=True))
    await h.settle()
    assert streamed_answers(h) == [(b"ok", True)]


def json_answer(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content},
         "finish_reason": "stop"}]}).encode()


async def run_json(h: Harness, answer: bytes) -> list[tuple[bytes, bool]]:
    await h.feed(configured_headers(), request_body(chat_request("hi", stream=False)))
    await h.settle()
    await h.feed(response_headers(content_type="application/json"))
    for start in range(0, len(answer), 10):  # streamed in small chunks, not buffered
        await h.feed(response_body(answer[start:start + 10]))
    await h.feed(response_body(b"", end_of_stream=True))
    for _ in range(5):
        await h.settle()
    return streamed_answers(h)


async def test_a_json_answer_is_checked_whole_and_sent_as_one_streamed_answer() -> None:
    guard = FakeGuardrail()
    h = Harness(guard)
    answer = json_answer("All fine here.")
    assert await run_json(h, answer) == [(answer, True)]
    assert [c.texts for c in guard.calls][-1] == ["All fine here."]


async def test_a_blocked_json_answer_becomes_the_format_error_body() -> None:
    h = Harness(FakeGuardrail())
    answers = await run_json(h, json_answer("something forbidden"))
    assert len(answers) == 1 and answers[0][1] is True
    # The headers went out with the 200 already: the body carries the error, never the answer.
    error = json.loads(answers[0][0])
    assert error["error"]["type"] == "guardrail_violation"
    assert b"forbidden" not in answers[0][0]
    assert not any(m.WhichOneof("response") == "immediate_response" for m in h.sent)


async def test_a_json_answer_over_max_held_bytes_fails_closed_with_the_error_body() -> None:
    # Envoy buffers a BUFFERED body within its own limit; here the chunks come to the sidecar,
    # so --max-held-bytes bounds what it collects (the overload failure class decides).
    guard = FakeGuardrail()
    h = Harness(guard, max_held_bytes=100)
    answers = await run_json(h, json_answer("x" * 300))
    assert len(answers) == 1 and answers[0][1] is True
    assert json.loads(answers[0][0])["error"]["type"] == "guardrail_unavailable"
    assert not [c for c in guard.calls if c.texts != ["hi"]]  # the answer was never checked
    assert h.processor.record.to_metadata()["error_class"] == "overload"


async def test_a_json_answer_over_max_held_bytes_passes_unchecked_when_failing_open() -> None:
    from extproc.domain.failure import FailureMode, FailurePolicy

    h = Harness(FakeGuardrail(), max_held_bytes=100,
                failure_mode=FailurePolicy.uniform(FailureMode.OPEN))
    answer = json_answer("x" * 300)
    answers = await run_json(h, answer)
    assert b"".join(body for body, _ in answers) == answer
    assert [eos for _, eos in answers][-1] is True and sum(eos for _, eos in answers) == 1
    assert h.processor.record.to_metadata()["failed_open"] is True
