"""The fake LLM's provider-native answers: Ollama, Google Gemini (and Vertex AI), AWS Bedrock.

``testkit.upstream.FakeLLM``'s default model answers OpenAI Chat Completions itself and hands
every other API it speaks to this module: :func:`match_route` recognises a request's path,
:func:`user_text` reads the last user text of its body (the fake answers it with
``answer_for``), and :func:`build_reply` turns the answer, already cut into word-sized
pieces, into the body writes (one per streamed event, line or frame) or the one JSON body the
provider itself sends. Everything here is a pure function of its arguments (ids and clocks
can be passed in; by default they are made up), so the exact bytes can be checked offline.

What is spoken, byte for byte as the providers write it:

* **Ollama** ``POST /api/chat`` and ``/api/generate`` (``stream`` true unless the body says
  ``false``): ``application/x-ndjson``, one compact JSON object per line with Go's field order
  and escaping (``<``, ``>``, ``&`` as ``\\u003c``...), ``created_at`` RFC 3339 in UTC with
  nanoseconds (trailing zeros trimmed, as Go's ``RFC3339Nano``); the last line has empty
  content, ``"done":true,"done_reason":"stop"`` and the duration/count fields (generate also
  ``context``). Not streamed: that last object with the whole text (``application/json;
  charset=utf-8``).
* **Gemini** ``POST .../models/{m}:streamGenerateContent?alt=sse`` (``data: {json}\\r\\n\\r\\n``
  events, Google's ``": "`` / ``","`` spacing, no terminator, ``finishReason`` on the last),
  ``:streamGenerateContent`` without ``alt=sse`` (a pretty-printed JSON array written element
  by element, ``"\\n,\\r\\n"`` between elements) and ``:generateContent`` (one pretty-printed
  response); Vertex AI's ``/v1/projects/{p}/locations/{l}/publishers/google/models/{m}:...``
  add ``createTime`` and ``usageMetadata.trafficType`` as Vertex does.
* **Bedrock Runtime** ``POST /model/{modelId}/converse`` (``ConverseResponse``, keys in AWS's
  alphabetical order), ``/converse-stream`` (an AWS event stream: ``messageStart``,
  ``contentBlockDelta`` per piece, ``contentBlockStop``, ``messageStop``, ``metadata``, each
  payload with Bedrock's ``p`` padding), ``/invoke`` and ``/invoke-with-response-stream`` with
  an Anthropic Messages body (``anthropic_version``): the Messages JSON, or ``chunk`` events
  ``{"bytes": <base64 of each Anthropic streaming event>, "p": ...}`` ending with
  ``message_stop`` carrying ``amazon-bedrock-invocationMetrics``. The model id is
  percent-decoded from the path.

A body the provider would refuse gets the provider's own error shape (:func:`error_reply`).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import string
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from extproc.eventstream import CONTENT_TYPE as EVENTSTREAM_CONTENT_TYPE
from extproc.eventstream import event_frame

__all__ = [
    "Reply",
    "Route",
    "anthropic_message",
    "anthropic_stream_events",
    "build_reply",
    "converse_response",
    "converse_stream",
    "error_reply",
    "gemini_array",
    "gemini_response",
    "gemini_sse",
    "go_json",
    "google_json",
    "invoke_stream",
    "match_route",
    "ollama_chat_object",
    "ollama_generate_object",
    "ollama_stream",
    "request_error",
    "rfc3339_nano",
    "user_text",
]

OLLAMA_NDJSON = "application/x-ndjson"
OLLAMA_JSON = "application/json; charset=utf-8"
GOOGLE_SSE = "text/event-stream"
GOOGLE_JSON = "application/json; charset=UTF-8"
AWS_JSON = "application/json"

#: Bedrock pads stream payloads with ``"p"``: a prefix of this alphabet, of varying length.
_PADDING = string.ascii_lowercase + string.ascii_uppercase + string.digits
_BASE62 = string.ascii_letters + string.digits


# --------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """A provider API a request asked for.

    ``provider``: ``ollama``, ``gemini`` or ``bedrock``. ``operation``: ``chat`` /
    ``generate`` (Ollama), ``streamGenerateContent`` / ``generateContent`` (Gemini),
    ``converse`` / ``converse-stream`` / ``invoke`` / ``invoke-with-response-stream``
    (Bedrock). ``model``: the model named by the path (percent-decoded; Ollama names it in
    the body, so ``""``). ``sse``: Gemini's ``alt=sse``. ``vertex``: a Vertex AI path.
    """

    provider: str
    operation: str
    model: str = ""
    sse: bool = False
    vertex: bool = False

    @property
    def streamed_by_path(self) -> bool:
        """Whether the path itself asks for a stream (Ollama decides in the body)."""
        return self.operation in (
            "streamGenerateContent", "converse-stream", "invoke-with-response-stream")


_GEMINI_PATH = re.compile(
    r"/models/(?P<model>[^/:]+):(?P<verb>streamGenerateContent|generateContent)$",
    re.IGNORECASE)
_VERTEX_PATH = re.compile(r"/projects/[^/]+/locations/[^/]+/publishers/google/models/[^/:]+:")
_BEDROCK_PATH = re.compile(
    r"/model/(?P<model>.+)/(?P<op>converse-stream|converse|invoke-with-response-stream|invoke)$")


def match_route(method: str, path: str, query: Mapping[str, Sequence[str]]) -> Route | None:
    """The provider route of ``POST path`` (raw, not percent-decoded), or None."""
    if method.upper() != "POST":
        return None
    path = path.rstrip("/")
    if path.endswith(("/api/chat", "/api/generate")):
        return Route("ollama", path.rsplit("/", 1)[1])
    gemini = _GEMINI_PATH.search(path)
    if gemini is not None:
        verb = gemini["verb"].lower()
        operation = "streamGenerateContent" if verb.startswith("stream") else "generateContent"
        alt = [v.lower() for v in query.get("alt", ())]
        return Route("gemini", operation, unquote(gemini["model"]),
                     sse=operation == "streamGenerateContent" and "sse" in alt,
                     vertex=_VERTEX_PATH.search(path) is not None)
    bedrock = _BEDROCK_PATH.search(path)
    if bedrock is not None:
        return Route("bedrock", bedrock["op"], unquote(bedrock["model"]))
    return None


# --------------------------------------------------------------------------
# Reading requests
# --------------------------------------------------------------------------


def _text_of(content: Any, *, typed: bool) -> str:
    """A message's text: a string, or its text blocks (``type: text`` when ``typed``, else
    Converse's ``{"text": ...}`` blocks) joined with spaces."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts: list[str] = []
    for block in content:
        if not isinstance(block, Mapping) or not isinstance(block.get("text"), str):
            continue
        if typed and block.get("type") != "text":
            continue
        texts.append(block["text"])
    return " ".join(texts)


