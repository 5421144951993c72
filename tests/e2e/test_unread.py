"""Nothing on a guarded route passes unread: bodies that Python's ``json`` and the upstream's
parser would read differently, tried through real Envoy and the sidecar process.

Each body carries the demo policy's blocked INPUT word (``bazinga``) where a lenient parser
(Node, Go, an upstream that strips a BOM or reads the first value) would find it, while our
old reading found no prompt and let it through unchecked. Every one must now be refused with a
400 in the API's shape (or blocked as the prompt it is) before anything reaches the upstream.
"""

from __future__ import annotations

import gzip
import json

import pytest

from testkit.upstream import Script
from tests.e2e.conftest import Stack
from tests.e2e.h2raw import post_with_trailers
from tests.e2e.test_chat_stream import client, events
from tests.e2e.test_hostile import fetch
from tests.support import BLOCK_FRAME, chat_request

PROMPT = '{"role":"user","content":"say bazinga now"}'

# name -> a request body a lenient parser reads a prompt from.
DIFFERENTIALS: dict[str, bytes] = {
    # Go's encoding/json replaces invalid UTF-8 with U+FFFD and reads on.
    "invalid_utf8": b'{"model":"demo","stream":true,"note":"\xff\xfe","messages":['
                    + PROMPT.encode() + b"]}",
    # Python refuses integers of more than 4,300 digits; Node and Go read them.
    "long_number": b'{"model":"demo","stream":true,"seed":' + b"1" * 5000
                   + b',"messages":[' + PROMPT.encode() + b"]}",
    # Python's RecursionError; Node and Go read the messages beside it.
    "deep_nesting": b'{"model":"demo","stream":true,"x":' + b"[" * 3000 + b"]" * 3000
                    + b',"messages":[' + PROMPT.encode() + b"]}",
    # Go's json.Decoder reads the first value and stops; we read "Extra data" as not JSON.
    "trailing_value": b'{"model":"demo","stream":true,"messages":[' + PROMPT.encode() + b"]}"
                      + b'{"model":"demo"}',
    # Every parser keeps the last of duplicate keys.
    "duplicate_key": b'{"model":"demo","stream":true,"messages":[],"messages":['
                     + PROMPT.encode() + b"]}",
    # Go matches struct fields without regard to case, with simple folding.
    "case_variant": b'{"model":"demo","stream":true,"Messages":[' + PROMPT.encode() + b"]}",
    "fold_variant": ('{"model":"demo","stream":true,"me\u017f\u017fages":[' + PROMPT
                     + "]}").encode(),
    # Some servers strip a byte order mark first.
    "bom": b"\xef\xbb\xbf" + json.dumps({"model": "demo", "stream": True,
                                         "messages": [json.loads(PROMPT)]}).encode(),
    # Python reads NaN; it is not JSON.
    "nan": b'{"model":"demo","stream":true,"temperature":NaN,"messages":['
           + PROMPT.encode() + b"]}",
}


@pytest.mark.parametrize("name", DIFFERENTIALS)
def test_a_body_parsers_read_differently_is_refused_before_the_upstream(
        stack: Stack, name: str) -> None:
    result = fetch(stack, Script(chunks=tuple(events("never"))), "http1",
                   body=DIFFERENTIALS[name])
    assert result.status == 400, (result.status, result.body[:200])
    error = json.loads(result.body)["error"]
    assert error["type"] == "guardrail_invalid_request"
    assert error["code"] == 400
    assert stack.llm.records_for_script(result.script_id or "") == []


def test_every_gzip_member_is_read(stack: Stack) -> None:
    # Two gzip members: Python's gzip, Go and Node inflate both and read the text joined. Only
    # the first was inflated, a truncated JSON that held no prompt, so it went up unchecked.
    body = json.dumps({"model": "demo", "stream": True,
                       "messages": [json.loads(PROMPT)]}).encode()
    cut = body.index(b"bazinga")
    packed = gzip.compress(body[:cut]) + gzip.compress(body[cut:])
    assert gzip.decompress(packed) == body
    result = fetch(stack, Script(chunks=tuple(events("never"))), "http1", body=packed,
                   headers={"content-encoding": "gzip"})
    assert result.status == 400
    assert json.loads(result.body)["error"]["type"] == "guardrail_violation"
    assert stack.llm.records_for_script(result.script_id or "") == []


def test_data_after_a_gzip_member_is_refused(stack: Stack) -> None:
    body = gzip.compress(json.dumps({"model": "demo", "stream": True,
                                     "messages": [{"role": "user", "content": "hi"}]}).encode())
    result = fetch(stack, Script(chunks=tuple(events("never"))), "http1",
                   body=body + b"trailing bytes", headers={"content-encoding": "gzip"})
    assert result.status == 415
    assert stack.llm.records_for_script(result.script_id or "") == []


