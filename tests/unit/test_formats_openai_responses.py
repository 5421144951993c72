"""OpenAI Responses: channels of a recorded stream (reasoning summary, message text, function
call), masking that also reaches the ``*.done`` events and ``response.completed``, and the
frames through the official ``openai`` SDK (raw ``responses.create(stream=True)`` and the
``responses.stream()`` helper, which checks event order and output identities).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from typing import Any

import openai
import pytest

from extproc.formats import ErrorKind, PromptScope, StreamCodec
from extproc.formats.openai_responses import OpenAIResponses
from extproc.sse import SSEEvent
from extproc.stream.masking import align, shift_offset
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

FMT = OpenAIResponses()
RAW = fixture("responses_stream.sse")
EVENTS = decode(RAW, chunk_size=13)
SUMMARY = "**Checking the weather**\n\nThe user wants Zürich's weather; I'll call get_weather."
TEXT = "Je vais vérifier la météo à Zürich (チューリッヒ) pour vous 🙂."
ARGUMENTS = '{"location":"Zür' + 'ich, CH","unit":"celsius"}'
RESPONSE_ID = "resp_68a3f1c2e0d88193b6d2c7e4a1f05b3e0c9d2a7f4e6b1c85"
LAST_SEQ = 35


def index_of(kind: str, nth: int = 0) -> int:
    """Position in EVENTS of the ``nth`` event of type ``kind``."""
    positions = [i for i, e in enumerate(EVENTS) if json.loads(e.data or "{}").get("type") == kind]
    return positions[nth]


def stream_of(released: int, end: Callable[[StreamCodec], bytes],
              mask: Callable[[Hashable, str], str] | None = None) -> bytes:
    """The first ``released`` events as the guard sends them (every event extracted), then
    ``end``."""
    codec = FMT.stream_codec()
    per_event = [codec.extract(e) for e in EVENTS]
    out = []
    for event, found in zip(EVENTS[:released], per_event, strict=False):
        changed = {ch: mask(ch, t) for ch, t in found} if mask else {}
        out.append(codec.rewrite(event, {k: v for k, v in changed.items()
                                         if v != dict(found)[k]}))
    return b"".join(out) + end(codec)


def create_stream(body: bytes) -> Any:
    return openai_client(body).responses.create(model="gpt-5-mini", input="Météo ?",
                                                stream=True)


def helper_stream(body: bytes) -> Any:
    return openai_client(body).responses.stream(model="gpt-5-mini", input="Météo ?")


# --------------------------------------------------------------------------- extract


def test_recorded_stream_channels() -> None:
    found = extract_all(FMT.stream_codec(), EVENTS)
    assert joined(found) == {("summary", 0, 0): SUMMARY, ("text", 1, 0): TEXT,
                             ("arguments", 2): ARGUMENTS}
    assert [ch for ch, _ in found].count(("text", 1, 0)) == 6
    assert json.loads(ARGUMENTS) == {"location": "Zürich, CH", "unit": "celsius"}


@pytest.mark.parametrize(("payload", "expected"), [
    ({"type": "response.refusal.delta", "output_index": 3, "content_index": 1,
      "item_id": "msg_1", "delta": "I can't"}, [(("refusal", 3, 1), "I can't")]),
    ({"type": "response.custom_tool_call_input.delta", "output_index": 2, "item_id": "ctc_1",
      "delta": "print("}, [(("input", 2), "print(")]),
    ({"type": "response.mcp_call_arguments.delta", "output_index": 4, "item_id": "mcp_1",
      "delta": "{\"q\""}, [(("arguments", 4), "{\"q\"")]),
    ({"type": "response.reasoning_text.delta", "output_index": 0, "content_index": 0,
      "item_id": "rs_1", "delta": "hmm"}, [(("reasoning", 0, 0), "hmm")]),
    ({"type": "response.output_text.delta", "output_index": 0, "content_index": 0,
      "delta": ""}, []),
    ({"type": "response.output_text.delta", "output_index": 0, "content_index": 0,
      "delta": 7}, []),
    # A done event whose text no delta streamed: the client shows it, so it is read.
    ({"type": "response.output_text.done", "output_index": 0, "content_index": 0,
      "text": "whole"}, [(("text", 0, 0), "whole")]),
    ({"type": "response.output_text.annotation.added", "output_index": 0,
      "annotation": {"type": "url_citation", "url": "https://example.com"}}, []),
    ({"type": "error", "code": "x", "message": "y"}, []),
])
def test_extract_event_kinds(payload: dict[str, Any], expected: list[Any]) -> None:
    event = SSEEvent(raw=b"", event=payload["type"], data=json.dumps(payload))
    assert FMT.stream_codec().extract(event) == expected


# --------------------------------------------------------------------------- terminal frame


@pytest.mark.parametrize(("kind", "message", "status"),
                         [(ErrorKind.VIOLATION, VIOLATION_MESSAGE, "400"),
                          (ErrorKind.UNAVAILABLE, UNAVAILABLE_MESSAGE, "503")])
@pytest.mark.parametrize("released", [0, 2, 9, 14, 25])
def test_terminal_frame_raises_in_the_sdk(kind: str, message: str, status: str,
                                          released: int) -> None:
    body = stream_of(released, lambda c: c.terminal_frame(kind))
    seen = []
    with pytest.raises(openai.APIError) as caught:
        for event in create_stream(body):
            seen.append(event.type)
    assert caught.value.message == message
    assert caught.value.type == kind
    assert caught.value.code == status  # the HTTP status: a 400 is not retried (test_ai_sdk)
    assert len(seen) == released
    # The stream helper, which checks event order, raises the same error.
    with pytest.raises(openai.APIError, match=message):
        with helper_stream(body) as stream:
            for _ in stream:
                pass


def test_terminal_frame_shape_and_sequence_numbers() -> None:
    body = stream_of(9, lambda c: c.terminal_frame(ErrorKind.VIOLATION))
    frame = sse_payloads(body)[9:]
    (name, error), (failed_name, failed) = frame
    assert name == "error"
    assert error == {
        "type": "error", "code": "400", "message": VIOLATION_MESSAGE,
        "param": None, "sequence_number": LAST_SEQ + 1,
        "error": {"type": "guardrail_violation", "code": "400",
                  "message": VIOLATION_MESSAGE, "param": None}}
    # Past the last sequence number seen, even of events the client never got.
    assert failed_name == "response.failed"
    assert failed["sequence_number"] == LAST_SEQ + 2
    assert failed["response"]["id"] == RESPONSE_ID
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "guardrail_violation",
                                           "message": VIOLATION_MESSAGE}
    assert b"[DONE]" not in body


def test_terminal_frame_before_response_created_is_the_error_alone() -> None:
    frame = FMT.stream_codec().terminal_frame(ErrorKind.VIOLATION)
    payloads = sse_payloads(frame)
    assert [name for name, _ in payloads] == ["error"]
    assert payloads[0][1]["sequence_number"] == 0


# --------------------------------------------------------------------------- soft block


@pytest.mark.parametrize("released", [0, 1, 2, 6, 9, 14, 16, 20, 25, 31])
def test_soft_block_parsed_cleanly_by_the_stream_helper(released: int) -> None:
    body = stream_of(released, lambda c: c.soft_block_frame(SOFT_MESSAGE))
    with helper_stream(body) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed"
    assert final.id == RESPONSE_ID if released else final.id
    assert final.status == "incomplete"
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "content_filter"
    assert final.output_text.endswith(SOFT_MESSAGE)
    assert TEXT.startswith(final.output_text[:-len(SOFT_MESSAGE)])
    assert all(item.status in ("completed", "incomplete", None) for item in final.output)
    # Sequence numbers keep increasing.
    numbers = [p["sequence_number"] for _, p in sse_payloads(body)]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def test_soft_block_mid_text_closes_the_open_message() -> None:
    released = index_of("response.output_text.delta", 3)  # three text deltas out
    body = stream_of(released, lambda c: c.soft_block_frame(SOFT_MESSAGE))
    payloads = sse_payloads(body)[released:]
    kinds = [p["type"] for _, p in payloads]
    assert kinds == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    partial = "Je vais vérifier la météo à Zürich"
    assert payloads[0][1]["text"] == partial
    assert payloads[2][1]["item"]["status"] == "incomplete"
    assert payloads[2][1]["item"]["content"][0]["text"] == partial
    assert payloads[3][1]["output_index"] == 2
    final = payloads[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message", "message"]
    assert final["output"][2]["content"][0]["text"] == SOFT_MESSAGE
    with helper_stream(body) as stream:
        assert stream.get_final_response().output_text == partial + SOFT_MESSAGE


def test_soft_block_mid_function_call() -> None:
    released = index_of("response.function_call_arguments.delta", 4)
    body = stream_of(released, lambda c: c.soft_block_frame(SOFT_MESSAGE))
    payloads = sse_payloads(body)[released:]
    assert payloads[0][1]["type"] == "response.function_call_arguments.done"
    assert payloads[0][1]["arguments"] == '{"location":"Zür'
    assert payloads[1][1]["item"]["status"] == "incomplete"
    with helper_stream(body) as stream:
        final = stream.get_final_response()
    assert [item.type for item in final.output] == [
        "reasoning", "message", "function_call", "message"]
    assert final.output_text == TEXT + SOFT_MESSAGE


def test_soft_block_raw_events_end_with_completed() -> None:
    body = stream_of(5, lambda c: c.soft_block_frame(SOFT_MESSAGE))
    events = list(create_stream(body))
    assert events[-1].type == "response.completed"
    assert events[-1].response.incomplete_details.reason == "content_filter"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == [SOFT_MESSAGE]


def test_soft_block_with_nothing_seen_is_a_whole_answer() -> None:
    body = FMT.stream_codec().soft_block_frame(SOFT_MESSAGE)
    with helper_stream(body) as stream:
        final = stream.get_final_response()
    assert final.output_text == SOFT_MESSAGE
    assert final.status == "incomplete"


# --------------------------------------------------------------------------- masking


def mask_city(channel: Hashable, text: str) -> str:
    return text.replace("Zürich", "{CITY}").replace(" à ", " À ")


def test_masking_reaches_done_events_and_the_final_response() -> None:
    body = release(FMT.stream_codec(), EVENTS, mask_city)
    masked_text = TEXT.replace(" à ", " À ").replace("Zürich", "{CITY}")
    masked_summary = SUMMARY.replace("Zürich", "{CITY}")
    assert masked_text != TEXT
    decoded = json.dumps([p for _, p in sse_payloads(body)], ensure_ascii=False)
    assert TEXT not in decoded
    assert SUMMARY not in decoded
    with helper_stream(body) as stream:
        done_texts = [e.text for e in stream if e.type == "response.output_text.done"]
        final = stream.get_final_response()
    assert done_texts == [masked_text]
    assert final.output_text == masked_text
    assert final.output[0].summary[0].text == masked_summary
    # Arguments were split ("Zür" + "ich") so no delta changed: they stay as sent.
    assert final.output[2].arguments == ARGUMENTS


def test_masking_only_rewrites_what_changed() -> None:
    body = release(FMT.stream_codec(), EVENTS, mask_city)
    before = {e.raw for e in EVENTS}
    after = decode(body)
    changed_types = {json.loads(e.data or "{}")["type"] for e in after if e.raw not in before}
    assert changed_types == {
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done", "response.completed"}
    assert len(after) == len(EVENTS)


def test_masked_delta_drops_logprobs() -> None:
    payload = {"type": "response.output_text.delta", "sequence_number": 4, "item_id": "m",
               "output_index": 0, "content_index": 0, "delta": "Jane",
               "logprobs": [{"token": "Jane", "logprob": -0.1, "top_logprobs": []}]}
    event = decode(f"event: response.output_text.delta\ndata: {json.dumps(payload)}\n\n"
                   .encode())[0]
    codec = FMT.stream_codec()
    codec.extract(event)
    out = decode(codec.rewrite(event, {("text", 0, 0): "{NAME}"}))[0]
    assert out.event == "response.output_text.delta"
    assert json.loads(out.data or "")["delta"] == "{NAME}"
    assert json.loads(out.data or "")["logprobs"] == []


# --------------------------------------------------------------------------- copies


def event_of(payload: dict[str, Any]) -> SSEEvent:
    return decode(f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode())[0]


def text_event(kind: str, **fields: Any) -> SSEEvent:
    return event_of({"type": kind, "output_index": 0, "content_index": 0, **fields})


def part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "text": text}


def completed(text: str) -> SSEEvent:
    item = {"id": "m", "type": "message", "role": "assistant", "content": [part(text)]}
    return event_of({"type": "response.completed", "response": {"output": [item]}})


CH = ("text", 0, 0)


def test_copies_that_repeat_the_stream_are_not_read_again() -> None:
    codec = FMT.stream_codec()
    steps = [
        (text_event("response.content_part.added", part=part("")), []),
        (text_event("response.output_text.delta", delta="Hello "), [(CH, "Hello ")]),
        (text_event("response.output_text.delta", delta="world"), [(CH, "world")]),
        (text_event("response.output_text.done", text="Hello world"), []),
        (text_event("response.content_part.done", part=part("Hello world")), []),
        (completed("Hello world"), []),
    ]
    for event, expected in steps:
        assert codec.extract(event) == expected
    for event, _ in steps:
        assert codec.rewrite(event, {}) == event.raw


def test_a_copy_that_continues_the_stream_is_more_of_its_channel() -> None:
    # The SDK's accumulator starts the part from content_part.added and appends the deltas.
    codec = FMT.stream_codec()
    assert codec.extract(text_event("response.content_part.added",
                                    part=part("Project "))) == [(CH, "Project ")]
    assert codec.extract(text_event("response.output_text.delta",
                                    delta="Nightingale")) == [(CH, "Nightingale")]
    assert codec.extract(completed("Project Nightingale!")) == [(CH, "!")]
    assert codec.text_ended


def test_a_copy_that_disagrees_is_read_on_its_own_channel_once() -> None:
    codec = FMT.stream_codec()
    codec.extract(text_event("response.output_text.delta", delta="Hello"))
    copy_channel = ("copy", CH, 0)
    assert codec.extract(text_event("response.output_text.done",
                                    text="Goodbye")) == [(copy_channel, "Goodbye")]
    assert codec.extract(completed("Goodbye")) == []  # the same text: already read
    assert codec.extract(completed("Farewell")) == [(("copy", CH, 1), "Farewell")]


def test_a_masked_copy_is_rewritten_wherever_it_repeats() -> None:
    codec = FMT.stream_codec()
    delta = text_event("response.output_text.delta", delta="Hi")
    done = text_event("response.output_text.done", text="Mail jane@example.com",
                      logprobs=[{"token": "jane", "logprob": -0.1}])
    final = completed("Mail jane@example.com")
    for event in (delta, done, final):
        codec.extract(event)
    assert codec.rewrite(delta, {}) == delta.raw
    out = json.loads(decode(codec.rewrite(done, {("copy", CH, 0): "Mail {EMAIL}"}))[0].data
                     or "")
    assert out["text"] == "Mail {EMAIL}" and out["logprobs"] == []
    out = json.loads(decode(codec.rewrite(final, {}))[0].data or "")
    assert out["response"]["output"][0]["content"][0]["text"] == "Mail {EMAIL}"


def test_a_masked_continuation_joins_the_channel_as_sent() -> None:
    codec = FMT.stream_codec()
    added = text_event("response.content_part.added", part=part("Mail jane@example.com "))
    delta = text_event("response.output_text.delta", delta="today")
    done = text_event("response.output_text.done", text="Mail jane@example.com today")
    for event in (added, delta, done):
        codec.extract(event)
    out = json.loads(decode(codec.rewrite(added, {CH: "Mail {EMAIL} "}))[0].data or "")
    assert out["part"]["text"] == "Mail {EMAIL} "
    assert codec.rewrite(delta, {}) == delta.raw
    out = json.loads(decode(codec.rewrite(done, {}))[0].data or "")
    assert out["text"] == "Mail {EMAIL} today"


# --------------------------------------------------------------------------- error bodies


def test_error_body_in_the_sdk() -> None:
    status, body = FMT.error_body(ErrorKind.VIOLATION)
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(body, status=status, json_body=True).responses.create(
            model="m", input="x")
    assert caught.value.type == "guardrail_violation"
    assert caught.value.body["message"] == VIOLATION_MESSAGE  # type: ignore[index]
    status, body = FMT.error_body(ErrorKind.UNAVAILABLE)
    with pytest.raises(openai.InternalServerError):
        openai_client(body, status=status, json_body=True).responses.create(
            model="m", input="x")


# --------------------------------------------------------------------------- non-streamed


def final_response() -> dict[str, Any]:
    payloads = sse_payloads(RAW)
    return dict(payloads[-1][1]["response"])


def test_response_texts_match_the_stream_channels() -> None:
    body = json.dumps(final_response()).encode()
    assert FMT.response_texts(body) == [
        (("summary", 0, 0), SUMMARY), (("text", 1, 0), TEXT), (("arguments", 2), ARGUMENTS)]


def test_rewrite_response_parsed_by_the_sdk() -> None:
    body = FMT.rewrite_response(json.dumps(final_response()).encode(), {
        ("text", 1, 0): "Je vais vérifier la météo à {CITY}.",
        ("arguments", 2): '{"location":"{CITY}","unit":"celsius"}'})
    response = openai_client(body, json_body=True).responses.create(model="m", input="x")
    assert response.output_text == "Je vais vérifier la météo à {CITY}."
    assert response.output[2].arguments == '{"location":"{CITY}","unit":"celsius"}'  # type: ignore[union-attr]
    assert response.output[0].summary[0].text == SUMMARY  # type: ignore[union-attr]


@pytest.mark.parametrize("original", ["final", None, "garbage"])
def test_soft_block_response_parsed_by_the_sdk(original: str | None) -> None:
    source = {"final": json.dumps(final_response()).encode(), None: None,
              "garbage": b"<html>"}[original]
    body = FMT.soft_block_response(source, SOFT_MESSAGE)
    response = openai_client(body, json_body=True).responses.create(model="m", input="x")
    assert response.output_text == SOFT_MESSAGE
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "content_filter"
    assert len(response.output) == 1
    if original == "final":
        assert response.id == RESPONSE_ID
        assert response.usage is not None and response.usage.total_tokens == 237


# --------------------------------------------------------------------------- prompts

REQUEST: dict[str, Any] = {
    "model": "gpt-5-mini",
    "instructions": "You are a concise travel assistant.",
    "input": [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Quel temps fait-il à Zürich ?"},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Je vérifie.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": "{\"location\":\"Zürich\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "{\"temp\": 4}"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Et demain ? jane@example.com"},
            {"type": "input_image", "image_url": "https://example.com/a.png"},
            {"type": "input_text", "text": "Merci 🙂"}]},
    ],
}


@pytest.mark.parametrize(("scope", "expected"), [
    (PromptScope.LAST_USER, ["Et demain ? jane@example.com", "Merci 🙂"]),
    (PromptScope.ALL, ["Quel temps fait-il à Zürich ?", "Je vérifie.", "{\"temp\": 4}",
                       "Et demain ? jane@example.com", "Merci 🙂"]),
    (PromptScope.ALL_WITH_SYSTEM, [
        "You are a concise travel assistant.", "Answer in French.",
        "Quel temps fait-il à Zürich ?", "Je vérifie.", "{\"temp\": 4}",
        "Et demain ? jane@example.com", "Merci 🙂"]),
])
def test_prompt_scopes_and_rewrite(scope: str, expected: list[str]) -> None:
    body = json.dumps(REQUEST).encode()
    assert FMT.prompt_texts(body, scope) == expected
    masked = [t.replace("jane@example.com", "{EMAIL}") + "!" for t in expected]
    rewritten = FMT.rewrite_prompt(body, scope, masked)
    assert rewritten is not None
    assert FMT.prompt_texts(rewritten, scope) == masked
    request = json.loads(rewritten)
    assert request["input"][3] == REQUEST["input"][3]
    assert request["input"][5]["content"][1] == REQUEST["input"][5]["content"][1]
    assert FMT.rewrite_prompt(body, scope, masked[1:]) is None


@pytest.mark.parametrize(("request_body", "scope", "expected"), [
    ({"input": "Bonjour"}, PromptScope.LAST_USER, ["Bonjour"]),
    ({"input": "Bonjour", "instructions": "Sois bref."}, PromptScope.ALL, ["Bonjour"]),
    ({"input": "Bonjour", "instructions": "Sois bref."}, PromptScope.ALL_WITH_SYSTEM,
     ["Sois bref.", "Bonjour"]),
    ({"previous_response_id": "resp_1", "instructions": "Sois bref."},
     PromptScope.ALL_WITH_SYSTEM, ["Sois bref."]),
    ({"input": [{"role": "assistant", "content": "hi"}]}, PromptScope.LAST_USER, []),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "42"}]},
     PromptScope.LAST_USER, []),
    ({"input": 5}, PromptScope.ALL, []),
])
def test_prompt_shapes(request_body: dict[str, Any], scope: str, expected: list[str]) -> None:
    body = json.dumps(request_body).encode()
    assert FMT.prompt_texts(body, scope) == expected
    rewritten = FMT.rewrite_prompt(body, scope, [t.upper() for t in expected])
    assert rewritten is not None
    assert FMT.prompt_texts(rewritten, scope) == [t.upper() for t in expected]


# --------------------------------------------------------------------------- offsets


def test_masking_moves_the_offsets_into_the_masked_text() -> None:
    # Issue 14, class 9: a url_citation's start_index/end_index point into the text; a mask
    # that shortens the text before them must move them, in every event that carries them.
    deltas = ["Write to jane.doe@exam", "ple.com. ", "Prices rose 5% ", "in May."]
    text = "".join(deltas)
    cited = "Prices rose 5%"
    annotation = {"type": "url_citation", "start_index": text.index(cited),
                  "end_index": text.index(cited) + len(cited), "url": "https://example.com",
                  "title": "Prices"}
    part = {"type": "output_text", "annotations": [annotation], "logprobs": [], "text": text}
    item = {"id": "m", "type": "message", "status": "completed", "role": "assistant",
            "content": [part]}
    events = [text_event("response.output_text.delta", delta=d) for d in deltas]
    events += [
        text_event("response.output_text.annotation.added", annotation_index=0,
                   annotation=annotation),
        text_event("response.output_text.done", text=text),
        text_event("response.content_part.done", part=part),
        event_of({"type": "response.output_item.done", "output_index": 0, "item": item}),
        event_of({"type": "response.completed", "response": {"output": [item]}}),
    ]
    codec = FMT.stream_codec()
    for event in events:
        codec.extract(event)
    masks = [{CH: "Write to {EMAIL}"}, {CH: ". "}, {}, {}]
    out = [codec.rewrite(e, m) for e, m in zip(events, masks + [{}] * 5, strict=True)]
    payloads = [json.loads(decode(o)[0].data or "") for o in out]
    masked = "".join(p["delta"] for p in payloads[:4])
    assert masked == "Write to {EMAIL}. Prices rose 5% in May."
    found = [payloads[4]["annotation"],
             payloads[6]["part"]["annotations"][0],
             payloads[7]["item"]["content"][0]["annotations"][0],
             payloads[8]["response"]["output"][0]["content"][0]["annotations"][0]]
    for shifted in found:
        assert masked[shifted["start_index"]:shifted["end_index"]] == cited
    assert payloads[6]["part"]["text"] == masked


def test_offsets_of_an_unmasked_stream_are_left_alone() -> None:
    codec = FMT.stream_codec()
    annotation = {"type": "url_citation", "start_index": 0, "end_index": 5, "url": "u",
                  "title": "t"}
    events = [text_event("response.output_text.delta", delta="Hello world"),
              text_event("response.output_text.annotation.added", annotation_index=0,
                         annotation=annotation)]
    for event in events:
        codec.extract(event)
    assert [codec.rewrite(e, {}) for e in events] == [e.raw for e in events]


@pytest.mark.parametrize(("offset", "end", "expected"), [
    (0, False, 0), (9, False, 9), (9, True, 9),  # before the address
    (12, False, 9), (12, True, 16),  # inside it: its start, or its end for an end
    (29, False, 16), (29, True, 16),  # right after it
    (35, False, 22), (99, False, 86),  # later, and past the text
])
def test_shift_offset(offset: int, end: bool, expected: int) -> None:
    original = "Write to jane.doe@example.com today"
    masked = "Write to {EMAIL} today"
    assert shift_offset(align(original, masked), offset, end=end) == expected
