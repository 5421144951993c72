"""Bedrock Runtime (``extproc.formats.bedrock``) read by boto3's real ``bedrock-runtime`` client
(the HTTP exchange replaced by a ``before-send`` hook answering with our bytes, as in
``tests/unit/test_eventstream.py``) and by the ``anthropic`` SDK's ``AnthropicBedrock``: paths,
prompts, whole answers, error bodies, ConverseStream and InvokeModelWithResponseStream frames
extracted, passed byte for byte, masked, cut by a terminal frame and ended by a soft block."""

from __future__ import annotations

import base64
import inspect
import json
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import anthropic
import boto3
import botocore.exceptions
import httpx2
import pytest
from botocore.awsrequest import AWSResponse
from mypy_boto3_bedrock_runtime import BedrockRuntimeClient

from extproc.eventstream import (
    CONTENT_TYPE,
    CONVERSE_STREAM_EXCEPTIONS,
    INVOKE_STREAM_EXCEPTIONS,
    EventFrame,
    EventStreamDecoder,
    encode_frame,
    event_frame,
    exception_frame,
)
from extproc.formats import ErrorKind, PromptScope, StreamCodec, StreamFormat, find_format
from extproc.formats.bedrock import (
    CONVERSE,
    ERROR_TYPE_HEADER,
    INVOKE,
    BedrockRuntime,
    ConverseStreamCodec,
    InvokeStreamCodec,
    error_type,
)
from extproc.sse import SSEEvent
from tests.unit.test_formats_common import joined

CONV = BedrockRuntime(CONVERSE)
INV = BedrockRuntime(INVOKE)
FORMATS: tuple[StreamFormat, ...] = (CONV, INV)
MESSAGES = [{"role": "user", "content": [{"text": "x"}]}]
JSON_HEADERS: Any = {"content-type": "application/json"}
ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet-v2:0"

# --------------------------------------------------------------------------- boto3 plumbing


class RawStream:
    """What botocore reads a body from: urllib3's response ``stream()`` and ``close()``."""

    def __init__(self, body: bytes, size: int = 7) -> None:
        self.chunks = [body[i:i + size] for i in range(0, len(body), size)] or [b""]

    def stream(self, *_: object, **__: object) -> Iterator[bytes]:
        yield from self.chunks

    def read(self, *_: object, **__: object) -> bytes:
        chunks, self.chunks = self.chunks, []
        return b"".join(chunks)

    def close(self) -> None:
        pass


def served(operation: str, body: bytes, status: int = 200,
           headers: dict[str, str] | None = None) -> BedrockRuntimeClient:
    """A real boto3 client whose ``operation`` calls get ``body`` instead of the network."""
    client = boto3.client("bedrock-runtime", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")
    streamed = operation in ("ConverseStream", "InvokeModelWithResponseStream")
    content_type = CONTENT_TYPE if streamed and status == 200 else "application/json"
    answer_headers: Any = {"content-type": content_type, **(headers or {})}

    def send(request: Any, **_: object) -> Any:
        return AWSResponse(request.url, status, answer_headers, RawStream(body))

    client.meta.events.register(f"before-send.bedrock-runtime.{operation}", send)
    return client


def read_converse_stream(body: bytes) -> tuple[list[dict[str, Any]], Exception | None]:
    answer = served("ConverseStream", body).converse_stream(modelId=ARN, messages=MESSAGES)  # type: ignore[arg-type]
    seen: list[dict[str, Any]] = []
    try:
        for event in answer["stream"]:
            seen.append(dict(event))
    except botocore.exceptions.EventStreamError as exc:
        return seen, exc
    return seen, None


def read_invoke_stream(body: bytes) -> tuple[list[Any], Exception | None]:
    answer = served("InvokeModelWithResponseStream", body).invoke_model_with_response_stream(
        modelId=ARN, body=b"{}")
    seen: list[Any] = []
    try:
        for event in answer["body"]:
            assert set(event) == {"chunk"}
            seen.append(json.loads(event["chunk"]["bytes"]))
    except botocore.exceptions.EventStreamError as exc:
        return seen, exc
    return seen, None


def bedrock_anthropic(body: bytes, status: int = 200,
                      content_type: str = CONTENT_TYPE) -> anthropic.AnthropicBedrock:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers={"content-type": content_type},
                               content=iter([body[i:i + 9] for i in range(0, len(body), 9)]))

    return anthropic.AnthropicBedrock(
        aws_access_key="x", aws_secret_key="y", aws_region="us-east-1", max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


def text_of(events: list[dict[str, Any]]) -> dict[int, str]:
    """The text boto3 yields per content block index of a ConverseStream."""
    texts: dict[int, str] = {}
    for event in events:
        delta = event.get("contentBlockDelta")
        if delta and "text" in delta["delta"]:
            index = delta["contentBlockIndex"]
            texts[index] = texts.get(index, "") + delta["delta"]["text"]
    return texts


# --------------------------------------------------------------------------- recordings


def frame(kind: str, payload: dict[str, Any], pad: str = "abcdefgh") -> bytes:
    """A ConverseStream event as Bedrock sends it, padding (``p``) included."""
    return event_frame(kind, json.dumps({**payload, "p": pad}, separators=(",", ":")).encode())


def chunk(model: dict[str, Any], pad: str = "abcdefghijkl") -> bytes:
    """An InvokeModelWithResponseStream ``chunk`` holding ``model``'s JSON."""
    encoded = base64.b64encode(json.dumps(model, separators=(",", ":")).encode()).decode()
    return event_frame("chunk", json.dumps({"bytes": encoded, "p": pad},
                                           separators=(",", ":")).encode())


CONVERSE_FRAMES = [
    frame("messageStart", {"role": "assistant"}),
    frame("contentBlockDelta", {"contentBlockIndex": 0,
                                "delta": {"reasoningContent": {"text": "Think "}}}),
    frame("contentBlockDelta", {"contentBlockIndex": 0,
                                "delta": {"reasoningContent": {"text": "first."}}}),
    frame("contentBlockDelta", {"contentBlockIndex": 0,
                                "delta": {"reasoningContent": {"signature": "c2ln"}}}),
    frame("contentBlockStop", {"contentBlockIndex": 0}),
    frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "Hello"}}),
    frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": " there, "}}),
    frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "friend."}}),
    frame("contentBlockStop", {"contentBlockIndex": 1}),
    frame("contentBlockStart", {"contentBlockIndex": 2, "start": {"toolUse": {
        "toolUseId": "tooluse_1", "name": "get_weather"}}}),
    frame("contentBlockDelta", {"contentBlockIndex": 2,
                                "delta": {"toolUse": {"input": '{"city": '}}}),
    frame("contentBlockDelta", {"contentBlockIndex": 2,
                                "delta": {"toolUse": {"input": '"Paris"}'}}}),
    frame("contentBlockStop", {"contentBlockIndex": 2}),
    frame("messageStop", {"stopReason": "tool_use"}),
    frame("metadata", {"usage": {"inputTokens": 12, "outputTokens": 30, "totalTokens": 42},
                       "metrics": {"latencyMs": 321}}),
]
CONVERSE_RECORDING = b"".join(CONVERSE_FRAMES)
CONVERSE_TEXTS = {("reasoning", 0): "Think first.", ("text", 1): "Hello there, friend.",
                  ("tool_name", 2): "get_weather", ("tool", 2): '{"city": "Paris"}'}

