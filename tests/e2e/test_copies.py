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
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.test_apis import (
    BLOCKED_PHRASE,
    CLEAN_DELTAS,
    CLEAN_TEXT,
    EMAIL,
    VIOLATION,
    AnthropicAPI,
    ResponsesAPI,
    anthropic_client,
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
