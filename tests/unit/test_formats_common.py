"""``extproc.formats``: the interface every format module implements, request matching across
all formats, and helpers the per-API tests share (SDK clients over a mock transport, the
guard's way of driving a codec).

The official SDKs (``openai``, ``anthropic``) talk through ``httpx2``; a ``MockTransport``
serves them our bytes, split into small chunks, so each SDK parses exactly what a client
behind Envoy would receive.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.eventstream import EventStreamDecoder
from extproc.formats import (
    ErrorKind,
    PromptScope,
    StreamCodec,
    StreamFormat,
    all_formats,
    find_format,
)
from extproc.formats.anthropic_messages import AnthropicMessages
from extproc.formats.bedrock import BedrockRuntime
from extproc.formats.gemini import GeminiGenerateContent
from extproc.formats.mcp import McpFormat
from extproc.formats.ollama import OllamaFormat
from extproc.formats.openai_chat import OpenAIChat
from extproc.formats.openai_completions import OpenAICompletions
from extproc.formats.openai_responses import OpenAIResponses
from extproc.framing import Decoder, NDJSONDecoder
from extproc.sse import SSEDecoder, SSEEvent
from tests.support import UNAVAILABLE_MESSAGE, VIOLATION_MESSAGE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

SOFT_MESSAGE = "Sorry, the guardrail blocked this answer. 申し訳ありません 🙏"


# --------------------------------------------------------------------------- shared helpers


FRAMINGS: dict[str, Callable[[], Decoder]] = {
    "sse": SSEDecoder, "ndjson": NDJSONDecoder, "eventstream": EventStreamDecoder}
#: framing (a fixture's extension) -> the content type of answers in it
CONTENT_TYPES = {"sse": "text/event-stream", "ndjson": "application/x-ndjson",
                 "eventstream": "application/vnd.amazon.eventstream"}


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def decode_as(fmt: StreamFormat, raw: bytes, chunk_size: int | None = None) -> list[SSEEvent]:
    """Wire bytes -> events in the framing of ``fmt``'s streams."""
    for framing, content_type in CONTENT_TYPES.items():
        if fmt.stream_decoder(content_type) is not None:
            return decode(raw, chunk_size, framing)
    raise AssertionError(f"{fmt.name} has no stream framing")


def fixture_events(name: str, chunk_size: int | None = None) -> list[SSEEvent]:
    """A recording's events, in its framing (``.ndjson``: lines)."""
    return decode(fixture(name), chunk_size, name.rsplit(".", 1)[-1])


def decode(raw: bytes, chunk_size: int | None = None, framing: str = "sse") -> list[SSEEvent]:
    """Wire bytes -> events, as the sidecar's decoder sees them (``framing``: ``sse``,
    ``ndjson`` lines, AWS ``eventstream`` frames)."""
    decoder: Decoder = FRAMINGS[framing]()
    events: list[SSEEvent] = []
    step = chunk_size or max(1, len(raw))
    for start in range(0, len(raw), step):
        events += decoder.feed(raw[start:start + step])
    events += decoder.feed(b"", end_of_stream=True)
    assert decoder.flush() == b""
    return events


def extract_all(codec: StreamCodec, events: list[SSEEvent]) -> list[tuple[Hashable, str]]:
    found: list[tuple[Hashable, str]] = []
    for event in events:
        found += codec.extract(event)
    return found


def joined(found: list[tuple[Hashable, str]]) -> dict[Hashable, str]:
    texts: dict[Hashable, str] = {}
    for channel, text in found:
        texts[channel] = texts.get(channel, "") + text
    return texts


def release(codec: StreamCodec, events: list[SSEEvent],
            mask: Callable[[Hashable, str], str] | None = None) -> bytes:
    """What the guard does: extract every event as it arrives, then rewrite every released
    event in order with the changed texts of its channels (``mask``: new text per delta)."""
    per_event = [codec.extract(event) for event in events]
    out: list[bytes] = []
    for event, found in zip(events, per_event, strict=True):
        changed: dict[Hashable, str] = {}
        if mask is not None:
            for channel, text in found:
                new = mask(channel, text)
                if new != text:
                    changed[channel] = new
        out.append(codec.rewrite(event, changed))
    return b"".join(out)