def _gemini_text(content: Mapping[str, Any]) -> str:
    parts = content.get("parts")
    if isinstance(parts, Mapping):  # Google's reader takes one object for a repeated field
        parts = [parts]
    if not isinstance(parts, list):
        return ""
    return "".join(p["text"] for p in parts
                   if isinstance(p, Mapping) and isinstance(p.get("text"), str))


def _messages(doc: Mapping[str, Any], key: str = "messages") -> list[Mapping[str, Any]]:
    found = doc.get(key)
    return [m for m in found if isinstance(m, Mapping)] if isinstance(found, list) else []


def _anthropic_body(route: Route) -> bool:
    return route.provider == "bedrock" and route.operation.startswith("invoke")


def request_error(route: Route, doc: Any) -> str | None:
    """Why the provider would refuse body ``doc`` (parsed JSON, None when it is not JSON), or
    None when it is answered."""
    if not isinstance(doc, dict):
        return "request body is not a JSON object"
    if route.provider == "ollama":
        if route.operation == "chat" and not isinstance(doc.get("messages", []), list):
            return "messages must be a list"
        if route.operation == "generate" and not isinstance(doc.get("prompt", ""), str):
            return "prompt must be a string"
        return None
    if route.provider == "gemini":
        contents = doc.get("contents")
        if not isinstance(contents, list) or not contents:
            return "* GenerateContentRequest.contents: contents is not specified"
        return None
    if _anthropic_body(route):
        if "anthropic_version" not in doc:
            return ("Malformed input request: fake-llm answers InvokeModel only for "
                    "Anthropic Messages bodies (anthropic_version, messages)")
        if not isinstance(doc.get("messages"), list) or not doc["messages"]:
            return "Malformed input request: #: required key [messages] not found"
        return None
    if not isinstance(doc.get("messages"), list):
        return "The model returned the following errors: messages is required"
    return None