ANTHROPIC_EVENTS: list[dict[str, Any]] = [
    {"type": "message_start", "message": {
        "id": "msg_bdrk_01", "type": "message", "role": "assistant",
        "model": "claude-3-5-sonnet-20241022", "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": 14, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_delta", "index": 0,
     "delta": {"type": "text_delta", "text": " there, "}},
    {"type": "content_block_delta", "index": 0,
     "delta": {"type": "text_delta", "text": "friend."}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
     "usage": {"output_tokens": 9}},
    {"type": "message_stop", "amazon-bedrock-invocationMetrics": {
        "inputTokenCount": 14, "outputTokenCount": 9, "invocationLatency": 420,
        "firstByteLatency": 210}},
]
INVOKE_FRAMES = [chunk(event) for event in ANTHROPIC_EVENTS]
INVOKE_RECORDING = b"".join(INVOKE_FRAMES)


def decode(raw: bytes, size: int | None = None) -> list[EventFrame]:
    decoder = EventStreamDecoder()
    frames: list[EventFrame] = []
    size = size or len(raw) or 1
    for start in range(0, len(raw), size):
        frames += decoder.feed(raw[start:start + size])
    frames += decoder.feed(b"", end_of_stream=True)
    assert decoder.flush() == b""
    return frames


def release(codec: StreamCodec, events: list[EventFrame], released: int | None = None,
            mask: Callable[[Hashable, str], str] | None = None) -> bytes:
    """What the guard does: extract every frame, rewrite the released ones in order."""
    found = [codec.extract(event) for event in events]
    out: list[bytes] = []
    for event, texts in list(zip(events, found))[:released]:
        changed: dict[Hashable, str] = {}
        for channel, text in texts:
            if mask is not None and mask(channel, text) != text:
                changed[channel] = mask(channel, text)
        out.append(codec.rewrite(event, changed))
    return b"".join(out)


# --------------------------------------------------------------------------- the interface


def test_implements_the_protocols() -> None:
    for fmt in FORMATS:
        for method in ("matches", "prompt_texts", "rewrite_prompt", "response_texts",
                       "rewrite_response", "soft_block_response", "error_body",
                       "stream_codec", "stream_decoder"):
            protocol = inspect.signature(getattr(StreamFormat, method))
            actual = inspect.signature(getattr(fmt, method))
            assert list(actual.parameters) == list(protocol.parameters)[1:], method
        codec = fmt.stream_codec()
        for method in ("extract", "rewrite", "terminal_frame", "soft_block_frame"):
            protocol = inspect.signature(getattr(StreamCodec, method))
            actual = inspect.signature(getattr(codec, method))
            assert list(actual.parameters) == list(protocol.parameters)[1:], method
        assert fmt.stream_codec() is not codec
        assert codec.text_ended is False
    assert (CONV.name, INV.name) == ("bedrock.converse", "bedrock.invoke")
    assert isinstance(CONV.stream_codec(), ConverseStreamCodec)
    assert isinstance(INV.stream_codec(), InvokeStreamCodec)
    with pytest.raises(ValueError):
        BedrockRuntime("apply-guardrail")


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("POST", "/model/anthropic.claude-3-5-sonnet-20241022-v2:0/converse", "bedrock.converse"),
    ("POST", "/model/anthropic.claude-3-5-sonnet-20241022-v2:0/converse-stream",
     "bedrock.converse"),
    ("POST", "/model/amazon.titan-text-express-v1/invoke", "bedrock.invoke"),
    ("POST", "/model/meta.llama3-70b-instruct-v1:0/invoke-with-response-stream",
     "bedrock.invoke"),
    ("POST", "/model/anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse", "bedrock.converse"),
    ("POST", "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
             "us.anthropic.claude-3-5-sonnet-20241022-v2%3A0/converse-stream",
     "bedrock.converse"),
    ("POST", f"/model/{ARN}/invoke", "bedrock.invoke"),
    ("POST", "/model/arn:aws:bedrock:us-west-2:123456789012:provisioned-model/abc123/invoke",
     "bedrock.invoke"),
    ("POST", "/model/model/converse", "bedrock.converse"),  # a model named "model"
    ("POST", "/bedrock/runtime/model/m/converse", "bedrock.converse"),  # a gateway's prefix
    ("POST", "/model/m/Converse/", "bedrock.converse"),
    ("POST", "/model/m/converse?x=1", "bedrock.converse"),
    ("post", "/model/m/invoke", "bedrock.invoke"),
    ("POST", "/model/m/count-tokens", None),
    ("POST", "/model/m/converse-streamx", None),
    ("POST", "/model/converse", None),
    ("POST", "/model/invoke-with-response-stream", None),
    ("POST", "/models/m/converse", None),
    ("POST", "/guardrail/g1/version/1/apply", None),
    ("POST", "/async-invoke", None),
    ("POST", "/m/invoke", None),
    ("GET", "/model/m/converse", None),
    ("GET", "/model/m/invoke", None),
    ("POST", "/v1/chat/completions", None),
    ("POST", "/v1/messages", None),
])
def test_paths(method: str, path: str, expected: str | None) -> None:
    found = find_format(method, path, FORMATS)
    assert (found.name if found is not None else None) == expected


def test_boto3_calls_reach_the_formats() -> None:
    """The paths boto3 really requests (model ids escaped as it escapes them)."""
    paths: list[str] = []
    client = boto3.client("bedrock-runtime", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")

    def send(request: Any, **_: object) -> Any:
        paths.append(request.url.split("amazonaws.com", 1)[1])
        return AWSResponse(request.url, 200, JSON_HEADERS,
                           RawStream(b'{"output":{"message":{"content":[]}}}'))

    client.meta.events.register("before-send.bedrock-runtime.*", send)
    client.converse(modelId=ARN, messages=MESSAGES)  # type: ignore[arg-type]
    client.invoke_model(modelId=ARN, body=b"{}")
    assert [find_format("POST", path, FORMATS) for path in paths] == [CONV, INV]
    assert "%2F" in paths[0] and "%3A" in paths[0]


def test_stream_decoder() -> None:
    for fmt in FORMATS:
        assert isinstance(fmt.stream_decoder(CONTENT_TYPE), EventStreamDecoder)
        assert fmt.stream_decoder("application/json") is None
        assert fmt.stream_decoder("text/event-stream") is None
    decoder = CONV.stream_decoder(CONTENT_TYPE)
    assert decoder is not None and decoder is not CONV.stream_decoder(CONTENT_TYPE)
    assert decoder.keepalive is None


# --------------------------------------------------------------------------- prompts

CONVERSE_REQUEST: dict[str, Any] = {
    "system": [{"text": "Be brief."}, {"guardContent": {"text": {"text": "Guarded rule."}}},
               {"cachePoint": {"type": "default"}}],
    "messages": [
        {"role": "user", "content": [
            {"text": "What is the weather?"},
            {"document": {"name": "notes", "format": "txt", "source": {"text": "Doc text."}}},
            {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}}]},
        {"role": "assistant", "content": [
            {"text": "Let me check."},
            {"toolUse": {"toolUseId": "t1", "name": "weather", "input": {"city": "Paris"}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [
            {"text": "Sunny."}, {"json": {"temp": "20C", "deep": [{"note": "warm"}]}}]}}]},
        {"role": "user", "content": [{"text": "And tomorrow?"},
                                     {"guardContent": {"text": {"text": "Check this."}}}]},
    ],
    "promptVariables": {"topic": {"text": "weather"}},
    "inferenceConfig": {"maxTokens": 100},
}


@pytest.mark.parametrize(("scope", "expected"), [
    (PromptScope.LAST_USER, ["And tomorrow?", "Check this.", "weather"]),
    (PromptScope.ALL, ["What is the weather?", "Doc text.", "Let me check.", "Sunny.", "20C",
                       "warm", "And tomorrow?", "Check this.", "weather"]),
    (PromptScope.ALL_WITH_SYSTEM, ["Be brief.", "Guarded rule.", "What is the weather?",
                                   "Doc text.", "Let me check.", "Sunny.", "20C", "warm",
                                   "And tomorrow?", "Check this.", "weather"]),
])
def test_converse_prompt_scopes_and_rewrite(scope: str, expected: list[str]) -> None:
    body = json.dumps(CONVERSE_REQUEST).encode()
    assert CONV.prompt_texts(body, scope) == expected
    rewritten = CONV.rewrite_prompt(body, scope, [t.upper() for t in expected])
    assert rewritten is not None
    assert CONV.prompt_texts(rewritten, scope) == [t.upper() for t in expected]
    untouched = json.loads(rewritten)
    assert untouched["messages"][2]["content"][0]["toolResult"]["toolUseId"] == "t1"
    assert untouched["inferenceConfig"] == {"maxTokens": 100}
    assert CONV.rewrite_prompt(body, scope, expected[:-1]) is None


