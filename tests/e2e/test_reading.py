"""SSE read as the clients read it (issue 14, class 6), through real Envoy and the sidecar.

The rule, one place in each codec (``extproc.formats._common.APART`` names the channels):
text a client would not show is never glued to text it shows, and text any client shows is
checked. The cases, each a stream where the demo policy's whole word ``bazinga`` is what the
official SDK shows, while reading every event glued together gives ``xbazinga`` or
``bazingax`` (not the word) or reads the halves apart:

=====================  ==========================================  ============================
case                   what the official SDK does                  the sidecar
=====================  ==========================================  ============================
chat_after_done        ``openai`` stops at ``[DONE]``              after ``[DONE]``: apart
chat_bom               ``openai`` drops the first event after a    that event: apart
                       byte order mark (``\\ufeffdata`` is no
                       field); WHATWG readers keep it
anthropic_ping         ``anthropic`` skips events named ``ping``   apart
anthropic_unnamed      ... and events without a name               apart
anthropic_bom          ... and so the first event after a BOM      apart
anthropic_blocks       ``get_final_text()`` joins the text blocks  text blocks: one channel
=====================  ==========================================  ============================

Other clients (the Vercel AI SDK reads every event by its data) show the apart text too: it
is checked, on its own. And a masked delta in an event named ``ping`` goes out masked.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from testkit.upstream import Script, sse_data
from tests.e2e.conftest import Stack
from tests.e2e.test_apis import (
    EMAIL,
    AnthropicAPI,
    ChatAPI,
    named_event,
    parse_sse,
    post_raw,
)
from tests.unit.test_formats_common import anthropic_client as served_anthropic
from tests.unit.test_formats_common import openai_client as served_openai

CHAT = ChatAPI()
ANTHROPIC = AnthropicAPI()
BOM = b"\xef\xbb\xbf"


def chat(*contents: str) -> list[bytes]:
    return [sse_data(CHAT.chunk(content=text)) for text in contents]


def chat_end() -> list[bytes]:
    return [sse_data(CHAT.chunk(finish_reason="stop")), b"data: [DONE]\n\n"]


def block_delta(text: str, index: int = 0, name: str | None = "content_block_delta") -> bytes:
    payload = {"type": "content_block_delta", "index": index,
               "delta": {"type": "text_delta", "text": text}}
    if name is None:
        return sse_data(payload)
    return named_event(name, payload)


def anthropic_head(blocks: int = 1) -> list[bytes]:
    start = ANTHROPIC.stream_events([])[0]
    return [start, *(named_event("content_block_start",
                                 {"type": "content_block_start", "index": i,
                                  "content_block": {"type": "text", "text": ""}})
                     for i in range(blocks))]


def anthropic_end(blocks: int = 1) -> list[bytes]:
    return [*(named_event("content_block_stop", {"type": "content_block_stop", "index": i})
              for i in range(blocks)),
            named_event("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": "end_turn",
                                                    "stop_sequence": None},
                                          "usage": {"output_tokens": 9}}),
            named_event("message_stop", {"type": "message_stop"})]


# case -> (API, the stream's events); written in one piece, so that the first check reads all.
CASES: dict[str, tuple[ChatAPI | AnthropicAPI, list[bytes]]] = {
    "chat_after_done": (CHAT, [sse_data(CHAT.chunk(role="assistant", content="")),
                               *chat("The word is ", "bazinga"), *chat_end(), *chat("x")]),
    "chat_bom": (CHAT, [BOM + sse_data(CHAT.chunk(role="assistant", content="x")),
                        *chat("bazinga", " is the word."), *chat_end()]),
    "anthropic_ping": (ANTHROPIC, [*anthropic_head(), block_delta("x", name="ping"),
                                   block_delta("bazinga is the word."), *anthropic_end()]),
    "anthropic_unnamed": (ANTHROPIC, [*anthropic_head(), block_delta("x", name=None),
                                      block_delta("bazinga is the word."), *anthropic_end()]),
    "anthropic_bom": (ANTHROPIC, [BOM + block_delta("x"), *anthropic_head(),
                                  block_delta("bazinga is the word."), *anthropic_end()]),
    "anthropic_blocks": (ANTHROPIC, [*anthropic_head(2), block_delta("The word is bazi", 0),
                                     block_delta("nga.", 1), *anthropic_end(2)]),
}


def run(stack: Stack, api: ChatAPI | AnthropicAPI, events: list[bytes]) -> bytes:
    script = Script(chunks=(b"".join(events),),
                    headers=(("content-type", "text/event-stream; charset=utf-8"),))
    response, body = post_raw(stack, api.path, api.request("The word?", True),
                              stack.llm.register(script))
    assert response.status_code == 200
    return body


def sdk_text(api: ChatAPI | AnthropicAPI, body: bytes) -> str:
    """The text the official SDK gives an application for this body (no sidecar)."""
    if isinstance(api, ChatAPI):
        stream = served_openai(body).chat.completions.create(
            model=CHAT.model, messages=[{"role": "user", "content": "?"}], stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream
                       if chunk.choices)
    with served_anthropic(body).messages.stream(
            model=ANTHROPIC.model, max_tokens=64,
            messages=[{"role": "user", "content": "?"}]) as stream:
        return stream.get_final_text()


@pytest.mark.parametrize("name", CASES)
def test_the_premise_the_sdk_shows_the_word_alone(name: str) -> None:
    api, events = CASES[name]
    shown = sdk_text(api, b"".join(events))
    assert re.search(r"\bbazinga\b", shown), shown  # the whole word, as the policy matches it


@pytest.mark.parametrize("name", CASES)
def test_the_word_the_sdk_shows_is_read_alone(stack: Stack, name: str) -> None:
    api, events = CASES[name]
    body = run(stack, api, events)
    assert b"bazinga" not in body
    parsed = parse_sse(body.removeprefix(BOM))
    if isinstance(api, ChatAPI):
        assert body.endswith(b"data: [DONE]\n\n")
        assert parsed[-2].json()["error"]["type"] == "guardrail_violation"
    else:
        assert parsed[-1].event == "error"
        assert parsed[-1].json()["error"]["type"] == "guardrail_violation"


def test_chat_text_split_over_two_choice_indexes_is_read_joined(stack: Stack) -> None:
    # Clients that read choices[0] of each chunk (the Vercel AI SDK, most hand-written loops)
    # show "bazi" + "nga" joined; the SDKs' accumulators show them by index. Both are read.
    first = CHAT.chunk(content="The word is bazi")
    second = CHAT.chunk(content="nga.")
    second["choices"][0]["index"] = 1
    body = run(stack, CHAT, [sse_data(CHAT.chunk(role="assistant", content="")),
                             sse_data(first), sse_data(second), *chat_end()])
    assert b"bazi" not in body


def test_text_apart_is_checked_too(stack: Stack) -> None:
    # The Vercel AI SDK reads an event named ping by its data: the word there blocks.
    body = run(stack, ANTHROPIC, [*anthropic_head(), block_delta("Fine. "),
                                  block_delta("bazinga", name="ping"), *anthropic_end()])
    assert b"bazinga" not in body
    assert parse_sse(body)[-1].event == "error"


def test_a_masked_delta_in_a_ping_event_goes_out_masked(stack: Stack) -> None:
    body = run(stack, ANTHROPIC, [*anthropic_head(), block_delta("Hello. "),
                                  block_delta(f"Write to {EMAIL} today.", name="ping"),
                                  *anthropic_end()])
    assert EMAIL.encode() not in body
    pings: list[Any] = [e.json() for e in parse_sse(body) if e.event == "ping"]
    assert [p["delta"]["text"] for p in pings] == ["Write to {EMAIL} today."]
    assert parse_sse(body)[-1].event == "message_stop"


def test_clean_streams_with_apart_text_pass_unchanged(stack: Stack) -> None:
    events = [*anthropic_head(2), block_delta("x", name="ping"), block_delta("Fine ", 0),
              block_delta("words.", 1), *anthropic_end(2)]
    assert run(stack, ANTHROPIC, events) == b"".join(events)
    events = [sse_data(CHAT.chunk(role="assistant", content="")), *chat("All ", "good."),
              *chat_end(), *chat("late")]
    assert run(stack, CHAT, events) == b"".join(events)
    assert json.loads(events[1][6:])["choices"][0]["delta"]["content"] == "All "