def user_text(route: Route, doc: Mapping[str, Any]) -> str:
    """The last user text of a request ``request_error`` accepted."""
    if route.provider == "ollama":
        if route.operation == "generate":
            return str(doc.get("prompt") or "")
        return next((_text_of(m.get("content"), typed=False)
                     for m in reversed(_messages(doc)) if m.get("role") == "user"), "")
    if route.provider == "gemini":
        return next((_gemini_text(c) for c in reversed(_messages(doc, "contents"))
                     if c.get("role") in (None, "", "user")), "")
    return next((_text_of(m.get("content"), typed=_anthropic_body(route))
                 for m in reversed(_messages(doc)) if m.get("role") == "user"), "")


def _prompt_tokens(route: Route, doc: Mapping[str, Any]) -> int:
    """A word count of every prompt text (the fake's token count)."""
    texts: list[str] = []
    if route.provider == "gemini":
        texts = [_gemini_text(c) for c in _messages(doc, "contents")]
        system = doc.get("systemInstruction") or doc.get("system_instruction")
        if isinstance(system, Mapping):
            texts.append(_gemini_text(system))
    elif route.provider == "ollama" and route.operation == "generate":
        texts = [str(doc.get("prompt") or ""), str(doc.get("system") or "")]
    else:
        typed = _anthropic_body(route)
        texts = [_text_of(m.get("content"), typed=typed) for m in _messages(doc)]
        system = doc.get("system")
        texts.append(_text_of(system, typed=typed))
    return max(1, sum(len(t.split()) for t in texts))


# --------------------------------------------------------------------------
# Encodings
# --------------------------------------------------------------------------

_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
               "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPED = re.compile("[<>&\u2028\u2029]")


def go_json(obj: Any) -> str:
    """``obj`` as Go's ``json.Marshal`` writes it (compact, UTF-8, HTML-safe: ``<``, ``>``,
    ``&``, U+2028 and U+2029 escaped). Key order is the mapping's (Go's is the struct's)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return _GO_ESCAPED.sub(lambda m: _GO_ESCAPES[m.group()], text)


def google_json(obj: Any) -> str:
    """One line as Google's servers write stream events: ``": "`` after a key, a bare ``,``
    between items, UTF-8."""
    return json.dumps(obj, separators=(",", ": "), ensure_ascii=False)


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def rfc3339_nano(ns: int) -> str:
    """Go's ``time.RFC3339Nano`` of a UTC time (nanoseconds since the epoch): trailing zeros
    of the fraction trimmed, no fraction when it is zero, ``Z``."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    digits = f"{fraction:09d}".rstrip("0")
    return f"{base}.{digits}Z" if digits else f"{base}Z"