def test_converse_last_user_skips_a_tool_turn() -> None:
    request = {"messages": [
        {"role": "user", "content": [{"text": "Question"}]},
        {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t", "name": "f",
                                                       "input": {}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "t",
                                                     "content": [{"text": "result"}]}}]}]}
    body = json.dumps(request).encode()
    assert CONV.prompt_texts(body, PromptScope.LAST_USER) == ["Question"]
    assert CONV.prompt_texts(body, PromptScope.ALL) == ["Question", "result"]


def test_converse_prompt_read_from_what_boto3_sends() -> None:
    bodies: list[bytes] = []
    client = boto3.client("bedrock-runtime", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")

    def send(request: Any, **_: object) -> Any:
        bodies.append(request.body)
        return AWSResponse(request.url, 200, JSON_HEADERS,
                           RawStream(b"{}"))

    client.meta.events.register("before-send.bedrock-runtime.Converse", send)
    client.converse(modelId="m", system=[{"text": "Sys"}], messages=[
        {"role": "user", "content": [{"text": "Hi there"}]}])
    assert CONV.prompt_texts(bodies[0], PromptScope.LAST_USER) == ["Hi there"]
    assert CONV.prompt_texts(bodies[0], PromptScope.ALL_WITH_SYSTEM) == ["Sys", "Hi there"]
    assert "Hi there" in " ".join(CONV.prompt_texts(bodies[0], PromptScope.WHOLE_REQUEST))


ANTHROPIC_REQUEST: dict[str, Any] = {
    "anthropic_version": "bedrock-2023-05-31", "max_tokens": 100,
    "system": "You are terse.",
    "messages": [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": [{"type": "text", "text": "First answer"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                      "content": "tool output"}]},
        {"role": "user", "content": [{"type": "text", "text": "Second question"}]},
    ],
}


@pytest.mark.parametrize(("scope", "expected"), [
    (PromptScope.LAST_USER, ["Second question"]),
    (PromptScope.ALL, ["First question", "First answer", "tool output", "Second question"]),
    (PromptScope.ALL_WITH_SYSTEM, ["You are terse.", "First question", "First answer",
                                   "tool output", "Second question"]),
])
def test_invoke_anthropic_prompt_scopes_and_rewrite(scope: str, expected: list[str]) -> None:
    body = json.dumps(ANTHROPIC_REQUEST).encode()
    assert INV.prompt_texts(body, scope) == expected
    rewritten = INV.rewrite_prompt(body, scope, ["X"] * len(expected))
    assert rewritten is not None
    assert INV.prompt_texts(rewritten, scope) == ["X"] * len(expected)
    assert json.loads(rewritten)["anthropic_version"] == "bedrock-2023-05-31"


@pytest.mark.parametrize(("request_body", "scope", "expected"), [
    ({"inputText": "Titan prompt", "textGenerationConfig": {"maxTokenCount": 50}},
     PromptScope.LAST_USER, ["Titan prompt"]),
    ({"prompt": "<s>[INST] Llama prompt [/INST]", "max_gen_len": 50},
     PromptScope.ALL, ["<s>[INST] Llama prompt [/INST]"]),
    ({"message": "Now", "chat_history": [{"role": "USER", "message": "Before"}],
      "preamble": "Cohere system"}, PromptScope.LAST_USER, ["Now"]),
    ({"message": "Now", "chat_history": [{"role": "USER", "message": "Before"}],
      "preamble": "Cohere system"}, PromptScope.ALL, ["Now", "Before"]),
    ({"message": "Now", "chat_history": [{"role": "USER", "message": "Before"}],
      "preamble": "Cohere system"}, PromptScope.ALL_WITH_SYSTEM,
     ["Cohere system", "Now", "Before"]),
    ({"schemaVersion": "messages-v1", "system": [{"text": "Nova system"}],
      "messages": [{"role": "user", "content": [{"text": "Nova prompt"}]}]},
     PromptScope.ALL_WITH_SYSTEM, ["Nova system", "Nova prompt"]),
    ({"messages": [{"role": "system", "content": "Mistral system"},
                   {"role": "user", "content": "Mistral prompt"}]},
     PromptScope.ALL, ["Mistral prompt"]),
    ({"messages": [{"role": "system", "content": "Mistral system"},
                   {"role": "user", "content": "Mistral prompt"}]},
     PromptScope.LAST_USER, ["Mistral prompt"]),
])
def test_invoke_other_models_prompts(request_body: dict[str, Any], scope: str,
                                     expected: list[str]) -> None:
    body = json.dumps(request_body).encode()
    assert INV.prompt_texts(body, scope) == expected
    rewritten = INV.rewrite_prompt(body, scope, [t + "!" for t in expected])
    assert rewritten is not None
    assert INV.prompt_texts(rewritten, scope) == [t + "!" for t in expected]


def test_whole_request_reads_every_text() -> None:
    titan = json.dumps({"inputText": "Titan prompt",
                        "textGenerationConfig": {"stopSequences": ["User:"]}}).encode()
    texts = INV.prompt_texts(titan, PromptScope.WHOLE_REQUEST)
    assert any("Titan prompt" in text for text in texts)
    converse = json.dumps(CONVERSE_REQUEST).encode()
    whole = "\n".join(CONV.prompt_texts(converse, PromptScope.WHOLE_REQUEST))
    for text in ("Be brief.", "Guarded rule.", "Doc text.", "Sunny.", "And tomorrow?"):
        assert text in whole
    rewritten = CONV.rewrite_prompt(converse, PromptScope.WHOLE_REQUEST,
                                    [t.replace("Sunny", "Rainy") for t in CONV.prompt_texts(
                                        converse, PromptScope.WHOLE_REQUEST)])
    assert rewritten is not None and b"Rainy." in rewritten and b"Sunny" not in rewritten


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"text"', b"{}",
                                 b'{"messages": "x"}', b'{"messages": [1, null, "x"]}'])
@pytest.mark.parametrize("scope", [PromptScope.LAST_USER, PromptScope.ALL,
                                   PromptScope.ALL_WITH_SYSTEM])
def test_prompt_of_garbage_is_empty(raw: bytes, scope: str) -> None:
    assert CONV.prompt_texts(raw, scope) == []
    assert INV.prompt_texts(raw, scope) == []


# --------------------------------------------------------------------------- whole answers

CONVERSE_ANSWER: dict[str, Any] = {
    "output": {"message": {"role": "assistant", "content": [
        {"reasoningContent": {"reasoningText": {"text": "Reasoning here.",
                                                "signature": "sig"}}},
        {"text": "The answer is 42."},
        {"toolUse": {"toolUseId": "t1", "name": "calc", "input": {"expr": "6*7"}}},
        {"citationsContent": {"content": [{"text": "Cited claim."}],
                              "citations": [{"title": "Doc", "sourceContent": [
                                  {"text": "source quote"}]}]}},
    ]}},
    "stopReason": "tool_use",
    "usage": {"inputTokens": 10, "outputTokens": 20, "totalTokens": 30},
    "metrics": {"latencyMs": 456},
}


