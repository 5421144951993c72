"""Ollama's native API (``extproc.formats.ollama``) read by the official ``ollama`` client:
NDJSON lines extracted and rewritten, the terminal line raises ``ResponseError``, the soft
block ends the stream normally, whole answers, error bodies, prompts."""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterator
from typing import Any

import httpx
import ollama
import pytest

from extproc.formats import ErrorKind, PromptScope, all_formats, find_format
from extproc.formats.ollama import OllamaFormat
from extproc.framing import NDJSONDecoder
from extproc.sse import SSEEvent
from tests.unit.test_formats_common import extract_all, release

CHAT = OllamaFormat(generate=False)
GENERATE = OllamaFormat(generate=True)
HEAD = '"model":"llama3.2","created_at":"2026-12-06T04:30:00.123456789Z"'


def chat_line(content: str = "", done: bool = False, **message: Any) -> bytes:
    body = json.dumps({"role": "assistant", "content": content, **message},
                      separators=(",", ":"))
    tail = ',"done_reason":"stop","eval_count":3' if done else ""
    return f'{{{HEAD},"message":{body},"done":{str(done).lower()}{tail}}}\n'.encode()


def gen_line(response: str, done: bool = False) -> bytes:
    tail = ',"done_reason":"stop","context":[1,2,3]' if done else ""
    return (f'{{{HEAD},"response":{json.dumps(response)},"done":{str(done).lower()}{tail}}}\n'
            ).encode()


CHAT_STREAM = [chat_line("Hello"), chat_line(" there,", thinking=None),
               chat_line(" friend."), chat_line(done=True)]


def decode(raw: bytes, size: int = 5) -> list[SSEEvent]:
    decoder = NDJSONDecoder()
    events: list[SSEEvent] = []
    for start in range(0, len(raw), size):
        events += decoder.feed(raw[start:start + size])
    events += decoder.feed(b"", end_of_stream=True)
    rest = decoder.flush()
    if rest:
        last = decoder.last(rest)
        assert last is not None
        events.append(last)
    return events


def served(body: bytes, status: int = 200,
           content_type: str = "application/x-ndjson") -> ollama.Client:
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 11):
            yield body[start:start + 11]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"content-type": content_type},
                              content=chunks())

    return ollama.Client(host="http://ollama.test", transport=httpx.MockTransport(handler))


def test_paths() -> None:
    formats = all_formats()
    chat = find_format("POST", "/api/chat", formats)
    generate = find_format("POST", "/API/Generate/", formats)
    assert chat is not None and chat.name == "ollama.chat"
    assert generate is not None and generate.name == "ollama.generate"
    assert find_format("GET", "/api/chat", formats) is None
    assert find_format("POST", "/api/tags", formats) is None
    assert CHAT.stream_decoder("application/x-ndjson") is not None
    assert CHAT.stream_decoder("application/json; charset=utf-8") is None


def test_a_clean_stream_passes_byte_for_byte_and_reads_every_text() -> None:
    raw = b"".join(CHAT_STREAM)
    events = decode(raw)
    codec = CHAT.stream_codec()
    found = extract_all(codec, events)
    assert [t for _, t in found] == ["Hello", " there,", " friend."]
    assert codec.text_ended
    assert b"".join(codec.rewrite(e, {}) for e in events) == raw


def test_thinking_tool_calls_and_generate_text_are_read() -> None:
    lines = [chat_line("", thinking="Think of bazinga"),
             chat_line("", tool_calls=[{"function": {"name": "mail",
                                                     "arguments": {"to": "a@b.c"}}}]),
             chat_line("", tool_calls=[{"function": {"name": "call", "arguments": {}}}])]
    found = extract_all(CHAT.stream_codec(), decode(b"".join(lines)))
    assert found == [(("thinking",), "Think of bazinga"), (("tool_name", (1, 0)), "mail"),
                     (("tool", (1, 0)), '{"to":"a@b.c"}'), (("tool_name", (2, 0)), "call")]
    found = extract_all(GENERATE.stream_codec(), decode(gen_line("Hi") + gen_line("", True)))
    assert found == [(("content",), "Hi")]