def _google_time(ns: int) -> str:
    """A protobuf ``Timestamp`` as Google's JSON writes it (microseconds here)."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{fraction // 1000:06d}Z"


def _padding(index: int, text: str = "") -> str:
    """Bedrock's ``p``: a prefix of a fixed alphabet whose length hides the payload's."""
    return _PADDING[: 1 + (index * 17 + len(text) * 7 + 5) % len(_PADDING)]


def _random_id(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _response_id() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(17)).decode("ascii").rstrip("=")


# --------------------------------------------------------------------------
# Ollama
# --------------------------------------------------------------------------


def _ollama_metrics(prompt_tokens: int, eval_count: int, delay_ns: int) -> dict[str, int]:
    load = 1_234_567
    prompt_eval = 2_000_000 + prompt_tokens * 150_000
    eval_duration = max(1, eval_count * max(delay_ns, 1_000_000))
    return {
        "total_duration": load + prompt_eval + eval_duration + 3_456_789,
        "load_duration": load,
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": prompt_eval,
        "eval_count": eval_count,
        "eval_duration": eval_duration,
    }


def _ollama_context(prompt: str, answer: str) -> list[int]:
    """Made-up token ids standing for the conversation (generate's ``context``)."""
    return [zlib.crc32(word.encode()) % 151_000 for word in f"{prompt} {answer}".split()]


def ollama_chat_object(model: str, created_ns: int, content: str, *, done: bool,
                       metrics: Mapping[str, int] | None = None) -> dict[str, Any]:
    """One ``ChatResponse`` in Ollama's field order (``api.ChatResponse``)."""
    obj: dict[str, Any] = {"model": model, "created_at": rfc3339_nano(created_ns),
                           "message": {"role": "assistant", "content": content}, "done": done}
    if done:
        obj["done_reason"] = "stop"
        obj.update(metrics or {})
    return obj


def ollama_generate_object(model: str, created_ns: int, response: str, *, done: bool,
                           context: Sequence[int] = (),
                           metrics: Mapping[str, int] | None = None) -> dict[str, Any]:
    """One ``GenerateResponse`` in Ollama's field order (``api.GenerateResponse``)."""
    obj: dict[str, Any] = {"model": model, "created_at": rfc3339_nano(created_ns),
                           "response": response, "done": done}
    if done:
        obj["done_reason"] = "stop"
        if context:
            obj["context"] = list(context)
        obj.update(metrics or {})
    return obj


def ollama_stream(operation: str, model: str, prompt: str, answer: str, pieces: Sequence[str],
                  *, prompt_tokens: int, started_ns: int, delay_ns: int) -> list[bytes]:
    """The NDJSON lines of a streamed ``/api/chat`` or ``/api/generate``: one per piece, then
    the ``done`` line (each line ``created_at`` one delay later)."""
    metrics = _ollama_metrics(prompt_tokens, max(1, len(pieces)), delay_ns)
    objects: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        at = started_ns + (i + 1) * delay_ns
        objects.append(
            ollama_chat_object(model, at, piece, done=False) if operation == "chat"
            else ollama_generate_object(model, at, piece, done=False))
    at = started_ns + (len(pieces) + 1) * delay_ns
    objects.append(
        ollama_chat_object(model, at, "", done=True, metrics=metrics) if operation == "chat"
        else ollama_generate_object(model, at, "", done=True,
                                    context=_ollama_context(prompt, answer), metrics=metrics))
    return [(go_json(obj) + "\n").encode() for obj in objects]


# --------------------------------------------------------------------------
# Gemini
# --------------------------------------------------------------------------


def gemini_response(text: str, *, model: str, response_id: str, prompt_tokens: int,
                    candidates_tokens: int | None, finished: bool, vertex: bool = False,
                    create_time: str | None = None) -> dict[str, Any]:
    """One ``GenerateContentResponse`` in Google's key order. ``candidates_tokens`` None: an
    intermediate stream event (its usage has no ``candidatesTokenCount``)."""
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finished:
        candidate["finishReason"] = "STOP"
    candidate["index"] = 0
    usage: dict[str, Any] = {"promptTokenCount": prompt_tokens}
    if candidates_tokens is not None:
        usage["candidatesTokenCount"] = candidates_tokens
    usage["totalTokenCount"] = prompt_tokens + (candidates_tokens or 0)
    if vertex:
        usage["trafficType"] = "ON_DEMAND"
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt_tokens}]
    if candidates_tokens is not None:
        usage["candidatesTokensDetails"] = [{"modality": "TEXT",
                                             "tokenCount": candidates_tokens}]
    obj: dict[str, Any] = {"candidates": [candidate], "usageMetadata": usage,
                           "modelVersion": model}
    if vertex and create_time is not None:
        obj["createTime"] = create_time
    obj["responseId"] = response_id
    return obj