def test_converse_response_texts() -> None:
    body = json.dumps(CONVERSE_ANSWER).encode()
    assert CONV.response_texts(body) == [
        (("reasoning", 0), "Reasoning here."), (("text", 1), "The answer is 42."),
        (("tool_name", 2), "calc"), (("tool", 2), '{"expr":"6*7"}'),
        (("citations", 3, 0), "Cited claim.")]


def test_converse_masked_answer_read_by_boto3() -> None:
    body = json.dumps(CONVERSE_ANSWER).encode()
    masked = CONV.rewrite_response(body, {("text", 1): "The answer is {NUMBER}.",
                                          ("tool", 2): '{"expr":"{EXPR}"}',
                                          ("reasoning", 0): "Reasoning {X}."})
    answer = served("Converse", masked).converse(modelId="m", messages=MESSAGES)  # type: ignore[arg-type]
    content = answer["output"]["message"]["content"]
    assert content[1]["text"] == "The answer is {NUMBER}."
    assert content[2]["toolUse"]["input"] == {"expr": "{EXPR}"}
    assert content[0]["reasoningContent"]["reasoningText"]["text"] == "Reasoning {X}."
    assert answer["stopReason"] == "tool_use" and answer["usage"]["totalTokens"] == 30
    with pytest.raises(ValueError):
        CONV.rewrite_response(body, {("tool", 2): "not json"})
    with pytest.raises(ValueError):
        CONV.rewrite_response(body, {("text", 9): "x"})
    with pytest.raises(ValueError):
        CONV.rewrite_response(b"nope", {("text", 1): "x"})


@pytest.mark.parametrize("original", [json.dumps(CONVERSE_ANSWER).encode(), None, b"garbage"])
def test_converse_soft_block_read_by_boto3(original: bytes | None) -> None:
    body = CONV.soft_block_response(original, "Blocked by policy.")
    answer = served("Converse", body).converse(modelId="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer["output"]["message"]["content"] == [
        {"text": "Blocked by policy."}]
    assert answer["stopReason"] == "guardrail_intervened"
    expected = 30 if original and original.startswith(b"{") else 0
    assert answer["usage"]["totalTokens"] == expected
    assert CONV.response_texts(body) == [(("text", 0), "Blocked by policy.")]


ANTHROPIC_ANSWER: dict[str, Any] = {
    "id": "msg_bdrk_01", "type": "message", "role": "assistant",
    "model": "claude-3-5-sonnet-20241022",
    "content": [{"type": "thinking", "thinking": "Hmm.", "signature": "s"},
                {"type": "text", "text": "Hello from Claude."},
                {"type": "tool_use", "id": "tu", "name": "f", "input": {"a": "b"}}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 5, "output_tokens": 7},
}


@pytest.mark.parametrize(("answer", "expected"), [
    (ANTHROPIC_ANSWER, [(("thinking", 0), "Hmm."), (("text", 1), "Hello from Claude."),
                        (("input", 2), '{"a":"b"}')]),
    ({"inputTextTokenCount": 3, "results": [{"tokenCount": 4, "outputText": "Titan says hi.",
                                             "completionReason": "FINISH"}]},
     [(("native", "results", 0, "outputText"), "Titan says hi.")]),
    ({"generation": "Llama says hi.", "prompt_token_count": 3, "stop_reason": "stop"},
     [(("native", "generation"), "Llama says hi.")]),
    ({"outputs": [{"text": "Mistral says hi.", "stop_reason": "stop"}]},
     [(("native", "outputs", 0, "text"), "Mistral says hi.")]),
    ({"type": "completion", "completion": " Claude 2 says hi.", "stop_reason": "stop_sequence"},
     [(("native", "completion"), " Claude 2 says hi.")]),
    ({"text": "Cohere says hi.", "generation_id": "g", "finish_reason": "COMPLETE"},
     [(("native", "text"), "Cohere says hi.")]),
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Jamba says hi."},
                   "finish_reason": "stop"}]},
     [(("native", "choices", 0, "message", "content"), "Jamba says hi.")]),
    ({"output": {"message": {"role": "assistant", "content": [{"text": "Nova says hi."}]}},
      "stopReason": "end_turn", "usage": {"inputTokens": 1}},
     [(("text", 0), "Nova says hi.")]),
    ({"answer": {"body": "Unknown model says hi.", "id": "x"}, "amazon-bedrock-trace": {
        "guardrail": {"text": "trace"}}},
     [(("unknown", "answer", "body"), "Unknown model says hi.")]),
    ({"embedding": [0.1, 0.2], "inputTextTokenCount": 3}, []),
])
def test_invoke_response_texts_and_masks(answer: dict[str, Any],
                                         expected: list[tuple[Hashable, str]]) -> None:
    body = json.dumps(answer).encode()
    assert INV.response_texts(body) == expected
    if not expected:
        return
    channel, text = next((ch, t) for ch, t in expected
                         if isinstance(ch, tuple) and ch[0] not in ("input", "tool"))
    masked = INV.rewrite_response(body, {channel: "{X}"})
    served_body = served("InvokeModel", masked).invoke_model(modelId="m", body=b"{}")["body"]
    read = json.loads(served_body.read())
    assert dict(INV.response_texts(json.dumps(read).encode()))[channel] != text
    assert "{X}" in json.dumps(read)


@pytest.mark.parametrize(("original", "shown"), [
    (json.dumps(ANTHROPIC_ANSWER).encode(), "anthropic"),
    (None, "anthropic"),
    (b"garbage", "anthropic"),
    (json.dumps({"generation": "Llama text.", "stop_reason": "stop"}).encode(), "generation"),
    (json.dumps({"results": [{"outputText": "a"}, {"outputText": "b"}]}).encode(), "results"),
    (json.dumps({"output": {"message": {"content": [{"text": "Nova"}]}},
                 "usage": {"inputTokens": 1}}).encode(), "nova"),
])
def test_invoke_soft_block_read_by_boto3(original: bytes | None, shown: str) -> None:
    body = INV.soft_block_response(original, "Blocked by policy.")
    raw = served("InvokeModel", body).invoke_model(modelId="m", body=b"{}")["body"].read()
    answer = json.loads(raw)
    assert answer["amazon-bedrock-guardrailAction"] == "INTERVENED"
    if shown == "anthropic":
        assert answer["content"] == [{"type": "text", "text": "Blocked by policy."}]
        assert answer["stop_reason"] == "guardrail_intervened"
        assert "stop_details" not in answer
        if original and original.startswith(b"{"):
            assert answer["id"] == "msg_bdrk_01" and answer["usage"]["output_tokens"] == 7
    elif shown == "generation":
        assert answer["generation"] == "Blocked by policy."
    elif shown == "results":
        assert [r["outputText"] for r in answer["results"]] == ["Blocked by policy.", ""]
    else:
        assert answer["output"]["message"]["content"] == [{"text": "Blocked by policy."}]
        assert answer["stopReason"] == "guardrail_intervened"
    assert [text for _, text in INV.response_texts(raw) if text] == ["Blocked by policy."]


