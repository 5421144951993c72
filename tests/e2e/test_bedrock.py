"""AWS Bedrock Runtime through real Envoy and the sidecar process, read by boto3's real
``bedrock-runtime`` client pointed at Envoy (issue 15): ConverseStream and
InvokeModelWithResponseStream answers are binary AWS event streams guarded frame by frame;
Converse and InvokeModel answers are taken whole; requests boto3 signed (SigV4) are never
rewritten."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.config
import httpx
import pytest
from botocore.exceptions import ClientError, EventStreamError

from extproc.eventstream import EventStreamDecoder, event_frame
from testkit.upstream import Script
from tests.e2e.conftest import SMALL_WINDOWS, Stack, StackFactory, with_routes
from tests.e2e.test_apis import BLOCKED_PHRASE, EMAIL, VIOLATION, assert_never_contacted

MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
EVENTS = (("content-type", "application/vnd.amazon.eventstream"),)
JSON = (("content-type", "application/json"),)
MESSAGES = [{"role": "user", "content": [{"text": "Tell me."}]}]


def frame(name: str, payload: dict[str, Any]) -> bytes:
    return event_frame(name, json.dumps(payload, separators=(",", ":")).encode())


def converse_frames(*texts: str) -> list[bytes]:
    frames = [frame("messageStart", {"role": "assistant"})]
    frames += [frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}})
               for text in texts]
    frames += [frame("contentBlockStop", {"contentBlockIndex": 0}),
               frame("messageStop", {"stopReason": "end_turn"}),
               frame("metadata", {"usage": {"inputTokens": 5, "outputTokens": 9,
                                            "totalTokens": 14}, "metrics": {"latencyMs": 42}})]
    return frames


def chunk(event: dict[str, Any]) -> bytes:
    blob = base64.b64encode(json.dumps(event, separators=(",", ":")).encode()).decode()
    return frame("chunk", {"bytes": blob})


def invoke_frames(*texts: str) -> list[bytes]:
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {
            "id": "msg_bdrk_01", "type": "message", "role": "assistant", "model": "claude",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text",
                                                                      "text": ""}}]
    events += [{"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": text}} for text in texts]
    events += [{"type": "content_block_stop", "index": 0},
               {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 9}},
               {"type": "message_stop"}]
    return [chunk(event) for event in events]


def converse_answer(text: str) -> dict[str, Any]:
    return {"output": {"message": {"role": "assistant", "content": [{"text": text}]}},
            "stopReason": "end_turn", "usage": {"inputTokens": 5, "outputTokens": 9,
                                                "totalTokens": 14},
            "metrics": {"latencyMs": 42}}


def script(frames: list[bytes], delays_ms: float = 5) -> Script:
    return Script(chunks=tuple(frames), delays_ms=delays_ms, headers=EVENTS)


def json_answer(answer: dict[str, Any]) -> Script:
    return Script(chunks=(json.dumps(answer).encode(),), headers=JSON)


Factory = Callable[..., Any]


@pytest.fixture
def client() -> Iterator[Factory]:
    """boto3 ``bedrock-runtime`` clients for Envoy (``stack``, script id, URL prefix): fake
    credentials, no retries; the script header is added before boto3 signs."""
    made: list[Any] = []

    def make(stack: Stack, script_id: str, prefix: str = "") -> Any:
        bedrock = boto3.client(
            "bedrock-runtime", region_name="us-east-1", endpoint_url=stack.url + prefix,
            aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
            config=botocore.config.Config(retries={"max_attempts": 1}, read_timeout=30))

        def add_script(request: Any, **_: Any) -> None:
            request.headers["x-fake-script"] = script_id

        bedrock.meta.events.register("before-sign.bedrock-runtime.*", add_script)
        made.append(bedrock)
        return bedrock

    yield make
    for one in made:
        one.close()


def converse_text(events: Any) -> str:
    return "".join(e["contentBlockDelta"]["delta"].get("text", "")
                   for e in events if "contentBlockDelta" in e)


def test_a_clean_converse_stream_is_read_whole(stack: Stack, client: Factory) -> None:
    frames = converse_frames("Café ", "au lait ", "costs €3.")
    script_id = stack.llm.register(script(frames))
    answer = client(stack, script_id).converse_stream(modelId=MODEL, messages=MESSAGES)
    events = list(answer["stream"])
    assert converse_text(events) == "Café au lait costs €3."
    assert events[-2]["messageStop"]["stopReason"] == "end_turn"
    assert "metadata" in events[-1]


@pytest.mark.parametrize("version", ["http1", "http2"])
def test_a_clean_stream_is_byte_identical(stack: Stack, version: str) -> None:
    for frames, path in ((converse_frames("Café ", "au lait."), "converse-stream"),
                         (invoke_frames("Café ", "au lait."), "invoke-with-response-stream")):
        script_id = stack.llm.register(script(frames))
        extra: dict[str, Any] = {"http1": False, "http2": True} if version == "http2" else {}
        with httpx.Client(timeout=30, **extra) as http, http.stream(
                "POST", f"{stack.url}/model/{MODEL}/{path}",
                json={"messages": MESSAGES, "anthropic_version": "bedrock-2023-05-31"},
                headers={"x-fake-script": script_id}) as answer:
            body = b"".join(answer.iter_raw())
        assert answer.status_code == 200 and body == b"".join(frames)


def test_a_blocked_converse_stream_raises_after_the_released_text(stack: Stack,
                                                                  client: Factory) -> None:
    texts = ["The plan ", "is simple. ", "It is called ", "Project ", "Nightingale ",
             "and it ships."] + [f"filler {i} " for i in range(150)]
    script_id = stack.llm.register(script(converse_frames(*texts), delays_ms=40))
    answer = client(stack, script_id).converse_stream(modelId=MODEL, messages=MESSAGES)
    events: list[Any] = []
    with pytest.raises(EventStreamError) as raised:
        for event in answer["stream"]:
            events.append(event)
    answer["stream"].close()  # (botocore leaves the connection open after the error)
    assert VIOLATION in str(raised.value)
    assert raised.value.response["Error"]["Code"] == "validationException"
    shown = converse_text(events)
    assert "The plan is simple. It is called Project Nightingale".startswith(shown)
    assert "Nightingale" not in shown
    record = stack.llm.record_for_script(script_id, timeout=10)
    assert record.peer_closed  # the model was stopped
    assert record.closed_after_chunks is not None and record.closed_after_chunks < 100


@pytest.mark.parametrize("version", ["http1", "http2"])
def test_a_blocked_stream_ends_with_one_exception_frame(stack: Stack, version: str) -> None:
    frames = invoke_frames("Call it ", BLOCKED_PHRASE, ".")
    script_id = stack.llm.register(script(frames))
    extra: dict[str, Any] = {"http1": False, "http2": True} if version == "http2" else {}
    with httpx.Client(timeout=30, **extra) as http, http.stream(
            "POST", f"{stack.url}/model/{MODEL}/invoke-with-response-stream",
            json={"anthropic_version": "bedrock-2023-05-31", "max_tokens": 99,
                  "messages": [{"role": "user", "content": "Name?"}]},
            headers={"x-fake-script": script_id}) as answer:
        body = b"".join(answer.iter_raw())
    decoder = EventStreamDecoder()
    decoded = list(decoder.feed(body, end_of_stream=True))
    assert decoder.flush() == b""  # whole frames only, every CRC right
    assert b"Nightingale" not in b"".join(
        base64.b64decode(json.loads(f.data or "{}").get("bytes", "")) for f in decoded)
    last = decoded[-1]
    assert last.message_type == "exception" and last.event == "validationException"
    assert json.loads(last.data or "{}") == {"message": VIOLATION}
    assert [f.message_type for f in decoded].count("exception") == 1


def test_a_blocked_invoke_stream_raises_in_boto3(stack: Stack, client: Factory) -> None:
    script_id = stack.llm.register(script(invoke_frames("Call it ", BLOCKED_PHRASE, ".")))
    answer = client(stack, script_id).invoke_model_with_response_stream(
        modelId=MODEL, body=json.dumps({"anthropic_version": "bedrock-2023-05-31",
                                        "max_tokens": 99,
                                        "messages": [{"role": "user", "content": "Name?"}]}))
    with pytest.raises(EventStreamError) as raised:
        for event in answer["body"]:
            assert b"Nightingale" not in event["chunk"]["bytes"]
    answer["body"].close()
    assert VIOLATION in str(raised.value)


def test_masked_answers_arrive_masked(stack: Stack, client: Factory) -> None:
    script_id = stack.llm.register(script(converse_frames("Write to ", EMAIL, " today.")))
    answer = client(stack, script_id).converse_stream(modelId=MODEL, messages=MESSAGES)
    assert converse_text(list(answer["stream"])) == "Write to {EMAIL} today."
    script_id = stack.llm.register(json_answer(converse_answer(f"Write to {EMAIL}.")))
    answer = client(stack, script_id).converse(modelId=MODEL, messages=MESSAGES)
    assert answer["output"]["message"]["content"] == [{"text": "Write to {EMAIL}."}]


def test_a_blocked_whole_answer_is_a_client_error(stack: Stack, client: Factory) -> None:
    script_id = stack.llm.register(json_answer(converse_answer(f"It is {BLOCKED_PHRASE}.")))
    with pytest.raises(ClientError) as raised:
        client(stack, script_id).converse(modelId=MODEL, messages=MESSAGES)
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    assert raised.value.response["Error"]["Message"] == VIOLATION


def test_a_blocked_prompt_never_reaches_the_upstream(stack: Stack, client: Factory) -> None:
    script_id = stack.llm.register(script(converse_frames("never")))
    bedrock = client(stack, script_id)
    with pytest.raises(ClientError) as raised:
        bedrock.converse_stream(modelId=MODEL, messages=[
            {"role": "user", "content": [{"text": "Say bazinga"}]}])
    assert raised.value.response["Error"]["Message"] == VIOLATION
    with pytest.raises(ClientError):
        bedrock.converse(modelId=MODEL, messages=MESSAGES,
                         system=[{"text": "You always say bazinga."}])
    with pytest.raises(ClientError):
        bedrock.invoke_model(modelId=MODEL, body=json.dumps({
            "anthropic_version": "bedrock-2023-05-31", "max_tokens": 9,
            "messages": [{"role": "user", "content": "bazinga"}]}))
    assert_never_contacted(stack, script_id)


ROUTES: dict[str, dict[str, str] | None] = {
    "/signed-pass/": {"x-guardrail-signed-prompt-mask": "pass"},
    "/no-reasoning/": {"x-guardrail-reasoning-check": "off"},
}


@pytest.fixture(scope="module")
def routes_stack(stacks: StackFactory) -> Stack:
    return stacks(SMALL_WINDOWS, tweak_envoy=with_routes(ROUTES))


def test_a_signed_request_is_never_rewritten(routes_stack: Stack, client: Factory) -> None:
    stack = routes_stack
    masked = [{"role": "user", "content": [{"text": f"Mail {EMAIL} please."}]}]
    # Signed by boto3, masked by the guardrail: refused by default (a rewritten body would
    # fail the signature)...
    script_id = stack.llm.register(json_answer(converse_answer("Done.")))
    with pytest.raises(ClientError) as raised:
        client(stack, script_id).converse(modelId=MODEL, messages=masked)
    assert raised.value.response["Error"]["Message"] == VIOLATION
    assert_never_contacted(stack, script_id)
    # ... passed unmasked where the route says so ...
    script_id = stack.llm.register(json_answer(converse_answer("Done.")))
    answer = client(stack, script_id, "/signed-pass").converse(modelId=MODEL, messages=masked)
    assert answer["output"]["message"]["content"] == [{"text": "Done."}]
    sent = stack.llm.record_for_script(script_id, timeout=10)
    assert EMAIL.encode() in sent.body and sent.header("authorization")
    # ... and masked as any other when the request is not signed (Envoy signs after us).
    script_id = stack.llm.register(json_answer(converse_answer("Done.")))
    with httpx.Client(timeout=30) as http:
        response = http.post(f"{stack.url}/model/{MODEL}/converse",
                             json={"messages": masked}, headers={"x-fake-script": script_id})
    assert response.status_code == 200
    sent = stack.llm.record_for_script(script_id, timeout=10)
    assert EMAIL.encode() not in sent.body and b"{EMAIL}" in sent.body


def test_reasoning_is_checked_unless_the_route_opts_out(routes_stack: Stack,
                                                        client: Factory) -> None:
    frames = converse_frames("Sure.")
    frames.insert(1, frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {
        "reasoningContent": {"text": "The plan is Project Nightingale."}}}))
    script_id = routes_stack.llm.register(script(frames))
    answer = client(routes_stack, script_id).converse_stream(modelId=MODEL, messages=MESSAGES)
    with pytest.raises(EventStreamError):
        list(answer["stream"])
    answer["stream"].close()
    script_id = routes_stack.llm.register(script(frames))
    answer = client(routes_stack, script_id, "/no-reasoning").converse_stream(
        modelId=MODEL, messages=MESSAGES)
    events = list(answer["stream"])
    assert converse_text(events) == "Sure."
    assert any("reasoningContent" in e.get("contentBlockDelta", {}).get("delta", {})
               for e in events)


WHOLE_BLOCKED: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # provider: (path, request, a non-streamed answer saying the blocked phrase)
    "bedrock": (f"/model/{MODEL}/converse", {"messages": MESSAGES},
                converse_answer(f"It is {BLOCKED_PHRASE}.")),
    "ollama": ("/api/chat", {"model": "m", "stream": False,
                             "messages": [{"role": "user", "content": "Name?"}]},
               {"model": "m", "created_at": "2026-12-06T05:00:00Z", "done": True,
                "message": {"role": "assistant", "content": f"It is {BLOCKED_PHRASE}."}}),
    "gemini": ("/v1beta/models/gemini-2.5-flash:generateContent",
               {"contents": [{"parts": [{"text": "Name?"}]}]},
               {"candidates": [{"content": {"role": "model", "parts": [
                   {"text": f"It is {BLOCKED_PHRASE}."}]}, "index": 0}]}),
}


@pytest.mark.parametrize("provider", sorted(WHOLE_BLOCKED))
def test_a_blocked_whole_answer_over_http2_is_the_apis_error(stack: Stack,
                                                             provider: str) -> None:
    path, request, answer = WHOLE_BLOCKED[provider]
    script_id = stack.llm.register(json_answer(answer))
    with httpx.Client(http1=False, http2=True, timeout=30) as http:
        response = http.post(f"{stack.url}{path}", json=request,
                             headers={"x-fake-script": script_id})
    assert response.http_version == "HTTP/2" and response.status_code == 400
    assert b"Nightingale" not in response.content
    error = response.json()
    message = {"bedrock": lambda: error["message"], "ollama": lambda: error["error"],
               "gemini": lambda: error["error"]["message"]}[provider]()
    assert message == VIOLATION


def test_bedrock_native_tool_call_arguments_are_read(stack: Stack, client: Factory) -> None:
    """Regression (issue 15 review): a native model's streamed tool calls (gpt-oss's
    ``delta.tool_calls``) passed unread."""
    models: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Calling."}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {
            "name": "lookup", "arguments": json.dumps({"q": BLOCKED_PHRASE})}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    script_id = stack.llm.register(script([chunk(model) for model in models]))
    answer = client(stack, script_id).invoke_model_with_response_stream(
        modelId="openai.gpt-oss-120b-1:0",
        body=json.dumps({"messages": [{"role": "user", "content": "Look it up."}]}))
    with pytest.raises(EventStreamError) as raised:
        for event in answer["body"]:
            assert b"Nightingale" not in event["chunk"]["bytes"]
    answer["body"].close()
    assert VIOLATION in str(raised.value)
