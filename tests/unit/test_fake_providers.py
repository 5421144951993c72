"""The fake LLM's default model on provider-native APIs (``testkit.providers``), read by each
provider's official client: ``ollama``, ``google-genai`` and boto3's ``bedrock-runtime``.

Every test runs a real ``FakeLLM`` on 127.0.0.1 (port 0, 1 ms between writes) and checks that
the whole canned answer arrives, that the stream ends cleanly and that the request was
recorded with one write per streamed event; a few check the exact bytes against what the
providers write.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import ollama
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from google import genai
from google.genai import types as genai_types

from extproc.eventstream import EventStreamDecoder
from testkit import providers
from testkit.upstream import FakeLLM, RequestRecord, _split_words, answer_for

WORDS = 3
GEMINI = "gemini-2.5-flash"
CLAUDE = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
EMAIL_QUESTION = "What is the email of our account manager?"
PROJECT_QUESTION = "Tell me about the project."
LONG_QUESTION = "Write a long text about lighthouses."
RFC3339_NANO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?Z")


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(token_delay_ms=1, words_per_chunk=WORDS) as server:
        yield server


def pieces(question: str) -> list[str]:
    return _split_words(answer_for(question), WORDS)


def finished(llm: FakeLLM, path_part: str) -> RequestRecord:
    """The (first) finished record of a request whose path contains ``path_part``."""
    return llm.wait_for_record(lambda r: path_part in r.path and r.finished)


def assert_complete(record: RequestRecord, writes: int) -> None:
    assert record.kind == "model" and record.status == 200
    assert record.completed and not record.peer_closed and record.error is None
    assert record.chunks_written == writes == len(record.chunks)


# --------------------------------------------------------------------------
# Ollama
# --------------------------------------------------------------------------


@pytest.fixture
def ollama_client(llm: FakeLLM) -> Iterator[ollama.Client]:
    client = ollama.Client(host=llm.url, timeout=30)
    yield client
    client.close()


def test_ollama_chat_streamed(llm: FakeLLM, ollama_client: ollama.Client) -> None:
    parts = list(ollama_client.chat(model="llama3.2", stream=True,
                                    messages=[{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": EMAIL_QUESTION}]))
    assert "".join(p.message.content or "" for p in parts) == answer_for(EMAIL_QUESTION)
    assert [p.message.content for p in parts[:-1]] == pieces(EMAIL_QUESTION)
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    last = parts[-1]
    assert last.done_reason == "stop" and last.message.role == "assistant"
    assert last.eval_count == len(parts) - 1 and (last.prompt_eval_count or 0) > 0
    assert all(p.model == "llama3.2" and RFC3339_NANO.fullmatch(p.created_at or "")
               for p in parts)

    record = finished(llm, "/api/chat")
    assert_complete(record, len(parts))
    assert record.json()["messages"][-1]["content"] == EMAIL_QUESTION
    assert record.response_headers == [("content-type", "application/x-ndjson")]


def test_ollama_chat_not_streamed(llm: FakeLLM, ollama_client: ollama.Client) -> None:
    answer = ollama_client.chat(model="llama3.2", stream=False,
                                messages=[{"role": "user", "content": PROJECT_QUESTION}])
    assert answer.message.content == answer_for(PROJECT_QUESTION)
    assert answer.done and answer.done_reason == "stop" and answer.total_duration
    record = finished(llm, "/api/chat")
    assert_complete(record, 1)
    assert record.json()["stream"] is False
    assert record.response_headers == [("content-type", "application/json; charset=utf-8")]


def test_ollama_generate_streamed_and_not(llm: FakeLLM, ollama_client: ollama.Client) -> None:
    parts = list(ollama_client.generate(model="qwen3:4b", prompt=LONG_QUESTION, stream=True))
    assert "".join(p.response or "" for p in parts) == answer_for(LONG_QUESTION)
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].context
    assert_complete(finished(llm, "/api/generate"), len(pieces(LONG_QUESTION)) + 1)

    llm.clear_records()
    whole = ollama_client.generate(model="qwen3:4b", prompt="hello there", stream=False)
    assert whole.response == "You said: hello there"
    assert whole.done and whole.done_reason == "stop" and whole.context
    assert_complete(finished(llm, "/api/generate"), 1)


def test_ollama_streams_when_the_body_does_not_say_and_writes_as_go_does(llm: FakeLLM) -> None:
    question = "a<b & c>d"
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{llm.url}/api/chat",
                         json={"model": "m", "messages": [{"role": "user",
                                                           "content": question}]}) as reply:
            assert reply.headers["content-type"] == "application/x-ndjson"
            body = b"".join(reply.iter_raw())
    lines = body.split(b"\n")
    assert lines[-1] == b"" and all(lines[:-1])
    first = lines[0].decode()
    # Go's field order, compact, HTML-safe escaping.
    assert re.fullmatch(r'\{"model":"m","created_at":"[^"]+","message":\{"role":"assistant",'
                        r'"content":"You said: a\\u003cb "\},"done":false\}', first), first
    last = lines[-2].decode()
    assert re.fullmatch(r'\{"model":"m","created_at":"[^"]+","message":\{"role":"assistant",'
                        r'"content":""\},"done":true,"done_reason":"stop","total_duration":\d+,'
                        r'"load_duration":\d+,"prompt_eval_count":\d+,'
                        r'"prompt_eval_duration":\d+,"eval_count":\d+,"eval_duration":\d+\}',
                        last), last
    assert all(escaped in body for escaped in (b"\\u003c", b"\\u0026", b"\\u003e"))
    assert not any(raw in body for raw in (b"<", b"&", b">"))
    text = "".join(json.loads(line)["message"]["content"] for line in lines[:-1])
    assert text == f"You said: {question}"
    record = finished(llm, "/api/chat")
    assert record.chunks == [line + b"\n" for line in lines[:-1]]


def test_ollama_refusal_is_its_error_object(llm: FakeLLM, ollama_client: ollama.Client) -> None:
    with httpx.Client(timeout=30) as http:
        reply = http.post(f"{llm.url}/api/chat", content=b"[1]")
    assert reply.status_code == 400 and "error" in reply.json()
    assert finished(llm, "/api/chat").error is not None


# --------------------------------------------------------------------------
# Gemini
# --------------------------------------------------------------------------


@pytest.fixture
def gemini(llm: FakeLLM) -> Iterator[genai.Client]:
    client = genai.Client(api_key="x", http_options=genai_types.HttpOptions(base_url=llm.url))
    yield client
    client.close()


def test_gemini_sse_stream_read_by_the_sdk(llm: FakeLLM, gemini: genai.Client) -> None:
    chunks = list(gemini.models.generate_content_stream(
        model=GEMINI, contents=[
            genai_types.Content(role="user", parts=[genai_types.Part(text="Hi.")]),
            genai_types.Content(role="model", parts=[genai_types.Part(text="Hello!")]),
            genai_types.Content(role="user", parts=[genai_types.Part(text=EMAIL_QUESTION)]),
        ]))
    assert "".join(c.text or "" for c in chunks) == answer_for(EMAIL_QUESTION)
    assert [c.text for c in chunks] == pieces(EMAIL_QUESTION)
    finish = [c.candidates[0].finish_reason if c.candidates else None for c in chunks]
    assert finish == [None] * (len(chunks) - 1) + [genai_types.FinishReason.STOP]
    assert chunks[-1].model_version == GEMINI and chunks[-1].response_id
    assert len({c.response_id for c in chunks}) == 1
    usage = chunks[-1].usage_metadata
    assert usage is not None and usage.candidates_token_count == len(
        answer_for(EMAIL_QUESTION).split())

    record = finished(llm, ":streamGenerateContent")
    assert re.fullmatch(rf"/v1\w*/models/{GEMINI}:streamGenerateContent\?alt=sse", record.path)
    assert_complete(record, len(chunks))
    assert all(c.startswith(b'data: {"candidates": [{"content": {"parts": [{"text": ')
               and c.endswith(b"\r\n\r\n") and c.count(b"\r\n\r\n") == 1
               for c in record.chunks)
    assert record.response_headers == [("content-type", "text/event-stream")]


def test_gemini_generate_content_read_by_the_sdk(llm: FakeLLM, gemini: genai.Client) -> None:
    answer = gemini.models.generate_content(model=GEMINI, contents=PROJECT_QUESTION)
    assert answer.text == answer_for(PROJECT_QUESTION)
    assert answer.candidates and answer.candidates[0].finish_reason == "STOP"
    record = finished(llm, ":generateContent")
    assert_complete(record, 1)
    assert record.json()["contents"][0]["parts"][0]["text"] == PROJECT_QUESTION
    body = record.chunks[0].decode()
    assert body.startswith('{\n  "candidates": [\n    {\n      "content": {\n')
    assert list(json.loads(body)) == ["candidates", "usageMetadata", "modelVersion",
                                      "responseId"]


def test_gemini_stream_without_alt_sse_is_one_json_array(llm: FakeLLM) -> None:
    with httpx.Client(timeout=30) as http:
        reply = http.post(f"{llm.url}/v1beta/models/{GEMINI}:streamGenerateContent",
                          json={"contents": [{"parts": [{"text": "First "},
                                                        {"text": LONG_QUESTION}]}]})
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json; charset=UTF-8"
    array = reply.json()
    texts = [p["text"] for r in array for c in r["candidates"] for p in c["content"]["parts"]]
    assert "".join(texts) == answer_for(LONG_QUESTION)
    assert array[-1]["candidates"][0]["finishReason"] == "STOP"
    assert all("finishReason" not in r["candidates"][0] for r in array[:-1])
    assert reply.content.startswith(b'[{\n  "candidates"') and reply.content.endswith(b"}\n]")
    assert reply.content.count(b"\n,\r\n{\n") == len(array) - 1
    record = finished(llm, ":streamGenerateContent")
    assert_complete(record, len(array))


def test_gemini_on_vertex_paths(llm: FakeLLM) -> None:
    path = ("/v1/projects/demo/locations/us-central1/publishers/google/models/"
            "gemini-2.0-flash-001")
    body = {"contents": [{"role": "user", "parts": [{"text": PROJECT_QUESTION}]}]}
    with httpx.Client(timeout=30) as http:
        whole = http.post(f"{llm.url}{path}:generateContent", json=body).json()
        with http.stream("POST", f"{llm.url}{path}:streamGenerateContent?alt=sse",
                         json=body) as reply:
            raw = b"".join(reply.iter_raw())
    assert whole["candidates"][0]["content"]["parts"][0]["text"] == answer_for(PROJECT_QUESTION)
    assert whole["modelVersion"] == "gemini-2.0-flash-001" and "createTime" in whole
    assert whole["usageMetadata"]["trafficType"] == "ON_DEMAND"
    events = [json.loads(e[len(b"data: "):]) for e in raw.split(b"\r\n\r\n") if e]
    assert "".join(e["candidates"][0]["content"]["parts"][0]["text"]
                   for e in events) == answer_for(PROJECT_QUESTION)
    assert_complete(finished(llm, ":generateContent"), 1)
    assert_complete(finished(llm, ":streamGenerateContent"), len(events))
    assert len(llm.records) == 2


def test_gemini_refusal_is_googles_error(llm: FakeLLM) -> None:
    with httpx.Client(timeout=30) as http:
        reply = http.post(f"{llm.url}/v1beta/models/{GEMINI}:generateContent",
                          json={"contents": []})
    assert reply.status_code == 400
    assert reply.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert finished(llm, ":generateContent").error is not None


# --------------------------------------------------------------------------
# Bedrock Runtime
# --------------------------------------------------------------------------


@pytest.fixture
def bedrock(llm: FakeLLM) -> Iterator[Any]:
    client = boto3.client(
        "bedrock-runtime", endpoint_url=llm.url, region_name="us-east-1",
        aws_access_key_id="AKIDFAKE", aws_secret_access_key="fake-secret",
        config=Config(retries={"max_attempts": 1}, read_timeout=30, connect_timeout=30))
    yield client
    client.close()


def converse_messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"text": "Hello."}]},
            {"role": "assistant", "content": [{"text": "Hi!"}]},
            {"role": "user", "content": [{"text": question}]}]


def anthropic_body(question: str) -> bytes:
    return json.dumps({
        "anthropic_version": "bedrock-2023-05-31", "max_tokens": 512,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hello."},
                     {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]},
                     {"role": "user", "content": [{"type": "text", "text": question}]}],
    }).encode()


def test_bedrock_converse(llm: FakeLLM, bedrock: Any) -> None:
    answer = bedrock.converse(modelId=CLAUDE, messages=converse_messages(PROJECT_QUESTION),
                              system=[{"text": "Be brief."}])
    assert answer["output"]["message"] == {"role": "assistant",
                                           "content": [{"text": answer_for(PROJECT_QUESTION)}]}
    assert answer["stopReason"] == "end_turn"
    assert answer["usage"]["outputTokens"] == len(answer_for(PROJECT_QUESTION).split())
    assert answer["metrics"]["latencyMs"] >= 1
    record = finished(llm, "/converse")
    # boto3 percent-encodes the model id's ``:``; the fake decodes it.
    assert record.path == f"/model/{CLAUDE.replace(':', '%3A')}/converse"
    assert_complete(record, 1)
    assert record.chunks[0].startswith(b'{"metrics":{"latencyMs":')


def test_bedrock_converse_stream(llm: FakeLLM, bedrock: Any) -> None:
    reply = bedrock.converse_stream(modelId=CLAUDE, messages=converse_messages(EMAIL_QUESTION))
    events = list(reply["stream"])
    reply["stream"].close()
    names = [next(iter(e)) for e in events]
    deltas = [e["contentBlockDelta"]["delta"]["text"] for e in events
              if "contentBlockDelta" in e]
    assert names == (["messageStart"] + ["contentBlockDelta"] * len(deltas)
                     + ["contentBlockStop", "messageStop", "metadata"])
    assert deltas == pieces(EMAIL_QUESTION)
    assert events[0]["messageStart"] == {"role": "assistant"}
    assert events[-2]["messageStop"] == {"stopReason": "end_turn"}
    assert events[-1]["metadata"]["usage"]["outputTokens"] == len(
        answer_for(EMAIL_QUESTION).split())

    record = finished(llm, "/converse-stream")
    assert_complete(record, len(events))
    frames = EventStreamDecoder().feed(b"".join(record.chunks))
    assert [f.event for f in frames] == names
    assert all(json.loads(f.data or "")["p"] for f in frames)  # Bedrock's padding
    assert ("content-type", "application/vnd.amazon.eventstream") in record.response_headers


def test_bedrock_invoke_model_anthropic(llm: FakeLLM, bedrock: Any) -> None:
    reply = bedrock.invoke_model(modelId=CLAUDE, body=anthropic_body(LONG_QUESTION),
                                 contentType="application/json", accept="application/json")
    with reply["body"] as body:
        message = json.loads(body.read())
    assert reply["contentType"] == "application/json"
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [{"type": "text", "text": answer_for(LONG_QUESTION)}]
    assert message["stop_reason"] == "end_turn" and message["stop_sequence"] is None
    assert message["model"] == "claude-3-5-haiku-20241022"
    assert message["id"].startswith("msg_bdrk_01")
    assert_complete(finished(llm, "/invoke"), 1)


def test_bedrock_invoke_model_with_response_stream(llm: FakeLLM, bedrock: Any) -> None:
    reply = bedrock.invoke_model_with_response_stream(
        modelId=CLAUDE, body=anthropic_body(EMAIL_QUESTION), contentType="application/json")
    assert reply["contentType"] == "application/json"
    stream = reply["body"]
    events = [json.loads(e["chunk"]["bytes"]) for e in stream]  # botocore decodes the base64
    stream.close()
    types = [e["type"] for e in events]
    assert types == (["message_start", "content_block_start"]
                     + ["content_block_delta"] * len(pieces(EMAIL_QUESTION))
                     + ["content_block_stop", "message_delta", "message_stop"])
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == answer_for(EMAIL_QUESTION)
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    metrics = events[-1]["amazon-bedrock-invocationMetrics"]
    assert metrics["outputTokenCount"] == len(answer_for(EMAIL_QUESTION).split())
    record = finished(llm, "/invoke-with-response-stream")
    assert_complete(record, len(events))
    frames = [EventStreamDecoder().feed(chunk) for chunk in record.chunks]  # one frame a write
    assert all(len(f) == 1 and f[0].event == "chunk" for f in frames)
    payloads = [json.loads(f[0].data or "") for f in frames]
    assert all(list(p) == ["bytes", "p"] for p in payloads)
    assert [json.loads(base64.b64decode(p["bytes"])) for p in payloads] == events


def test_bedrock_refusal_is_a_validation_exception(llm: FakeLLM, bedrock: Any) -> None:
    with pytest.raises(ClientError) as raised:
        bedrock.invoke_model(modelId="amazon.titan-text-express-v1",
                             body=json.dumps({"inputText": "Hi"}).encode())
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    assert finished(llm, "/invoke").error is not None


# --------------------------------------------------------------------------
# Routing, and what stays as it was
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "query", "expected"), [
    ("POST", "/api/chat", {}, providers.Route("ollama", "chat")),
    ("POST", "/ollama/api/generate", {}, providers.Route("ollama", "generate")),
    ("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", {"alt": ["sse"]},
     providers.Route("gemini", "streamGenerateContent", "gemini-2.5-flash", sse=True)),
    ("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", {},
     providers.Route("gemini", "streamGenerateContent", "gemini-2.5-flash")),
    ("POST", "/v1/projects/p/locations/l/publishers/google/models/g:generateContent", {},
     providers.Route("gemini", "generateContent", "g", vertex=True)),
    ("POST", "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.x-v1%3A0"
     "/converse-stream", {},
     providers.Route("bedrock", "converse-stream",
                     "arn:aws:bedrock:us-east-1:1:inference-profile/us.x-v1:0")),
    ("POST", "/model/m/invoke", {}, providers.Route("bedrock", "invoke", "m")),
    ("GET", "/api/chat", {}, None),
    ("POST", "/v1/chat/completions", {}, None),
    ("POST", "/v1beta/models/g:countTokens", {}, None),
    ("POST", "/model/m/count-tokens", {}, None),
])
def test_match_route(method: str, path: str, query: dict[str, list[str]],
                     expected: providers.Route | None) -> None:
    assert providers.match_route(method, path, query) == expected


@pytest.mark.parametrize(("ns", "text"), [
    (1_780_000_000_123_456_789, "2026-05-28T20:26:40.123456789Z"),
    (1_780_000_000_120_000_000, "2026-05-28T20:26:40.12Z"),
    (1_780_000_000_000_000_000, "2026-05-28T20:26:40Z"),
])
def test_rfc3339_nano_trims_like_go(ns: int, text: str) -> None:
    assert providers.rfc3339_nano(ns) == text


def test_builders_are_pure_given_clock_and_ids() -> None:
    route = providers.Route("gemini", "streamGenerateContent", GEMINI, sse=True)
    doc = {"contents": [{"parts": [{"text": "hi"}]}]}

    def make() -> providers.Reply:
        return providers.build_reply(route, doc, "You said: hi", ["You said: ", "hi"],
                                     now_ns=1, response_id="r")

    assert make() == make()
    reply = make()
    assert reply.content_type == "text/event-stream" and reply.streamed
    assert reply.writes[-1] == (
        b'data: {"candidates": [{"content": {"parts": [{"text": "hi"}],"role": "model"},'
        b'"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 1,'
        b'"candidatesTokenCount": 3,"totalTokenCount": 4,"promptTokensDetails": '
        b'[{"modality": "TEXT","tokenCount": 1}],"candidatesTokensDetails": '
        b'[{"modality": "TEXT","tokenCount": 3}]},"modelVersion": "gemini-2.5-flash",'
        b'"responseId": "r"}\r\n\r\n')


def test_openai_chat_and_unknown_paths_are_unchanged(llm: FakeLLM) -> None:
    with httpx.Client(timeout=30) as http:
        chat = http.post(f"{llm.url}/v1/chat/completions",
                         json={"model": "demo",
                               "messages": [{"role": "user", "content": PROJECT_QUESTION}]})
        missing = http.post(f"{llm.url}/v1/embeddings", json={"input": "x"})
        tags = http.get(f"{llm.url}/api/chat")
    assert chat.json()["choices"][0]["message"]["content"] == answer_for(PROJECT_QUESTION)
    assert missing.status_code == 404 and tags.status_code == 404
