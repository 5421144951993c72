"""Google Gemini ``generateContent`` through the official ``google-genai`` SDK: paths, prompts,
non-streamed answers (one object or an array), and streams (a hand-written recording in the
API's own shape) read by the real client over a mock transport: clean events pass byte for
byte, the terminal frame raises mid-stream, the soft-block frame ends it with ``SAFETY``,
masks reach the client. Also the SDK behaviours the module docstring relies on.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from typing import Any

import pytest
from google import genai
from google.genai import errors, types
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.formats import (
    ErrorKind,
    PromptScope,
    StreamCodec,
    StreamFormat,
    canonical_path,
    find_format,
)
from extproc.formats.gemini import GeminiGenerateContent, GeminiSSEDecoder
from extproc.sse import SSEDecoder, SSEEvent
from tests.unit.test_formats_common import (
    MASKS,
    SOFT_MESSAGE,
    UNAVAILABLE_MESSAGE,
    VIOLATION_MESSAGE,
    Served,
    Unnoted,
    decode,
    drive,
    extract_all,
    joined,
    release,
    upper_mask,
)

FMT = GeminiGenerateContent()
MODEL = "gemini-2.5-flash"
RESPONSE_ID = "mSbYaK2bH4qhz7IPk5-W8Qc"
THOUGHT = "**Planning the answer**\n\nThe user wants a summary of the trip."
TEXT = ("Bonjour ! Voici un résumé de votre voyage au 日本 : Tōkyō, Kyōto et Ōsaka. "
        "Bon séjour 🙂")


def _usage(candidates: int | None) -> str:
    counts = (f'"candidatesTokenCount": {candidates},' if candidates is not None else "")
    total = 9 + (candidates or 0) + 41
    return ('"usageMetadata": {"promptTokenCount": 9,' + counts
            + f'"totalTokenCount": {total},"promptTokensDetails": [{{"modality": "TEXT",'
            '"tokenCount": 9}],"thoughtsTokenCount": 41}')


def _event(parts: str, usage: str, finish: bool = False) -> bytes:
    """One event as Google writes it: its spacing, its key order, CR LF line endings."""
    reason = '"finishReason": "STOP",' if finish else ""
    return ('data: {"candidates": [{"content": {"parts": [' + parts + '],"role": "model"},'
            + reason + '"index": 0}],' + usage + f',"modelVersion": "{MODEL}",'
            f'"responseId": "{RESPONSE_ID}"}}\r\n\r\n').encode()


def _text(text: str, extra: str = "") -> str:
    return "{" + '"text": ' + json.dumps(text, ensure_ascii=False) + extra + "}"


#: A streamed answer with thinking (``includeThoughts``), in the API's shape (alt=sse).
RECORDING = b"".join([
    _event(_text(THOUGHT, ',"thought": true'), _usage(None)),
    _event(_text("Bonjour ! Voici un résumé", ',"thoughtSignature": "CiQB0e2Kb3xJ"'),
           _usage(None)),
    _event(_text(" de votre voyage au 日本 : Tōkyō, Kyōto"), _usage(None)),
    _event(_text(" et Ōsaka. Bon séjour 🙂"), _usage(19), finish=True),
])


def gemini_client(body: bytes, status: int = 200, json_body: bool = False,
                  vertexai: bool = False) -> genai.Client:
    served = Served(body, status, "application/json" if json_body else "text/event-stream")
    return genai.Client(api_key="test", vertexai=vertexai, http_options=types.HttpOptions(
        base_url="http://llm.test", httpx_client=served.http_client()))


def read_stream(body: bytes) -> tuple[list[types.GenerateContentResponse], Exception | None]:
    """The chunks the SDK yields for a stream body, and what it raised (None: nothing)."""
    chunks: list[types.GenerateContentResponse] = []
    try:
        for chunk in gemini_client(body).models.generate_content_stream(model=MODEL,
                                                                         contents="hi"):
            chunks.append(chunk)
    except Exception as exc:  # noqa: BLE001 - the SDK's error is what is asserted
        return chunks, exc
    return chunks, None


def shown(chunks: list[types.GenerateContentResponse]) -> str:
    """The text a client shows: ``chunk.text`` joined (thoughts left out)."""
    return "".join(chunk.text or "" for chunk in chunks)


def thoughts(chunks: list[types.GenerateContentResponse]) -> str:
    return "".join(part.text or "" for chunk in chunks for candidate in chunk.candidates or []
                   if candidate.content for part in candidate.content.parts or []
                   if part.thought)


def stream_of(raw: bytes, released: int | None, end: Callable[[StreamCodec], bytes],
              chunk_size: int = 9) -> bytes:
    """The first ``released`` events of a recording as the guard sends them, then ``end``."""
    events = decode(raw, chunk_size=chunk_size)
    codec = FMT.stream_codec()
    extract_all(codec, events)
    kept = events if released is None else events[:released]
    return b"".join(codec.rewrite(e, {}) for e in kept) + end(codec)


def events_of(*payloads: Any) -> list[SSEEvent]:
    return decode(b"".join(b"data: " + json.dumps(p, ensure_ascii=False).encode() + b"\r\n\r\n"
                           for p in payloads))


def chunk(*candidates: dict[str, Any], **head: Any) -> dict[str, Any]:
    return {"candidates": list(candidates), **head}


def candidate(*parts: dict[str, Any], index: Any = 0, **fields: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"content": {"parts": list(parts), "role": "model"}, **fields}
    if index is not None:
        result["index"] = index
    return result


# --------------------------------------------------------------------------- the interface


def test_implements_the_protocols() -> None:
    for method in ("matches", "prompt_texts", "rewrite_prompt", "response_texts",
                   "rewrite_response", "soft_block_response", "error_body", "stream_codec",
                   "stream_decoder"):
        protocol = inspect.signature(getattr(StreamFormat, method))
        actual = inspect.signature(getattr(FMT, method))
        assert list(actual.parameters) == list(protocol.parameters)[1:], method
    codec = FMT.stream_codec()
    for method in ("extract", "rewrite", "terminal_frame", "soft_block_frame"):
        protocol = inspect.signature(getattr(StreamCodec, method))
        actual = inspect.signature(getattr(codec, method))
        assert list(actual.parameters) == list(protocol.parameters)[1:], method
    assert FMT.stream_codec() is not codec
    assert FMT.name == "google.gemini"


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", True),
    ("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", True),
    ("POST", "/v1/models/gemini-2.5-flash:generateContent?key=abc", True),
    ("POST", "/v1alpha/models/gemini-2.5-flash:streamGenerateContent", True),
    ("POST", "/v1beta/tunedModels/my-model-123:generateContent", True),
    ("POST", "/v1/projects/p/locations/us-central1/publishers/google/models/"
             "gemini-2.5-flash:streamGenerateContent?alt=sse", True),
    ("POST", "/v1beta1/projects/p/locations/global/publishers/google/models/"
             "gemini-2.5-pro:generateContent", True),
    ("POST", "/v1/publishers/google/models/gemini-2.5-flash:generateContent", True),
    ("POST", "/v1/projects/p/locations/l/endpoints/1234567890:generateContent", True),
    ("POST", "/gemini/v1beta/models/gemini-2.5-flash:generateContent", True),  # a gateway
    ("POST", "/v1beta/models/gemini-2.5-flash%3AgenerateContent", True),
    ("POST", "/v1beta/models/gemini-2.5-flash:generateContent/", True),
    ("post", "/v1beta/models/gemini-2.5-flash:generateContent", True),
    ("POST", "/v1beta/models/gemini-2.5-flash:countTokens", False),
    ("POST", "/v1beta/models/gemini-2.5-flash:embedContent", False),
    ("POST", "/v1beta/models/text-embedding-004:batchEmbedContents", False),
    ("POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", False),
    ("POST", "/v1beta/models/gemini-2.5-flash:generateContentx", False),
    ("POST", "/v1beta/models/gemini-2.5-flash", False),
    ("POST", "/v1beta/models:generateContent", False),
    ("POST", "/v1beta/models/:generateContent", False),
    ("POST", "/v1beta/cachedContents/abc:generateContent", False),
    ("GET", "/v1beta/models/gemini-2.5-flash:generateContent", False),
    ("GET", "/v1beta/models", False),
    ("POST", "/v1/embeddings", False),
    ("POST", "/v1/chat/completions", False),
    ("POST", "/v1/messages", False),
])
def test_paths(method: str, path: str, expected: bool) -> None:
    assert (find_format(method, path, (FMT,)) is FMT) is expected


@pytest.mark.parametrize("vertexai", [False, True])
def test_the_sdk_requests_are_recognised_and_their_prompt_read(vertexai: bool) -> None:
    served = Served(RECORDING)
    client = genai.Client(api_key="test", vertexai=vertexai, http_options=types.HttpOptions(
        base_url="http://llm.test", httpx_client=served.http_client()))
    list(client.models.generate_content_stream(
        model=MODEL, contents="Parle-moi du voyage",
        config=types.GenerateContentConfig(system_instruction="Be brief.")))
    (request,) = served.requests
    assert request.url.params["alt"] == "sse"
    assert FMT.matches(request.method, canonical_path(request.url.path))
    assert FMT.prompt_texts(request.content, PromptScope.LAST_USER) == ["Parle-moi du voyage"]
    assert FMT.prompt_texts(request.content, PromptScope.ALL_WITH_SYSTEM) == [
        "Be brief.", "Parle-moi du voyage"]


# --------------------------------------------------------------------------- prompts

CONVERSATION: dict[str, Any] = {
    "systemInstruction": {"parts": [{"text": "You are a travel agent."}]},
    "contents": [
        {"role": "user", "parts": [{"text": "Plan a week in Japan."}]},
        {"role": "model", "parts": [
            {"text": "Let me think.", "thought": True},
            {"text": "Sure! Tokyo first?"},
            {"functionCall": {"name": "weather", "args": {"city": "Tokyo"}}}]},
        {"role": "user", "parts": [{"functionResponse": {
            "name": "weather", "response": {"forecast": "Snow", "days": [{"note": "cold"}],
                                            "temp": 4}}}]},
        {"parts": [
            {"text": "Yes, and Kyōto — 京都 🙂"},
            {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
            {"text": "My mail is jane@example.com"}]},
    ],
    "generationConfig": {"temperature": 0.2},
}


@pytest.mark.parametrize(("scope", "expected"), [
    (PromptScope.LAST_USER, ["Yes, and Kyōto — 京都 🙂", "My mail is jane@example.com"]),
    (PromptScope.ALL, ["Plan a week in Japan.", "Let me think.", "Sure! Tokyo first?", "Snow",
                       "cold", "Yes, and Kyōto — 京都 🙂", "My mail is jane@example.com"]),
    (PromptScope.ALL_WITH_SYSTEM, [
        "You are a travel agent.", "Plan a week in Japan.", "Let me think.",
        "Sure! Tokyo first?", "Snow", "cold", "Yes, and Kyōto — 京都 🙂",
        "My mail is jane@example.com"]),
])
def test_prompt_scopes_and_rewrite(scope: str, expected: list[str]) -> None:
    body = json.dumps(CONVERSATION).encode()
    assert FMT.prompt_texts(body, scope) == expected
    masked = [t.replace("jane@example.com", "{EMAIL}").upper() for t in expected]
    rewritten = FMT.rewrite_prompt(body, scope, masked)
    assert rewritten is not None
    assert FMT.prompt_texts(rewritten, scope) == masked
    request = json.loads(rewritten)
    assert [c.get("role") for c in request["contents"]] == [
        c.get("role") for c in CONVERSATION["contents"]]
    assert request["contents"][3]["parts"][1] == CONVERSATION["contents"][3]["parts"][1]
    assert request["contents"][1]["parts"][2] == CONVERSATION["contents"][1]["parts"][2]
    assert request["contents"][2]["parts"][0]["functionResponse"]["response"]["temp"] == 4
    assert request["generationConfig"] == {"temperature": 0.2}


def test_last_user_skips_a_tool_turn() -> None:
    body = json.dumps({"contents": CONVERSATION["contents"][:3]}).encode()
    assert FMT.prompt_texts(body, PromptScope.LAST_USER) == ["Plan a week in Japan."]


def test_prompt_reads_proto_names_and_single_objects() -> None:
    # Google's JSON reader takes proto field names and one object for a repeated field.
    body = json.dumps({
        "system_instruction": {"parts": {"text": "You are a cat."}},
        "contents": {"role": "user", "parts": {"text": "Hello there"}},
    }).encode()
    assert FMT.prompt_texts(body, PromptScope.LAST_USER) == ["Hello there"]
    assert FMT.prompt_texts(body, PromptScope.ALL) == ["Hello there"]
    assert FMT.prompt_texts(body, PromptScope.ALL_WITH_SYSTEM) == ["You are a cat.",
                                                                  "Hello there"]
    rewritten = FMT.rewrite_prompt(body, PromptScope.ALL_WITH_SYSTEM, ["A", "B"])
    assert rewritten is not None
    assert json.loads(rewritten) == {"system_instruction": {"parts": {"text": "A"}},
                                     "contents": {"role": "user", "parts": {"text": "B"}}}


def test_whole_request_reads_every_text() -> None:
    body = json.dumps(CONVERSATION).encode()
    texts = FMT.prompt_texts(body, PromptScope.WHOLE_REQUEST)
    every = "\n".join(texts)
    for text in ("You are a travel agent.", "Plan a week in Japan.", "Tokyo", "Snow", "cold",
                 "jane@example.com"):
        assert text in every
    rewritten = FMT.rewrite_prompt(body, PromptScope.WHOLE_REQUEST,
                                   [t.replace("jane@example.com", "{EMAIL}") for t in texts])
    assert rewritten is not None
    assert json.loads(rewritten)["contents"][3]["parts"][2]["text"] == "My mail is {EMAIL}"


def test_rewrite_prompt_with_the_wrong_count_is_none() -> None:
    body = json.dumps(CONVERSATION).encode()
    assert FMT.rewrite_prompt(body, PromptScope.LAST_USER, ["only one"]) is None
    assert FMT.prompt_texts(body) == FMT.prompt_texts(body, PromptScope.LAST_USER)


@pytest.mark.parametrize("scope", PromptScope.VALUES)
@pytest.mark.parametrize("raw", [b"", b"{not json", b"[]", b"null", b'{"contents": 3}',
                                 b'{"contents": [{"parts": [{"text": 3}]}]}'])
def test_prompt_of_garbage_is_empty(scope: str, raw: bytes) -> None:
    if scope == PromptScope.WHOLE_REQUEST:
        return  # the generic reading, tested with every format in test_formats_common
    assert FMT.prompt_texts(raw, scope) == []


def test_a_deep_tool_result_is_read() -> None:
    response: Any = "deep"
    for _ in range(350):  # 700 levels: json reads it
        response = {"r": [response]}
    request = {"contents": [{"role": "user", "parts": [
        {"functionResponse": {"name": "f", "response": response}}]}]}
    body = json.dumps(request).encode()
    assert FMT.prompt_texts(body, PromptScope.ALL) == ["deep"]
    rewritten = FMT.rewrite_prompt(body, PromptScope.ALL, ["DEEP"])
    assert rewritten is not None and FMT.prompt_texts(rewritten, PromptScope.ALL) == ["DEEP"]


# --------------------------------------------------------------------------- non-streamed

ANSWER: dict[str, Any] = {
    "candidates": [
        {"content": {"role": "model", "parts": [
            {"text": "Checking the mail", "thought": True},
            {"text": "Write to jane"},
            {"text": ".doe@example.com 🙂"},
            {"functionCall": {"name": "send_mail", "args": {"to": "jane.doe@example.com"}}},
            {"executableCode": {"language": "PYTHON", "code": "print('jane')"}},
            {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": "jane\n"}}]},
         "finishReason": "STOP", "index": 0},
    ],
    "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 30, "totalTokenCount": 42},
    "modelVersion": MODEL,
    "responseId": RESPONSE_ID,
}


def test_response_texts() -> None:
    assert FMT.response_texts(json.dumps(ANSWER).encode()) == [
        (("thought", 0), "Checking the mail"),
        (("text", 0), "Write to jane.doe@example.com 🙂"),
        (("function_name", 0), "send_mail"),
        (("function", 0), '{"to":"jane.doe@example.com"}'),
        (("code", 0), "print('jane')"),
        (("code_result", 0), "jane\n"),
    ]


def test_rewrite_response_puts_masks_back_into_their_parts_and_the_sdk_reads_it() -> None:
    body = FMT.rewrite_response(json.dumps(ANSWER).encode(), {
        ("text", 0): "Write to {EMAIL} 🙂",
        ("function", 0): '{"to":"{EMAIL}"}',
        ("thought", 0): "Checking the {THING}",
    })
    parts = json.loads(body)["candidates"][0]["content"]["parts"]
    # The mask starts in the first part: it gets the replacement whole, the second its rest.
    assert [p.get("text") for p in parts[1:3]] == ["Write to {EMAIL}", " 🙂"]
    response = gemini_client(body, json_body=True).models.generate_content(model=MODEL,
                                                                            contents="hi")
    assert response.text == "Write to {EMAIL} 🙂"
    assert response.function_calls is not None
    assert response.function_calls[0].args == {"to": "{EMAIL}"}
    assert response.candidates is not None and response.candidates[0].content is not None
    assert response.candidates[0].content.parts is not None
    assert response.candidates[0].content.parts[0].text == "Checking the {THING}"
    assert response.candidates[0].content.parts[0].thought is True
    assert response.usage_metadata is not None
    assert response.usage_metadata.total_token_count == 42


def test_rewrite_response_rejects_what_it_cannot_do() -> None:
    body = json.dumps(ANSWER).encode()
    with pytest.raises(ValueError, match="no longer JSON"):
        FMT.rewrite_response(body, {("function", 0): '{"to": {EMAIL'})
    with pytest.raises(ValueError, match="no such channels"):
        FMT.rewrite_response(body, {("text", 7): "x"})
    with pytest.raises(ValueError):
        FMT.rewrite_response(b"not json", {("text", 0): "x"})
    with pytest.raises(ValueError):
        FMT.rewrite_response(b"{}", {("no such channel", 0): "x"})


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[]", b"{}", b'{"candidates": 3}',
                                 b"[1, null]", b'{"candidates": [{"content": 3}]}'])
def test_response_texts_of_garbage_is_empty(raw: bytes) -> None:
    assert FMT.response_texts(raw) == []


#: ``:streamGenerateContent`` without ``alt=sse``: a JSON array of responses.
ARRAY_ANSWER: list[dict[str, Any]] = [
    chunk(candidate({"text": "Mail jane.doe@"}), modelVersion=MODEL, responseId=RESPONSE_ID),
    chunk(candidate({"text": "example.com"}, {"text": " today"}),
          modelVersion=MODEL, responseId=RESPONSE_ID),
    chunk(candidate({"text": "."}, finishReason="STOP"), modelVersion=MODEL,
          responseId=RESPONSE_ID, usageMetadata={"totalTokenCount": 20}),
]


def test_array_answer_channels_continue_across_elements() -> None:
    body = json.dumps(ARRAY_ANSWER).encode()
    assert FMT.response_texts(body) == [(("text", 0), "Mail jane.doe@example.com today.")]
    rewritten = json.loads(FMT.rewrite_response(body, {("text", 0): "Mail {EMAIL} today."}))
    assert isinstance(rewritten, list) and len(rewritten) == 3
    texts = [[p["text"] for p in element["candidates"][0]["content"]["parts"]]
             for element in rewritten]
    assert texts == [["Mail {EMAIL}"], ["", " today"], ["."]]
    assert rewritten[2]["candidates"][0]["finishReason"] == "STOP"


def test_soft_block_of_an_array_answer_is_an_array() -> None:
    body = FMT.soft_block_response(json.dumps(ARRAY_ANSWER).encode(), SOFT_MESSAGE)
    (answer,) = json.loads(body)
    assert answer["candidates"] == [{"content": {"parts": [{"text": SOFT_MESSAGE}],
                                                 "role": "model"},
                                     "finishReason": "SAFETY", "index": 0}]
    assert answer["modelVersion"] == MODEL and answer["responseId"] == RESPONSE_ID
    assert answer["usageMetadata"] == {"totalTokenCount": 20}


@pytest.mark.parametrize("original", [json.dumps(ANSWER).encode(), None, b"garbage", b"[]"])
def test_soft_block_response_parsed_by_the_sdk(original: bytes | None) -> None:
    body = FMT.soft_block_response(original, SOFT_MESSAGE)
    if original == b"[]":
        (payload,) = json.loads(body)
        body = json.dumps(payload).encode()
    response = gemini_client(body, json_body=True).models.generate_content(model=MODEL,
                                                                            contents="hi")
    assert response.text == SOFT_MESSAGE
    assert response.candidates is not None and len(response.candidates) == 1
    assert response.candidates[0].finish_reason == types.FinishReason.SAFETY
    assert response.function_calls is None
    parsed = types.GenerateContentResponse.model_validate(json.loads(body))
    assert parsed.text == SOFT_MESSAGE
    if original == json.dumps(ANSWER).encode():
        assert response.model_version == MODEL
        assert response.response_id == RESPONSE_ID
        assert response.usage_metadata is not None
        assert response.usage_metadata.total_token_count == 42


def test_soft_block_response_covers_every_candidate() -> None:
    answer = chunk(candidate({"text": "a"}, index=0), candidate({"text": "b"}, index=1))
    body = json.loads(FMT.soft_block_response(json.dumps(answer).encode(), "no"))
    assert [c["index"] for c in body["candidates"]] == [0, 1]
    assert {c["finishReason"] for c in body["candidates"]} == {"SAFETY"}


# --------------------------------------------------------------------------- error bodies


@pytest.mark.parametrize(("kind", "status", "message", "error_class", "status_name"), [
    (ErrorKind.VIOLATION, 400, VIOLATION_MESSAGE, errors.ClientError, "INVALID_ARGUMENT"),
    (ErrorKind.UNAVAILABLE, 503, UNAVAILABLE_MESSAGE, errors.ServerError, "UNAVAILABLE"),
    (ErrorKind.TOO_LARGE, 413, "Request too large for the guardrail", errors.ClientError,
     "INVALID_ARGUMENT"),
    (ErrorKind.UNREADABLE, 415, "Request body could not be read by the guardrail",
     errors.ClientError, "INVALID_ARGUMENT"),
    (ErrorKind.INVALID, 400, "Request body is not valid JSON the guardrail can read",
     errors.ClientError, "INVALID_ARGUMENT"),
    (ErrorKind.UNRECOGNISED, 403, "Request not recognised by the guardrail",
     errors.ClientError, "PERMISSION_DENIED"),
])
def test_error_body_raises_in_the_sdk(kind: str, status: int, message: str,
                                      error_class: type[errors.APIError],
                                      status_name: str) -> None:
    got, body = FMT.error_body(kind)
    assert got == status
    payload = json.loads(body)
    assert list(payload) == ["error"]
    assert payload["error"]["details"][0]["reason"] == kind.upper()
    client = gemini_client(body, status=status, json_body=True)
    with pytest.raises(error_class) as caught:
        client.models.generate_content(model=MODEL, contents="hi")
    assert caught.value.code == status
    assert caught.value.message == message
    assert caught.value.status == status_name


@pytest.mark.parametrize("kind", ["guardrail_exploded", "", "VIOLATION"])
def test_unknown_error_kind_is_rejected(kind: str) -> None:
    with pytest.raises(KeyError):
        FMT.error_body(kind)
    with pytest.raises(KeyError):
        FMT.stream_codec().terminal_frame(kind)


# --------------------------------------------------------------------------- stream: basics


def test_stream_decoder() -> None:
    decoder = FMT.stream_decoder("text/event-stream; charset=utf-8")
    assert isinstance(decoder, SSEDecoder) and isinstance(decoder, GeminiSSEDecoder)
    # google-genai raises on an SSE comment (see test_the_sdk_raises_on_an_sse_comment).
    assert decoder.keepalive is None
    assert FMT.stream_decoder("application/json") is None
    assert FMT.stream_decoder("application/json; charset=utf-8") is None


def test_the_recording_is_read_by_the_sdk() -> None:
    chunks, raised = read_stream(RECORDING)
    assert raised is None
    assert shown(chunks) == TEXT
    assert thoughts(chunks) == THOUGHT
    assert chunks[-1].candidates is not None
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 13, 64, None])
def test_clean_events_pass_byte_for_byte(chunk_size: int | None) -> None:
    events = decode(RECORDING, chunk_size=chunk_size)
    assert len(events) == 4
    codec = FMT.stream_codec()
    found = [codec.extract(event) for event in events]
    assert joined([pair for pairs in found for pair in pairs]) == {("thought", 0): THOUGHT,
                                                                  ("text", 0): TEXT}
    assert b"".join(codec.rewrite(event, {}) for event in events) == RECORDING


def test_text_ended_after_the_finish() -> None:
    codec = FMT.stream_codec()
    ended = []
    for event in decode(RECORDING):
        codec.extract(event)
        ended.append(codec.text_ended)
    assert ended == [False, False, False, True]
    # The same text after the end: a misbehaving upstream withdraws it.
    codec.extract(dataclasses.replace(decode(RECORDING)[1]))
    assert not codec.text_ended


def test_text_ended_waits_for_every_candidate() -> None:
    codec = FMT.stream_codec()
    a0, b1, f0, f1 = events_of(chunk(candidate({"text": "a"}, index=0)),
                               chunk(candidate({"text": "b"}, index=1)),
                               chunk(candidate({"text": "c"}, index=0, finishReason="STOP")),
                               chunk(candidate(index=1, finishReason="MAX_TOKENS")))
    for event in (a0, b1, f0):
        codec.extract(event)
    assert not codec.text_ended
    codec.extract(f1)
    assert codec.text_ended


# --------------------------------------------------------------------------- stream: frames


@pytest.mark.parametrize(("kind", "message", "error_class", "code"), [
    (ErrorKind.VIOLATION, VIOLATION_MESSAGE, errors.ClientError, 400),
    (ErrorKind.UNAVAILABLE, UNAVAILABLE_MESSAGE, errors.ServerError, 503),
])
@pytest.mark.parametrize("released", [0, 1, 2, 3])
def test_terminal_frame_raises_in_the_sdk_after_the_released_events(
        kind: str, message: str, error_class: type[errors.APIError], code: int,
        released: int) -> None:
    body = stream_of(RECORDING, released, lambda c: c.terminal_frame(kind), chunk_size=5)
    chunks, raised = read_stream(body)
    assert isinstance(raised, error_class)
    assert raised.message == message
    assert raised.code == code
    assert len(chunks) == released  # mid-stream: after the chunks released, in order
    assert TEXT.startswith(shown(chunks))
    if released >= 2:
        assert shown(chunks).startswith("Bonjour ! Voici un résumé")


def test_terminal_frame_is_one_event_in_the_streams_line_endings() -> None:
    codec = FMT.stream_codec()
    for event in decode(RECORDING):
        codec.extract(event)
    frame = codec.terminal_frame(ErrorKind.VIOLATION)
    assert frame.endswith(b"}\r\n\r\n") and frame.startswith(b'data: {"error": {"code": 400,')
    (event,) = decode(frame)
    assert event.raw == frame
    assert codec.extract(event) == []
    lf = FMT.stream_codec()
    lf.extract(decode(b'data: {"candidates": []}\n\n')[0])
    assert lf.terminal_frame(ErrorKind.VIOLATION).endswith(b"}\n\n")


@pytest.mark.parametrize("released", [0, 1, 2, 3, 4])
def test_soft_block_ends_the_stream_normally(released: int) -> None:
    body = stream_of(RECORDING, released, lambda c: c.soft_block_frame(SOFT_MESSAGE))
    chunks, raised = read_stream(body)
    assert raised is None
    assert len(chunks) == released + 1
    last = chunks[-1]
    assert last.text == SOFT_MESSAGE
    assert last.candidates is not None
    assert last.candidates[0].finish_reason == types.FinishReason.SAFETY
    assert shown(chunks).endswith(SOFT_MESSAGE)
    assert TEXT.startswith(shown(chunks)[:-len(SOFT_MESSAGE)])
    # The soft block continues the stream: the same model version and response id.
    assert {c.model_version for c in chunks} == {MODEL}
    assert {c.response_id for c in chunks} == {RESPONSE_ID}
    assert body.endswith(b"}\r\n\r\n")


def test_soft_block_frame_of_a_fresh_codec() -> None:
    frame = FMT.stream_codec().soft_block_frame(SOFT_MESSAGE)
    events = decode(frame, chunk_size=3)
    assert b"".join(e.raw for e in events) == frame
    assert joined(extract_all(FMT.stream_codec(), events)) == {("text", 0): SOFT_MESSAGE}
    chunks, raised = read_stream(frame)
    assert raised is None and shown(chunks) == SOFT_MESSAGE


def test_soft_block_covers_the_open_candidates() -> None:
    events = events_of(chunk(candidate({"text": "a"}, index=0), candidate({"text": "b"}, index=1),
                             modelVersion=MODEL),
                       chunk(candidate({"text": "c"}, index=1, finishReason="STOP")))
    codec = FMT.stream_codec()
    extract_all(codec, events)
    for event in events:
        codec.rewrite(event, {})
    (frame,) = decode(codec.soft_block_frame("no"))
    payload = json.loads(frame.data or "")
    assert [c["index"] for c in payload["candidates"]] == [0]  # candidate 1 already finished
    assert payload["modelVersion"] == MODEL


# --------------------------------------------------------------------------- stream: masking


def test_masked_stream_reaches_the_sdk_rewritten() -> None:
    events = decode(RECORDING, chunk_size=11)
    body = release(FMT.stream_codec(), events, upper_mask)
    chunks, raised = read_stream(body)
    assert raised is None
    assert shown(chunks) == TEXT.upper()
    assert thoughts(chunks) == THOUGHT.upper()
    assert body.count(b"\r\n\r\n") == 4  # rewritten events keep Google's line endings
    # Everything else of an event is kept: ids, usage, the thought signature.
    first_text = json.loads(decode(body)[1].data or "")
    assert first_text["candidates"][0]["content"]["parts"][0]["thoughtSignature"] == \
        "CiQB0e2Kb3xJ"
    assert first_text["responseId"] == RESPONSE_ID


def test_a_mask_over_two_parts_of_one_event_stays_in_place() -> None:
    (event,) = events_of(chunk(candidate({"text": "Mail jane@"}, {"text": "example.com"},
                                         {"text": " now"})))
    codec = FMT.stream_codec()
    assert codec.extract(event) == [(("text", 0), "Mail jane@example.com now")]
    out = json.loads(decode(codec.rewrite(event, {("text", 0): "Mail {EMAIL} now"}))[0].data
                     or "")
    assert [p["text"] for p in out["candidates"][0]["content"]["parts"]] == [
        "Mail {EMAIL}", "", " now"]


def test_masked_function_args_in_a_stream() -> None:
    call = {"functionCall": {"name": "send_mail", "args": {"to": "jane@example.com"}}}
    (event,) = events_of(chunk(candidate(call)))
    codec = FMT.stream_codec()
    assert codec.extract(event) == [(("function_name", 0), "send_mail"),
                                    (("function", 0), '{"to":"jane@example.com"}')]
    out = json.loads(decode(codec.rewrite(event, {("function", 0): '{"to":"{EMAIL}"}'}))[0]
                     .data or "")
    assert out["candidates"][0]["content"]["parts"][0]["functionCall"]["args"] == {
        "to": "{EMAIL}"}
    # A mask that breaks the JSON leaves the call without arguments, never the original ones.
    codec = FMT.stream_codec()
    codec.extract(event)
    out = json.loads(decode(codec.rewrite(event, {("function", 0): '{"to":{EMAIL'}))[0].data
                     or "")
    assert out["candidates"][0]["content"]["parts"][0]["functionCall"]["args"] == {}


def test_masked_text_drops_the_logprobs_that_repeat_it() -> None:
    logprobs = {"chosenCandidates": [{"token": "Jane", "logProbability": -0.1}],
                "topCandidates": [{"candidates": [{"token": "Jane"}, {"token": "Bob"}]}]}
    (event,) = events_of(chunk(candidate({"text": "Jane"}, logprobsResult=logprobs)))
    codec = FMT.stream_codec()
    # The chosen tokens are the text: not checked twice; the alternative is checked.
    assert codec.extract(event) == [(("text", 0), "Jane"), (("top_logprobs", 0), "Bob\n")]
    out = json.loads(decode(codec.rewrite(event, {("text", 0): "{NAME}"}))[0].data or "")
    assert out["candidates"][0]["logprobsResult"] is None
    assert out["candidates"][0]["content"]["parts"][0]["text"] == "{NAME}"


def test_logprob_tokens_that_are_not_the_text_are_checked() -> None:
    logprobs = {"chosenCandidates": [{"token": "secret"}]}
    (event,) = events_of(chunk(candidate({"text": "other"}, logprobsResult=logprobs)))
    codec = FMT.stream_codec()
    assert codec.extract(event) == [(("text", 0), "other"), (("logprobs", 0), "secret")]
    out = json.loads(decode(codec.rewrite(event, {("logprobs", 0): "{X}"}))[0].data or "")
    assert out["candidates"][0]["logprobsResult"] is None
    assert out["candidates"][0]["content"]["parts"][0]["text"] == "other"


def test_grounding_segments_repeat_the_answer_and_are_checked() -> None:
    grounding = {"groundingSupports": [{"segment": {"startIndex": 0, "endIndex": 16,
                                                    "text": "Call jane@ex.com"},
                                        "groundingChunkIndices": [0]}],
                 "groundingChunks": [{"web": {"uri": "https://x.test", "title": "x.test"}}]}
    (event,) = events_of(chunk(candidate({"text": "Call jane@ex.com"},
                                         groundingMetadata=grounding)))
    codec = FMT.stream_codec()
    assert codec.extract(event) == [(("text", 0), "Call jane@ex.com"),
                                    (("grounding", 0), "Call jane@ex.com")]
    out = json.loads(decode(codec.rewrite(event, {("text", 0): "Call {EMAIL}",
                                                  ("grounding", 0): "Call {EMAIL}"}))[0].data
                     or "")
    assert out["candidates"][0]["groundingMetadata"]["groundingSupports"][0]["segment"][
        "text"] == "Call {EMAIL}"
    body = json.dumps(chunk(candidate({"text": "Call jane@ex.com"},
                                      groundingMetadata=grounding))).encode()
    assert (("grounding", 0), "Call jane@ex.com") in FMT.response_texts(body)


# --------------------------------------------------------------------------- stream: readings


@pytest.mark.parametrize(("part", "channel"), [
    ({"text": "x", "thought": True}, "thought"),
    ({"text": "x", "thought": "yes"}, "thought"),  # pydantic's lax bool, as the SDK reads it
    ({"text": "x", "thought": 1}, "thought"),
    ({"text": "x", "thought": "false"}, "text"),
    ({"text": "x", "thought": False}, "text"),
    ({"text": "x", "thought": None}, "text"),
])
def test_thought_parts_as_the_sdk_reads_them(part: dict[str, Any], channel: str) -> None:
    (event,) = events_of(chunk(candidate(part)))
    assert FMT.stream_codec().extract(event) == [((channel, 0), "x")]
    chunks, _ = read_stream(event.raw)
    assert (chunks[0].text == "x") is (channel == "text")


def test_a_candidate_without_index_is_candidate_0() -> None:
    events = events_of(chunk(candidate({"text": "Hel"}, index=None)),
                       chunk({"content": {"parts": [{"text": "lo"}]}, "index": None}),
                       chunk(candidate({"text": "!"}, index=0)))
    assert joined(extract_all(FMT.stream_codec(), events)) == {("text", 0): "Hello!"}


def test_first_candidates_changing_index_are_also_read_joined() -> None:
    # The SDK shows ``candidates[0]`` of each chunk, whatever its index: "baz" + "inga".
    events = events_of(chunk(candidate({"text": "say baz"}, index=0)),
                       chunk(candidate({"text": "inga now"}, index=1)),
                       chunk(candidate({"text": "!"}, index=0)))
    chunks, _ = read_stream(b"".join(e.raw for e in events))
    assert shown(chunks) == "say bazinga now!"
    codec = FMT.stream_codec()
    found = extract_all(codec, events)
    assert joined(found) == {("text", 0): "say baz!", ("text", 1): "inga now",
                             ("first", "text"): "say bazinga now!"}
    # A mask of the joined reading reaches the chunk it came from.
    codec = FMT.stream_codec()
    per_event = [codec.extract(e) for e in events]
    assert per_event[1][-1] == (("first", "text"), "say bazinga now")
    out = [codec.rewrite(events[0], {}),
           codec.rewrite(events[1], {("first", "text"): "say {WORD} now"}),
           codec.rewrite(events[2], {})]
    assert json.loads(decode(out[1])[0].data or "")["candidates"][0]["content"]["parts"][0][
        "text"] == "{WORD} now"


def test_array_answers_first_candidates_changing_index_are_read_joined() -> None:
    body = json.dumps([chunk(candidate({"text": "baz"}, index=0)),
                       chunk(candidate({"text": "inga"}, index=1))]).encode()
    assert FMT.response_texts(body) == [(("text", 0), "baz"), (("text", 1), "inga"),
                                        (("first", "text"), "bazinga")]
    rewritten = json.loads(FMT.rewrite_response(body, {("first", "text"): "{WORD}"}))
    assert [e["candidates"][0]["content"]["parts"][0]["text"] for e in rewritten] == [
        "{WORD}", ""]
    with pytest.raises(ValueError, match="disagree"):
        FMT.rewrite_response(body, {("text", 1): "in{X}", ("first", "text"): "{WORD}"})


def test_partial_args_are_read_per_json_path() -> None:
    events = events_of(
        chunk(candidate({"functionCall": {"name": "mail", "willContinue": True, "partialArgs": [
            {"jsonPath": "$.body", "stringValue": "Dear Ja", "willContinue": True}]}})),
        chunk(candidate({"functionCall": {"partialArgs": [
            {"jsonPath": "$.body", "stringValue": "ne,"}]}})))
    assert joined(extract_all(FMT.stream_codec(), events)) == {
        ("function_name", 0): "mail", ("function_arg", 0, "$.body"): "Dear Jane,"}


# --------------------------------------------------------------------------- the SDK itself
# What the module docstring says of ``google-genai`` (``_api_client.py``), checked here.

_HELLO = chunk(candidate({"text": "Hello"}), modelVersion=MODEL)


def _sse(*payloads: Any) -> bytes:
    return b"".join(b"data: " + json.dumps(p).encode() + b"\r\n\r\n" for p in payloads)


def test_the_sdk_skips_an_error_that_is_not_the_first_key() -> None:
    # ``request_streamed`` raises only when the chunk's json.dumps starts with '{"error":'.
    other = {"candidates": [candidate({"text": " there"})],
             "error": {"code": 400, "message": "Violated guardrail policy"}}
    chunks, raised = read_stream(_sse(_HELLO, {"x": 1, **_ERROR}, other, _HELLO))
    assert raised is None
    assert len(chunks) == 4
    assert chunks[1].candidates is None  # the error object, read as an empty response
    assert shown(chunks) == "Hello thereHello"  # its candidates are shown, its error dropped
    # So our codec reads the candidates of any object, whatever else it holds.
    assert extract_all(FMT.stream_codec(), decode(_sse(other))) == [(("text", 0), " there")]


_ERROR = {"error": {"code": 400, "message": "Violated guardrail policy",
                    "status": "INVALID_ARGUMENT"}}


def test_the_sdk_raises_on_an_error_first_with_an_int_code() -> None:
    chunks, raised = read_stream(_sse(_HELLO, _ERROR, _HELLO))
    assert isinstance(raised, errors.ClientError)
    assert raised.message == VIOLATION_MESSAGE and raised.status == "INVALID_ARGUMENT"
    assert shown(chunks) == "Hello"
    # With ``error`` first but a code that is not an int, ``raise_error`` compares it with
    # 400 and fails: TypeError, not the guardrail's message (our frames send an int).
    _, raised = read_stream(_sse(_HELLO, {"error": {"code": "400", "message": "m"}}))
    assert isinstance(raised, TypeError)


def test_the_sdk_raises_on_an_sse_comment() -> None:
    # A keep-alive comment is handed to the raw-JSON buffer and fails to parse: no keep-alive.
    chunks, raised = read_stream(_sse(_HELLO) + b": keep-alive\n\n" + _sse(_HELLO))
    assert isinstance(raised, errors.UnknownApiResponseError)
    assert shown(chunks) == "Hello"
    # A blank line alone is skipped (not used: older JavaScript readers stall on it).
    chunks, raised = read_stream(_sse(_HELLO) + b"\r\n" + _sse(_HELLO))
    assert raised is None and shown(chunks) == "HelloHello"


def test_text_in_a_data_array_is_skipped_by_the_sdk_and_checked_apart() -> None:
    hidden = [chunk(candidate({"text": "x jane@example.com"}, finishReason="STOP"))]
    body = _sse(_HELLO, hidden, _HELLO)
    chunks, raised = read_stream(body)
    assert raised is None
    assert shown(chunks) == "HelloHello"  # the array is read as an empty response
    codec = FMT.stream_codec()
    events = decode(body)
    found = [codec.extract(event) for event in events]
    assert found[1] == [(("skipped", "text", 0), "x jane@example.com")]
    assert joined([p for pairs in found for p in pairs])[("text", 0)] == "HelloHello"
    assert not codec.text_ended  # its finish reason is not the client's
    out = codec.rewrite(events[0], {}) + codec.rewrite(
        events[1], {("skipped", "text", 0): "x {EMAIL}"})
    assert json.loads(decode(out)[1].data or "") == [
        chunk(candidate({"text": "x {EMAIL}"}, finishReason="STOP"))]


def test_data_without_its_space_ends_the_sdk_but_is_read_as_whatwg_readers_do() -> None:
    body = _sse(_HELLO) + b"data:" + json.dumps(chunk(candidate({"text": " there"}))).encode() \
        + b"\r\n\r\n"
    chunks, raised = read_stream(body)
    assert isinstance(raised, errors.UnknownApiResponseError)
    assert shown(chunks) == "Hello"
    assert joined(extract_all(FMT.stream_codec(), decode(body))) == {("text", 0): "Hello there"}


def test_the_sdk_splits_lines_at_cr_lf_and_crlf() -> None:
    for ending in (b"\n", b"\r", b"\r\n"):
        body = RECORDING.replace(b"\r\n", ending)
        chunks, raised = read_stream(body)
        assert raised is None and shown(chunks) == TEXT
        assert joined(extract_all(FMT.stream_codec(), decode(body)))[("text", 0)] == TEXT


# --------------------------------------------------------------------------- notes, robustness


@pytest.mark.parametrize("mask", MASKS)
def test_notes_change_no_byte_of_the_recording(mask: str) -> None:
    events = decode(RECORDING, chunk_size=13)
    for released in range(len(events) + 1):
        for schedule in ([True] * len(events), [True, False] * len(events), []):
            noted = drive(FMT.stream_codec(), events, schedule, released, mask)
            reread = drive(Unnoted(FMT.stream_codec()), events, schedule, released, mask)
            assert noted == reread, (released, schedule[:2])
            if mask == "none":
                assert noted[:-2] == [e.raw for e in events[:released]]


def test_an_unchanged_release_parses_no_event_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from extproc.formats import _common

    parsed: list[str | bytes | None] = []
    load_object = _common.load_object

    def counting(data: bytes | str | None) -> dict[str, Any] | None:
        parsed.append(data)
        return load_object(data)

    monkeypatch.setattr(_common, "load_object", counting)
    events = decode(RECORDING)
    codec = FMT.stream_codec()
    found = [codec.extract(event) for event in events]
    parsed.clear()
    assert b"".join(codec.rewrite(event, {}) for event in events) == RECORDING
    assert parsed == []
    codec = FMT.stream_codec()
    found = [codec.extract(event) for event in events]
    parsed.clear()
    codec.rewrite(events[0], {channel: "X" for channel, _ in found[0]})
    assert parsed == [events[0].data]


def test_events_without_json_pass_unchanged() -> None:
    odd = decode(b": keep-alive\n\ndata: not json\n\nevent: ping\n\ndata: [DONE]\n\n"
                 b"data: [1, {\"a\": 2}]\n\n")
    codec = FMT.stream_codec()
    assert extract_all(codec, odd) == []
    assert b"".join(codec.rewrite(e, {}) for e in odd) == b"".join(e.raw for e in odd)


_FIELDS = ["candidates", "content", "parts", "text", "thought", "index", "finishReason",
           "functionCall", "args", "name", "partialArgs", "stringValue", "jsonPath",
           "executableCode", "code", "codeExecutionResult", "output", "groundingMetadata",
           "groundingSupports", "segment", "logprobsResult", "chosenCandidates",
           "topCandidates", "token", "error", "modelVersion", "responseId"]
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.text(max_size=5),
                     st.sampled_from(["STOP", "SAFETY", "yes", "$.a"]))
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(_FIELDS), inner, max_size=4)),
    max_leaves=14)
_PAYLOADS = st.one_of(
    st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=5),
    st.lists(st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=3), max_size=2),
    st.builds(lambda text, index, thought, finish: chunk(
        candidate({"text": text, "thought": thought}, index=index, finishReason=finish)),
        st.text(max_size=4), st.one_of(st.none(), st.integers(0, 2)),
        st.sampled_from([None, True, "yes", 0]), st.sampled_from([None, "STOP"])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(_PAYLOADS, max_size=10), schedule=st.lists(st.booleans(), max_size=20),
       released=st.integers(0, 10), mask=st.sampled_from(sorted(MASKS)))
def test_codec_survives_malformed_events(payloads: list[Any], schedule: list[bool],
                                         released: int, mask: str) -> None:
    events = decode(_sse(*payloads) + b": comment\n\ndata: not json\n\n")
    released = min(released, len(events))
    noted = drive(FMT.stream_codec(), events, schedule, released, mask)
    assert noted == drive(Unnoted(FMT.stream_codec()), events, schedule, released, mask)
    for frame in noted[-2:]:
        decoded = decode(frame)
        assert b"".join(e.raw for e in decoded) == frame
        assert all(e.data is not None for e in decoded)
    out = release(FMT.stream_codec(), events, upper_mask)
    assert isinstance(out, bytes)
    # Every masked channel reaches the bytes: re-reading them gives the masked text.
    masked = joined(extract_all(FMT.stream_codec(), decode(out)))
    for channel, text in joined(extract_all(FMT.stream_codec(), events)).items():
        if isinstance(channel, tuple) and channel[0] in ("text", "thought", "code"):
            assert masked.get(channel) == text.upper()


@settings(max_examples=150, deadline=None)
@given(payload=st.one_of(_PAYLOADS, st.lists(_PAYLOADS, max_size=3)))
def test_non_streamed_answers_survive_malformed_bodies(payload: Any) -> None:
    body = json.dumps(payload).encode()
    texts = FMT.response_texts(body)
    for channel, text in texts:
        hash(channel)
        assert text
    identity = FMT.rewrite_response(body, dict(texts))
    assert FMT.response_texts(identity) == texts
    soft = json.loads(FMT.soft_block_response(body, "no"))
    first = soft[0] if isinstance(soft, list) else soft
    assert first["candidates"][0]["finishReason"] == "SAFETY"


def test_channel_keys_are_hashable_for_odd_indexes() -> None:
    for odd in ([1], {"a": 1}, True, "2", 1.5):
        (event,) = events_of(chunk(candidate({"text": "a"}, index=odd)))
        found = FMT.stream_codec().extract(event)
        assert found and all(hash(channel) is not None for channel, _ in found)


def test_events_extract_never_saw_are_read_by_rewrite() -> None:
    # Rewriting events extract never saw (a caller that checks no text) reads them itself.
    codec = FMT.stream_codec()
    events = decode(RECORDING)
    assert b"".join(codec.rewrite(e, {}) for e in events) == RECORDING
    (frame,) = decode(codec.soft_block_frame("no"))
    assert json.loads(frame.data or "")["candidates"] == [
        {"content": {"parts": [{"text": "no"}], "role": "model"}, "finishReason": "SAFETY",
         "index": 0}]


# --------------------------------------------------------------------------- stream: raw JSON lines


def _read_all(body: bytes, chunk_size: int | None = None) -> list[SSEEvent]:
    decoder = FMT.stream_decoder("text/event-stream")
    assert decoder is not None
    step = chunk_size or len(body) or 1
    events: list[SSEEvent] = []
    for at in range(0, len(body), step):
        events += decoder.feed(body[at:at + step], end_of_stream=at + step >= len(body))
    leftover = decoder.flush()
    if leftover:
        last = decoder.last(leftover)
        if last is not None:
            events.append(last)
    assert b"".join(e.raw for e in events) == body
    return events


_PLAIN = b"data: " + json.dumps(chunk(candidate({"text": "Hello "}))).encode() + b"\r\n\r\n"
_RAW = json.dumps(chunk(candidate({"text": 'secret {with} "braces"'}))).encode()


@pytest.mark.parametrize(("name", "body"), [
    ("one line", _PLAIN + _RAW + b"\r\n\r\n"),
    ("two lines", _PLAIN + _RAW[:30] + b"\n" + _RAW[30:] + b"\n\n"),
    ("across a blank line", _PLAIN + _RAW[:30] + b"\r\n\r\n" + _RAW[30:] + b"\r\n\r\n"),
    ("a lone CR", _PLAIN + _RAW[:25] + b"\r" + _RAW[25:] + b"\r\r"),
    ("unterminated", _PLAIN + _RAW),
])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_gemini_raw_json_lines_are_read_as_the_sdk_reads_them(
        name: str, body: bytes, chunk_size: int | None) -> None:
    """Regression (issue 15 review): google-genai shows an answer sent as JSON lines without
    ``data: `` (SSE readers skip them as unknown fields); the decoder passed them unread."""
    chunks, raised = read_stream(body)
    assert raised is None
    assert shown(chunks) == 'Hello secret {with} "braces"'
    codec = FMT.stream_codec()
    found = [pair for event in _read_all(body, chunk_size) for pair in codec.extract(event)]
    assert joined(found) == {("text", 0): 'Hello secret {with} "braces"'}


def test_gemini_raw_json_line_is_masked_as_a_data_event() -> None:
    events = _read_all(_PLAIN + _RAW + b"\r\n\r\n")
    codec = FMT.stream_codec()
    extract_all(codec, events)
    rewritten = codec.rewrite(events[1], {("text", 0): "masked"})
    chunks, raised = read_stream(codec.rewrite(events[0], {}) + rewritten)
    assert raised is None and shown(chunks) == "Hello masked"
    assert b"secret" not in rewritten


@pytest.mark.parametrize("body", [
    b"data: " + _RAW + b"\r\n" + _RAW + b"\r\n\r\n",  # SSE data and a chunk in one event
    _RAW + b"\r\n" + _RAW + b"\r\n\r\n",  # two chunks in one event
])
def test_gemini_an_event_with_two_readings_is_refused(body: bytes) -> None:
    decoder = FMT.stream_decoder("text/event-stream")
    assert decoder is not None
    with pytest.raises(ValueError, match="google-genai"):
        decoder.feed(body, end_of_stream=True)


@pytest.mark.parametrize("line", [b": keep-alive", b"event: x", b"id: 7", b"data:{}",
                                  b'{"candidates": [', b"not json"])
def test_gemini_lines_the_sdk_cannot_parse_add_nothing(line: bytes) -> None:
    events = _read_all(_PLAIN + line + b"\r\n\r\n")
    codec = FMT.stream_codec()
    found = [pair for event in events for pair in codec.extract(event)]
    assert joined(found) == {("text", 0): "Hello "}


# --------------------------------------------------------------------------- members read by rule


def test_gemini_unknown_part_and_candidate_members_are_read_by_rule() -> None:
    """Regression (issue 15 review): ``toolCall.args``, ``audioTranscription.text`` and
    ``finishMessage`` passed unread; members the format does not know are read by rule."""
    payload = chunk(candidate({"toolCall": {"name": "search", "args": {"query": "secret q"}}},
                              {"audioTranscription": {"text": "heard secret"}},
                              {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo" * 8}},
                              {"text": "plain", "thoughtSignature": "c2lnbmF0dXJl"},
                              finishMessage="finish secret"))
    codec = FMT.stream_codec()
    (event,) = events_of(payload)
    found = dict(codec.extract(event))
    assert found == {
        ("text", 0): "plain",
        ("unknown", 0, "part", "toolCall", "name"): "search",
        ("unknown", 0, "part", "toolCall", "args", "query"): "secret q",
        ("unknown", 0, "part", "audioTranscription", "text"): "heard secret",
        ("unknown", 0, "finishMessage"): "finish secret",
    }
    rewritten = codec.rewrite(event, {k: v.replace("secret", "XX") for k, v in found.items()})
    assert b"secret" not in rewritten and rewritten.count(b"XX") == 3
    # Whole answers read the same members.
    assert dict(FMT.response_texts(json.dumps(payload).encode())) == found