def chunked(body: bytes, size: int = 7) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


class Served:
    """A MockTransport answering every request with one canned response; records requests."""

    def __init__(self, body: bytes, status: int = 200,
                 content_type: str = "text/event-stream; charset=utf-8") -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.requests: list[httpx2.Request] = []

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        return httpx2.Response(self.status, headers={"content-type": self.content_type},
                               content=chunked(self.body))

    def http_client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handler))


def openai_client(body: bytes, status: int = 200, json_body: bool = False) -> openai.OpenAI:
    served = Served(body, status, "application/json" if json_body else "text/event-stream")
    return openai.OpenAI(api_key="sk-test", base_url="http://llm.test/v1", max_retries=0,
                         http_client=served.http_client())


def anthropic_client(body: bytes, status: int = 200,
                     json_body: bool = False) -> anthropic.Anthropic:
    served = Served(body, status, "application/json" if json_body else "text/event-stream")
    return anthropic.Anthropic(api_key="sk-ant-test", base_url="http://llm.test",
                               max_retries=0, http_client=served.http_client())


def sse_payloads(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) of every message event; ``[DONE]`` kept as the string."""
    result = []
    for event in decode(raw):
        if event.data is None:
            continue
        data: Any = event.data if event.data == "[DONE]" else json.loads(event.data)
        result.append((event.event, data))
    return result


# --------------------------------------------------------------------------- the interface

FORMATS = all_formats()
#: The formats whose streams are SSE (the tests that feed OpenAI- or Anthropic-shaped events).
SSE_FORMATS = [f for f in FORMATS if f.stream_decoder("text/event-stream") is not None]
#: The model APIs. MCP (JSON-RPC) differs by design where these tests assume a model API: it
#: refuses a body that is not one JSON-RPC message (a JSON-RPC error, not an empty prompt), its
#: errors are JSON-RPC errors (HTTP 200 for the id at stake), its events are whole messages
#: (the text is complete after each one); tests/unit/test_formats_mcp.py covers those.
MODEL_FORMATS = [f for f in FORMATS if f.name != "mcp"]
MODEL_SSE_FORMATS = [f for f in SSE_FORMATS if f.name != "mcp"]
CODEC_METHODS = ("extract", "rewrite", "terminal_frame", "soft_block_frame")
FORMAT_METHODS = ("matches", "prompt_texts", "rewrite_prompt", "response_texts",
                  "rewrite_response", "soft_block_response", "error_body", "stream_codec",
                  "stream_decoder")


def test_all_formats_order_and_names() -> None:
    assert [type(f) for f in FORMATS] == [
        OpenAIChat, OpenAIResponses, AnthropicMessages, OpenAICompletions,
        GeminiGenerateContent, BedrockRuntime, BedrockRuntime, OllamaFormat, OllamaFormat,
        McpFormat]
    names = [f.name for f in FORMATS]
    assert names == ["openai.chat_completions", "openai.responses", "anthropic.messages",
                     "openai.completions", "google.gemini", "bedrock.converse",
                     "bedrock.invoke", "ollama.chat", "ollama.generate", "mcp"]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_every_format_implements_the_protocols(fmt: StreamFormat) -> None:
    for method in FORMAT_METHODS:
        assert callable(getattr(fmt, method)), method
        protocol = inspect.signature(getattr(StreamFormat, method))
        actual = inspect.signature(getattr(fmt, method))
        assert list(actual.parameters) == list(protocol.parameters)[1:], method
    codec = fmt.stream_codec()
    for method in CODEC_METHODS:
        protocol = inspect.signature(getattr(StreamCodec, method))
        actual = inspect.signature(getattr(codec, method))
        assert list(actual.parameters) == list(protocol.parameters)[1:], method
    # One codec per stream: never shared.
    assert fmt.stream_codec() is not codec


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/chat/completions", OpenAIChat),
        ("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
         OpenAIChat),
        ("POST", "/v1/completions", OpenAICompletions),
        ("POST", "/openai/deployments/davinci/completions?api-version=2024-10-21",
         OpenAICompletions),
        ("POST", "/completions", OpenAICompletions),
        ("POST", "/v1/responses", OpenAIResponses),
        ("POST", "/openai/v1/responses?api-version=preview", OpenAIResponses),
        ("POST", "/v1/messages", AnthropicMessages),
        ("POST", "/anthropic/v1/messages?beta=true", AnthropicMessages),
        ("POST", "/v1/threads/thread_abc/messages", None),
        ("POST", "/v1/messages/count_tokens", None),
        ("POST", "/v1/messages/batches", None),
        ("POST", "/v1/responses/resp_123/cancel", None),
        ("POST", "/v1/responses/input_tokens", None),
        ("GET", "/v1/responses", None),
        ("GET", "/v1/messages", None),
        ("PUT", "/v1/completions", None),
        ("POST", "/v1/embeddings", None),
        ("POST", "/v1/chat/completionsx", None),
        ("POST", "/v1/models?x=/messages", None),
    ],
)
def test_find_format_across_all_apis(method: str, path: str, expected: type | None) -> None:
    found = find_format(method, path, FORMATS)
    if expected is None:
        assert found is None
    else:
        assert type(found) is expected


def test_chat_path_is_not_completions_even_alone() -> None:
    # all_formats() tries chat first, and completions also refuses chat paths by itself.
    assert OpenAICompletions().matches("POST", "/v1/chat/completions") is False


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_unknown_scope_is_rejected(fmt: StreamFormat) -> None:
    with pytest.raises(ValueError, match="scope"):
        fmt.prompt_texts(b"{}", "everything")
    with pytest.raises(ValueError, match="scope"):
        fmt.rewrite_prompt(b"{}", "everything", [])


@pytest.mark.parametrize("fmt", MODEL_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("scope", PromptScope.VALUES)
@pytest.mark.parametrize("raw", [b"", b"{not json", b"\xff\xfe\x00", b"[]", b"null", b'"x"'])
def test_prompt_of_garbage_is_empty(fmt: StreamFormat, scope: str, raw: bytes) -> None:
    if scope == PromptScope.WHOLE_REQUEST and raw == b'"x"':
        # A bare JSON string is text a lenient upstream may hand to its model: checked.
        assert fmt.prompt_texts(raw, scope) == ["x"]
        assert fmt.rewrite_prompt(raw, scope, ["y"]) == b'"y"'
        return
    assert fmt.prompt_texts(raw, scope) == []
    assert fmt.rewrite_prompt(raw, scope, []) is None


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("raw", [b"", b"{not json", b"[]", b"{}", b'{"choices": 3}'])
def test_response_texts_of_garbage_is_empty(fmt: StreamFormat, raw: bytes) -> None:
    assert fmt.response_texts(raw) == []


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_rewrite_response_rejects_what_it_cannot_do(fmt: StreamFormat) -> None:
    with pytest.raises(ValueError):
        fmt.rewrite_response(b"not json", {("text", 0): "x"})
    with pytest.raises(ValueError):
        fmt.rewrite_response(b"{}", {("no such channel", 0): "x"})


@pytest.mark.parametrize("fmt", MODEL_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize(
    ("kind", "status", "message"),
    [(ErrorKind.VIOLATION, 400, VIOLATION_MESSAGE),
     (ErrorKind.UNAVAILABLE, 503, UNAVAILABLE_MESSAGE)],
)
def test_error_body_status_and_message(fmt: StreamFormat, kind: str, status: int,
                                       message: str) -> None:
    got, body = fmt.error_body(kind)
    assert got == status
    payload = json.loads(body)
    if "error" not in payload:
        assert set(payload) == {"message", "__type"}, payload  # (AWS's error shape)
        assert payload["message"] == message
        return
    if isinstance(payload["error"], str):  # (Ollama: the message alone)
        assert payload["error"] == message
        return
    assert payload["error"]["message"] == message
    if "status" in payload["error"]:  # (Google: the kind is the reason of its details)
        assert payload["error"]["code"] == status
        assert payload["error"]["details"][0]["reason"] == kind.upper()
        return
    assert payload["error"]["type"] == kind


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("kind", ["guardrail_exploded", "", "VIOLATION"])
def test_unknown_error_kind_is_rejected(fmt: StreamFormat, kind: str) -> None:
    with pytest.raises(KeyError):
        fmt.error_body(kind)
    with pytest.raises(KeyError):
        fmt.stream_codec().terminal_frame(kind)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("kind", [ErrorKind.VIOLATION, ErrorKind.UNAVAILABLE])
def test_own_frames_carry_no_model_text(fmt: StreamFormat, kind: str) -> None:
    # Our frames are whole events and re-reading them never yields text to check.
    for frame in (fmt.stream_codec().terminal_frame(kind),):
        events = decode_as(fmt, frame)
        assert b"".join(e.raw for e in events) == frame
        assert extract_all(fmt.stream_codec(), events) == []


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_soft_block_frame_on_a_fresh_codec_is_whole_events(fmt: StreamFormat) -> None:
    frame = fmt.stream_codec().soft_block_frame(SOFT_MESSAGE)
    events = decode_as(fmt, frame, chunk_size=3)
    assert b"".join(e.raw for e in events) == frame
    texts = joined(extract_all(fmt.stream_codec(), events))
    assert list(texts.values()) == [SOFT_MESSAGE]


@pytest.mark.parametrize("fmt", SSE_FORMATS, ids=lambda f: f.name)
def test_rewrite_without_changes_is_byte_identical(fmt: StreamFormat) -> None:
    name = {"openai.chat_completions": "openai_tool_calls.sse",
            "openai.responses": "responses_stream.sse",
            "anthropic.messages": "anthropic_stream.sse",
            "openai.completions": "completions.sse",
            "google.gemini": "gemini_stream.sse",
            "mcp": "mcp_stream.sse"}[fmt.name]
    raw = fixture(name)
    assert release(fmt.stream_codec(), decode(raw, chunk_size=11)) == raw
    # And events that carry no JSON at all pass through.
    odd = decode(b": keep-alive\n\ndata: not json\n\nevent: ping\n\ndata: [DONE]\n\n")
    codec = fmt.stream_codec()
    assert extract_all(codec, odd) == []
    assert b"".join(codec.rewrite(e, {}) for e in odd) == b"".join(e.raw for e in odd)


def upper_mask(channel: Hashable, text: str) -> str:
    return text.upper()


# --------------------------------------------------------------------------- robustness

_TYPES = [
    "response.created", "response.in_progress", "response.output_item.added",
    "response.content_part.added", "response.output_text.delta", "response.output_text.done",
    "response.refusal.delta", "response.function_call_arguments.delta",
    "response.function_call_arguments.done", "response.content_part.done",
    "response.reasoning_summary_part.added", "response.reasoning_summary_text.delta",
    "response.reasoning_summary_part.done", "response.output_item.done",
    "response.completed", "response.failed", "error",
    "message_start", "content_block_start", "content_block_delta", "content_block_stop",
    "message_delta", "message_stop", "ping", "chat.completion.chunk", "text_completion",
]
_FIELDS = ["index", "output_index", "content_index", "summary_index", "delta", "text",
           "part", "item", "response", "choices", "message", "finish_reason",
           "sequence_number", "usage", "content_block", "arguments", "refusal", "logprobs",
           "content", "output", "summary", "partial_json", "thinking"]
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.text(max_size=6),
                     st.sampled_from(["output_text", "refusal", "message", "function_call",
                                      "reasoning", "text", "text_delta", "input_json_delta",
                                      "thinking_delta", "summary_text", "tool_use"]))
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(_FIELDS + ["type"]), inner, max_size=4)),
    max_leaves=12)
_PAYLOADS = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from(_TYPES),
    st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=6))


@pytest.mark.parametrize("fmt", MODEL_SSE_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("odd_index", [[1], {"a": 1}, True, "2", 1.5])
def test_odd_indexes_give_stable_channels(fmt: StreamFormat, odd_index: Any) -> None:
    payloads = [
        {"id": "x", "object": "chat.completion.chunk", "choices": [
            {"index": odd_index, "delta": {"content": "a", "tool_calls": [
                {"index": odd_index, "function": {"arguments": "b"}}]}, "text": "c"}]},
        {"type": "response.output_text.delta", "output_index": odd_index,
         "content_index": odd_index, "delta": "d"},
        {"type": "content_block_delta", "index": odd_index,
         "delta": {"type": "text_delta", "text": "e"}},
        {"candidates": [{"index": odd_index, "content": {"parts": [{"text": "f"}]}}]},
    ]
    events = decode(b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads))
    codec = fmt.stream_codec()
    found = extract_all(codec, events)
    assert found  # the text is still found, so it is still checked
    for channel, _ in found:
        hash(channel)
    out = release(fmt.stream_codec(), events, upper_mask)
    assert joined(extract_all(fmt.stream_codec(), decode(out))) == {
        ch: t.upper() for ch, t in joined(found).items()}


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(_PAYLOADS, max_size=12), masked=st.booleans(),
       named=st.booleans())
def test_codecs_survive_malformed_events(fmt: StreamFormat, payloads: list[dict[str, Any]],
                                         masked: bool, named: bool) -> None:
    raw = b"".join(
        (f"event: {p['type']}\n".encode() if named else b"")
        + b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads)
    events = decode(raw)
    codec = fmt.stream_codec()
    out = release(codec, events, upper_mask if masked else None)
    assert isinstance(out, bytes)
    for frame in (codec.soft_block_frame("stop"),
                  codec.terminal_frame(ErrorKind.VIOLATION)):
        decoded = decode_as(fmt, frame)
        assert b"".join(e.raw for e in decoded) == frame
        assert all(e.data is not None for e in decoded)


# --------------------------------------------------------------------------- notes
# A codec keeps what ``extract`` read of an event for that event's ``rewrite`` (``Notes``), so
# an event is parsed once. The reference: the same codec with every note missed (``extract``
# sees a copy of each event), which reads every released event again, as the codecs did before.

FIXTURES_OF = {
    "openai.chat_completions": ("openai_chat.sse", "openai_tool_calls.sse"),
    "openai.responses": ("responses_stream.sse",),
    "anthropic.messages": ("anthropic_messages.sse", "anthropic_stream.sse"),
    "openai.completions": ("completions.sse",),
    "google.gemini": ("gemini_stream.sse",),
    "bedrock.converse": ("bedrock_converse.eventstream",),
    "bedrock.invoke": ("bedrock_invoke.eventstream",),
    "ollama.chat": ("ollama_chat.ndjson",),
    "ollama.generate": ("ollama_generate.ndjson",),
    "mcp": ("mcp_stream.sse",),  # (the SDK server's SSE answer to tools/call, legacy transport)
}


class Unnoted:
    """A codec whose ``extract`` only ever sees copies of the events ``rewrite`` gets."""

    def __init__(self, codec: StreamCodec) -> None:
        self.codec = codec

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        return self.codec.extract(dataclasses.replace(event))

    @property
    def text_ended(self) -> bool:
        return self.codec.text_ended

    @property
    def holds_trailing_events(self) -> bool:
        return self.codec.holds_trailing_events

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        return self.codec.rewrite(event, texts)

    def terminal_frame(self, kind: str) -> bytes:
        return self.codec.terminal_frame(kind)

    def soft_block_frame(self, message: str) -> bytes:
        return self.codec.soft_block_frame(message)


# Which events' text is replaced: none, every one, every other one (by arrival index).
MASKS: dict[str, Callable[[int, Hashable, str], str]] = {
    "none": lambda index, channel, text: text,
    "all": lambda index, channel, text: text.upper() + "#",
    "odd": lambda index, channel, text: "{MASK}" if index % 2 else text,
}


def drive(codec: StreamCodec, events: list[SSEEvent], schedule: list[bool], released: int,
          mask: str) -> list[bytes]:
    """What the guard does, in the order ``schedule`` gives (True: the next event arrives,
    False: the oldest arrived one is released), ``released`` events at most; then the closing
    frames. Returns every byte string the codec produced."""
    found: list[list[tuple[Hashable, str]]] = []
    out: list[bytes] = []
    steps = iter(schedule)
    while len(out) < released:
        arrive = next(steps, True)
        if len(found) < len(events) and (arrive or len(out) == len(found)):
            found.append(codec.extract(events[len(found)]))
            continue
        index = len(out)
        changed = {channel: MASKS[mask](index, channel, text) for channel, text in found[index]
                   if MASKS[mask](index, channel, text) != text}
        out.append(codec.rewrite(events[index], changed))
    out.append(codec.soft_block_frame(SOFT_MESSAGE))
    out.append(codec.terminal_frame(ErrorKind.VIOLATION))
    return out


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("mask", MASKS)
def test_notes_change_no_byte_of_the_recordings(fmt: StreamFormat, mask: str) -> None:
    for name in FIXTURES_OF[fmt.name]:
        events = fixture_events(name, chunk_size=13)
        for released in range(len(events) + 1):
            for schedule in ([True] * len(events), [True, False] * len(events), []):
                noted = drive(fmt.stream_codec(), events, schedule, released, mask)
                reread = drive(Unnoted(fmt.stream_codec()), events, schedule, released, mask)
                assert noted == reread, (name, released, schedule[:2])
                # The notes are used: an unmasked release is the events' own bytes.
                if mask == "none":
                    assert noted[:-2] == [e.raw for e in events[:released]]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(_PAYLOADS, max_size=12), named=st.booleans(),
       schedule=st.lists(st.booleans(), max_size=30), released=st.integers(0, 12),
       mask=st.sampled_from(sorted(MASKS)))
def test_notes_change_no_byte_of_malformed_streams(fmt: StreamFormat,
                                                   payloads: list[dict[str, Any]], named: bool,
                                                   schedule: list[bool], released: int,
                                                   mask: str) -> None:
    raw = b"".join(
        (f"event: {p['type']}\n".encode() if named else b"")
        + b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads)
    events = decode(raw + b"data: [DONE]\n\n: comment\n\ndata: not json\n\n")
    released = min(released, len(events))
    assert drive(fmt.stream_codec(), events, schedule, released, mask) == drive(
        Unnoted(fmt.stream_codec()), events, schedule, released, mask)


@pytest.mark.parametrize("fmt", MODEL_SSE_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("kind", [[1], {"a": 1}, 7, None, True])
def test_bug_a_list_as_event_type_raised_in_the_responses_and_anthropic_codecs(
        fmt: StreamFormat, kind: Any) -> None:
    # ``{"type": [1]}`` made ``_DELTAS.get(kind)`` / ``kind in _TRACKED`` raise TypeError
    # (unhashable), failing the stream. The event is not one we understand: it passes unchanged.
    events = decode(b"".join(
        (f"event: {name}\n".encode() if name else b"")
        + b"data: " + json.dumps({"type": kind, "index": 0, "delta": "x"}).encode() + b"\n\n"
        for name in (None, "message_start", "content_block_start", "response.created")))
    for codec in (fmt.stream_codec(), Unnoted(fmt.stream_codec())):
        assert extract_all(codec, events) == []
        assert [codec.rewrite(e, {}) for e in events] == [e.raw for e in events]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_an_unchanged_release_parses_no_event_again(fmt: StreamFormat,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from extproc.formats import _common

    parsed: list[str | bytes | None] = []
    load_object = _common.load_object

    def counting(data: bytes | str | None) -> dict[str, Any] | None:
        parsed.append(data)
        return load_object(data)

    monkeypatch.setattr(_common, "load_object", counting)
    for name in FIXTURES_OF[fmt.name]:
        events = fixture_events(name)
        codec = fmt.stream_codec()
        found = [codec.extract(event) for event in events]
        parsed.clear()
        assert b"".join(codec.rewrite(event, {}) for event in events) == fixture(name)
        assert parsed == []
        # Text to replace is the exception: that event is read again to rewrite it.
        codec = fmt.stream_codec()
        found = [codec.extract(event) for event in events]
        index = next(i for i, texts in enumerate(found) if texts)
        parsed.clear()
        for event, texts in zip(events[:index + 1], found, strict=False):
            codec.rewrite(event, {channel: "X" for channel, _ in texts})
        # (Bedrock InvokeModel: the model JSON inside the chunk is read again too)
        assert events[index].data in parsed and len(parsed) <= 2


def _loads_object(data: str) -> Any:
    """``load_object`` as it was: ``json.loads``, then objects only."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