def test_a_line_that_is_not_an_object_is_read() -> None:
    events = decode(b'{"message":{"content":"a"}}\n["bazinga"]\nplain text\n')
    found = extract_all(CHAT.stream_codec(), events)
    assert found == [(("content",), "a"), (("data",), '["bazinga"]'), (("data",), "plain text")]


def test_masking_rewrites_the_line_and_keeps_the_rest() -> None:
    lines = [chat_line("Write to jane@example.com"),
             chat_line("", tool_calls=[{"function": {"name": "mail",
                                                     "arguments": {"to": "jane@example.com"}}}]),
             chat_line(done=True)]
    events = decode(b"".join(lines))
    codec = CHAT.stream_codec()

    def mask(channel: Hashable, text: str) -> str:
        return text.replace("jane@example.com", "{EMAIL}")

    out = release(codec, events, mask)
    messages = [json.loads(line)["message"] for line in out.splitlines()]
    assert messages[0]["content"] == "Write to {EMAIL}"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"to": "{EMAIL}"}
    assert out.endswith(lines[-1])
    # a mask that leaves no JSON object empties the arguments: nothing of them goes out
    codec = CHAT.stream_codec()
    out = release(codec, decode(lines[1]), lambda ch, t: "***" if ch == ("tool", (0, 0)) else t)
    assert json.loads(out)["message"]["tool_calls"][0]["function"]["arguments"] == {}


@pytest.mark.parametrize("released", [0, 2])
@pytest.mark.parametrize(("kind", "message"), [(ErrorKind.VIOLATION, "Violated guardrail policy"),
                                               (ErrorKind.UNAVAILABLE, "Guardrail unavailable")])
def test_the_terminal_line_raises_in_the_client_after_the_released_text(
        released: int, kind: str, message: str) -> None:
    events = decode(b"".join(CHAT_STREAM))
    codec = CHAT.stream_codec()
    extract_all(codec, events)
    body = b"".join(codec.rewrite(e, {}) for e in events[:released]) + codec.terminal_frame(kind)
    seen = []
    with pytest.raises(ollama.ResponseError) as raised:
        for part in served(body).chat(model="llama3.2", messages=[{"role": "user",
                                                                   "content": "hi"}],
                                      stream=True):
            seen.append(part.message.content)
    assert raised.value.error == message
    assert "".join(s or "" for s in seen) == "".join(["Hello", " there,"][:released])


@pytest.mark.parametrize("fmt", [CHAT, GENERATE])
def test_the_soft_block_ends_the_stream_normally(fmt: OllamaFormat) -> None:
    first = CHAT_STREAM[0] if fmt is CHAT else gen_line("Hello")
    events = decode(first)
    codec = fmt.stream_codec()
    extract_all(codec, events)
    body = b"".join(codec.rewrite(e, {}) for e in events) + codec.soft_block_frame("Blocked.")
    client = served(body)
    if fmt is CHAT:
        parts = list(client.chat(model="m", messages=[], stream=True))
        text = "".join(p.message.content or "" for p in parts)
    else:
        parts = list(client.generate(model="m", prompt="hi", stream=True))
        text = "".join(p.response for p in parts)
    assert text == "HelloBlocked."
    assert parts[-1].done and parts[-1].done_reason == "content_filter"
    assert parts[-1].model == "llama3.2"


def test_whole_answers() -> None:
    answer = json.loads(chat_line("Hi jane@example.com", done=True, thinking="hmm"))
    body = json.dumps(answer).encode()
    assert CHAT.response_texts(body) == [(("content",), "Hi jane@example.com"),
                                         (("thinking",), "hmm")]
    masked = CHAT.rewrite_response(body, {("content",): "Hi {EMAIL}"})
    reply = served(masked, content_type="application/json").chat(model="m", messages=[])
    assert reply.message.content == "Hi {EMAIL}" and reply.message.thinking == "hmm"
    soft = CHAT.soft_block_response(body, "Blocked.")
    reply = served(soft, content_type="application/json").chat(model="m", messages=[])
    assert reply.message.content == "Blocked." and reply.done_reason == "content_filter"
    soft = GENERATE.soft_block_response(gen_line("x", True), "Blocked.")
    reply2 = served(soft, content_type="application/json").generate(model="m", prompt="p")
    assert reply2.response == "Blocked." and reply2.model == "llama3.2"