def _gemini_events(pieces: Sequence[str], answer: str, **kwargs: Any) -> list[dict[str, Any]]:
    pieces = list(pieces) or [""]
    last = len(pieces) - 1
    return [gemini_response(piece, finished=i == last,
                            candidates_tokens=max(1, len(answer.split())) if i == last else None,
                            **kwargs)
            for i, piece in enumerate(pieces)]


def gemini_sse(pieces: Sequence[str], answer: str, **kwargs: Any) -> list[bytes]:
    """``:streamGenerateContent?alt=sse``: one ``data: {json}\\r\\n\\r\\n`` per piece."""
    return [f"data: {google_json(e)}\r\n\r\n".encode()
            for e in _gemini_events(pieces, answer, **kwargs)]


def gemini_array(pieces: Sequence[str], answer: str, **kwargs: Any) -> list[bytes]:
    """``:streamGenerateContent`` without ``alt=sse``: a pretty-printed JSON array, one write
    per element (``[`` before the first, ``\\n,\\r\\n`` before the others, ``\\n]`` after the
    last)."""
    elements = [json.dumps(e, indent=2, ensure_ascii=False)
                for e in _gemini_events(pieces, answer, **kwargs)]
    writes = [("[" if i == 0 else "\n,\r\n") + element for i, element in enumerate(elements)]
    writes[-1] += "\n]"
    return [w.encode() for w in writes]


# --------------------------------------------------------------------------
# Bedrock: Converse
# --------------------------------------------------------------------------


def _usage(prompt_tokens: int, output_tokens: int) -> dict[str, int]:
    return {"inputTokens": prompt_tokens, "outputTokens": output_tokens,
            "totalTokens": prompt_tokens + output_tokens}


def converse_response(answer: str, *, prompt_tokens: int, output_tokens: int,
                      latency_ms: int) -> dict[str, Any]:
    """A ``ConverseResponse``, keys in the alphabetical order Bedrock writes them."""
    return {
        "metrics": {"latencyMs": latency_ms},
        "output": {"message": {"content": [{"text": answer}], "role": "assistant"}},
        "stopReason": "end_turn",
        "usage": _usage(prompt_tokens, output_tokens),
    }