_JSON_TEXTS = st.one_of(
    _JSON.map(json.dumps),
    st.builds(lambda value, before, after: before + json.dumps(value) + after,
              st.dictionaries(st.text(max_size=3), _JSON, max_size=3),
              st.sampled_from(["", " ", "\n", "\ufeff"]),
              st.sampled_from(["", " ", "\n\t", "x", "}", "{}", "\x00", "\ufeff"])),
    st.text(alphabet='{}[]":,0123456789.eE-+ tfnrulas\\', max_size=30).map(lambda t: "{" + t),
    st.sampled_from(["{", "{}", "{} ", "{}{}", '{"a":1}]', '{"a":NaN}', '{"a":1e400}',
                     '{"a":"\\ud800"}', "{" * 5000 + "}" * 5000, '{"a":1,}']),
)


@settings(max_examples=500, deadline=None)
@given(_JSON_TEXTS)
def test_load_object_reads_text_like_json_loads(data: str) -> None:
    from extproc.formats._common import load_object

    # repr: equal structure and values, NaN included (NaN != NaN)
    assert repr(load_object(data)) == repr(_loads_object(data))


# --------------------------------------------------------------------------- end of the text
# ``text_ended``: the events seen say the model's text is complete, so the guard checks the
# tail at once instead of waiting for the end of the body.