def test_invoke_soft_block_read_by_anthropic_bedrock() -> None:
    body = INV.soft_block_response(json.dumps(ANTHROPIC_ANSWER).encode(), "Blocked.")
    client = bedrock_anthropic(body, content_type="application/json")
    message = client.messages.create(model="anthropic.claude-3-5-sonnet-20241022-v2:0",
                                     max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Blocked."  # type: ignore[union-attr]
    assert str(message.stop_reason) == "guardrail_intervened"


@pytest.mark.parametrize(("raw"), [b"", b"null", b"[]", b'"x"', b"{}", b'{"output": 1}',
                                   b'{"content": "x"}', b'{"output": {"message": {"content": 3}}}'])
def test_response_texts_of_garbage_is_empty(raw: bytes) -> None:
    assert CONV.response_texts(raw) == []
    # an answer of no shape InvokeModel knows is read by rule
    expected = [(("unknown", "content"), "x")] if raw == b'{"content": "x"}' else []
    assert INV.response_texts(raw) == expected


# --------------------------------------------------------------------------- error bodies

ERRORS = [
    (ErrorKind.VIOLATION, 400, "ValidationException", "Violated guardrail policy"),
    (ErrorKind.UNAVAILABLE, 503, "ServiceUnavailableException", "Guardrail unavailable"),
    (ErrorKind.TOO_LARGE, 413, "ValidationException", "Request too large for the guardrail"),
    (ErrorKind.UNREADABLE, 415, "ValidationException",
     "Request body could not be read by the guardrail"),
    (ErrorKind.INVALID, 400, "ValidationException",
     "Request body is not valid JSON the guardrail can read"),
    (ErrorKind.UNRECOGNISED, 403, "AccessDeniedException",
     "Request not recognised by the guardrail"),
]


@pytest.mark.parametrize(("kind", "status", "code", "message"), ERRORS)
@pytest.mark.parametrize("with_header", [False, True])
@pytest.mark.parametrize("operation", ["Converse", "ConverseStream", "InvokeModel",
                                       "InvokeModelWithResponseStream"])
def test_error_body_raises_client_error(kind: str, status: int, code: str, message: str,
                                        with_header: bool, operation: str) -> None:
    fmt = CONV if operation.startswith("Converse") else INV
    got_status, body = fmt.error_body(kind)
    assert got_status == status and error_type(kind) == code
    headers = {ERROR_TYPE_HEADER: f"{code}:http://internal.amazon.com/coral/com.amazon.bedrock/"
               } if with_header else {}
    client = served(operation, body, status, headers)
    call: dict[str, Callable[[], object]] = {
        "Converse": lambda: client.converse(modelId="m", messages=MESSAGES),  # type: ignore[arg-type]
        "ConverseStream": lambda: client.converse_stream(modelId="m", messages=MESSAGES),  # type: ignore[arg-type]
        "InvokeModel": lambda: client.invoke_model(modelId="m", body=b"{}"),
        "InvokeModelWithResponseStream":
            lambda: client.invoke_model_with_response_stream(modelId="m", body=b"{}"),
    }
    modelled = getattr(client.exceptions, code)
    with pytest.raises(modelled) as raised:
        call[operation]()
    assert isinstance(raised.value, botocore.exceptions.ClientError)
    error = raised.value.response["Error"]
    assert error["Code"] == code and error["Message"] == message
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert message in str(raised.value)


def test_error_body_raises_in_anthropic_bedrock() -> None:
    status, body = INV.error_body(ErrorKind.VIOLATION)
    client = bedrock_anthropic(body, status, "application/json")
    with pytest.raises(anthropic.BadRequestError, match="Violated guardrail policy"):
        client.messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "x"}])


def test_unknown_error_kind_is_rejected() -> None:
    with pytest.raises(KeyError):
        CONV.error_body("nope")
    with pytest.raises(KeyError):
        CONV.stream_codec().terminal_frame("nope")


# --------------------------------------------------------------------------- ConverseStream


def test_converse_recording_is_read_by_boto3() -> None:
    events, raised = read_converse_stream(CONVERSE_RECORDING)
    assert raised is None and len(events) == len(CONVERSE_FRAMES)
    assert text_of(events) == {1: "Hello there, friend."}
    assert events[-2] == {"messageStop": {"stopReason": "tool_use"}}


@pytest.mark.parametrize("size", [None, 1, 5, 13, 64, 1000])
def test_converse_clean_frames_pass_byte_for_byte(size: int | None) -> None:
    events = decode(CONVERSE_RECORDING, size)
    assert [event.raw for event in events] == CONVERSE_FRAMES
    codec = CONV.stream_codec()
    assert release(codec, events) == CONVERSE_RECORDING
    codec = CONV.stream_codec()
    assert joined([found for e in events for found in codec.extract(e)]) == CONVERSE_TEXTS


def test_every_split_offset_passes_byte_for_byte() -> None:
    for recording, fmt in ((CONVERSE_RECORDING, CONV), (INVOKE_RECORDING, INV)):
        for offset in range(len(recording) + 1):
            decoder = EventStreamDecoder()
            events = decoder.feed(recording[:offset])
            events += decoder.feed(recording[offset:], end_of_stream=True)
            assert decoder.flush() == b""
            assert release(fmt.stream_codec(), events) == recording, offset


def test_converse_extract_channels_and_text_ended() -> None:
    codec = CONV.stream_codec()
    events = decode(CONVERSE_RECORDING)
    per_event = [codec.extract(event) for event in events[:-2]]
    assert per_event[1] == [(("reasoning", 0), "Think ")]
    assert per_event[3] == []  # a signature is not text
    assert per_event[5] == [(("text", 1), "Hello")]
    assert per_event[9] == [(("tool_name", 2), "get_weather")]
    assert per_event[10] == [(("tool", 2), '{"city": ')]
    assert codec.text_ended is False
    assert codec.extract(events[-2]) == [] and codec.text_ended is True
    assert codec.extract(events[-1]) == [] and codec.text_ended is True
    late = decode(frame("contentBlockDelta", {"contentBlockIndex": 3, "delta": {"text": "x"}}))
    assert codec.extract(late[0]) == [(("text", 3), "x")] and codec.text_ended is False


@pytest.mark.parametrize("released", range(len(CONVERSE_FRAMES) - 1))
@pytest.mark.parametrize(("kind", "code", "message"), [
    (ErrorKind.VIOLATION, "validationException", "Violated guardrail policy"),
    (ErrorKind.UNAVAILABLE, "serviceUnavailableException", "Guardrail unavailable"),
])
def test_converse_stream_terminal_frame_in_boto3(released: int, kind: str, code: str,
                                                  message: str) -> None:
    codec = CONV.stream_codec()
    events = decode(CONVERSE_RECORDING, 11)
    terminal = codec.terminal_frame(kind)
    assert terminal == exception_frame(code, message)
    (only,) = decode(terminal)
    assert only.message_type == "exception" and only.event in CONVERSE_STREAM_EXCEPTIONS
    body = release(codec, events, released) + terminal
    seen, raised = read_converse_stream(body)
    assert seen == read_converse_stream(CONVERSE_RECORDING)[0][:released]
    assert isinstance(raised, botocore.exceptions.EventStreamError)
    assert raised.response["Error"] == {"Code": code, "Message": message}
    assert message in str(raised)


@pytest.mark.parametrize("released", range(len(CONVERSE_FRAMES) + 1))
def test_converse_stream_soft_block_in_boto3(released: int) -> None:
    codec = CONV.stream_codec()
    events = decode(CONVERSE_RECORDING)
    body = release(codec, events, released) + codec.soft_block_frame("Blocked by policy.")
    seen, raised = read_converse_stream(body)
    assert raised is None
    assert seen[:released] == read_converse_stream(CONVERSE_RECORDING)[0][:released]
    tail = seen[released:]
    assert tail[-1] == {"messageStop": {"stopReason": "guardrail_intervened"}}
    assert "messageStart" in seen[0]
    # every block the client saw is closed, the message is a block of its own after them
    started: set[int] = set()
    closed: set[int] = set()
    for event in seen[:-1]:
        for name in ("contentBlockStart", "contentBlockDelta"):
            if name in event:
                started.add(event[name]["contentBlockIndex"])
        if "contentBlockStop" in event:
            closed.add(event["contentBlockStop"]["contentBlockIndex"])
    assert started == closed
    last_index = max(started)
    assert text_of(seen)[last_index] == "Blocked by policy."
    assert sum(1 for e in seen if "contentBlockDelta" in e
               and e["contentBlockDelta"]["contentBlockIndex"] == last_index) == 1
    assert last_index == max(started - {last_index}, default=-1) + 1
    # and the codec reads its own soft block as text on that block
    assert joined(release_found(CONV.stream_codec(), body))[("text", last_index)] \
        == "Blocked by policy."