def converse_stream(pieces: Sequence[str], *, prompt_tokens: int, output_tokens: int,
                    latency_ms: int) -> list[bytes]:
    """``ConverseStream``'s event frames: ``messageStart``, a ``contentBlockDelta`` per piece,
    ``contentBlockStop``, ``messageStop``, ``metadata``; payloads compact, keys sorted, with
    the ``p`` padding."""
    events: list[tuple[str, dict[str, Any]]] = [("messageStart", {"role": "assistant"})]
    events += [("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece}})
               for piece in pieces]
    events += [
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("messageStop", {"stopReason": "end_turn"}),
        ("metadata", {"metrics": {"latencyMs": latency_ms},
                      "usage": _usage(prompt_tokens, output_tokens)}),
    ]
    frames: list[bytes] = []
    for i, (name, payload) in enumerate(events):
        padded = {**payload, "p": _padding(i, _compact(payload))}
        frames.append(event_frame(name, json.dumps(padded, separators=(",", ":"),
                                                   ensure_ascii=False, sort_keys=True).encode()))
    return frames


# --------------------------------------------------------------------------
# Bedrock: InvokeModel with Anthropic Messages
# --------------------------------------------------------------------------


def _anthropic_model(model_id: str) -> str:
    """The ``model`` Claude on Bedrock reports: ``us.anthropic.claude-x-20250101-v1:0`` ->
    ``claude-x-20250101`` (an ARN's last segment likewise)."""
    name = model_id.rsplit("/", 1)[-1]
    name = name.split("anthropic.", 1)[-1]
    return re.sub(r"-v\d+(?::\d+)?$", "", name)


def anthropic_message(answer: str, *, model: str, message_id: str, input_tokens: int,
                      output_tokens: int) -> dict[str, Any]:
    """The Anthropic Messages answer of ``InvokeModel``."""
    return {
        "id": message_id, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": answer}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


def anthropic_stream_events(pieces: Sequence[str], *, model: str, message_id: str,
                            input_tokens: int, output_tokens: int,
                            latency_ms: int) -> list[dict[str, Any]]:
    """The Anthropic streaming events Bedrock wraps in ``chunk`` frames, the last one with
    ``amazon-bedrock-invocationMetrics``."""
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "text", "text": ""}},
    ]
    events += [{"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": piece}} for piece in pieces]
    events += [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": output_tokens}},
        {"type": "message_stop", "amazon-bedrock-invocationMetrics": {
            "inputTokenCount": input_tokens, "outputTokenCount": output_tokens,
            "invocationLatency": latency_ms, "firstByteLatency": min(latency_ms, 150)}},
    ]
    return events


def invoke_stream(events: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """``InvokeModelWithResponseStream``'s frames: one ``chunk`` event per model event,
    payload ``{"bytes": <base64 of the event's compact JSON>, "p": <padding>}``."""
    frames: list[bytes] = []
    for i, event in enumerate(events):
        blob = base64.b64encode(_compact(event).encode()).decode("ascii")
        payload = _compact({"bytes": blob, "p": _padding(i, blob)})
        frames.append(event_frame("chunk", payload.encode()))
    return frames


# --------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What to send: ``writes`` are the body writes (one HTTP chunk each when ``streamed``;
    otherwise their concatenation is one fixed-length body). ``headers`` start with the
    content type."""

    status: int
    headers: tuple[tuple[str, str], ...]
    writes: tuple[bytes, ...]
    streamed: bool

    @property
    def content_type(self) -> str:
        return self.headers[0][1]


def _aws_request_id() -> tuple[str, str]:
    return ("x-amzn-requestid", str(uuid.uuid4()))


def error_reply(route: Route, status: int, message: str) -> Reply:
    """A refusal as the provider words it (Ollama ``{"error"}``, Google's ``error`` object,
    AWS's ``message`` with ``x-amzn-errortype``)."""
    if route.provider == "ollama":
        return Reply(status, (("content-type", OLLAMA_JSON),),
                     (go_json({"error": message}).encode(),), False)
    if route.provider == "gemini":
        status_name = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}.get(status, "UNKNOWN")
        body = json.dumps({"error": {"code": status, "message": message,
                                     "status": status_name}}, indent=2) + "\n"
        return Reply(status, (("content-type", GOOGLE_JSON),), (body.encode(),), False)
    error_type = "ValidationException" if status < 500 else "InternalServerException"
    return Reply(status, (("content-type", AWS_JSON), _aws_request_id(),
                          ("x-amzn-errortype", f"{error_type}:")),
                 (_compact({"message": message}).encode(),), False)


def _wants_stream(route: Route, doc: Mapping[str, Any]) -> bool:
    if route.provider == "ollama":
        return doc.get("stream") is not False  # Ollama streams unless told not to
    return route.streamed_by_path