@pytest.mark.parametrize("fmt", MODEL_FORMATS, ids=lambda f: f.name)
def test_text_ended_after_the_last_text_of_each_recording(fmt: StreamFormat) -> None:
    for name in FIXTURES_OF[fmt.name]:
        events = fixture_events(name)
        codec = fmt.stream_codec()
        found = [codec.extract(event) for event in events]
        ended = []
        codec = fmt.stream_codec()
        for event in events:
            codec.extract(event)
            ended.append(codec.text_ended)
        last_text = max(i for i, texts in enumerate(found) if texts)
        assert not any(ended[:last_text]), name  # never while text is still to come
        assert ended[-1], name  # and known before the body ends


@pytest.mark.parametrize("fmt", MODEL_FORMATS, ids=lambda f: f.name)
def test_text_ended_is_withdrawn_by_later_text(fmt: StreamFormat) -> None:
    name = FIXTURES_OF[fmt.name][0]
    events = fixture_events(name)
    codec = fmt.stream_codec()
    texts = [(event, codec.extract(event)) for event in events]
    assert codec.text_ended
    # The same text event again, after the end: a misbehaving upstream.
    late = next(event for event, found in texts if found)
    assert codec.extract(dataclasses.replace(late))
    assert not codec.text_ended


def test_text_ended_waits_for_every_choice() -> None:
    codec = OpenAIChat().stream_codec()

    def chunk(index: int, content: str | None, finish: str | None) -> SSEEvent:
        delta = {} if content is None else {"content": content}
        data = json.dumps({"choices": [{"index": index, "delta": delta,
                                        "finish_reason": finish}]})
        return SSEEvent(raw=f"data: {data}\n\n".encode(), data=data)

    codec.extract(chunk(0, "a", None))
    codec.extract(chunk(1, "b", None))
    codec.extract(chunk(0, None, "stop"))
    assert not codec.text_ended  # choice 1 is still streaming
    codec.extract(chunk(1, None, "length"))
    assert codec.text_ended