@pytest.mark.parametrize("kind", [ErrorKind.VIOLATION, ErrorKind.UNAVAILABLE,
                                  ErrorKind.INVALID])
def test_error_bodies_raise_with_their_message_and_status(kind: str) -> None:
    status, body = CHAT.error_body(kind)
    with pytest.raises(ollama.ResponseError) as raised:
        served(body, status, "application/json").chat(model="m", messages=[], stream=False)
    assert raised.value.status_code == status
    assert raised.value.error == json.loads(body)["error"]


def test_prompts_per_scope_and_rewrite() -> None:
    request = {"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Mail jane@example.com", "images": ["iVBORw0KGgo="]},
        {"role": "assistant", "content": "Sure.", "thinking": "ok"},
        {"role": "user", "content": "Now."}]}
    body = json.dumps(request).encode()
    assert CHAT.prompt_texts(body, PromptScope.LAST_USER) == ["Now."]
    assert CHAT.prompt_texts(body, PromptScope.ALL) == ["Mail jane@example.com", "Sure.", "Now."]
    assert CHAT.prompt_texts(body, PromptScope.ALL_WITH_SYSTEM)[0] == "Be brief."
    whole = CHAT.prompt_texts(body, PromptScope.WHOLE_REQUEST)
    assert any("jane@example.com" in t for t in whole)
    assert not any("iVBOR" in t for t in whole)  # pictures are not text
    rewritten = CHAT.rewrite_prompt(body, PromptScope.ALL,
                                    ["Mail {EMAIL}", "Sure.", "Now."])
    assert rewritten is not None
    assert json.loads(rewritten)["messages"][1]["content"] == "Mail {EMAIL}"
    generate = json.dumps({"model": "m", "prompt": "Hi", "system": "S", "suffix": "end"})
    assert GENERATE.prompt_texts(generate.encode(), PromptScope.LAST_USER) == ["Hi", "end"]
    assert GENERATE.prompt_texts(generate.encode(),
                                 PromptScope.ALL_WITH_SYSTEM) == ["Hi", "end", "S"]


def test_bug_a_lone_surrogate_escape_crashed_the_masked_rewrite() -> None:
    # ``"m\udc00"`` in the line made ``dumps(...).encode()`` raise UnicodeEncodeError.
    raw = b'{"model":"m\\udc00","message":{"content":"mail jane@example.com"},"done":false}\n'
    events = decode(raw)
    codec = CHAT.stream_codec()
    out = release(codec, events, lambda ch, t: t.replace("jane@example.com", "{EMAIL}"))
    assert json.loads(out)["message"]["content"] == "mail {EMAIL}"
    assert codec.soft_block_frame("Blocked.")  # the head holds the surrogate too


def test_logprob_tokens_are_read_and_a_mask_drops_them() -> None:
    # Review finding: a masked line kept ``logprobs[].token`` with the original text.
    line = json.loads(chat_line("Mail jane@example.com"))
    line["logprobs"] = [{"token": "Mail jane@example.com", "logprob": -0.1,
                         "top_logprobs": [{"token": "bazinga", "logprob": -2.0}]}]
    raw = json.dumps(line).encode() + b"\n"
    codec = CHAT.stream_codec()
    found = extract_all(codec, decode(raw))
    assert (("top_logprobs", "content", None), "bazinga\n") in found
    codec = CHAT.stream_codec()
    out = release(codec, decode(raw), lambda ch, t: t.replace("jane@example.com", "{EMAIL}"))
    assert b"jane" not in out and json.loads(out)["logprobs"] is None
    whole = CHAT.rewrite_response(json.dumps(line).encode(), {("content",): "Mail {EMAIL}"})
    assert b"jane" not in whole and json.loads(whole)["logprobs"] is None
