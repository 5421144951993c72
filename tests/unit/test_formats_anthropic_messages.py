"""Anthropic Messages: channels of recorded streams (thinking, text, tool use), masking, and
the frames through the official ``anthropic`` SDK (``messages.create(stream=True)`` and the
``messages.stream()`` helper, which indexes content blocks by position).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import pytest

from extproc.formats import ErrorKind, PromptScope, StreamCodec
from extproc.formats.anthropic_messages import AnthropicMessages
from extproc.sse import SSEEvent
from tests.unit.test_formats_common import (
    SOFT_MESSAGE,
    UNAVAILABLE_MESSAGE,
    VIOLATION_MESSAGE,
    anthropic_client,
    decode,
    extract_all,
    fixture,
    joined,
    release,
    sse_payloads,
)

FMT = AnthropicMessages()
RAW = fixture("anthropic_stream.sse")
EVENTS = decode(RAW, chunk_size=17)
THINKING = ("The user asks about the weather in Zürich. "
            "I should call get_weather with celsius.")
TEXT = "Je vais vérifier la météo à Zürich (チューリッヒ) pour vous 🙂."
INPUT = '{"location": "Zürich, CH", "unit": "celsius"}'
MESSAGE_ID = "msg_01Hq7Yb3VfQmZr2sLkT8nWcE"
PARAMS: dict[str, Any] = {"model": "claude-haiku-4-5", "max_tokens": 1024,
                          "messages": [{"role": "user", "content": "Météo ?"}]}


def index_of(kind: str, nth: int = 0) -> int:
    positions = [i for i, e in enumerate(EVENTS) if e.event == kind]
    return positions[nth]


def stream_of(released: int, end: Callable[[StreamCodec], bytes],
              events: list[SSEEvent] = EVENTS) -> bytes:
    codec = FMT.stream_codec()
    extract_all(codec, events)
    return b"".join(codec.rewrite(e, {}) for e in events[:released]) + end(codec)


# --------------------------------------------------------------------------- extract


def test_recorded_stream_channels() -> None:
    found = extract_all(FMT.stream_codec(), EVENTS)
    assert joined(found) == {("thinking", 0): THINKING, ("text",): TEXT, ("input", 2): INPUT}
    assert json.loads(INPUT) == {"location": "Zürich, CH", "unit": "celsius"}


def test_the_older_recording_too() -> None:
    found = joined(extract_all(FMT.stream_codec(), decode(fixture("anthropic_messages.sse"))))
    assert found == {("text",): TEXT, ("input", 1): INPUT}


@pytest.mark.parametrize(("delta", "expected"), [
    ({"type": "signature_delta", "signature": "EqQB"}, []),
    ({"type": "citations_delta", "citation": {"type": "char_location", "cited_text": "x"}}, []),
    ({"type": "text_delta", "text": ""}, []),
    ({"type": "input_json_delta", "partial_json": ""}, []),
    ({"type": "text_delta", "text": None}, []),
    ({"type": "thinking_delta", "thinking": "hm"}, [(("thinking", 4), "hm")]),
])
def test_extract_delta_kinds(delta: dict[str, Any], expected: list[Any]) -> None:
    payload = {"type": "content_block_delta", "index": 4, "delta": delta}
    event = SSEEvent(raw=b"", event="content_block_delta", data=json.dumps(payload))
    assert FMT.stream_codec().extract(event) == expected


# --------------------------------------------------------------------------- terminal frame


def start_event(payload: dict[str, Any]) -> SSEEvent:
    return decode(f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode())[0]


@pytest.mark.parametrize(("payload", "expected"), [
    ({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
     []),
    ({"type": "content_block_start", "index": 2,
      "content_block": {"type": "text", "text": "Project "}}, [(("text",), "Project ")]),
    ({"type": "content_block_start", "index": 1,
      "content_block": {"type": "thinking", "thinking": "hmm", "signature": ""}},
     [(("thinking", 1), "hmm")]),
    ({"type": "content_block_start", "index": 3,
      "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}, []),
    ({"type": "content_block_start", "index": 3,
      "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {"q": "x"}}},
     [(("input", 3), '{"q":"x"}')]),
    ({"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant",
                                           "content": []}}, []),
    ({"type": "message_start", "message": {
        "id": "m", "type": "message", "role": "assistant",
        "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}},
     [(("text",), "Hellothere")]),  # text blocks are read joined
])
def test_text_a_start_holds_begins_its_channel(payload: dict[str, Any],
                                               expected: list[Any]) -> None:
    codec = FMT.stream_codec()
    event = start_event(payload)
    assert codec.extract(event) == expected
    assert codec.rewrite(event, {}) == event.raw


def test_a_masked_start_is_rewritten() -> None:
    codec = FMT.stream_codec()
    text = start_event({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": "Mail jane@example.com"}})
    tool = start_event({"type": "content_block_start", "index": 1,
                        "content_block": {"type": "tool_use", "id": "t", "name": "f",
                                          "input": {"to": "jane@example.com"}}})
    codec.extract(text)
    codec.extract(tool)
    out = json.loads(decode(codec.rewrite(text, {("text",): "Mail {EMAIL}"}))[0].data or "")
    assert out["content_block"]["text"] == "Mail {EMAIL}"
    # A mask that leaves the input no JSON object: the block starts with an empty input.
    out = json.loads(decode(codec.rewrite(tool, {("input", 1): '{"to":"{EMAIL}'}))[0].data
                     or "")
    assert out["content_block"]["input"] == {}


def test_terminal_frame_is_byte_exact() -> None:
    assert FMT.stream_codec().terminal_frame(ErrorKind.VIOLATION) == (
        b'event: error\ndata: {"type": "error", "error": {"type": "guardrail_violation", '
        b'"message": "Violated guardrail policy"}}\n\n')


@pytest.mark.parametrize(("kind", "message"), [(ErrorKind.VIOLATION, VIOLATION_MESSAGE),
                                               (ErrorKind.UNAVAILABLE, UNAVAILABLE_MESSAGE)])
@pytest.mark.parametrize("released", [0, 1, 3, 12, 17, 22])
def test_terminal_frame_raises_in_the_sdk(kind: str, message: str, released: int) -> None:
    body = stream_of(released, lambda c: c.terminal_frame(kind))
    client = anthropic_client(body)
    seen = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        for event in client.messages.create(**PARAMS, stream=True):
            seen.append(event.type)
    error = caught.value
    assert error.api_message == message
    assert error.type == kind
    assert error.status_code == 200
    assert message in str(error)
    assert len(seen) == len([e for e in EVENTS[:released] if e.event != "ping"])
    with pytest.raises(anthropic.APIStatusError, match=message):
        with client.messages.stream(**PARAMS) as stream:
            for _ in stream:
                pass


# --------------------------------------------------------------------------- soft block


@pytest.mark.parametrize("released", list(range(len(EVENTS))))
def test_soft_block_parsed_cleanly_by_the_stream_helper(released: int) -> None:
    body = stream_of(released, lambda c: c.soft_block_frame(SOFT_MESSAGE))
    client = anthropic_client(body)
    with client.messages.stream(**PARAMS) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[-1] == "message_stop"
    assert final.id == MESSAGE_ID
    assert final.stop_reason == "refusal"
    assert final.stop_details is not None and final.stop_details.explanation == SOFT_MESSAGE
    last = final.content[-1]
    assert last.type == "text" and last.text == SOFT_MESSAGE
    # Blocks the client already had are kept as they were.
    assert len(final.content) == 1 + len([e for e in EVENTS[:released]
                                          if e.event == "content_block_start"])


def test_soft_block_mid_text_closes_the_open_block() -> None:
    released = index_of("content_block_delta", 6)  # thinking done, 4 text deltas out
    body = stream_of(released, lambda c: c.soft_block_frame(SOFT_MESSAGE))
    frame = sse_payloads(body)[len([e for e in EVENTS[:released] if e.data]):]
    assert [name for name, _ in frame] == [
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert frame[0][1] == {"type": "content_block_stop", "index": 1}
    assert frame[1][1]["index"] == 2
    assert frame[4][1]["delta"]["stop_reason"] == "refusal"
    assert frame[4][1]["usage"] == {"output_tokens": 112}  # the last count seen
    with anthropic_client(body).messages.stream(**PARAMS) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "text"]
    assert final.content[1].text == "Je vais vérifier la météo à Zürich"  # type: ignore[union-attr]
    assert stream.get_final_text() == "Je vais vérifier la météo à Zürich" + SOFT_MESSAGE


def test_soft_block_mid_tool_use() -> None:
    released = index_of("content_block_delta", 12)  # 3 of 5 input deltas out
    body = stream_of(released, lambda c: c.soft_block_frame(SOFT_MESSAGE))
    with anthropic_client(body).messages.stream(**PARAMS) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "text"]
    assert final.stop_reason == "refusal"


def test_soft_block_with_nothing_seen_starts_the_message() -> None:
    body = FMT.stream_codec().soft_block_frame(SOFT_MESSAGE)
    assert [name for name, _ in sse_payloads(body)][0] == "message_start"
    events = list(anthropic_client(body).messages.create(**PARAMS, stream=True))
    assert events[0].type == "message_start"
    with anthropic_client(body).messages.stream(**PARAMS) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == SOFT_MESSAGE  # type: ignore[union-attr]
    assert final.stop_reason == "refusal"


# --------------------------------------------------------------------------- masking


def test_masking_reaches_the_sdk() -> None:
    body = release(FMT.stream_codec(), EVENTS,
                   lambda channel, text: text.replace("Zürich", "{CITY}"))
    with anthropic_client(body).messages.stream(**PARAMS) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == THINKING.replace("Zürich", "{CITY}")  # type: ignore[union-attr]
    assert final.content[1].text == TEXT.replace("Zürich", "{CITY}")  # type: ignore[union-attr]
    # "Zür" / "ich" arrived in different deltas: per-delta masking leaves them.
    assert final.content[2].input == {"location": "Zürich, CH", "unit": "celsius"}  # type: ignore[union-attr]
    unchanged = [e for e in decode(body) if e.raw in {x.raw for x in EVENTS}]
    assert len(unchanged) == len(EVENTS) - 2


def test_masked_tool_input_is_parsed_by_the_sdk() -> None:
    body = release(FMT.stream_codec(), EVENTS,
                   lambda channel, text: text.replace("celsius", "{UNIT}"))
    with anthropic_client(body).messages.stream(**PARAMS) as stream:
        final = stream.get_final_message()
    assert final.content[2].input == {"location": "Zürich, CH", "unit": "{UNIT}"}  # type: ignore[union-attr]


# --------------------------------------------------------------------------- error bodies


@pytest.mark.parametrize(("kind", "status", "error_class", "message"), [
    (ErrorKind.VIOLATION, 400, anthropic.BadRequestError, VIOLATION_MESSAGE),
    (ErrorKind.UNAVAILABLE, 503, anthropic.InternalServerError, UNAVAILABLE_MESSAGE),
])
def test_error_body_in_the_sdk(kind: str, status: int, error_class: type[Exception],
                               message: str) -> None:
    got, body = FMT.error_body(kind)
    assert got == status
    assert json.loads(body) == {"type": "error", "error": {"type": kind, "message": message}}
    with pytest.raises(error_class) as caught:
        anthropic_client(body, status=status, json_body=True).messages.create(**PARAMS)
    assert caught.value.api_message == message  # type: ignore[attr-defined]
    assert caught.value.type == kind  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- non-streamed

ANSWER: dict[str, Any] = {
    "id": MESSAGE_ID, "type": "message", "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "thinking", "thinking": THINKING, "signature": "EqQB"},
        {"type": "text", "text": TEXT},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
         "input": {"location": "Zürich, CH", "unit": "celsius"}},
    ],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 612, "output_tokens": 112},
}


def test_response_texts() -> None:
    assert FMT.response_texts(json.dumps(ANSWER).encode()) == [
        (("thinking", 0), THINKING), (("text", 1), TEXT),
        (("input", 2), '{"location":"Zürich, CH","unit":"celsius"}')]


def test_rewrite_response_parsed_by_the_sdk() -> None:
    body = FMT.rewrite_response(json.dumps(ANSWER).encode(), {
        ("text", 1): TEXT.replace("Zürich", "{CITY}"),
        ("input", 2): '{"location":"{CITY}, CH","unit":"celsius"}'})
    message = anthropic_client(body, json_body=True).messages.create(**PARAMS)
    assert message.content[1].text == TEXT.replace("Zürich", "{CITY}")
    assert message.content[2].input == {"location": "{CITY}, CH", "unit": "celsius"}
    assert message.content[0].thinking == THINKING


@pytest.mark.parametrize("masked", ['{"location": "{CITY', '["a list"]'])
def test_rewrite_response_refuses_a_broken_tool_input(masked: str) -> None:
    with pytest.raises(ValueError):
        FMT.rewrite_response(json.dumps(ANSWER).encode(), {("input", 2): masked})


@pytest.mark.parametrize("original", ["answer", None, "garbage"])
def test_soft_block_response_parsed_by_the_sdk(original: str | None) -> None:
    source = {"answer": json.dumps(ANSWER).encode(), None: None, "garbage": b"\x00"}[original]
    body = FMT.soft_block_response(source, SOFT_MESSAGE)
    message = anthropic_client(body, json_body=True).messages.create(**PARAMS)
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == SOFT_MESSAGE
    assert message.stop_reason == "refusal"
    if original == "answer":
        assert message.id == MESSAGE_ID
        assert message.usage.output_tokens == 112


# --------------------------------------------------------------------------- prompts

REQUEST: dict[str, Any] = {
    "model": "claude-sonnet-4-5", "max_tokens": 1024,
    "system": [{"type": "text", "text": "You are a travel agent.",
                "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "Weather in Zürich? I'm jane@example.com"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                            "data": "Itinerary: Zürich, Bern"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "call the tool", "signature": "EqQB"},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"location": "Zürich"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "4 °C, rain"}]},
        {"role": "assistant", "content": "It is 4 °C."},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_2",
             "content": [{"type": "text", "text": "nested result"}]}]},
    ],
}


@pytest.mark.parametrize(("scope", "expected"), [
    (PromptScope.LAST_USER, ["Weather in Zürich? I'm jane@example.com",
                             "Itinerary: Zürich, Bern"]),
    (PromptScope.ALL, ["Weather in Zürich? I'm jane@example.com", "Itinerary: Zürich, Bern",
                       "Let me check.", "4 °C, rain", "It is 4 °C.", "nested result"]),
    (PromptScope.ALL_WITH_SYSTEM, [
        "You are a travel agent.", "Weather in Zürich? I'm jane@example.com",
        "Itinerary: Zürich, Bern", "Let me check.", "4 °C, rain", "It is 4 °C.",
        "nested result"]),
])
def test_prompt_scopes_and_rewrite(scope: str, expected: list[str]) -> None:
    body = json.dumps(REQUEST).encode()
    assert FMT.prompt_texts(body, scope) == expected
    masked = [t.replace("jane@example.com", "{EMAIL}").replace("Zürich", "{CITY}")
              for t in expected]
    rewritten = FMT.rewrite_prompt(body, scope, masked)
    assert rewritten is not None
    assert FMT.prompt_texts(rewritten, scope) == masked
    request = json.loads(rewritten)
    assert request["messages"][1]["content"][2] == REQUEST["messages"][1]["content"][2]
    assert request["messages"][0]["content"][1] == REQUEST["messages"][0]["content"][1]
    assert request["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert FMT.rewrite_prompt(body, scope, masked + ["extra"]) is None


@pytest.mark.parametrize(("request_body", "scope", "expected"), [
    ({"messages": [{"role": "user", "content": "Hallo"}]}, PromptScope.LAST_USER, ["Hallo"]),
    ({"system": "Be brief.", "messages": [{"role": "user", "content": "Hallo"}]},
     PromptScope.ALL_WITH_SYSTEM, ["Be brief.", "Hallo"]),
    ({"system": "Be brief.", "messages": [{"role": "user", "content": "Hallo"}]},
     PromptScope.ALL, ["Hallo"]),
    ({"messages": [{"role": "user", "content": "first"},
                   {"role": "user", "content": [{"type": "image", "source": {}}]}]},
     PromptScope.LAST_USER, []),
    ({"messages": "nope"}, PromptScope.ALL, []),
])
def test_prompt_shapes(request_body: dict[str, Any], scope: str, expected: list[str]) -> None:
    body = json.dumps(request_body).encode()
    assert FMT.prompt_texts(body, scope) == expected