def test_a_strict_body_still_passes_byte_identical(stack: Stack) -> None:
    answer = b"".join(events("Fine."))
    body = ('{"model":"demo","stream":true,"seed":12345678901234567890,"temperature":0.5,'
            '"messages":[{"role":"user","content":"caf\u00e9 \\ud83d\\ude00 hi"}],'
            '"metadata":{"Messages":"not a known key here? it is: refused"}}')
    # A case variant of a known key is refused at any level, even inside metadata.
    refused = fetch(stack, Script(chunks=(answer,)), "http1", body=body.encode())
    assert refused.status == 400
    clean = body.replace('"Messages"', '"note"').encode()
    result = fetch(stack, Script(chunks=(answer,)), "http1", body=clean)
    assert result.status == 200 and result.body == answer
    assert stack.llm.record_for_script(result.script_id or "").body == clean


def test_a_prompt_followed_by_trailers_is_checked(stack: Stack) -> None:
    # HTTP/2 request trailers: Envoy hands the buffered body over with end_of_stream false, and
    # the prompt was continued without a check.
    script_id = stack.llm.register(Script(chunks=tuple(events("never"))))
    body = json.dumps({"model": "demo", "stream": True,
                       "messages": [json.loads(PROMPT)]}).encode()
    answer = post_with_trailers(
        stack.envoy.listener_port, "/v1/chat/completions",
        [("content-type", "application/json"), ("x-fake-script", script_id)], body,
        [("x-checksum", "abc")])
    assert answer.status == 400 and answer.ended, answer
    assert json.loads(answer.body)["error"]["type"] == "guardrail_violation"
    assert stack.llm.records_for_script(script_id) == []


