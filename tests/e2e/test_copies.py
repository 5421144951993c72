"""Text an answer repeats outside its deltas is read too (issue 14, class 5), through real Envoy
and the sidecar process.

A Responses stream says its text again in ``response.output_text.done``, the parts
(``content_part.added`` / ``.done``), the items (``output_item.added`` / ``.done``) and the
final ``response.completed``; the ``openai`` SDK's stream helper starts each part from the one
``content_part.added`` carries and hands the application the completed response. The sidecar
read only the deltas: an upstream whose copies say more than its deltas got that text to the
client unread. Each case below puts the demo policy's blocked phrase (``Project
Nightingale``) or an e-mail address (masked) where only a copy holds it.

Anthropic likewise: the ``anthropic`` SDK's accumulator starts the message from
``message_start.message`` (its ``content`` too) and each block from
``content_block_start.content_block``, then appends the deltas; the sidecar read the deltas
only.

Chat Completions: text beside ``delta.content`` that clients show: an audio answer's
``delta.audio.transcript``, tool and function names, and Mistral's content as a list of chunks
(``text`` parts, ``thinking`` parts); the sidecar read none of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from testkit.upstream import sse_data
from tests.e2e.conftest import Stack
from tests.e2e.test_apis import (
    BLOCKED_PHRASE,
    CLEAN_DELTAS,
    CLEAN_TEXT,
    EMAIL,
    VIOLATION,
    AnthropicAPI,
    ChatAPI,
    ResponsesAPI,
    anthropic_client,
    json_script,
    named_event,
    openai_client,
    parse_sse,
    post_raw,
    sse_script,
)

API = ResponsesAPI()
ANTHROPIC = AnthropicAPI()
Patch = Callable[[str, dict[str, Any]], None]


def patched(deltas: list[str], patch: Patch,
            api: ResponsesAPI | AnthropicAPI = API) -> list[bytes]:
    """The API's stream of ``deltas`` with ``patch(event name, payload)`` applied to every
    event."""
    out = []
    for event in parse_sse(b"".join(api.stream_events(deltas))):
        assert event.event is not None
        payload = event.json()
        patch(event.event, payload)
        out.append(named_event(event.event, payload))
    return out


def set_done_text(text: str) -> Patch:
    def patch(name: str, payload: dict[str, Any]) -> None:
        if name == "response.output_text.done":
            payload["text"] = text
    return patch


def set_completed_text(text: str) -> Patch:
    def patch(name: str, payload: dict[str, Any]) -> None:
        if name == "response.completed":
            payload["response"]["output"][0]["content"][0]["text"] = text
    return patch


def set_item_done_text(text: str) -> Patch:
    def patch(name: str, payload: dict[str, Any]) -> None:
        if name == "response.output_item.done":
            payload["item"]["content"][0]["text"] = text
    return patch


def set_added_part_text(text: str) -> Patch:
    # The part starts with text; the deltas continue it, and every later copy says the whole.
    def patch(name: str, payload: dict[str, Any]) -> None:
        if name == "response.content_part.added":
            payload["part"]["text"] = text
        elif name == "response.output_text.done":
            payload["text"] = text + payload["text"]
        elif name in ("response.content_part.done",):
            payload["part"]["text"] = text + payload["part"]["text"]
        elif name == "response.output_item.done":
            payload["item"]["content"][0]["text"] = text + payload["item"]["content"][0]["text"]
        elif name == "response.completed":
            part = payload["response"]["output"][0]["content"][0]
            part["text"] = text + part["text"]
    return patch


BLOCKED_ELSEWHERE = f"The plan is called {BLOCKED_PHRASE} and it ships soon."

# name -> the stream, where only a copy (or a copy and the deltas together) says the phrase
BLOCKED_CASES: dict[str, list[bytes]] = {
    "done_differs": patched(CLEAN_DELTAS, set_done_text(BLOCKED_ELSEWHERE)),
    "completed_differs": patched(CLEAN_DELTAS, set_completed_text(BLOCKED_ELSEWHERE)),
    "item_done_differs": patched(CLEAN_DELTAS, set_item_done_text(BLOCKED_ELSEWHERE)),
    # "Project " in the added part, "Nightingale ..." in the deltas: only joined is it the
    # phrase, as the SDK's accumulator joins them.
    "added_part_continued": patched(["Nightingale ", "ships soon. ", *CLEAN_DELTAS],
                                    set_added_part_text("The plan is called Project ")),
}


@pytest.mark.parametrize("name", BLOCKED_CASES)
def test_a_phrase_only_a_copy_holds_is_blocked(stack: Stack, name: str) -> None:
    script_id = stack.llm.register(sse_script(BLOCKED_CASES[name], delays_ms=5))
    response, body = post_raw(stack, API.path, API.request("The plan?", True), script_id)
    assert response.status_code == 200
    assert b"Nightingale" not in body
    error = parse_sse(body)[-2]
    assert error.event == "error" and error.json()["message"] == VIOLATION


def test_the_sdk_raises_where_it_would_have_shown_the_copy(stack: Stack) -> None:
    script_id = stack.llm.register(sse_script(BLOCKED_CASES["completed_differs"]))
    seen: list[str] = []
    with openai_client(stack, script_id) as sdk, pytest.raises(openai.APIError) as caught:
        with sdk.responses.stream(model=API.model, input="The plan?") as stream:
            for event in stream:
                seen.append(json.dumps(event.model_dump()))
    assert caught.value.message == VIOLATION
    assert "Nightingale" not in "".join(seen)


def test_a_clean_stream_with_equal_copies_is_byte_identical(stack: Stack) -> None:
    events = API.stream_events(CLEAN_DELTAS)
    script_id = stack.llm.register(sse_script(events))
    response, body = post_raw(stack, API.path, API.request("Coffee?", True), script_id)
    assert response.status_code == 200
    assert body == b"".join(events)


def test_an_address_only_the_done_item_holds_is_masked_there(stack: Stack) -> None:
    leaked = f"{CLEAN_TEXT} Write to {EMAIL}."
    events = patched(CLEAN_DELTAS, set_item_done_text(leaked))
    script_id = stack.llm.register(sse_script(events))
    response, body = post_raw(stack, API.path, API.request("Coffee?", True), script_id)
    assert response.status_code == 200
    assert EMAIL.encode() not in body
    parsed = parse_sse(body)
    [item_done] = [e for e in parsed if e.event == "response.output_item.done"]
    assert item_done.json()["item"]["content"][0]["text"] == leaked.replace(EMAIL, "{EMAIL}")
    # The deltas and the other copies said the clean text; they pass as they came.
    [text_done] = [e for e in parsed if e.event == "response.output_text.done"]
    assert text_done.json()["text"] == CLEAN_TEXT
    assert parsed[-1].event == "response.completed"


# -- Anthropic ------------------------------------------------------------------------------


def block_start_text(text: str) -> Patch:
    def patch(name: str, payload: dict[str, Any]) -> None:
        if name == "content_block_start":
            payload["content_block"]["text"] = text
    return patch


def message_start_content(text: str) -> Patch:
    def patch(name: str, payload: dict[str, Any]) -> None:
        if name == "message_start":
            payload["message"]["content"] = [{"type": "text", "text": text}]
        elif name in ("content_block_start", "content_block_delta", "content_block_stop"):
            payload["index"] = 1  # the streamed block follows the one the start holds
    return patch


ANTHROPIC_BLOCKED: dict[str, list[bytes]] = {
    # "Project " in the block start, "Nightingale ..." in the deltas.
    "block_start_continued": patched(["Nightingale ", "ships soon. ", *CLEAN_DELTAS],
                                     block_start_text("The plan is called Project "),
                                     ANTHROPIC),
    "message_start_content": patched(CLEAN_DELTAS, message_start_content(BLOCKED_ELSEWHERE),
                                     ANTHROPIC),
}


@pytest.mark.parametrize("name", ANTHROPIC_BLOCKED)
def test_anthropic_text_a_start_holds_is_read(stack: Stack, name: str) -> None:
    script_id = stack.llm.register(sse_script(ANTHROPIC_BLOCKED[name]))
    with anthropic_client(stack, script_id) as sdk, \
            pytest.raises(anthropic.APIStatusError) as caught:
        with sdk.messages.stream(model=ANTHROPIC.model, max_tokens=512,
                                 messages=[{"role": "user", "content": "The plan?"}]) as stream:
            for _ in stream:
                pass
    assert caught.value.body == {"type": "error",
                                 "error": {"type": "guardrail_violation", "message": VIOLATION}}
    response, body = post_raw(stack, ANTHROPIC.path, ANTHROPIC.request("The plan?", True),
                              stack.llm.register(sse_script(ANTHROPIC_BLOCKED[name])))
    assert response.status_code == 200
    assert b"Nightingale" not in body
    assert parse_sse(body)[-1].event == "error"


def test_anthropic_an_address_a_block_start_holds_is_masked(stack: Stack) -> None:
    events = patched(CLEAN_DELTAS, block_start_text(f"Write to {EMAIL}. "), ANTHROPIC)
    script_id = stack.llm.register(sse_script(events))
    with anthropic_client(stack, script_id) as sdk:
        with sdk.messages.stream(model=ANTHROPIC.model, max_tokens=512,
                                 messages=[{"role": "user", "content": "Coffee?"}]) as stream:
            message = stream.get_final_message()
    block = message.content[0]
    assert block.type == "text"
    assert block.text == "Write to {EMAIL}. " + CLEAN_TEXT


def test_anthropic_clean_stream_is_byte_identical(stack: Stack) -> None:
    events = ANTHROPIC.stream_events(CLEAN_DELTAS)
    script_id = stack.llm.register(sse_script(events))
    response, body = post_raw(stack, ANTHROPIC.path, ANTHROPIC.request("Coffee?", True),
                              script_id)
    assert response.status_code == 200
    assert body == b"".join(events)


# -- Chat Completions: text beside the content -------------------------------------------------

CHAT = ChatAPI()


def chat_stream(*deltas: dict[str, Any]) -> list[bytes]:
    return [sse_data(CHAT.chunk(role="assistant", content="")),
            *(sse_data(CHAT.chunk(**delta)) for delta in deltas),
            sse_data(CHAT.chunk(finish_reason="stop")), b"data: [DONE]\n\n"]


CHAT_BLOCKED: dict[str, list[bytes]] = {
    "audio_transcript": chat_stream(
        {"audio": {"id": "audio_1", "data": "UklGRg==", "transcript": "The plan is called "}},
        {"audio": {"data": "UklGRg==", "transcript": "Project Nightingale."}}),
    "tool_name": chat_stream(
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "Project Nightingale", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
    "mistral_text_parts": chat_stream(
        {"content": [{"type": "text", "text": "The plan is called Project "}]},
        {"content": [{"type": "text", "text": "Nightingale and it ships soon."}]}),
    # Logprob tokens that are not the content: clients that show tokens show them.
    "logprob_tokens": [sse_data(CHAT.chunk(role="assistant", content="")),
                       sse_data({**CHAT.chunk(content="Fine."), "choices": [{
                           "index": 0, "delta": {"content": "Fine."}, "finish_reason": None,
                           "logprobs": {"content": [
                               {"token": "Project Nightingale", "logprob": -0.1,
                                "bytes": list(b"Project Nightingale"), "top_logprobs": []}],
                               "refusal": None}}]}),
                       sse_data(CHAT.chunk(finish_reason="stop")), b"data: [DONE]\n\n"],
    # Alternatives in top_logprobs: a playground shows them beside the chosen token.
    "top_logprobs": [sse_data(CHAT.chunk(role="assistant", content="")),
                     sse_data({**CHAT.chunk(content="Fine."), "choices": [{
                         "index": 0, "delta": {"content": "Fine."}, "finish_reason": None,
                         "logprobs": {"content": [
                             {"token": "Fine.", "logprob": -0.1, "bytes": list(b"Fine."),
                              "top_logprobs": [
                                  {"token": "Fine.", "logprob": -0.1,
                                   "bytes": list(b"Fine.")},
                                  {"token": "Project Nightingale", "logprob": -2.3,
                                   "bytes": list(b"Project Nightingale")}]}],
                             "refusal": None}}]}),
                     sse_data(CHAT.chunk(finish_reason="stop")), b"data: [DONE]\n\n"],
    "mistral_thinking": chat_stream(
        {"content": [{"type": "thinking",
                      "thinking": [{"type": "text", "text": "Call it Project Nightingale"}]}]},
        {"content": "Sure."}),
}


@pytest.mark.parametrize("name", CHAT_BLOCKED)
def test_chat_text_beside_the_content_is_read(stack: Stack, name: str) -> None:
    script_id = stack.llm.register(sse_script(CHAT_BLOCKED[name]))
    response, body = post_raw(stack, CHAT.path, CHAT.request("The plan?", True), script_id)
    assert response.status_code == 200
    assert b"Nightingale" not in body
    assert body.endswith(b"data: [DONE]\n\n")
    error = parse_sse(body)[-2].json()
    assert error["error"]["type"] == "guardrail_violation"


def test_chat_an_address_in_the_transcript_is_masked(stack: Stack) -> None:
    events = chat_stream({"audio": {"id": "audio_1", "transcript": f"Write to {EMAIL} today."}})
    script_id = stack.llm.register(sse_script(events))
    response, body = post_raw(stack, CHAT.path, CHAT.request("Mail?", True), script_id)
    assert response.status_code == 200
    assert EMAIL.encode() not in body
    transcripts = [e.json()["choices"][0]["delta"]["audio"]["transcript"]
                   for e in parse_sse(body)[:-1]
                   if "audio" in e.json()["choices"][0]["delta"]]
    assert transcripts == ["Write to {EMAIL} today."]


def test_chat_logprob_tokens_of_a_whole_answer_are_read(stack: Stack) -> None:
    # A non-streamed answer's logprobs: an alternative token is blocked; an address in a
    # chosen token that is not the content drops the logprobs, the content stays.
    answer = CHAT.json_answer("Fine.")
    answer["choices"][0]["logprobs"] = {"refusal": None, "content": [
        {"token": "Fine.", "logprob": -0.1, "bytes": list(b"Fine."), "top_logprobs": [
            {"token": "Project Nightingale", "logprob": -2.3, "bytes": None}]}]}
    response, body = post_raw(stack, CHAT.path, CHAT.request("The plan?", False),
                              stack.llm.register(json_script(answer)))
    assert response.status_code == 400
    assert b"Nightingale" not in body
    answer["choices"][0]["logprobs"]["content"] = [
        {"token": f"Write to {EMAIL}", "logprob": -0.1, "bytes": None, "top_logprobs": []}]
    response, body = post_raw(stack, CHAT.path, CHAT.request("Mail?", False),
                              stack.llm.register(json_script(answer)))
    assert response.status_code == 200
    choice = json.loads(body)["choices"][0]
    assert choice["logprobs"] is None and choice["message"]["content"] == "Fine."