def build_reply(route: Route, doc: Mapping[str, Any], answer: str, pieces: Sequence[str], *,
                delay_ms: float = 0.0, now_ns: int | None = None,
                response_id: str | None = None) -> Reply:
    """The provider's answer ``answer`` (streamed as ``pieces``, ``"".join(pieces) ==
    answer``) to request body ``doc`` (one ``request_error`` accepted). ``delay_ms`` (the
    pause before each write) only shapes reported timings; ``now_ns`` and ``response_id``
    default to the clock and a random id."""
    now = time.time_ns() if now_ns is None else now_ns
    delay_ns = int(delay_ms * 1_000_000)
    prompt_tokens = _prompt_tokens(route, doc)
    output_tokens = max(1, len(answer.split()))
    latency_ms = max(1, round(delay_ms * (len(pieces) + 1)))
    streamed = _wants_stream(route, doc)

    if route.provider == "ollama":
        model = str(doc.get("model") or "llama3.2")
        prompt = user_text(route, doc)
        if streamed:
            writes = ollama_stream(route.operation, model, prompt, answer, pieces,
                                   prompt_tokens=prompt_tokens, started_ns=now,
                                   delay_ns=delay_ns)
            return Reply(200, (("content-type", OLLAMA_NDJSON),), tuple(writes), True)
        metrics = _ollama_metrics(prompt_tokens, max(1, len(pieces)), delay_ns)
        obj = (ollama_chat_object(model, now, answer, done=True, metrics=metrics)
               if route.operation == "chat" else
               ollama_generate_object(model, now, answer, done=True,
                                      context=_ollama_context(prompt, answer),
                                      metrics=metrics))
        return Reply(200, (("content-type", OLLAMA_JSON),), (go_json(obj).encode(),), False)

    if route.provider == "gemini":
        google: dict[str, Any] = {
            "model": route.model, "response_id": response_id or _response_id(),
            "prompt_tokens": prompt_tokens, "vertex": route.vertex,
            "create_time": _google_time(now)}
        if route.operation == "generateContent":
            obj = gemini_response(answer, candidates_tokens=output_tokens, finished=True,
                                  **google)
            body = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
            return Reply(200, (("content-type", GOOGLE_JSON),), (body.encode(),), False)
        if route.sse:
            return Reply(200, (("content-type", GOOGLE_SSE),),
                         tuple(gemini_sse(pieces, answer, **google)), True)
        return Reply(200, (("content-type", GOOGLE_JSON),),
                     tuple(gemini_array(pieces, answer, **google)), True)

    if route.operation == "converse":
        obj = converse_response(answer, prompt_tokens=prompt_tokens,
                                output_tokens=output_tokens, latency_ms=latency_ms)
        return Reply(200, (("content-type", AWS_JSON), _aws_request_id()),
                     (_compact(obj).encode(),), False)
    if route.operation == "converse-stream":
        frames = converse_stream(pieces, prompt_tokens=prompt_tokens,
                                 output_tokens=output_tokens, latency_ms=latency_ms)
        return Reply(200, (("content-type", EVENTSTREAM_CONTENT_TYPE), _aws_request_id()),
                     tuple(frames), True)

    anthropic: dict[str, Any] = {
        "model": _anthropic_model(route.model),
        "message_id": response_id or f"msg_bdrk_01{_random_id(_BASE62, 22)}",
        "input_tokens": prompt_tokens, "output_tokens": output_tokens}
    if route.operation == "invoke":
        obj = anthropic_message(answer, **anthropic)
        return Reply(200, (("content-type", AWS_JSON), _aws_request_id(),
                           ("x-amzn-bedrock-invocation-latency", str(latency_ms)),
                           ("x-amzn-bedrock-output-token-count", str(output_tokens)),
                           ("x-amzn-bedrock-input-token-count", str(prompt_tokens))),
                     (_compact(obj).encode(),), False)
    events = anthropic_stream_events(pieces, latency_ms=latency_ms, **anthropic)
    return Reply(200, (("content-type", EVENTSTREAM_CONTENT_TYPE), _aws_request_id(),
                       ("x-amzn-bedrock-content-type", AWS_JSON)),
                 tuple(invoke_stream(events)), True)
