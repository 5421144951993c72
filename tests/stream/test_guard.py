"""Stream modes, windows, masking, keep-alives and the STREAMED sink, through StreamProcessor."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import pytest

from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.domain.cost import DEFAULT_PRICES
from extproc.domain.values import GuardrailRef, InputCheck, Source, StreamMode
from extproc.domain.verdict import GuardrailVerdict, classify
from extproc.domain.windows import Strategy, WindowPolicy
from extproc.envoy import STREAMED
from tests.stream.test_stream_processor import Harness
from tests.support import (
    BLOCK_FRAME,
    FakeGuardrail,
    bedrock_response,
    chunk_event,
    eventually,
    request_headers,
    response_body,
    response_headers,
)

EMAIL = re.compile(r"[a-z.]+@example\.com")


class MaskingGuardrail(FakeGuardrail):
    """Masks e-mail addresses the way Bedrock does: one output per content block."""

    async def apply(self, guardrail: GuardrailRef, source: Source,
                    texts: Sequence[str]) -> GuardrailVerdict:
        self.calls.append(__import__("tests.support", fromlist=["Call"]).Call(source, list(texts)))
        await asyncio.sleep(0)
        if any(EMAIL.search(t) for t in texts):
            return classify(bedrock_response("mask", [EMAIL.sub("{EMAIL}", t) for t in texts]))
        return classify(bedrock_response("pass"))


def content_of(body: bytes) -> str:
    text = ""
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: {"):
            for choice in json.loads(block[6:]).get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    return text


async def run(h: Harness, chunks: Sequence[bytes], settle_each: bool = True) -> None:
    await h.feed(request_headers(), response_headers())
    for chunk in chunks:
        await h.feed(response_body(chunk))
        if settle_each:
            await h.settle()
    await h.feed(response_body(b"", end_of_stream=True))
    for _ in range(10):
        await h.settle()


def words(total_chars: int) -> list[str]:
    out, size = [], 0
    while size < total_chars:
        piece = f"word{len(out) % 97} "
        out.append(piece)
        size += len(piece)
    return out


async def test_windowed_cost_is_linear_for_a_20000_character_answer() -> None:
    guard = FakeGuardrail()
    h = Harness(guard, input_check=InputCheck.OFF)
    pieces = words(20_000)
    await run(h, [chunk_event(p) for p in pieces])
    total = sum(len(p) for p in pieces)
    assert h.client_bytes() == b"".join(chunk_event(p) for p in pieces)
    assert all(len(text) <= 1000 for call in guard.calls for text in call.texts)
    assert len(guard.calls) <= math.ceil(total / 800) + 1
    # Consecutive windows overlap by 200 characters (a phrase split across two windows is
    # seen whole) and together cover the whole answer.
    text, previous_end = "".join(pieces), 0
    for call in guard.calls:
        start = text.index(call.texts[0], max(0, previous_end - 200))
        assert start <= max(0, previous_end - 200) or previous_end < 200
        previous_end = start + len(call.texts[0])
    assert previous_end == total


async def test_phrase_split_across_windows_is_still_blocked() -> None:
    guard = FakeGuardrail()
    h = Harness(guard, input_check=InputCheck.OFF, window=WindowPolicy(
        window_chars=100, overlap_chars=30, min_chars=100))
    pieces = words(95) + ["forb", "idden ", *words(300)]
    await run(h, [chunk_event(p) for p in pieces])
    assert h.client_bytes().endswith(BLOCK_FRAME)
    assert "forb" not in content_of(h.client_bytes())


async def test_sync_masks_an_email_split_across_events() -> None:
    h = Harness(MaskingGuardrail(), input_check=InputCheck.OFF,
                window=WindowPolicy(window_chars=60, overlap_chars=30, min_chars=40,
                                    fast_first_window=False))
    pieces = ["Write to ", "jane.", "doe@exam", "ple.com today. ", *words(200)]
    await run(h, [chunk_event(p) for p in pieces])
    body = h.client_bytes()
    assert content_of(body) == "".join(pieces).replace("jane.doe@example.com", "{EMAIL}")
    assert b"jane" not in body and b"exam" not in body
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: {"):
            chunk = json.loads(block[6:])
            assert set(chunk) == {"id", "object", "created", "model", "choices"}
    assert h.processor.record.to_metadata()["masked"] >= 1


async def test_async_releases_at_once_and_counts_unapplied_masks() -> None:
    hold = asyncio.Event()
    h = Harness(FakeGuardrail(hold=hold, masked=("secret",)), input_check=InputCheck.OFF,
                stream_mode=StreamMode.ASYNC)
    await h.feed(request_headers(), response_headers())
    await h.feed(response_body(chunk_event("the secret ")))
    await h.settle()
    assert h.client_bytes() == chunk_event("the secret ")  # released before any verdict
    hold.set()
    await h.feed(response_body(b"data: [DONE]\n\n", end_of_stream=True))
    for _ in range(5):
        await h.settle()
    assert h.client_bytes() == chunk_event("the secret ") + b"data: [DONE]\n\n"
    assert h.processor.record.to_metadata()["mask_unapplied"] == 1


async def test_async_block_ends_at_the_next_event_boundary() -> None:
    h = Harness(FakeGuardrail(), input_check=InputCheck.OFF, stream_mode=StreamMode.ASYNC,
                window=WindowPolicy(min_chars=1))
    event = chunk_event("the forbidden word")
    await h.feed(request_headers(), response_headers())
    await h.feed(response_body(event + chunk_event("next")[:15]))
    for _ in range(5):
        await h.settle()
    assert h.client_bytes() == event + BLOCK_FRAME  # the half event never goes out


async def test_bug_async_a_stream_whose_last_event_holds_text_ended_before_its_verdict(
        ) -> None:
    # No textless event (finish chunk, [DONE]) waited for the verdict: the body ended with the
    # last text event, and a block of that text came too late (Gemini's streams end so).
    hold = asyncio.Event()
    h = Harness(FakeGuardrail(hold=hold), input_check=InputCheck.OFF,
                stream_mode=StreamMode.ASYNC, window=WindowPolicy(min_chars=1))
    await h.feed(request_headers(), response_headers())
    await h.feed(response_body(chunk_event("the forbidden word"), end_of_stream=True))
    await h.settle()
    answers = h.body_answers()
    assert answers and not answers[-1][1]  # released, but the body has not ended
    hold.set()
    for _ in range(5):
        await h.settle()
    assert h.client_bytes() == chunk_event("the forbidden word") + BLOCK_FRAME
    assert h.body_answers()[-1][1]
    assert h.processor.record.to_metadata()["outcome"] == "block"


async def test_cumulative_strategy_checks_the_whole_answer_until_its_cap() -> None:
    guard = FakeGuardrail()
    h = Harness(guard, input_check=InputCheck.OFF, window=WindowPolicy(
        strategy=Strategy.CUMULATIVE, window_chars=50, overlap_chars=10, min_chars=50,
        max_stream_text_units=3))
    pieces = words(400)
    await run(h, [chunk_event(p) for p in pieces])
    text = "".join(pieces)
    assert guard.calls[1].texts == [text[:len(guard.calls[1].texts[0])]]
    assert len(guard.calls[2].texts[0]) > len(guard.calls[1].texts[0])
    assert h.processor.record.to_metadata()["cumulative_cap_reached"] is True
    assert h.processor.record.to_metadata()["strategy"] == "windowed"
    assert h.client_bytes() == b"".join(chunk_event(p) for p in pieces)


async def test_keepalive_comment_while_text_is_held() -> None:
    hold = asyncio.Event()
    h = Harness(FakeGuardrail(hold=hold), input_check=InputCheck.OFF, keepalive_s=0.05)
    await h.feed(request_headers(), response_headers(), response_body(chunk_event("a")))
    await eventually(lambda: h.client_bytes().startswith(b": keep-alive\n\n"),
                     what="a keep-alive comment")
    hold.set()
    await h.feed(response_body(b"", end_of_stream=True))
    for _ in range(5):
        await h.settle()
    assert h.client_bytes().endswith(chunk_event("a"))
    assert h.processor.record.to_metadata()["keepalives"] >= 1


def streamed_headers() -> pb.ProcessingRequest:
    request = request_headers()
    request.protocol_config.response_body_mode = STREAMED
    return request


def streamed_answers(sent: list[Any]) -> list[bytes | None]:
    """Per response-body answer: the replacement bytes, b"" for clear_body, None for pass."""
    out: list[bytes | None] = []
    for message in sent:
        if message.WhichOneof("response") != "response_body":
            continue
        mutation = message.response_body.response.body_mutation
        kind = mutation.WhichOneof("mutation")
        assert kind != "streamed_response"
        out.append(mutation.body if kind == "body" else b"" if kind == "clear_body" else None)
    return out


async def test_streamed_sink_answers_every_chunk_once_in_order() -> None:
    hold = asyncio.Event()
    h = Harness(FakeGuardrail(hold=hold), input_check=InputCheck.OFF)
    await h.feed(streamed_headers(), response_headers())
    assert not h.sent[-1].HasField("mode_override")  # STREAMED configured: no override
    for word in ("a", "b", "c"):
        await h.feed(response_body(chunk_event(word)))
    assert streamed_answers(h.sent) == [b"", b"", b""]  # held: cleared, answered at once
    hold.set()
    await h.settle()
    await h.feed(response_body(b"data: [DONE]\n\n", end_of_stream=True))
    for _ in range(10):
        await h.settle()
    answers = streamed_answers(h.sent)
    assert len(answers) == 4
    assert b"".join(a or b"" for a in answers) == b"".join(
        chunk_event(w) for w in "abc") + b"data: [DONE]\n\n"


async def test_streamed_sink_extends_the_timer_while_the_last_answer_waits() -> None:
    hold = asyncio.Event()
    h = Harness(FakeGuardrail(hold=hold), input_check=InputCheck.OFF,
                streamed_message_timeout_s=7.5)
    await h.feed(streamed_headers(), response_headers())
    await h.feed(response_body(chunk_event("a"), end_of_stream=True))
    timeouts = [m for m in h.sent if m.HasField("override_message_timeout")]
    assert [t.override_message_timeout.ToMilliseconds() for t in timeouts] == [7500]
    assert streamed_answers(h.sent) == []
    hold.set()
    for _ in range(5):
        await h.settle()
    assert streamed_answers(h.sent) == [chunk_event("a")]


async def test_streamed_sink_block_replaces_the_next_chunk_and_clears_the_rest() -> None:
    h = Harness(FakeGuardrail(), input_check=InputCheck.OFF)
    await h.feed(streamed_headers(), response_headers())
    # (A whole word: a first window holds back a word that may go on in the next delta.)
    await h.feed(response_body(chunk_event("forbidden ")))
    await h.settle()
    await h.feed(response_body(chunk_event("x")), response_body(chunk_event("y")),
                 response_body(b"", end_of_stream=True))
    assert streamed_answers(h.sent) == [b"", BLOCK_FRAME, b"", b""]


async def test_streamed_route_passes_unguarded_answers_through() -> None:
    h = Harness(FakeGuardrail(), input_check=InputCheck.OFF)
    # (An error answer: a 2xx answer of any content type is read, issue 14 class 7.)
    await h.feed(streamed_headers(), response_headers(status=404, content_type="text/plain"))
    await h.feed(response_body(b'plain text', end_of_stream=True))
    assert streamed_answers(h.sent) == [None]


def reasoning_event(text: str) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "demo",
           "choices": [{"index": 0, "delta": {"reasoning_content": text},
                        "finish_reason": None}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def test_reasoning_is_checked_unless_the_route_opts_out() -> None:
    # Issue 15, item 4: reasoning text is answer text the client shows.
    chunks = [reasoning_event("the forbidden plan"), chunk_event("Fine."),
              chunk_event(finish_reason="stop"), b"data: [DONE]\n\n"]
    checked = Harness(FakeGuardrail(), input_check=InputCheck.OFF)
    await run(checked, chunks)
    assert checked.client_bytes().endswith(BLOCK_FRAME)
    assert b"forbidden" not in checked.client_bytes()
    skipped = Harness(FakeGuardrail(), input_check=InputCheck.OFF, reasoning_check=False)
    await run(skipped, chunks)
    assert skipped.client_bytes() == b"".join(chunks)
    assert [c.texts for c in skipped.guardrail.calls] == [["Fine."]]  # the content still is
    assert skipped.processor.record.to_metadata()["reasoning_unchecked"] == len(
        "the forbidden plan")
    # and the content is still blocked on such a route
    blocked = Harness(FakeGuardrail(), input_check=InputCheck.OFF, reasoning_check=False)
    await run(blocked, [reasoning_event("fine"), chunk_event("the forbidden word"),
                        b"data: [DONE]\n\n"])
    assert blocked.client_bytes().endswith(BLOCK_FRAME)


async def test_reasoning_opt_out_applies_to_whole_answers() -> None:
    answer = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {
                             "role": "assistant", "content": "Fine.",
                             "reasoning_content": "the forbidden plan"}}]}).encode()
    for reasoning_check, status in ((True, 400), (False, None)):
        h = Harness(FakeGuardrail(), input_check=InputCheck.OFF,
                    reasoning_check=reasoning_check)
        await h.feed(request_headers(), response_headers(content_type="application/json"),
                     response_body(answer, end_of_stream=True))
        for _ in range(5):
            await h.settle()
        replies = [m for m in h.sent if m.WhichOneof("response") == "immediate_response"]
        if status is None:
            assert not replies
            assert h.processor.record.to_metadata()["reasoning_unchecked"] == 18
        else:
            assert replies and replies[0].immediate_response.status.code == status


class PricedGuardrail(FakeGuardrail):
    """Bills 2 content-filter and 3 PII units per call (and blocks ``forbidden``)."""

    async def apply(self, guardrail: GuardrailRef, source: Source,
                    texts: Sequence[str]) -> GuardrailVerdict:
        verdict = await super().apply(guardrail, source, texts)
        usage = {**verdict.usage, "contentPolicyUnits": 2, "sensitiveInformationPolicyUnits": 3}
        return __import__("dataclasses").replace(verdict, usage=usage)


async def test_a_streams_cost_is_its_calls_units_times_the_price_table() -> None:
    # Issue 18, item 3: $0.15 per 1,000 content units, $0.10 per 1,000 PII units.
    h = Harness(PricedGuardrail(), input_check=InputCheck.OFF,
                window=WindowPolicy(window_chars=10, overlap_chars=2, min_chars=5))
    await run(h, [chunk_event(w) for w in words(60)] + [b"data: [DONE]\n\n"])
    calls = len(h.guardrail.calls)
    assert calls >= 2
    facts = h.processor.record.to_metadata()
    assert facts["cost_usd"] == pytest.approx(calls * (2 * 0.15 + 3 * 0.10) / 1000)
    cheap = Harness(PricedGuardrail(), input_check=InputCheck.OFF,
                    prices={**DEFAULT_PRICES, "contentPolicyUnits": 0.0})
    await run(cheap, [chunk_event("the forbidden word"), b"data: [DONE]\n\n"])
    assert cheap.processor.record.to_metadata()["cost_usd"] == pytest.approx(
        len(cheap.guardrail.calls) * 3 * 0.10 / 1000)
