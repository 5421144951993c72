"""OpenAI Chat Completions through the official ``openai`` SDK: the terminal frame raises, the
soft-block frame ends a stream normally, error bodies, non-streamed answers, masking, prompts.

(The parsing details of the format are in ``test_openai_chat.py``.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

from extproc.formats import ErrorKind, PromptScope, StreamCodec
from extproc.formats.openai_chat import OpenAIChat
from extproc.sse import SSEDecoder
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
    upper_mask,
)

FMT = OpenAIChat()
MESSAGES = [{"role": "user", "content": "Parle-moi du voyage"}]
TEXT = ("Bonjour ! Voici un résumé de votre voyage au 日本 : Tōkyō, Kyōto et Ōsaka. "
        "Bon séjour 🙂")


def stream_of(raw: bytes, released: int | None, end: Callable[[StreamCodec], bytes]) -> bytes:
    """The first ``released`` events of a recording as the guard sends them, then ``end``."""
    events = decode(raw, chunk_size=9)
    codec = FMT.stream_codec()
    extract_all(codec, events)
    kept = events if released is None else events[:released]
    return b"".join(codec.rewrite(e, {}) for e in kept) + end(codec)


def chat_stream(body: bytes) -> Any:
    return openai_client(body).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- terminal frame


@pytest.mark.parametrize(("kind", "message"), [(ErrorKind.VIOLATION, VIOLATION_MESSAGE),
                                               (ErrorKind.UNAVAILABLE, UNAVAILABLE_MESSAGE)])
@pytest.mark.parametrize("released", [0, 1, 4])
def test_terminal_frame_raises_in_the_sdk_after_the_released_events(
        kind: str, message: str, released: int) -> None:
    body = stream_of(fixture("openai_chat.sse"), released, lambda c: c.terminal_frame(kind))
    seen: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in chat_stream(body):
            seen.append(chunk.choices[0].delta.content or "")
    assert caught.value.message == message
    assert caught.value.type == kind
    assert caught.value.code == str(400 if kind == ErrorKind.VIOLATION else 503)
    assert len(seen) == released
    assert TEXT.startswith("".join(seen))


def test_terminal_frame_raises_in_the_stream_helper_with_tool_calls() -> None:
    body = stream_of(fixture("openai_tool_calls.sse"), 5,
                     lambda c: c.terminal_frame(ErrorKind.VIOLATION))
    client = openai_client(body)
    with pytest.raises(openai.APIError, match=VIOLATION_MESSAGE):
        with client.chat.completions.stream(model="gpt-4o-mini",
                                            messages=MESSAGES) as stream:  # type: ignore[arg-type]
            for _ in stream:
                pass


# --------------------------------------------------------------------------- soft block


@pytest.mark.parametrize("released", [0, 1, 5, 11])
def test_soft_block_ends_the_stream_normally(released: int) -> None:
    body = stream_of(fixture("openai_chat.sse"), released,
                     lambda c: c.soft_block_frame(SOFT_MESSAGE))
    chunks = list(chat_stream(body))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert content.endswith(SOFT_MESSAGE)
    assert TEXT.startswith(content[:-len(SOFT_MESSAGE)])
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    # The soft-block chunks continue the stream's own id and model.
    assert {ch.id for ch in chunks} == {"chatcmpl-Ag7f3kQ2XbWZ9mT1pLrN0vYc4sDe"}
    assert {ch.model for ch in chunks} == {"gpt-4o-mini-2024-07-18"}
    assert body.endswith(b"data: [DONE]\n\n")


def helper_final(body: bytes) -> Any:
    """Events through ``client.chat.completions.stream()``; the completion the helper
    accumulated. Like any content_filter finish, ``get_final_completion()`` raises
    ``ContentFilterFinishReasonError`` carrying that completion."""
    client = openai_client(body)
    with client.chat.completions.stream(model="gpt-4o-mini",
                                        messages=MESSAGES) as stream:  # type: ignore[arg-type]
        kinds = [event.type for event in stream]
        assert "chunk" in kinds and "content.done" in kinds
        with pytest.raises(openai.ContentFilterFinishReasonError) as caught:
            stream.get_final_completion()
    assert caught.value.completion is not None
    return caught.value.completion


def test_soft_block_in_the_stream_helper() -> None:
    body = stream_of(fixture("openai_chat.sse"), 4, lambda c: c.soft_block_frame(SOFT_MESSAGE))
    final = helper_final(body)
    choice = final.choices[0]
    assert choice.finish_reason == "content_filter"
    assert choice.message.content == "Bonjour ! Voici un résumé" + SOFT_MESSAGE


def test_soft_block_after_tool_call_deltas() -> None:
    body = stream_of(fixture("openai_tool_calls.sse"), 6,
                     lambda c: c.soft_block_frame(SOFT_MESSAGE))
    final = helper_final(body)
    assert final.choices[0].finish_reason == "content_filter"
    assert final.choices[0].message.content == SOFT_MESSAGE
    assert final.id == "chatcmpl-Ag7gH1nVwq8cR2yZ5KbTtUe6oPzA"


def test_soft_block_with_nothing_released_is_a_whole_answer() -> None:
    body = FMT.stream_codec().soft_block_frame(SOFT_MESSAGE)
    chunks = list(chat_stream(body))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == SOFT_MESSAGE
    assert chunks[-1].choices[0].finish_reason == "content_filter"


def test_soft_block_covers_every_open_choice() -> None:
    head = {"id": "chatcmpl-n2", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    raw = b"".join(
        b"data: " + json.dumps({**head, "choices": [
            {"index": i, "delta": {"content": f"c{i}"}, "finish_reason": fin}]}).encode()
        + b"\n\n" for i, fin in ((0, None), (1, None), (1, "stop")))
    body = stream_of(raw, None, lambda c: c.soft_block_frame("blocked"))
    payloads = [p for _, p in sse_payloads(body)]
    content_chunk, finish_chunk = payloads[-3], payloads[-2]
    assert [c["index"] for c in content_chunk["choices"]] == [0]  # choice 1 already finished
    assert finish_chunk["choices"][0]["finish_reason"] == "content_filter"


# --------------------------------------------------------------------------- masking


def test_masked_stream_reaches_the_sdk_rewritten() -> None:
    events = decode(fixture("openai_chat.sse"))
    body = release(FMT.stream_codec(), events, upper_mask)
    content = "".join(ch.choices[0].delta.content or "" for ch in chat_stream(body)
                      if ch.choices)
    assert content == TEXT.upper()


def test_masked_tool_arguments_reach_the_sdk_rewritten() -> None:
    body = release(FMT.stream_codec(), decode(fixture("openai_tool_calls.sse")),
                   lambda channel, text: text.replace("Zürich", "{CITY}"))
    client = openai_client(body)
    with client.chat.completions.stream(model="gpt-4o-mini",
                                        messages=MESSAGES) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None
    arguments = json.loads(calls[0].function.arguments)
    assert arguments["location"] == "{CITY}, Schweiz"


def test_rewrite_drops_logprobs_of_a_masked_choice() -> None:
    raw = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
           b'"choices":[{"index":0,"delta":{"content":"Jane"},"logprobs":{"content":'
           b'[{"token":"Jane","logprob":-0.1,"bytes":[74],"top_logprobs":[]}]},'
           b'"finish_reason":null}]}\n\n')
    codec = FMT.stream_codec()
    (event,) = decode(raw)
    assert codec.extract(event) == [(("content", 0), "Jane")]
    out = json.loads(decode(codec.rewrite(event, {("content", 0): "{NAME}"}))[0].data or "")
    assert out["choices"][0]["delta"]["content"] == "{NAME}"
    assert out["choices"][0]["logprobs"] is None


# --------------------------------------------------------------------------- error bodies


def test_error_body_400_is_a_bad_request_in_the_sdk() -> None:
    status, body = FMT.error_body(ErrorKind.VIOLATION)
    client = openai_client(body, status=status, json_body=True)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 400
    assert caught.value.body == {"message": VIOLATION_MESSAGE, "code": 400,
                                 "type": "guardrail_violation"}
    assert caught.value.type == "guardrail_violation"
    assert VIOLATION_MESSAGE in caught.value.message


def test_error_body_503_is_a_server_error_in_the_sdk() -> None:
    status, body = FMT.error_body(ErrorKind.UNAVAILABLE)
    client = openai_client(body, status=status, json_body=True)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 503
    assert caught.value.type == "guardrail_unavailable"


# --------------------------------------------------------------------------- non-streamed


COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-B9mX2kQ7LtVf0aRw3NcYp8HdZs1E",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {"index": 0, "message": {
            "role": "assistant", "content": "Write to jane.doe@example.com 🙂",
            "refusal": None, "annotations": [],
            "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "send_mail", "arguments": "{\"to\":\"jane.doe@example.com\"}"}}]},
         "logprobs": None, "finish_reason": "tool_calls"},
        {"index": 1, "message": {"role": "assistant", "content": None,
                                 "refusal": "I can't help with that."},
         "logprobs": None, "finish_reason": "stop"},
    ],
    "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29},
    "service_tier": "default",
    "system_fingerprint": "fp_f9f4fb6dbf",
}


def test_response_texts() -> None:
    assert FMT.response_texts(json.dumps(COMPLETION).encode()) == [
        (("content", 0), "Write to jane.doe@example.com 🙂"),
        (("tool", 0, 0), "{\"to\":\"jane.doe@example.com\"}"),
        (("tool_name", 0, 0), "send_mail"),
        (("refusal", 1), "I can't help with that."),
    ]


def test_rewrite_response_parsed_by_the_sdk() -> None:
    body = FMT.rewrite_response(json.dumps(COMPLETION).encode(), {
        ("content", 0): "Write to {EMAIL} 🙂",
        ("tool", 0, 0): "{\"to\":\"{EMAIL}\"}",
    })
    completion = openai_client(body, json_body=True).chat.completions.create(
        model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "Write to {EMAIL} 🙂"
    calls = completion.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.arguments == "{\"to\":\"{EMAIL}\"}"  # type: ignore[union-attr]
    assert completion.choices[1].message.refusal == "I can't help with that."
    assert completion.usage is not None and completion.usage.total_tokens == 29


@pytest.mark.parametrize("original", [json.dumps(COMPLETION).encode(), None, b"garbage"])
def test_soft_block_response_parsed_by_the_sdk(original: bytes | None) -> None:
    body = FMT.soft_block_response(original, SOFT_MESSAGE)
    completion = openai_client(body, json_body=True).chat.completions.create(
        model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.object == "chat.completion"
    assert all(c.finish_reason == "content_filter" for c in completion.choices)
    assert all(c.message.content == SOFT_MESSAGE for c in completion.choices)
    assert all(not c.message.tool_calls for c in completion.choices)
    if original is COMPLETION or (original and original.startswith(b"{")):
        assert completion.id == COMPLETION["id"]
        assert len(completion.choices) == 2
        assert completion.usage is not None and completion.usage.total_tokens == 29


# --------------------------------------------------------------------------- prompts

CONVERSATION: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "You are a travel agent."},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Plan a week in Japan."},
        {"role": "assistant", "content": "Sure! Tokyo first?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 4}"},
        {"role": "user", "content": [
            {"type": "text", "text": "Yes, and Kyōto — 京都 🙂"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "text", "text": "My mail is jane@example.com"}]},
    ],
}


@pytest.mark.parametrize(("scope", "expected"), [
    (PromptScope.LAST_USER, ["Yes, and Kyōto — 京都 🙂", "My mail is jane@example.com"]),
    (PromptScope.ALL, ["Plan a week in Japan.", "Sure! Tokyo first?", "{\"temp\": 4}",
                       "Yes, and Kyōto — 京都 🙂", "My mail is jane@example.com"]),
    (PromptScope.ALL_WITH_SYSTEM, [
        "You are a travel agent.", "Be brief.", "Plan a week in Japan.", "Sure! Tokyo first?",
        "{\"temp\": 4}", "Yes, and Kyōto — 京都 🙂", "My mail is jane@example.com"]),
])
def test_prompt_scopes_and_rewrite(scope: str, expected: list[str]) -> None:
    body = json.dumps(CONVERSATION).encode()
    assert FMT.prompt_texts(body, scope) == expected
    masked = [t.replace("jane@example.com", "{EMAIL}").upper() for t in expected]
    rewritten = FMT.rewrite_prompt(body, scope, masked)
    assert rewritten is not None
    assert FMT.prompt_texts(rewritten, scope) == masked
    request = json.loads(rewritten)
    # Same shape: the same messages, roles, parts and non-text parts.
    assert [m["role"] for m in request["messages"]] == [
        m["role"] for m in CONVERSATION["messages"]]
    assert request["messages"][-1]["content"][1] == CONVERSATION["messages"][-1]["content"][1]
    assert request["messages"][4] == CONVERSATION["messages"][4]
    assert request["model"] == "gpt-4o"


def test_rewrite_prompt_with_the_wrong_count_is_none() -> None:
    body = json.dumps(CONVERSATION).encode()
    assert FMT.rewrite_prompt(body, PromptScope.LAST_USER, ["only one"]) is None
    assert FMT.rewrite_prompt(body, PromptScope.LAST_USER, []) is None


def test_rewrite_prompt_identity_keeps_the_texts() -> None:
    body = json.dumps(CONVERSATION, ensure_ascii=False).encode()
    texts = FMT.prompt_texts(body, PromptScope.ALL)
    rewritten = FMT.rewrite_prompt(body, PromptScope.ALL, texts)
    assert rewritten is not None and json.loads(rewritten) == CONVERSATION


def test_prompt_scope_defaults_to_last_user() -> None:
    body = json.dumps(CONVERSATION).encode()
    assert FMT.prompt_texts(body) == FMT.prompt_texts(body, PromptScope.LAST_USER)


def test_extracted_channels_of_the_recordings() -> None:
    content = joined(extract_all(FMT.stream_codec(), decode(fixture("openai_chat.sse"))))
    assert content == {("content", 0): TEXT}


def test_reasoning_is_answer_text_on_channels_of_its_own() -> None:
    # vLLM's reasoning parsers and DeepSeek stream ``reasoning_content``, OpenRouter and newer
    # vLLM ``reasoning``: clients show it, so it is checked (issue 14, class 5).
    codec = FMT.stream_codec()
    raw = (b'data: {"id":"c","choices":[{"index":0,"delta":{"reasoning_content":"think baz"}}]}'
           b'\n\ndata: {"id":"c","choices":[{"index":0,"delta":{"reasoning":"inga"}}]}\n\n')
    first, second = SSEDecoder().feed(raw)
    assert codec.extract(first) == [(("reasoning_content", 0), "think baz")]
    assert codec.extract(second) == [(("reasoning", 0), "inga")]
    rewritten = codec.rewrite(first, {("reasoning_content", 0): "think ***"})
    assert json.loads(rewritten[6:])["choices"][0]["delta"]["reasoning_content"] == "think ***"
    body = json.dumps({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": "ok", "reasoning_content": "why"}}]}).encode()
    assert FMT.response_texts(body) == [(("content", 0), "ok"), (("reasoning_content", 0), "why")]


def chunk_event(delta: dict[str, Any]) -> Any:
    raw = f"data: {json.dumps({'id': 'c', 'choices': [{'index': 0, 'delta': delta}]})}\n\n"
    (event,) = SSEDecoder().feed(raw.encode())
    return event


@pytest.mark.parametrize(("delta", "expected"), [
    # OpenAI audio answers: the transcript is what the audio says.
    ({"audio": {"id": "a", "data": "UklGR", "transcript": "Hello"}}, [(("audio", 0), "Hello")]),
    ({"audio": {"id": "a", "data": "UklGR"}}, []),
    # Tool and function names are model text too.
    ({"tool_calls": [{"index": 1, "id": "t", "type": "function",
                      "function": {"name": "get_weather", "arguments": ""}}]},
     [(("tool_name", 0, 1), "get_weather")]),
    ({"function_call": {"name": "lookup", "arguments": "{}"}},
     [(("function_name", 0), "lookup"), (("function", 0), "{}")]),
    # Mistral streams content as a list of chunks: text parts continue the content, thinking
    # parts (a list of text chunks) are the reasoning.
    ({"content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
     [(("content", 0), "Hello")]),
    ({"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]}]},
     [(("thinking", 0), "hmm")]),
    ({"content": [{"type": "reference", "reference_ids": [1]}]}, []),
])
def test_text_beside_the_content_is_read(delta: dict[str, Any], expected: list[Any]) -> None:
    codec = FMT.stream_codec()
    event = chunk_event(delta)
    assert codec.extract(event) == expected
    assert codec.rewrite(event, {}) == event.raw


def test_text_beside_the_content_is_masked_in_place() -> None:
    codec = FMT.stream_codec()
    parts = chunk_event({"content": [{"type": "text", "text": "Mail jane@"},
                                     {"type": "text", "text": "example.com"}]})
    audio = chunk_event({"audio": {"id": "a", "transcript": "Call Jane"}})
    call = chunk_event({"tool_calls": [{"index": 0, "function": {"name": "mail_jane",
                                                                  "arguments": ""}}]})
    for event in (parts, audio, call):
        codec.extract(event)
    out = json.loads(codec.rewrite(parts, {("content", 0): "Mail {EMAIL}"})[6:])
    assert out["choices"][0]["delta"]["content"] == [{"type": "text", "text": "Mail {EMAIL}"},
                                                     {"type": "text", "text": ""}]
    out = json.loads(codec.rewrite(audio, {("audio", 0): "Call {NAME}"})[6:])
    assert out["choices"][0]["delta"]["audio"] == {"id": "a", "transcript": "Call {NAME}"}
    out = json.loads(codec.rewrite(call, {("tool_name", 0, 0): "mail_{NAME}"})[6:])
    assert out["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "mail_{NAME}"


def test_text_beside_the_content_of_a_whole_answer() -> None:
    body = json.dumps({"choices": [{"index": 0, "message": {
        "role": "assistant",
        "content": [{"type": "thinking", "thinking": [{"type": "text", "text": "why"}]},
                    {"type": "text", "text": "ok"}],
        "audio": {"id": "a", "transcript": "said"},
        "tool_calls": [{"id": "t", "type": "function",
                        "function": {"name": "f", "arguments": "{}"}}]}}]}).encode()
    assert FMT.response_texts(body) == [
        (("thinking_part", 0, 0), "why"), (("content_part", 0, 0), "ok"),
        (("audio", 0), "said"), (("tool", 0, 0), "{}"), (("tool_name", 0, 0), "f")]
    rewritten = json.loads(FMT.rewrite_response(body, {("audio", 0): "***",
                                                       ("content_part", 0, 0): "OK"}))
    message = rewritten["choices"][0]["message"]
    assert message["audio"]["transcript"] == "***"
    assert message["content"][1] == {"type": "text", "text": "OK"}


def test_masking_a_whole_answer_moves_its_citation_offsets() -> None:
    # Issue 14, class 9: url_citation offsets point into the content a mask shortens.
    content = "Write to jane.doe@example.com. Prices rose 5% in May."
    cited = "Prices rose 5%"
    start = content.index(cited)
    body = json.dumps({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": content,
        "annotations": [{"type": "url_citation", "url_citation": {
            "start_index": start, "end_index": start + len(cited), "url": "u", "title": "t"}},
            {"type": "url_citation", "start_index": start, "end_index": start + len(cited),
             "url": "u", "title": "t"}]}}]}).encode()
    masked = content.replace("jane.doe@example.com", "{EMAIL}")
    answer = json.loads(FMT.rewrite_response(body, {("content", 0): masked}))
    message = answer["choices"][0]["message"]
    assert message["content"] == masked
    flat = message["annotations"][1]
    assert masked[flat["start_index"]:flat["end_index"]] == cited
    nested = message["annotations"][0]["url_citation"]
    assert masked[nested["start_index"]:nested["end_index"]] == cited


def logprob_chunk(content: str, tokens: list[dict[str, Any]]) -> Any:
    payload = {"id": "c", "choices": [{"index": 0, "delta": {"content": content},
                                       "logprobs": {"content": tokens, "refusal": None}}]}
    (event,) = SSEDecoder().feed(f"data: {json.dumps(payload)}\n\n".encode())
    return event


def token(text: str, raw: bytes | None = None) -> dict[str, Any]:
    return {"token": text, "logprob": -0.1, "bytes": list(raw if raw is not None
                                                          else text.encode()),
            "top_logprobs": []}


@pytest.mark.parametrize(("event", "expected"), [
    # The usual: the tokens are the content; nothing more to read.
    (logprob_chunk("Hello there", [token("Hello"), token(" there")]),
     [(("content", 0), "Hello there")]),
    # A character split over two tokens: their bytes are the content.
    (logprob_chunk("\u00e9", [token("bytes:\\xc3", b"\xc3"), token("bytes:\\xa9", b"\xa9")]),
     [(("content", 0), "\u00e9")]),
    # Tokens that say something else: read on a channel of their own.
    (logprob_chunk("Fine.", [token("bazinga")]),
     [(("logprobs", "content", 0), "bazinga"), (("content", 0), "Fine.")]),
])
def test_logprob_tokens_that_are_not_the_text_are_read(event: Any,
                                                       expected: list[Any]) -> None:
    codec = FMT.stream_codec()
    assert codec.extract(event) == expected
    assert codec.rewrite(event, {}) == event.raw


def test_masked_logprob_tokens_drop_the_logprobs() -> None:
    codec = FMT.stream_codec()
    event = logprob_chunk("Fine.", [token("jane@example.com")])
    codec.extract(event)
    out = json.loads(codec.rewrite(event, {("logprobs", "content", 0): "{EMAIL}"})[6:])
    assert out["choices"][0]["logprobs"] is None
    assert out["choices"][0]["delta"]["content"] == "Fine."


@pytest.mark.parametrize("annotated_with_text", [False, True])
def test_masking_a_stream_moves_the_citation_offsets_of_its_later_chunks(
        annotated_with_text: bool) -> None:
    # Issue 14, class 9: a streamed answer's url_citation (in a later chunk's
    # delta.annotations) points into the content as the SDK accumulates it; a mask of an
    # earlier piece shortened that content.
    pieces = ["Write to ", "jane.doe@example.com", " today. ", "Prices rose 5% in May."]
    content = "".join(pieces)
    cited = "Prices rose 5%"
    start = content.index(cited)
    citation = {"type": "url_citation", "url_citation": {
        "start_index": start, "end_index": start + len(cited), "url": "u", "title": "t"}}
    events = [chunk_event({"content": p}) for p in pieces[:-1]]
    last: dict[str, Any] = {"content": pieces[-1]} if annotated_with_text else {"content": ""}
    events.append(chunk_event({**last, "annotations": [citation]}))
    if not annotated_with_text:
        events.insert(-1, chunk_event({"content": pieces[-1]}))
    codec = FMT.stream_codec()
    read = [codec.extract(e) for e in events]
    out = []
    for event, found in zip(events, read, strict=True):
        texts = {ch: t.replace("jane.doe@example.com", "{EMAIL}") for ch, t in found
                 if "jane" in t}
        out.append(codec.rewrite(event, texts))
    chunks = [json.loads(line[6:]) for line in b"".join(out).decode().split("\n\n") if line]
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
    assert text == content.replace("jane.doe@example.com", "{EMAIL}")
    (found,) = [a for ch in chunks for a in ch["choices"][0]["delta"].get("annotations", [])]
    span = found["url_citation"]
    assert text[span["start_index"]:span["end_index"]] == cited
    # the events before the mask and the clean text after it pass byte for byte
    assert out[0] == events[0].raw and out[2] == events[2].raw


def test_a_stream_without_masks_keeps_its_annotations_byte_for_byte() -> None:
    events = [chunk_event({"content": "Prices rose."}),
              chunk_event({"content": "", "annotations": [{"type": "url_citation",
                           "url_citation": {"start_index": 0, "end_index": 6}}]})]
    codec = FMT.stream_codec()
    for event in events:
        codec.extract(event)
    assert [codec.rewrite(e, {}) for e in events] == [e.raw for e in events]


def test_top_logprobs_alternatives_are_read_one_per_line() -> None:
    alternatives = {**token("Fine."), "top_logprobs": [
        {"token": "Fine.", "logprob": -0.1}, {"token": "bazinga", "logprob": -2.0},
        {"token": " ", "logprob": -3.0}]}
    event = logprob_chunk("Fine.", [alternatives])
    codec = FMT.stream_codec()
    assert codec.extract(event) == [(("top_logprobs", "content", 0), "bazinga\n"),
                                    (("content", 0), "Fine.")]
    out = json.loads(codec.rewrite(event, {("top_logprobs", "content", 0): "***\n"})[6:])
    assert out["choices"][0]["logprobs"] is None


def test_a_whole_answers_logprob_tokens_are_read_and_a_mask_drops_them() -> None:
    body = json.dumps({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": "Fine."}, "logprobs": {"content": [
            {**token("Fine."), "top_logprobs": [{"token": "bazinga", "logprob": -1}]}],
            "refusal": None}}]}).encode()
    found = FMT.response_texts(body)
    assert found == [(("content", 0), "Fine."), (("top_logprobs", "content", 0), "bazinga\n")]
    both = json.loads(FMT.rewrite_response(body, {("content", 0): "Good.",
                                                  ("top_logprobs", "content", 0): "***\n"}))
    assert both["choices"][0]["logprobs"] is None
    assert both["choices"][0]["message"]["content"] == "Good."