def release_found(codec: StreamCodec, body: bytes) -> list[tuple[Hashable, str]]:
    return [found for event in decode(body) for found in codec.extract(event)]


def test_converse_soft_block_of_a_fresh_codec() -> None:
    body = CONV.stream_codec().soft_block_frame("No.")
    seen, raised = read_converse_stream(body)
    assert raised is None
    assert seen == [{"messageStart": {"role": "assistant"}},
                    {"contentBlockDelta": {"contentBlockIndex": 0, "delta": {"text": "No."}}},
                    {"contentBlockStop": {"contentBlockIndex": 0}},
                    {"messageStop": {"stopReason": "guardrail_intervened"}}]


def mask_text(channel: Hashable, text: str) -> str:
    return text.replace("friend", "{NAME}").replace("Paris", "{CITY}").replace("Think", "{T}")


def test_masked_converse_frames_read_by_boto3() -> None:
    events = decode(CONVERSE_RECORDING, 17)
    body = release(CONV.stream_codec(), events, mask=mask_text)
    seen, raised = read_converse_stream(body)
    assert raised is None
    assert text_of(seen) == {1: "Hello there, {NAME}."}
    tool = "".join(e["contentBlockDelta"]["delta"]["toolUse"]["input"] for e in seen
                   if "contentBlockDelta" in e and "toolUse" in e["contentBlockDelta"]["delta"])
    assert json.loads(tool) == {"city": "{CITY}"}
    reasoning = "".join(e["contentBlockDelta"]["delta"]["reasoningContent"].get("text", "")
                        for e in seen if "contentBlockDelta" in e
                        and "reasoningContent" in e["contentBlockDelta"]["delta"])
    assert reasoning == "{T} first."
    out = decode(body)
    changed = [i for i, (a, b) in enumerate(zip(events, out)) if a.raw != b.raw]
    assert changed == [1, 7, 11]
    for i in changed:  # same headers, same padding, only the text differs
        assert out[i].headers == events[i].headers
        assert json.loads(out[i].data or "")["p"] == "abcdefgh"


def test_masked_frames_keep_their_other_headers() -> None:
    payload = b'{"contentBlockIndex":0,"delta":{"text":"secret"}}'
    headers: list[tuple[str, str | bytes | bool | int]] = [
        (":message-type", "event"), ("x-trace", 7), (":event-type", "contentBlockDelta"),
        ("x-flag", True), (":content-type", "application/json"), ("x-blob", b"\x00\x01")]
    raw = encode_frame(headers, payload)
    codec = CONV.stream_codec()
    (event,) = decode(raw)
    assert codec.extract(event) == [(("text", 0), "secret")]
    out = codec.rewrite(event, {("text", 0): "{S}"})
    (masked,) = decode(out)
    assert masked.headers == tuple(headers)
    assert out[12:12 + len(raw) - 16 - len(payload)] == raw[12:12 + len(raw) - 16 - len(payload)]
    seen, raised = read_converse_stream(out)
    assert raised is None and seen == [{"contentBlockDelta": {"contentBlockIndex": 0,
                                                              "delta": {"text": "{S}"}}}]


def test_converse_rewrite_without_extract_reads_the_frame() -> None:
    """A caller that checks no text rewrites frames extract never saw: same bytes, same view
    of the stream (the soft block closes the same blocks)."""
    events = decode(CONVERSE_RECORDING)
    for released in (0, 6, 11, len(events)):
        noted = CONV.stream_codec()
        unnoted = CONV.stream_codec()
        out_noted = release(noted, events, released)
        out_unnoted = b"".join(unnoted.rewrite(e, {}) for e in events[:released])
        assert out_noted == out_unnoted == b"".join(CONVERSE_FRAMES[:released])
        assert noted.soft_block_frame("m") == unnoted.soft_block_frame("m")
    codec = CONV.stream_codec()
    out = codec.rewrite(events[5], {("text", 1): "Howdy"})
    assert json.loads(decode(out)[0].data or "")["delta"]["text"] == "Howdy"


def test_unknown_events_and_members_are_read_apart_and_exceptions_pass() -> None:
    stream = [
        event_frame("somethingNew", b'{"note":"hidden text","id":"x","p":"pad"}'),
        frame("contentBlockDelta", {"contentBlockIndex": 0,
                                    "delta": {"futureText": {"value": "new member text"}}}),
        frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"citation": {
            "title": "Doc", "sourceContent": [{"text": "quoted source"}]}}}),
        frame("contentBlockStart", {"contentBlockIndex": 1, "start": {
            "toolResult": {"toolUseId": "t", "status": "success"}}}),
        event_frame("plainText", b"not json at all"),
        encode_frame([(":message-type", "error"), (":error-code", "InternalFailure"),
                      (":error-message", "boom")], b""),
        exception_frame("throttlingException", "slow down"),
    ]
    events = decode(b"".join(stream))
    codec = CONV.stream_codec()
    found = [codec.extract(event) for event in events]
    assert found == [
        [(("unknown", "somethingNew", "note"), "hidden text")],
        [(("unknown", "contentBlockDelta", 0, "futureText", "value"), "new member text")],
        [], [],
        [(("unknown", "plainText"), "not json at all")],
        [], []]
    out = [codec.rewrite(event, dict((ch, "{M}") for ch, _ in texts))
           for event, texts in zip(events, found)]
    assert out[2:4] == stream[2:4] and out[5:] == stream[5:]
    assert json.loads(decode(out[0])[0].data or "") == {"note": "{M}", "id": "x", "p": "pad"}
    assert json.loads(decode(out[1])[0].data or "")["delta"]["futureText"]["value"] == "{M}"
    assert decode(out[4])[0].data == "{M}"


# --------------------------------------------------------------------------- InvokeModelWithResponseStream


def test_invoke_recording_is_read_by_boto3_and_anthropic_bedrock() -> None:
    seen, raised = read_invoke_stream(INVOKE_RECORDING)
    assert raised is None and seen == ANTHROPIC_EVENTS
    client = bedrock_anthropic(INVOKE_RECORDING)
    with client.messages.stream(model="m", max_tokens=10,
                                messages=[{"role": "user", "content": "x"}]) as stream:
        assert stream.get_final_text() == "Hello there, friend."


@pytest.mark.parametrize("size", [None, 1, 7, 100])
def test_invoke_clean_frames_pass_byte_for_byte_and_text_ended(size: int | None) -> None:
    events = decode(INVOKE_RECORDING, size)
    codec = INV.stream_codec()
    assert release(codec, events) == INVOKE_RECORDING
    codec = INV.stream_codec()
    ended = []
    found: list[tuple[Hashable, str]] = []
    for event in events:
        found += codec.extract(event)
        ended.append(codec.text_ended)
    assert joined(found) == {("text",): "Hello there, friend."}
    assert ended == [False] * 6 + [True, True]


@pytest.mark.parametrize("released", range(len(INVOKE_FRAMES)))
@pytest.mark.parametrize(("kind", "code", "message"), [
    (ErrorKind.VIOLATION, "validationException", "Violated guardrail policy"),
    (ErrorKind.UNAVAILABLE, "serviceUnavailableException", "Guardrail unavailable"),
])
def test_invoke_stream_terminal_frame_in_boto3(released: int, kind: str, code: str,
                                               message: str) -> None:
    codec = INV.stream_codec()
    events = decode(INVOKE_RECORDING, 9)
    terminal = codec.terminal_frame(kind)
    assert terminal == exception_frame(code, message)
    assert decode(terminal)[0].event in INVOKE_STREAM_EXCEPTIONS
    body = release(codec, events, released) + terminal
    seen, raised = read_invoke_stream(body)
    assert seen == ANTHROPIC_EVENTS[:released]
    assert isinstance(raised, botocore.exceptions.EventStreamError)
    assert raised.response["Error"] == {"Code": code, "Message": message}


