"""``extproc.formats`` (``find_format``, ``strip_query``) and the OpenAI Chat Completions format.

Stream events are built the way the sidecar sees them: wire bytes through ``SSEDecoder``.
The stream side (``extract``, ``rewrite``, ``terminal_frame``) lives on the per-stream codec;
the official SDK's view of the frames is in ``test_formats_openai_chat.py``.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest

from extproc.formats import ErrorKind, all_formats, find_format, strip_query
from extproc.formats.anthropic_messages import AnthropicMessages
from extproc.formats.openai_chat import OpenAIChat, error_object
from extproc.formats.openai_completions import OpenAICompletions
from extproc.formats.openai_responses import OpenAIResponses
from extproc.sse import SSEDecoder, SSEEvent
from tests.support import BLOCK_FRAME as VIOLATION_FRAME
from tests.support import UNAVAILABLE_FRAME, UNAVAILABLE_MESSAGE, VIOLATION_MESSAGE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


FMT = OpenAIChat()


def extract(event: SSEEvent) -> list[tuple[Hashable, str]]:
    return FMT.stream_codec().extract(event)


def terminal_frame(kind: str) -> bytes:
    return FMT.stream_codec().terminal_frame(kind)


# --------------------------------------------------------------------------- helpers


def decode(raw: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = decoder.feed(raw, end_of_stream=True)
    assert decoder.flush() == b""
    return events


def one_event(raw: bytes) -> SSEEvent:
    events = decode(raw)
    assert len(events) == 1
    return events[0]


def chunk_bytes(choices: Any, **extra: Any) -> bytes:
    payload = {
        "id": "chatcmpl-B9mX2kQ7LtVf0aRw3NcYp8HdZs1E",
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": "gpt-4o-2024-08-06",
        "service_tier": "default",
        "system_fingerprint": "fp_f9f4fb6dbf",
        "choices": choices,
    }
    payload.update(extra)
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def chunk(choices: Any, **extra: Any) -> SSEEvent:
    return one_event(chunk_bytes(choices, **extra))


def choice(delta: Any, index: int | None = 0, finish_reason: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if index is not None:
        entry["index"] = index
    return entry


def body(messages: Any, **extra: Any) -> bytes:
    request = {"model": "gpt-4o", "stream": True, "messages": messages}
    request.update(extra)
    return json.dumps(request).encode()


# --------------------------------------------------------------------------- strip_query


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/completions?stream=true", "/v1/chat/completions"),
        ("/v1/chat/completions#frag", "/v1/chat/completions"),
        ("/v1/chat/completions?a=1#frag", "/v1/chat/completions"),
        ("/v1/chat/completions#frag?a=1", "/v1/chat/completions"),
        ("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
         "/openai/deployments/gpt-4o/chat/completions"),
        ("/?", "/"),
        ("?only=query", ""),
        ("", ""),
    ],
)
def test_strip_query(path: str, expected: str) -> None:
    assert strip_query(path) == expected


# --------------------------------------------------------------------------- request matching


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/chat/completions",
        "/v1/chat/completions?stream=true",
        "/openai/deployments/x/chat/completions?api-version=2024-10-21",
        "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2025-01-01-preview",
        "/api/v1/chat/completions",
    ],
)
def test_find_format_matches_chat_completions_posts(path: str) -> None:
    fmt = find_format("POST", path, all_formats())
    assert isinstance(fmt, OpenAIChat)
    assert fmt.name == "openai.chat_completions"


@pytest.mark.parametrize(
    ("method", "path", "other"),
    [
        ("POST", "/v1/completions", OpenAICompletions),
        ("POST", "/v1/responses", OpenAIResponses),
        ("POST", "/v1/messages", AnthropicMessages),
        ("POST", "/openai/deployments/x/completions?api-version=2024-10-21", OpenAICompletions),
    ],
)
def test_other_llm_apis_are_not_chat(method: str, path: str, other: type) -> None:
    assert isinstance(find_format(method, path, all_formats()), other)
    assert FMT.matches(method, strip_query(path)) is False


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/chat/completions/chatcmpl-123"),
        ("POST", "/v1/chat/completionsx"),
        ("POST", "/v1/models?x=/chat/completions"),
        ("POST", "/"),
        ("GET", "/v1/chat/completions"),
        ("GET", "/openai/deployments/x/chat/completions?api-version=2024-10-21"),
        ("PUT", "/v1/chat/completions"),
        ("OPTIONS", "/v1/chat/completions"),
        ("HEAD", "/v1/chat/completions"),
    ],
)
def test_find_format_ignores_other_traffic(method: str, path: str) -> None:
    assert find_format(method, path, all_formats()) is None
    assert FMT.matches(method, strip_query(path)) is False


def test_matches_takes_a_bare_path() -> None:
    # The query is find_format's job: matches() is given the path without it.
    assert FMT.matches("POST", "/v1/chat/completions") is True
    assert FMT.matches("POST", "/v1/chat/completions?api-version=1") is False
    assert find_format("POST", "/v1/chat/completions?api-version=1", (FMT,)) is FMT


def test_find_format_first_match_wins_and_empty_tuple() -> None:
    class Recorder:
        def __init__(self, name: str, answer: bool) -> None:
            self.name = name
            self.answer = answer
            self.seen: list[tuple[str, str]] = []

        def matches(self, method: str, path: str) -> bool:
            self.seen.append((method, path))
            return self.answer

    first, second, third = Recorder("a", False), Recorder("b", True), Recorder("c", True)
    found = find_format("POST", "/x/y?z=1#f", (first, second, third))  # type: ignore[arg-type]
    assert found is second
    assert first.seen == [("POST", "/x/y")]
    assert second.seen == [("POST", "/x/y")]
    assert third.seen == []
    assert find_format("POST", "/v1/chat/completions", ()) is None


def test_all_formats() -> None:
    formats = all_formats()
    assert isinstance(formats, tuple)
    # (the whole list: tests/unit/test_formats_common.py) chat before the legacy completions
    assert [type(f) for f in formats][:4] == [
        OpenAIChat, OpenAIResponses, AnthropicMessages, OpenAICompletions]


# --------------------------------------------------------------------------- prompt_texts


def test_prompt_is_the_last_user_message() -> None:
    request = body([
        {"role": "system", "content": "You are a travel agent."},
        {"role": "user", "content": "Plan a week in Japan."},
        {"role": "assistant", "content": "Sure! Tokyo first?"},
        {"role": "user", "content": "Yes, and Kyōto — 京都 🙂"},
    ])
    assert FMT.prompt_texts(request) == ["Yes, and Kyōto — 京都 🙂"]


def test_prompt_later_non_user_messages_are_skipped() -> None:
    request = body([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "What's the weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"location\":\"Zürich\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 4}"},
    ])
    assert FMT.prompt_texts(request) == ["What's the weather in Zürich?"]


def test_prompt_list_of_parts_gives_one_text_per_part() -> None:
    # One text per part, so that a masked prompt can be put back part by part.
    request = body([{"role": "user", "content": [
        {"type": "text", "text": "Describe this picture"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "text", "text": ""},
        {"type": "text", "text": "in one sentence."},
        "not a part",
        {"type": "text", "text": 42},
    ]}])
    assert FMT.prompt_texts(request) == ["Describe this picture", "in one sentence."]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "You are helpful."}],
        [{"role": "assistant", "content": "Hi"}],
        [],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": None}],
        [{"role": "user"}],
        [{"role": "user", "content": 17}],
        [{"role": "user", "content": {"text": "not a list"}}],
        [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
        # Only the last user message counts, even when it has no text.
        [{"role": "user", "content": "earlier"},
         {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
        ["junk", 3, None],
    ],
    ids=["system-only", "assistant-only", "empty", "empty-string", "null-content",
         "missing-content", "number-content", "dict-content", "image-only",
         "last-user-without-text", "non-dict-messages"],
)
def test_prompt_nothing_to_check(messages: Any) -> None:
    assert FMT.prompt_texts(body(messages)) == []


def test_prompt_skips_non_dict_messages() -> None:
    request = body([{"role": "user", "content": "hello"}, "junk", None, 5])
    assert FMT.prompt_texts(request) == ["hello"]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{not json",
        b'{"messages": [',
        b"\x80\x81\x82",
        b"\xff\xfe\x00",
        b"data: {}",
    ],
    ids=["empty", "broken", "truncated", "invalid-utf8", "utf16-bom-garbage", "sse-line"],
)
def test_prompt_invalid_json(raw: bytes) -> None:
    assert FMT.prompt_texts(raw) == []


@pytest.mark.parametrize(
    "raw",
    [b"[]", b'[{"role": "user", "content": "hi"}]', b'"hello"', b"42", b"null", b"true"],
)
def test_prompt_non_dict_json(raw: bytes) -> None:
    assert FMT.prompt_texts(raw) == []


@pytest.mark.parametrize(
    "raw",
    [b"{}", b'{"messages": null}', b'{"messages": "hi"}', b'{"messages": {"role": "user"}}',
     b'{"prompt": "legacy completions prompt"}'],
)
def test_prompt_messages_missing_or_not_a_list(raw: bytes) -> None:
    assert FMT.prompt_texts(raw) == []


def test_prompt_accepts_utf8_bytes_with_non_ascii() -> None:
    raw = '{"messages": [{"role": "user", "content": "Grüße aus 東京"}]}'.encode()
    assert FMT.prompt_texts(raw) == ["Grüße aus 東京"]


# --------------------------------------------------------------------------- extract


def test_extract_content_delta() -> None:
    event = chunk([choice({"content": "Hello"})])
    assert extract(event) == [(("content", 0), "Hello")]


def test_extract_content_preserves_text_exactly() -> None:
    text = " un résumé\n\t 日本 🙂 "
    assert extract(chunk([choice({"content": text})])) == [(("content", 0), text)]


def test_extract_refusal_has_its_own_channel() -> None:
    # Its own channel, so that masking can rewrite content and refusal separately.
    event = chunk([choice({"refusal": "I'm sorry, I can't help with that."})])
    assert extract(event) == [(("refusal", 0), "I'm sorry, I can't help with that.")]


def test_extract_content_then_refusal_in_one_delta() -> None:
    event = chunk([choice({"content": "Well", "refusal": " no."})])
    assert extract(event) == [(("content", 0), "Well"), (("refusal", 0), " no.")]


def test_extract_multiple_choices_have_separate_channels() -> None:
    event = chunk([
        choice({"content": "Paris"}, index=0),
        choice({"content": "Lyon"}, index=1),
        choice({"refusal": "No."}, index=2),
    ])
    assert extract(event) == [
        (("content", 0), "Paris"),
        (("content", 1), "Lyon"),
        (("refusal", 2), "No."),
    ]


def test_extract_choice_without_index_is_choice_zero() -> None:
    assert extract(chunk([choice({"content": "x"}, index=None)])) == [(("content", 0), "x")]


def test_extract_tool_call_arguments_per_choice_and_tool_index() -> None:
    event = chunk([
        choice({"tool_calls": [
            {"index": 0, "function": {"arguments": "{\"location\": \"Par"}},
            {"index": 1, "function": {"arguments": "{\"city\": \"Ro"}},
        ]}, index=0),
        choice({"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":"}}]}, index=1),
    ])
    assert extract(event) == [
        (("tool", 0, 0), "{\"location\": \"Par"),
        (("tool", 0, 1), "{\"city\": \"Ro"),
        (("tool", 1, 0), "{\"q\":"),
    ]


def test_extract_tool_call_header_chunk_has_only_the_name() -> None:
    # The name is model text too (issue 14, class 5), on a channel of its own.
    event = chunk([choice({"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"index": 0, "id": "call_Qm3vX8bN2kLr7TsYw1HdPc0e", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]})])
    assert extract(event) == [(("tool_name", 0, 0), "get_weather")]


def test_extract_tool_call_malformed_parts_skipped() -> None:
    event = chunk([choice({"tool_calls": [
        "junk",
        {"index": 3},
        {"index": 4, "function": "junk"},
        {"index": 5, "function": {"arguments": 12}},
        {"function": {"arguments": "no index"}},
    ]})])
    assert extract(event) == [(("tool", 0, 0), "no index")]


def test_extract_tool_calls_not_a_list() -> None:
    event = chunk([choice({"tool_calls": {"index": 0, "function": {"arguments": "x"}}})])
    assert extract(event) == []


def test_extract_content_and_tool_call_in_one_delta_in_order() -> None:
    event = chunk([choice({
        "content": "Let me check.",
        "tool_calls": [{"index": 0, "function": {"arguments": "{}"}}],
    })])
    assert extract(event) == [(("content", 0), "Let me check."), (("tool", 0, 0), "{}")]


def test_extract_legacy_function_call() -> None:
    event = chunk([choice({"function_call": {"arguments": "{\"location\": \"Bos"}})])
    assert extract(event) == [(("function", 0), "{\"location\": \"Bos")]


def test_extract_legacy_function_call_name_only_has_only_the_name() -> None:
    event = chunk([choice({"role": "assistant", "content": None,
                           "function_call": {"name": "get_weather", "arguments": ""}})])
    assert extract(event) == [(("function_name", 0), "get_weather")]


def test_extract_legacy_function_call_on_second_choice() -> None:
    event = chunk([choice({"function_call": {"arguments": "{}"}}, index=1)])
    assert extract(event) == [(("function", 1), "{}")]


def test_channels_of_different_kinds_are_distinct() -> None:
    channels = {("content", 0), ("tool", 0, 0), ("function", 0), ("content", 1)}
    event = chunk([
        choice({"content": "a", "tool_calls": [{"index": 0, "function": {"arguments": "b"}}],
                "function_call": {"arguments": "c"}}, index=0),
        choice({"content": "d"}, index=1),
    ])
    found = extract(event)
    assert [text for _, text in found] == ["a", "b", "c", "d"]
    assert {channel for channel, _ in found} == channels
    for channel, _ in found:
        assert isinstance(channel, Hashable)
        hash(channel)


@pytest.mark.parametrize(
    "raw",
    [
        # role-only first chunk
        chunk_bytes([choice({"role": "assistant", "content": "", "refusal": None})],
                    usage=None),
        # finish chunk
        chunk_bytes([choice({}, finish_reason="stop")]),
        chunk_bytes([choice({}, finish_reason="tool_calls")]),
        chunk_bytes([choice({"content": None}, finish_reason="length")]),
        # usage chunk (stream_options.include_usage)
        chunk_bytes([], usage={"prompt_tokens": 31, "completion_tokens": 24,
                               "total_tokens": 55}),
        b"data: [DONE]\n\n",
        b"data: keep-alive\n\n",
        b"data: {\"choices\": [\n\n",
        b"data:\n\n",
        b"data: []\n\n",
        b"data: \"content\"\n\n",
        b"data: 42\n\n",
        b"data: null\n\n",
        b"data: {}\n\n",
        b'data: {"choices": null}\n\n',
        b'data: {"choices": {"0": {"delta": {"content": "x"}}}}\n\n',
        b'data: {"choices": ["x", 3, null]}\n\n',
        b'data: {"choices": [{"index": 0}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": "content"}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"content": 5, "refusal": ["x"]}}]}\n\n',
        b'data: {"choices": [{"index": 0, "message": {"content": "not a delta"}}]}\n\n',
        b": ping\n\n",
        b": keep-alive\n: still here\n\n",
        b"\n",
        b"event: ping\n\n",
        b"id: 7\nretry: 1000\n\n",
    ],
    ids=["role-only", "finish-stop", "finish-tool-calls", "finish-length-null-content",
         "usage-chunk", "done", "non-json", "truncated-json", "empty-data", "json-list",
         "json-string", "json-number", "json-null", "no-choices", "null-choices",
         "dict-choices", "non-dict-choices", "choice-without-delta", "string-delta",
         "non-string-content", "non-stream-message", "comment", "comments", "blank-line",
         "event-without-data", "id-and-retry-only"],
)
def test_extract_events_without_model_text(raw: bytes) -> None:
    assert extract(one_event(raw)) == []


def test_extract_multiline_data_is_joined_before_parsing() -> None:
    event = one_event(b'data: {"choices": [{"index": 0,\ndata: "delta": {"content": "hi"}}]}\n\n')
    assert extract(event) == [(("content", 0), "hi")]


def test_extract_with_event_name_and_crlf() -> None:
    raw = chunk_bytes([choice({"content": "crlf"})]).replace(b"\n", b"\r\n")
    event = one_event(b"event: message\r\nid: 3\r\n" + raw)
    assert extract(event) == [(("content", 0), "crlf")]


def test_extract_on_a_hand_built_event() -> None:
    event = SSEEvent(raw=b"", data='{"choices":[{"index":0,"delta":{"content":"x"}}]}')
    assert extract(event) == [(("content", 0), "x")]
    assert extract(SSEEvent(raw=b": x\n\n", comments=("x",))) == []


def _stream_text(raw: bytes, chunk_size: int | None = None) -> list[tuple[Hashable, str]]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    if chunk_size is None:
        events += decoder.feed(raw)
    else:
        for start in range(0, len(raw), chunk_size):
            events += decoder.feed(raw[start:start + chunk_size])
    events += decoder.feed(b"", end_of_stream=True)
    assert decoder.flush() == b""
    found: list[tuple[Hashable, str]] = []
    for event in events:
        found += extract(event)
    return found


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_recorded_content_stream(chunk_size: int | None) -> None:
    raw = (FIXTURES / "openai_chat.sse").read_bytes()
    found = _stream_text(raw, chunk_size)
    assert {channel for channel, _ in found} == {("content", 0)}
    assert "".join(text for _, text in found) == (
        "Bonjour ! Voici un résumé de votre voyage au 日本 : Tōkyō, Kyōto et Ōsaka. "
        "Bon séjour 🙂"
    )
    assert len(found) == 11


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_recorded_tool_call_stream(chunk_size: int | None) -> None:
    raw = (FIXTURES / "openai_tool_calls.sse").read_bytes()
    found = _stream_text(raw, chunk_size)
    assert {channel for channel, _ in found} == {("tool", 0, 0), ("tool_name", 0, 0)}
    assert [text for channel, text in found if channel[0] == "tool_name"] == ["get_weather"]
    arguments = "".join(text for channel, text in found if channel[0] == "tool")
    assert json.loads(arguments) == {
        "location": "Zürich, Schweiz", "unit": "celsius", "note": "東京 🌧"}


# --------------------------------------------------------------------------- frames and errors


def test_error_kinds() -> None:
    assert ErrorKind.VIOLATION == "guardrail_violation"
    assert ErrorKind.UNAVAILABLE == "guardrail_unavailable"


def test_violation_terminal_frame_is_byte_exact() -> None:
    frame = terminal_frame("guardrail_violation")
    assert isinstance(frame, bytes)
    assert frame == VIOLATION_FRAME


def test_unavailable_terminal_frame_is_byte_exact() -> None:
    frame = terminal_frame(ErrorKind.UNAVAILABLE)
    assert frame == UNAVAILABLE_FRAME
    payload = json.loads(frame.split(b"\n\n")[0].removeprefix(b"data: "))
    assert payload["error"]["type"] == "guardrail_unavailable"
    assert payload["error"]["code"] == 503


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        (ErrorKind.VIOLATION, 400, VIOLATION_MESSAGE),
        (ErrorKind.UNAVAILABLE, 503, UNAVAILABLE_MESSAGE),
    ],
)
def test_terminal_frame_decodes_into_exactly_two_events(kind: str, code: int,
                                                        message: str) -> None:
    frame = terminal_frame(kind)
    events = decode(frame)
    assert len(events) == 2
    error, done = events
    assert b"".join(e.raw for e in events) == frame
    assert error.event_type == "message" and done.event_type == "message"
    assert error.data is not None
    assert json.loads(error.data) == {"error": {"message": message, "code": code, "type": kind}}
    assert done.data == "[DONE]"
    # Our own frames carry no model text: re-reading them never checks anything.
    assert extract(error) == []
    assert extract(done) == []


def test_terminal_frame_decodes_the_same_byte_by_byte() -> None:
    frame = terminal_frame(ErrorKind.VIOLATION)
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for byte in frame:
        events += decoder.feed(bytes([byte]))
    events += decoder.feed(b"", end_of_stream=True)
    assert [e.data for e in events] == [json.dumps(error_object(ErrorKind.VIOLATION)), "[DONE]"]
    assert decoder.flush() == b""


@pytest.mark.parametrize(
    ("kind", "status", "message"),
    [
        (ErrorKind.VIOLATION, 400, VIOLATION_MESSAGE),
        (ErrorKind.UNAVAILABLE, 503, UNAVAILABLE_MESSAGE),
    ],
)
def test_error_body(kind: str, status: int, message: str) -> None:
    got_status, payload = FMT.error_body(kind)
    assert got_status == status
    assert isinstance(payload, bytes)
    assert json.loads(payload) == {"error": {"message": message, "code": status, "type": kind}}
    assert payload == json.dumps(error_object(kind)).encode()
    assert b"\n" not in payload


def test_error_object_shape() -> None:
    assert error_object(ErrorKind.VIOLATION) == {
        "error": {"message": VIOLATION_MESSAGE, "code": 400,
                  "type": "guardrail_violation"}}
    # A fresh dict each time: callers may not corrupt later answers.
    first = error_object(ErrorKind.UNAVAILABLE)
    first["error"]["message"] = "changed"
    assert error_object(ErrorKind.UNAVAILABLE)["error"]["message"] == UNAVAILABLE_MESSAGE


@pytest.mark.parametrize("kind", ["guardrail_exploded", "", "VIOLATION"])
def test_unknown_error_kind_is_rejected(kind: str) -> None:
    with pytest.raises(KeyError):
        terminal_frame(kind)
    with pytest.raises(KeyError):
        FMT.error_body(kind)