def test_a_clean_prompt_with_trailers_goes_upstream_whole(stack: Stack) -> None:
    answer_events = events("Fine.")
    script_id = stack.llm.register(Script(chunks=tuple(answer_events)))
    body = json.dumps({"model": "demo", "stream": True,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    answer = post_with_trailers(
        stack.envoy.listener_port, "/v1/chat/completions",
        [("content-type", "application/json"), ("x-fake-script", script_id)], body,
        [("x-checksum", "abc")])
    assert answer.status == 200 and answer.ended, answer
    assert answer.body == b"".join(answer_events)
    assert stack.llm.record_for_script(script_id).body == body


@pytest.mark.parametrize("version", ["http1", "http2"])
@pytest.mark.parametrize("kind", ["block", "mask"])
def test_a_rewritten_answer_sent_with_content_length_ends_cleanly(
        stack: Stack, version: str, kind: str) -> None:
    # Issue 14, class 8: the upstream sends its SSE answer with content-length; the guard
    # rewrites it (a terminal frame, masked text), so that length is wrong. It was kept, and a
    # keep-alive client waited for bytes that never came. Now it is dropped and the answer ends
    # cleanly at its real end; the connection serves the next request.
    word = "Project Nightingale" if kind == "block" else "jane.doe@example.com"
    chunks = tuple(events("Write to ", f"{word} ", "any time. " * 20))
    script = Script(chunks=chunks, delays_ms=5, fixed_length=True)
    with client(version) as http:
        for _ in range(2):  # the second request reuses the connection
            script_id = stack.llm.register(script)
            response = http.post(f"{stack.url}/v1/chat/completions",
                                 content=chat_request("hello"),
                                 headers={"content-type": "application/json",
                                          "x-fake-script": script_id}, timeout=20)
            assert response.status_code == 200
            assert "content-length" not in response.headers or int(
                response.headers["content-length"]) == len(response.content)
            body = response.content
            assert word.encode() not in body
            if kind == "block":
                assert body.endswith(BLOCK_FRAME)
            else:
                assert b"{EMAIL}" in body and body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("fixed", [True, False], ids=["content_length", "chunked"])
def test_a_json_answer_over_envoys_buffer_limit_is_answered_at_once(
        stack: Stack, fixed: bool) -> None:
    # Issue 14, class 8: a 2 MiB non-streamed answer (Envoy's buffer limit is 1 MiB) got no
    # response at all. Now the overload class answers it: closed (the default), a 503 in the
    # API's shape, and nothing of it reaches the client.
    text = "lorem ipsum " * (2 * 1024 * 1024 // 12)
    body = json.dumps({"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text},
         "finish_reason": "stop"}]}).encode()
    chunks = tuple(body[i:i + 65536] for i in range(0, len(body), 65536))
    script = Script(chunks=chunks, headers=(("content-type", "application/json"),),
                    fixed_length=fixed)
    result = fetch(stack, script, "http1", body=chat_request("hello", stream=False),
                   timeout=30)
    assert result.status == 503, (result.status, result.body[:200])
    assert json.loads(result.body)["error"]["type"] == "guardrail_unavailable"


# Path variants a real server routes to an LLM API (uvicorn decodes escapes before routing,
# Express folds case and ignores a trailing slash): each one is guarded like the plain path.
PATH_VARIANTS = [
    "/v1/chat/completion%73", "/v1/chat%2Fcompletions", "/v1/chat%2fcompletions",
    "/v1/chat/completions/", "/V1/CHAT/COMPLETIONS", "//v1//chat/completions",
    "/v1/./chat/completions", "/v1/x/../chat/completions", "/v1/chat/completions;v=1",
    "/v1/chat/completions?x=%2F", "/v1/chat/completion%2573",
]


@pytest.mark.parametrize("version", ["http1", "http2"])
@pytest.mark.parametrize("path", PATH_VARIANTS)
def test_a_path_variant_is_guarded(stack: Stack, path: str, version: str) -> None:
    result = fetch(stack, Script(chunks=tuple(events("never"))), version, path=path,
                   prompt="say bazinga now")
    assert result.status == 400, (path, result.status, result.body[:200])
    assert json.loads(result.body)["error"]["type"] == "guardrail_violation"
    assert stack.llm.records_for_script(result.script_id or "") == []


@pytest.mark.parametrize("path", ["/v1/message%73", "/V1/Messages/"])
def test_an_anthropic_path_variant_is_guarded(stack: Stack, path: str) -> None:
    body = json.dumps({"model": "claude", "max_tokens": 10, "stream": True,
                       "messages": [{"role": "user", "content": "say bazinga now"}]}).encode()
    result = fetch(stack, Script(chunks=tuple(events("never"))), "http1", path=path,
                   body=body)
    assert result.status == 400, (path, result.status, result.body[:200])
    assert json.loads(result.body)["error"]["type"] == "guardrail_violation"
    assert stack.llm.records_for_script(result.script_id or "") == []


def test_the_upstream_sees_the_path_the_sidecar_matched(stack: Stack) -> None:
    # Envoy's shipped settings normalize what it forwards: %2F unescaped, slashes merged, dot
    # segments resolved, unreserved escapes decoded.
    answer = b"".join(events("fine"))
    result = fetch(stack, Script(chunks=(answer,)), "http1",
                   path="//v1/./chat%2Fcompletion%73")
    assert result.status == 200 and result.body == answer
    assert stack.llm.record_for_script(result.script_id or "").path == "/v1/chat/completions"


# -- traffic no format recognises (--unknown-traffic generic, the default) ---------------------

# (Vertex AI's ``:predict`` for a deployed model: no format reads it; Gemini-shaped JSON.)
UNKNOWN_PATH = "/v1/projects/p/locations/us-central1/endpoints/e1:predict?alt=sse"


def gemini_request(text: str) -> bytes:
    return json.dumps({"contents": [{"role": "user", "parts": [{"text": text}]}],
                       "systemInstruction": {"parts": [{"text": "be brief"}]}}).encode()


def gemini_events(*texts: str) -> list[bytes]:
    return [b"data: " + json.dumps({"candidates": [{"content": {
        "role": "model", "parts": [{"text": text}]}, "index": 0}],
        "modelVersion": "gemini-2.5-flash"}).encode() + b"\r\n\r\n" for text in texts]


def test_a_prompt_of_an_api_no_format_knows_is_read_by_rule(stack: Stack) -> None:
    result = fetch(stack, Script(chunks=tuple(gemini_events("never"))), "http1",
                   path=UNKNOWN_PATH, body=gemini_request("say bazinga now"))
    assert result.status == 400, (result.status, result.body[:200])
    assert json.loads(result.body)["error"]["type"] == "guardrail_violation"
    assert stack.llm.records_for_script(result.script_id or "") == []


def test_an_answer_of_an_api_no_format_knows_is_read_by_rule(stack: Stack) -> None:
    clean = gemini_events("The weather ", "is fine ", "today.")
    result = fetch(stack, Script(chunks=tuple(clean)),
                   "http1", path=UNKNOWN_PATH, body=gemini_request("hello"))
    assert result.status == 200 and result.clean_end
    assert result.body == b"".join(clean)  # a clean stream passes byte for byte
    blocked = gemini_events("Our plan is ", "Project Nightingale", " and more.")
    result = fetch(stack, Script(chunks=tuple(blocked)),
                   "http2", path=UNKNOWN_PATH, body=gemini_request("hello again"))
    assert result.status == 200 and result.clean_end
    assert b"Nightingale" not in result.body
    assert result.body.endswith(BLOCK_FRAME)