def test_invoke_stream_terminal_frame_in_anthropic_bedrock() -> None:
    codec = INV.stream_codec()
    body = release(codec, decode(INVOKE_RECORDING), 3) + codec.terminal_frame(
        ErrorKind.VIOLATION)
    client = bedrock_anthropic(body)
    texts: list[str] = []
    with pytest.raises(anthropic.APIStatusError, match="Violated guardrail policy"):
        with client.messages.stream(model="m", max_tokens=10,
                                    messages=[{"role": "user", "content": "x"}]) as stream:
            texts.extend(stream.text_stream)
    assert texts == ["Hello"]


@pytest.mark.parametrize("released", range(len(INVOKE_FRAMES) + 1))
def test_invoke_stream_soft_block_in_boto3(released: int) -> None:
    codec = INV.stream_codec()
    body = release(codec, decode(INVOKE_RECORDING), released) + codec.soft_block_frame(
        "Blocked by policy.")
    seen, raised = read_invoke_stream(body)
    assert raised is None
    assert seen[:released] == ANTHROPIC_EVENTS[:released]
    tail = seen[released:]
    assert tail[-1] == {"type": "message_stop"}
    assert tail[-2]["type"] == "message_delta"
    assert tail[-2]["delta"]["stop_reason"] == "guardrail_intervened"
    assert "stop_details" not in tail[-2]["delta"]
    assert seen[0]["type"] == "message_start"
    client = bedrock_anthropic(body)
    with client.messages.stream(model="m", max_tokens=10,
                                messages=[{"role": "user", "content": "x"}]) as stream:
        message = stream.get_final_message()
    assert str(message.stop_reason) == "guardrail_intervened"
    assert message.content[-1].text == "Blocked by policy."  # type: ignore[union-attr]
    if 3 <= released:
        assert message.content[0].text.startswith("Hello")  # type: ignore[union-attr]


def test_masked_invoke_chunks_read_by_boto3_and_anthropic_bedrock() -> None:
    events = decode(INVOKE_RECORDING, 23)
    body = release(INV.stream_codec(), events, mask=mask_text)
    seen, raised = read_invoke_stream(body)
    assert raised is None
    assert [e["delta"]["text"] for e in seen if e["type"] == "content_block_delta"] == [
        "Hello", " there, ", "{NAME}."]
    out = decode(body)
    changed = [i for i, (a, b) in enumerate(zip(events, out)) if a.raw != b.raw]
    assert changed == [4]
    assert json.loads(out[4].data or "")["p"] == "abcdefghijkl"
    assert out[4].headers == events[4].headers
    client = bedrock_anthropic(body)
    with client.messages.stream(model="m", max_tokens=10,
                                messages=[{"role": "user", "content": "x"}]) as stream:
        assert stream.get_final_text() == "Hello there, {NAME}."


def test_invoke_rewrite_without_extract_reads_the_frame() -> None:
    events = decode(INVOKE_RECORDING)
    for released in (0, 3, len(events)):
        noted = INV.stream_codec()
        unnoted = INV.stream_codec()
        assert release(noted, events, released) == b"".join(
            unnoted.rewrite(e, {}) for e in events[:released]) == b"".join(
            INVOKE_FRAMES[:released])
        body = b"".join(INVOKE_FRAMES[:released]) + unnoted.soft_block_frame("m")
        seen, raised = read_invoke_stream(body)
        assert raised is None and seen[-2]["delta"]["stop_reason"] == "guardrail_intervened"
        assert [e["type"] for e in seen].count("message_start") == 1
    codec = INV.stream_codec()
    out = codec.rewrite(events[2], {("text",): "Howdy"})
    assert read_invoke_stream(out)[0][0]["delta"]["text"] == "Howdy"


NOVA_EVENTS: list[dict[str, Any]] = [
    {"messageStart": {"role": "assistant"}},
    {"contentBlockDelta": {"delta": {"text": "Nova "}, "contentBlockIndex": 0}},
    {"contentBlockDelta": {"delta": {"text": "speaks."}, "contentBlockIndex": 0}},
    {"contentBlockStop": {"contentBlockIndex": 0}},
    {"messageStop": {"stopReason": "end_turn"}},
    {"metadata": {"usage": {"inputTokens": 3, "outputTokens": 2}},
     "amazon-bedrock-invocationMetrics": {"inputTokenCount": 3, "outputTokenCount": 2}},
]
TITAN_EVENTS: list[dict[str, Any]] = [
    {"outputText": "Titan ", "index": 0, "totalOutputTextTokenCount": 1,
     "completionReason": None, "inputTextTokenCount": 4},
    {"outputText": "speaks.", "index": 0, "totalOutputTextTokenCount": 2,
     "completionReason": "FINISH", "inputTextTokenCount": None,
     "amazon-bedrock-invocationMetrics": {"inputTokenCount": 4, "outputTokenCount": 2}},
]
MISTRAL_EVENTS: list[dict[str, Any]] = [
    {"outputs": [{"text": "Mistral ", "stop_reason": None}]},
    {"outputs": [{"text": "speaks.", "stop_reason": "stop"}],
     "amazon-bedrock-invocationMetrics": {"inputTokenCount": 4, "outputTokenCount": 2}},
]


@pytest.mark.parametrize(("models", "channel", "text", "ended"), [
    (NOVA_EVENTS, ("text", 0), "Nova speaks.", [False, False, False, False, True, True]),
    (TITAN_EVENTS, ("native", "outputText"), "Titan speaks.", [False, True]),
    (MISTRAL_EVENTS, ("native", "outputs", 0, "text"), "Mistral speaks.", [False, True]),
])
def test_other_models_streams(models: list[dict[str, Any]], channel: Hashable, text: str,
                              ended: list[bool]) -> None:
    recording = b"".join(chunk(model) for model in models)
    events = decode(recording, 10)
    codec = INV.stream_codec()
    found: list[tuple[Hashable, str]] = []
    states = []
    for event in events:
        found += codec.extract(event)
        states.append(codec.text_ended)
    assert joined(found) == {channel: text} and states == ended
    assert release(INV.stream_codec(), events) == recording
    # masked
    body = release(INV.stream_codec(), events, mask=lambda ch, t: t.replace("speaks", "{V}"))
    seen, raised = read_invoke_stream(body)
    assert raised is None
    assert "{V}" in json.dumps(seen) and "speaks" not in json.dumps(seen)
    # soft block after the first two chunks, in the stream's own shape
    codec = INV.stream_codec()
    body = release(codec, events, 2) + codec.soft_block_frame("Blocked.")
    seen, raised = read_invoke_stream(body)
    assert raised is None and seen[:2] == models[:2]
    soft_channel = ("text", 1) if models is NOVA_EVENTS else channel
    assert joined(release_found(INV.stream_codec(), body))[soft_channel].endswith("Blocked.")
    if models is NOVA_EVENTS:
        assert seen[2:] == [
            {"contentBlockStop": {"contentBlockIndex": 0}},
            {"contentBlockDelta": {"contentBlockIndex": 1, "delta": {"text": "Blocked."}}},
            {"contentBlockStop": {"contentBlockIndex": 1}},
            {"messageStop": {"stopReason": "guardrail_intervened"}}]
    else:
        assert seen[2]["amazon-bedrock-guardrailAction"] == "INTERVENED"
        assert len(seen) == 3


