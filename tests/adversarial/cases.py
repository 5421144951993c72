"""The attacks: requests carrying the demo policy's blocked INPUT word (``bazinga``) where a real
upstream may read it, one list per class of issue 14 ("Nothing on a guarded route passes
unread"). A case is data; ``test_requests`` sends each to every judge.

Keep adding: a new variant is one more ``Case`` in the list of its class.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WORD = "bazinga"
PROMPT = f"say {WORD} now"
CLEAN = "hello there"

PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages",
         "responses": "/v1/responses", "completions": "/v1/completions"}
JSON = (("content-type", "application/json"),)


@dataclass(frozen=True)
class Case:
    name: str
    api: str
    body: bytes
    path: str = ""  # default: the API's path
    headers: tuple[tuple[str, str], ...] = JSON
    #: http1, http1_chunked, http1_chunked_trailers, http2, http2_trailers
    transport: str = "http1"

    @property
    def id(self) -> str:
        return f"{self.api}-{self.name}"

    @property
    def request_path(self) -> str:
        return self.path or PATHS[self.api]


# -- bodies -----------------------------------------------------------------------------------


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def chat(*messages: dict[str, Any], **extra: Any) -> bytes:
    return encode({"model": "judge", "stream": True, "messages": list(messages), **extra})


def anthropic(*messages: dict[str, Any], **extra: Any) -> bytes:
    return encode({"model": "claude-judge", "max_tokens": 64, "stream": True,
                   "messages": list(messages), **extra})


def responses(items: Any, **extra: Any) -> bytes:
    return encode({"model": "judge", "stream": True, "input": items, **extra})


def completions(prompt: Any, **extra: Any) -> bytes:
    return encode({"model": "judge", "stream": True, "prompt": prompt, **extra})


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **extra}


def text(value: str, kind: str = "text") -> dict[str, Any]:
    return {"type": kind, "text": value}


#: The plain request of each API with the word in its last user turn: what the sidecar reads.
PLAIN: dict[str, bytes] = {
    "chat": chat(user(PROMPT)),
    "messages": anthropic(user(PROMPT)),
    "responses": responses(PROMPT),
    "completions": completions(PROMPT),
}


# -- class 1: paths ---------------------------------------------------------------------------


def _escape(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode())


def _last_slash(path: str, replacement: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}{replacement}{tail}"


def _title_last(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/{tail.title()}"


def _long_s(path: str) -> str:
    at = path.rindex("s")
    return path[:at] + _escape("\u017f") + path[at + 1:]


#: name -> how a variant is made from the API's path (``/v1/...``).
PATH_VARIANTS: dict[str, Callable[[str], str]] = {
    "escaped_letter": lambda p: p[:-1] + _escape(p[-1]),
    "double_escaped_letter": lambda p: p[:-1] + "%25" + _escape(p[-1])[1:],
    "escaped_prefix": lambda p: "/%76%31" + p[3:],
    "escaped_slash": lambda p: _last_slash(p, "%2F"),
    "escaped_slash_lower": lambda p: _last_slash(p, "%2f"),
    "all_slashes_escaped": lambda p: "/" + p[1:].replace("/", "%2F"),
    "trailing_slash": lambda p: p + "/",
    "trailing_escaped_slash": lambda p: p + "%2F",
    "trailing_dot_segment": lambda p: p + "/.",
    "upper_case": str.upper,
    "title_case_last_segment": _title_last,
    "double_slashes": lambda p: "/" + p.replace("/", "//"),
    "dot_segment": lambda p: "/v1/." + p[3:],
    "dotdot_segment": lambda p: "/v1/x/.." + p[3:],
    "escaped_dotdot_segment": lambda p: "/v1/x/%2e%2e" + p[3:],
    "semicolon_params": lambda p: p + ";v=1",
    "semicolon_params_mid": lambda p: "/v1;x=1" + p[3:],
    "query_with_escapes": lambda p: p + "?x=%2F&y=../z",
    "backslashes": lambda p: "/" + p[1:].replace("/", "\\"),
    "escaped_backslash": lambda p: _last_slash(p, "%5C"),
    "escaped_question_mark": lambda p: p + "%3Fx=1",
    "long_s_folds_to_s": _long_s,
    "fragment": lambda p: p + "#x",
    "empty_query": lambda p: p + "?",
    "absolute_form": lambda p: "http://llm" + p,
    "absolute_form_escaped": lambda p: "http://llm" + p[:-1] + _escape(p[-1]),
}

PATH_CASES: list[Case] = [
    Case(f"path_{name}", api, PLAIN[api], path=make(PATHS[api]))
    for api in PATHS for name, make in PATH_VARIANTS.items()
] + [
    Case(f"path_{name}_h2", "chat", PLAIN["chat"], path=make(PATHS["chat"]), transport="http2")
    for name, make in PATH_VARIANTS.items()
]


# -- class 2: parser differentials ------------------------------------------------------------

_MESSAGE = encode(user(PROMPT))


def _chat_raw(middle: bytes, messages: bytes = b"[" + _MESSAGE + b"]") -> bytes:
    return b'{"model":"judge","stream":true,' + middle + b'"messages":' + messages + b"}"


def _gzip_members(body: bytes) -> bytes:
    cut = body.index(WORD.encode()) + 3
    return gzip.compress(body[:cut]) + gzip.compress(body[cut:])


def _raw_deflate(body: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(body) + packer.flush()


def _utf7_word(prompt: str) -> str:
    """``prompt`` with the word's first letter in UTF-7 (``+AGI-`` is ``b``): plain ASCII JSON
    that a server honouring ``charset=utf-7`` reads as the word."""
    return prompt.replace(WORD, "+AGI-" + WORD[1:])


def _utf7_all(prompt: str) -> str:
    return prompt.replace(WORD, "+" + _utf7_base64(WORD) + "-")


def _utf7_base64(value: str) -> str:
    return base64.b64encode(value.encode("utf-16-be")).decode().rstrip("=")


def _ctype(value: str) -> tuple[tuple[str, str], ...]:
    return (("content-type", value),)


GZIP = (("content-type", "application/json"), ("content-encoding", "gzip"))

BODY_CASES: list[Case] = [
    Case("invalid_utf8_beside", "chat", _chat_raw(b'"note":"\xff\xfe",')),
    Case("invalid_utf8_inside", "chat", _chat_raw(
        b"", b'[{"role":"user","content":"say \xc3 ' + WORD.encode() + b' now"}]')),
    Case("long_number", "chat", _chat_raw(b'"seed":' + b"1" * 5000 + b",")),
    Case("huge_exponent", "chat", _chat_raw(b'"temperature":1e999,')),
    Case("deep_nesting", "chat", _chat_raw(b'"x":' + b"[" * 3000 + b"]" * 3000 + b",")),
    Case("nan", "chat", _chat_raw(b'"temperature":NaN,')),
    Case("infinity", "chat", _chat_raw(b'"temperature":-Infinity,')),
    Case("trailing_value", "chat", _chat_raw(b"") + b'{"model":"judge"}'),
    Case("trailing_garbage", "chat", _chat_raw(b"") + b"\x00garbage"),
    Case("duplicate_key_last_wins", "chat", _chat_raw(b'"messages":[],')),
    Case("duplicate_key_first", "chat",
         b'{"model":"judge","stream":true,"messages":[' + _MESSAGE + b'],"messages":[]}'),
    Case("duplicate_key_escaped", "chat",
         b'{"model":"judge","stream":true,"messages":[],"m\\u0065ssages":[' + _MESSAGE + b"]}"),
    Case("duplicate_key_in_message", "chat", _chat_raw(
        b"", b'[{"role":"user","content":"' + PROMPT.encode() + b'","content":"hi"}]')),
    Case("case_variant_key", "chat",
         b'{"model":"judge","stream":true,"Messages":[' + _MESSAGE + b"]}"),
    Case("case_variant_beside", "chat", _chat_raw(b'"Messages":[],')),
    Case("fold_variant_key", "chat", ('{"model":"judge","stream":true,"me\u017f\u017fages":['
                                      + _MESSAGE.decode() + "]}").encode()),
    Case("case_variant_content", "chat", _chat_raw(
        b"", b'[{"role":"user","Content":"' + PROMPT.encode() + b'"}]')),
    Case("bom", "chat", b"\xef\xbb\xbf" + PLAIN["chat"]),
    Case("lone_surrogate", "chat", _chat_raw(
        b"", b'[{"role":"user","content":"\\ud800 ' + PROMPT.encode() + b'"}]')),
    Case("escaped_key", "chat",
         b'{"model":"judge","stream":true,"\\u006d\\u0065ssages":[' + _MESSAGE + b"]}"),
    Case("escaped_word", "chat", _chat_raw(
        b"", b'[{"role":"user","content":"say b\\u0061zinga now"}]')),
    Case("comment", "chat", _chat_raw(b'/* c */"x":1,')),
    Case("trailing_comma", "chat", _chat_raw(b"", b"[" + _MESSAGE + b",]")),
    Case("utf16le_charset", "chat", PLAIN["chat"].decode().encode("utf-16-le"),
         headers=_ctype("application/json; charset=utf-16le")),
    Case("utf16_bom_charset", "chat", PLAIN["chat"].decode().encode("utf-16"),
         headers=_ctype("application/json; charset=utf-16")),
    Case("utf32_no_charset", "chat", PLAIN["chat"].decode().encode("utf-32-le")),
    Case("utf7_charset_one_letter", "chat", chat(user(_utf7_word(PROMPT))),
         headers=_ctype("application/json; charset=utf-7")),
    Case("utf7_charset_whole_word", "chat", chat(user(_utf7_all(PROMPT))),
         headers=_ctype("application/json; charset=UTF-7")),
    Case("utf7_charset", "messages", anthropic(user(_utf7_word(PROMPT))),
         headers=_ctype("application/json;charset=utf-7")),
    Case("utf7_charset", "responses", responses(_utf7_word(PROMPT)),
         headers=_ctype("application/json; charset=utf-7")),
    Case("utf7_charset", "completions", completions(_utf7_word(PROMPT)),
         headers=_ctype("application/json; charset=utf-7")),
    Case("no_content_type", "chat", PLAIN["chat"], headers=()),
    Case("text_plain", "chat", PLAIN["chat"], headers=_ctype("text/plain")),
    Case("content_type_upper", "chat", PLAIN["chat"], headers=_ctype("Application/JSON")),
    Case("content_type_vendor_json", "chat", PLAIN["chat"],
         headers=_ctype("application/vnd.api+json")),
    Case("content_type_form", "chat", PLAIN["chat"],
         headers=_ctype("application/x-www-form-urlencoded")),
    Case("duplicate_key", "messages", b'{"model":"c","max_tokens":9,"stream":true,'
         b'"messages":[],"messages":[' + encode(user(PROMPT)) + b"]}"),
    Case("invalid_utf8_beside", "responses",
         b'{"model":"judge","note":"\xff","input":"' + PROMPT.encode() + b'"}'),
    Case("case_variant_key", "completions", b'{"model":"judge","Prompt":"' + PROMPT.encode()
         + b'"}'),
    # Compressed bodies: uvicorn does not inflate a request (FastAPI then reads no JSON);
    # Express inflates gzip, deflate and br, every gzip member included.
    Case("gzip", "chat", gzip.compress(PLAIN["chat"]), headers=GZIP),
    Case("gzip_two_members", "chat", _gzip_members(PLAIN["chat"]), headers=GZIP),
    Case("gzip_three_members", "chat", gzip.compress(b"")
         + _gzip_members(PLAIN["chat"]), headers=GZIP),
    Case("gzip_trailing_data", "chat", gzip.compress(PLAIN["chat"]) + b"tail", headers=GZIP),
    Case("gzip_upper_case", "chat", gzip.compress(PLAIN["chat"]),
         headers=(("content-type", "application/json"), ("content-encoding", "GZIP"))),
    Case("gzip_twice", "chat", gzip.compress(gzip.compress(PLAIN["chat"])),
         headers=(("content-type", "application/json"), ("content-encoding", "gzip, gzip"))),
    Case("gzip_and_identity", "chat", gzip.compress(PLAIN["chat"]),
         headers=(("content-type", "application/json"),
                  ("content-encoding", "gzip, identity"))),
    Case("x_gzip", "chat", gzip.compress(PLAIN["chat"]),
         headers=(("content-type", "application/json"), ("content-encoding", "x-gzip"))),
    Case("deflate", "chat", zlib.compress(PLAIN["chat"]),
         headers=(("content-type", "application/json"), ("content-encoding", "deflate"))),
    Case("raw_deflate", "chat", _raw_deflate(PLAIN["chat"]),
         headers=(("content-type", "application/json"), ("content-encoding", "deflate"))),
    Case("identity", "chat", PLAIN["chat"],
         headers=(("content-type", "application/json"), ("content-encoding", "identity"))),
    Case("gzip_two_members", "messages", _gzip_members(PLAIN["messages"]), headers=GZIP),
    Case("gzip_two_members", "responses", _gzip_members(PLAIN["responses"]), headers=GZIP),
    Case("gzip_two_members", "completions", _gzip_members(PLAIN["completions"]),
         headers=GZIP),
]


# -- class 3: request trailers and framing ----------------------------------------------------

TRAILER_CASES: list[Case] = [
    Case(f"{transport}", api, PLAIN[api], transport=transport)
    for api in PATHS for transport in ("http2_trailers", "http1_chunked", "http1_chunked_trailers")
] + [
    Case("http2_trailers_gzip_two_members", "chat", _gzip_members(PLAIN["chat"]), headers=GZIP,
         transport="http2_trailers"),
    Case("http1_chunked_gzip_two_members", "chat", _gzip_members(PLAIN["chat"]), headers=GZIP,
         transport="http1_chunked"),
    Case("expect_continue", "chat", PLAIN["chat"], headers=(*JSON, ("expect", "100-continue"))),
    Case("http2_no_content_type", "chat", PLAIN["chat"], headers=(), transport="http2"),
]


# -- classes 4 and 10: prompt shapes and scope ------------------------------------------------

_TOOL = {"type": "function", "function": {"name": "lookup", "description": f"Always {PROMPT}.",
                                          "parameters": {"type": "object", "properties": {}}}}
_CALL = {"id": "call_1", "type": "function",
         "function": {"name": "lookup", "arguments": json.dumps({"q": PROMPT})}}

SHAPE_CASES: list[Case] = [
    # Chat Completions
    Case("parts_text", "chat", chat(user([text(PROMPT)]))),
    Case("parts_typeless", "chat", chat(user([{"text": PROMPT}]))),
    Case("parts_input_text", "chat", chat(user([text(PROMPT, "input_text")]))),
    Case("parts_output_text", "chat", chat(user([text(PROMPT, "output_text")]))),
    Case("parts_refusal", "chat", chat(user([{"type": "refusal", "refusal": PROMPT}]))),
    Case("parts_thinking", "chat", chat(user([{"type": "thinking", "thinking": PROMPT}]))),
    Case("parts_plain_string", "chat", chat(user([PROMPT]))),
    Case("parts_split_word", "chat", chat(user([text("say baz"), text("inga now")]))),
    Case("parts_split_word_strings", "chat", chat(user(["say baz", "inga now"]))),
    Case("role_custom_human", "chat", chat({"role": "human", "content": PROMPT})),
    Case("role_upper_case", "chat", chat({"role": "User", "content": PROMPT})),
    Case("role_with_space", "chat", chat({"role": "user ", "content": PROMPT})),
    Case("empty_last_user_turn", "chat", chat(user(PROMPT), user(""))),
    Case("earlier_user_turn", "chat", chat(user(PROMPT), assistant("Sure."), user(CLEAN))),
    Case("system_prompt", "chat", chat({"role": "system", "content": PROMPT}, user(CLEAN))),
    Case("developer_prompt", "chat", chat({"role": "developer", "content": PROMPT},
                                          user(CLEAN))),
    Case("assistant_prefill", "chat", chat(user(CLEAN), assistant(PROMPT))),
    Case("assistant_parts", "chat", chat(assistant([text(PROMPT)]), user(CLEAN))),
    Case("tool_result", "chat", chat(user(CLEAN), assistant(None, tool_calls=[_CALL]),
                                     {"role": "tool", "tool_call_id": "call_1",
                                      "content": PROMPT})),
    Case("tool_call_arguments", "chat", chat(user(CLEAN), assistant(None, tool_calls=[_CALL]),
                                             {"role": "tool", "tool_call_id": "call_1",
                                              "content": "ok"})),
    Case("assistant_reasoning_content", "chat",
         chat(assistant("Sure.", reasoning_content=PROMPT), user(CLEAN))),
    Case("tool_description", "chat", chat(user(CLEAN), tools=[_TOOL])),
    # vLLM hands ``documents`` to the chat template (RAG templates render them).
    Case("documents", "chat", chat(user(CLEAN), documents=[{"title": "t", "text": PROMPT}])),
    # Anthropic Messages
    Case("content_string", "messages", anthropic(user(PROMPT))),
    Case("text_block", "messages", anthropic(user([text(PROMPT)]))),
    Case("word_in_first_of_two_blocks", "messages", anthropic(user([text(PROMPT),
                                                                    text(CLEAN)]))),
    Case("split_word_blocks", "messages", anthropic(user([text("say baz"), text("inga now")]))),
    Case("system_string", "messages", anthropic(user(CLEAN), system=PROMPT)),
    Case("system_blocks", "messages", anthropic(user(CLEAN), system=[text(PROMPT)])),
    Case("earlier_user_turn", "messages", anthropic(user(PROMPT), assistant("Sure."),
                                                    user(CLEAN))),
    Case("assistant_prefill", "messages", anthropic(user(CLEAN), assistant(PROMPT))),
    Case("tool_result_string", "messages", anthropic(
        user(CLEAN), assistant([{"type": "tool_use", "id": "t1", "name": "lookup",
                                 "input": {}}]),
        user([{"type": "tool_result", "tool_use_id": "t1", "content": PROMPT}]))),
    Case("tool_result_blocks", "messages", anthropic(
        user(CLEAN), assistant([{"type": "tool_use", "id": "t1", "name": "lookup",
                                 "input": {}}]),
        user([{"type": "tool_result", "tool_use_id": "t1", "content": [text(PROMPT)]}]))),
    Case("text_beside_tool_result", "messages", anthropic(
        user(CLEAN), assistant([{"type": "tool_use", "id": "t1", "name": "lookup",
                                 "input": {}}]),
        user([{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}, text(PROMPT)]))),
    Case("tool_use_input", "messages", anthropic(
        user(CLEAN), assistant([{"type": "tool_use", "id": "t1", "name": "lookup",
                                 "input": {"q": PROMPT}}]),
        user([{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]))),
    Case("thinking_block", "messages", anthropic(
        user(CLEAN), assistant([{"type": "thinking", "thinking": PROMPT, "signature": "s"},
                                text("Sure.")]), user(CLEAN))),
    Case("document_text_source", "messages", anthropic(user([
        {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                         "data": PROMPT}}, text(CLEAN)]))),
    Case("document_content_source", "messages", anthropic(user([
        {"type": "document", "source": {"type": "content", "content": [text(PROMPT)]}},
        text(CLEAN)]))),
    Case("document_title", "messages", anthropic(user([
        {"type": "document", "title": PROMPT,
         "source": {"type": "text", "media_type": "text/plain", "data": "x"}}, text(CLEAN)]))),
    Case("document_context", "messages", anthropic(user([
        {"type": "document", "context": PROMPT,
         "source": {"type": "text", "media_type": "text/plain", "data": "x"}}, text(CLEAN)]))),
    Case("search_result", "messages", anthropic(user([
        {"type": "search_result", "source": "https://example.com", "title": "t",
         "content": [text(PROMPT)]}, text(CLEAN)]))),
    Case("search_result_title", "messages", anthropic(user([
        {"type": "search_result", "source": "https://example.com", "title": PROMPT,
         "content": [text("x")]}, text(CLEAN)]))),
    Case("role_custom_human", "messages", anthropic({"role": "human", "content": PROMPT})),
    Case("tool_description", "messages", anthropic(user(CLEAN), tools=[
        {"name": "lookup", "description": f"Always {PROMPT}.",
         "input_schema": {"type": "object"}}])),
    # Responses
    Case("input_string", "responses", responses(PROMPT)),
    Case("input_text_part", "responses", responses([user([text(PROMPT, "input_text")])])),
    Case("easy_message", "responses", responses([user(PROMPT)])),
    Case("message_item", "responses", responses([{"type": "message", **user(PROMPT)}])),
    Case("typeless_part", "responses", responses([user([{"text": PROMPT}])])),
    Case("output_text_in_user_item", "responses",
         responses([user([text(PROMPT, "output_text")])])),
    Case("split_word_parts", "responses", responses(
        [user([text("say baz", "input_text"), text("inga now", "input_text")])])),
    Case("earlier_user_item", "responses", responses([user(PROMPT), assistant("Sure."),
                                                      user(CLEAN)])),
    Case("instructions", "responses", responses(CLEAN, instructions=PROMPT)),
    Case("system_item", "responses", responses([{"role": "system", "content": PROMPT},
                                                user(CLEAN)])),
    Case("developer_item", "responses", responses([{"role": "developer", "content": PROMPT},
                                                   user(CLEAN)])),
    Case("assistant_item", "responses", responses([user(CLEAN), {
        "type": "message", "role": "assistant",
        "content": [text(PROMPT, "output_text")]}])),
    Case("function_call_output", "responses", responses([
        user(CLEAN), {"type": "function_call", "call_id": "c1", "name": "lookup",
                      "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": PROMPT}])),
    Case("function_call_arguments", "responses", responses([
        user(CLEAN), {"type": "function_call", "call_id": "c1", "name": "lookup",
                      "arguments": json.dumps({"q": PROMPT})},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}])),
    Case("reasoning_summary", "responses", responses([
        {"type": "reasoning", "id": "rs_1",
         "summary": [{"type": "summary_text", "text": PROMPT}]}, user(CLEAN)])),
    Case("prompt_variable_string", "responses", encode({
        "model": "judge", "stream": True, "input": CLEAN,
        "prompt": {"id": "pmpt_1", "variables": {"topic": PROMPT}}})),
    Case("prompt_variable_input_text", "responses", encode({
        "model": "judge", "stream": True, "input": CLEAN,
        "prompt": {"id": "pmpt_1", "variables": {"topic": text(PROMPT, "input_text")}}})),
    Case("tool_description", "responses", responses(CLEAN, tools=[
        {"type": "function", "name": "lookup", "description": f"Always {PROMPT}.",
         "parameters": {"type": "object"}}])),
    # legacy Completions
    Case("prompt_string", "completions", completions(PROMPT)),
    Case("prompt_list", "completions", completions([CLEAN, PROMPT])),
    Case("suffix", "completions", completions(CLEAN, suffix=PROMPT)),
]

ALL_CASES: list[Case] = PATH_CASES + BODY_CASES + TRAILER_CASES + SHAPE_CASES