def test_unknown_chunks_are_read_by_rule() -> None:
    models = [{"weird": {"words": "odd text", "id": "skip"}, "amazon-bedrock-x": {"y": "z"}}]
    stream = [chunk(models[0]), event_frame("chunk", json.dumps(
        {"bytes": base64.b64encode(b"plain words").decode()}).encode()),
        event_frame("chunk", b'{"bytes": "abc"}'),  # botocore cannot decode it
        exception_frame("modelStreamErrorException", "upstream broke")]
    events = decode(b"".join(stream))
    codec = INV.stream_codec()
    found = [codec.extract(event) for event in events]
    assert found == [[(("unknown", "chunk", "weird", "words"), "odd text")],
                     [(("unknown", "chunk"), "plain words")],
                     [(("unknown", "chunk", "bytes"), "abc")],  # undecodable: read as it is
                     []]
    out = [codec.rewrite(event, dict((ch, "{M}") for ch, _ in texts))
           for event, texts in zip(events, found)]
    assert out[3:] == stream[3:]
    assert json.loads(decode(out[2])[0].data or "") == {"bytes": "{M}"}
    seen, raised = read_invoke_stream(out[0])
    assert raised is None and seen == [{"weird": {"words": "{M}", "id": "skip"},
                                        "amazon-bedrock-x": {"y": "z"}}]
    assert base64.b64decode(json.loads(decode(out[1])[0].data or "")["bytes"]) == b"{M}"


def test_a_plain_sse_event_is_read_too() -> None:
    """The codecs take any ``SSEEvent`` (as the guard's tests build them)."""
    codec = CONV.stream_codec()
    event = SSEEvent(b"", event="contentBlockDelta",
                     data='{"contentBlockIndex":0,"delta":{"text":"hi"}}')
    assert codec.extract(event) == [(("text", 0), "hi")]
    out = codec.rewrite(event, {("text", 0): "yo"})
    seen, raised = read_converse_stream(out)
    assert raised is None and seen == [{"contentBlockDelta": {"contentBlockIndex": 0,
                                                              "delta": {"text": "yo"}}}]


def test_each_chunk_is_parsed_once_and_an_unchanged_release_parses_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from extproc.formats import _common

    parsed: list[str | bytes | None] = []
    load_object = _common.load_object

    def counting(data: bytes | str | None) -> dict[str, Any] | None:
        parsed.append(data)
        return load_object(data)

    monkeypatch.setattr(_common, "load_object", counting)
    for recording, fmt, per_frame in ((INVOKE_RECORDING, INV, 2), (CONVERSE_RECORDING, CONV, 1)):
        events = decode(recording)
        codec = fmt.stream_codec()
        parsed.clear()
        for event in events:
            codec.extract(event)
        assert len(parsed) == per_frame * len(events)  # (a chunk: its payload, its model JSON)
        parsed.clear()
        assert b"".join(codec.rewrite(event, {}) for event in events) == recording
        assert parsed == []


def test_anthropic_chunks_are_recognised_however_their_json_is_spaced() -> None:
    spaced = [event_frame("chunk", json.dumps({"bytes": base64.b64encode(
        json.dumps(event, indent=1).encode()).decode()}).encode()) for event in ANTHROPIC_EVENTS]
    codec = INV.stream_codec()
    events = decode(b"".join(spaced))
    found = [pair for event in events for pair in codec.extract(event)]
    assert joined(found) == {("text",): "Hello there, friend."} and codec.text_ended
    body = release(INV.stream_codec(), events, mask=mask_text)
    assert "{NAME}." in json.dumps(read_invoke_stream(body)[0])


def test_a_lone_surrogate_in_a_mask_is_sent_as_a_replacement_character() -> None:
    for fmt, raw in ((CONV, CONVERSE_FRAMES[5]), (INV, INVOKE_FRAMES[2])):
        codec = fmt.stream_codec()
        (event,) = decode(raw)
        ((channel, _),) = codec.extract(event)
        out = codec.rewrite(event, {channel: "a\ud83db"})
        seen, raised = (read_converse_stream if fmt is CONV else read_invoke_stream)(out)
        assert raised is None and "a\ufffdb" in json.dumps(seen, ensure_ascii=False)


# ------------------------------------------------------------- native models read by rule


@pytest.mark.parametrize(("answer", "expected"), [
    # gpt-oss on Bedrock: OpenAI-style tool calls beside the content
    ({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Calling.",
                                           "tool_calls": [{"id": "c1", "type": "function",
                                                           "function": {"name": "lookup",
                                                                        "arguments": '{"q": "secret"}'}}]},
                   "finish_reason": "tool_calls"}]},
     {("native", "choices", 0, "message", "content"): "Calling.",
      ("unknown", "choices", 0, "message", "tool_calls", 0, "function", "name"): "lookup",
      ("unknown", "choices", 0, "message", "tool_calls", 0, "function", "arguments"):
          '{"q": "secret"}'}),
    # Cohere Command R: tool calls beside the text
    ({"text": "", "tool_calls": [{"name": "lookup", "parameters": {"q": "secret"}}],
      "finish_reason": "COMPLETE"},
     {("unknown", "tool_calls", 0, "name"): "lookup",
      ("unknown", "tool_calls", 0, "parameters", "q"): "secret"}),
    # a ``text`` that is not a string
    ({"text": [{"value": "secret list"}], "finish_reason": "COMPLETE"},
     {("unknown", "text", 0, "value"): "secret list"}),
])
def test_bedrock_native_answers_read_every_string_by_rule(
        answer: dict[str, Any], expected: dict[Hashable, str]) -> None:
    """Regression (issue 15 review): only the listed paths of a native model's answer were
    read; its tool calls and a non-string ``text`` passed unread."""
    body = json.dumps(answer).encode()
    assert dict(INV.response_texts(body)) == expected
    masked = INV.rewrite_response(body, {ch: t.replace("secret", "{X}")
                                         for ch, t in expected.items()})
    assert b"secret" not in masked and b"{X}" in masked


def test_bedrock_native_stream_tool_calls_are_read() -> None:
    """Regression (issue 15 review): gpt-oss's streamed ``delta.tool_calls`` passed unread."""
    models = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Calling."}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1",
                                                            "function": {"name": "lookup",
                                                                         "arguments": '{"q": "se'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {
            "arguments": 'cret"}'}}]}, "finish_reason": "tool_calls"}],
         "amazon-bedrock-invocationMetrics": {"inputTokenCount": 4, "outputTokenCount": 2}},
    ]
    recording = b"".join(chunk(model) for model in models)
    events = decode(recording, 10)
    codec = INV.stream_codec()
    found = [pair for event in events for pair in codec.extract(event)]
    args = ("unknown", "chunk", "choices", 0, "delta", "tool_calls", 0, "function", "arguments")
    assert joined(found)[args] == '{"q": "secret"}'
    assert joined(found)[("native", "choices", 0, "delta", "content")] == "Calling."
    assert codec.text_ended
    assert release(INV.stream_codec(), events) == recording
    body = release(INV.stream_codec(), events, mask=lambda ch, t: t.replace("se", "XX"))
    seen, raised = read_invoke_stream(body)
    assert raised is None and "secret" not in json.dumps(seen)


def test_bedrock_nova_chunk_with_two_events_reads_both() -> None:
    """Regression (issue 15 review): a Nova chunk holding two Converse events was read by its
    first only."""
    model = {"contentBlockDelta": {"contentBlockIndex": 0, "delta": {"text": "one "}},
             "messageStop": {"stopReason": "end_turn"},
             "extra": {"words": "secret words"}}
    (event,) = decode(chunk(model))
    codec = INV.stream_codec()
    found = dict(codec.extract(event))
    assert found[("text", 0)] == "one "
    assert found[("unknown", "chunk", "extra", "words")] == "secret words"
    assert codec.text_ended
    rewritten = codec.rewrite(event, {k: v.replace("secret", "{X}") for k, v in found.items()})
    seen, raised = read_invoke_stream(rewritten)
    assert raised is None and "secret words" not in json.dumps(seen)
