"""Nothing on a guarded route passes unread, judged by real upstreams: every case of ``cases``
goes client -> real Envoy -> the sidecar -> a judge (FastAPI on uvicorn, Node + Express), and
the judge says what its model would read.

The verdict for each: EITHER the request was refused before the upstream (a 4xx, and the judge
recorded nothing for it) OR the judge's record of what the model reads does not hold the
blocked word. A case where the model read the word is a hole: it is marked in ``HOLES`` with
the class of issue 14 it belongs to, as a strict expected failure (``raises=Hole``: nothing but
the judged hole counts), so the suite stays green and documents it. When a hole is closed its
test passes, the strict XPASS fails the run, and its line in ``HOLES`` must go.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.adversarial.cases import ALL_CASES, WORD, Case
from tests.adversarial.conftest import JUDGES, JudgedStack
from tests.adversarial.wire import Answer, http1, http2
from tests.judges.process import CASE_HEADER

READ = re.compile(WORD, re.IGNORECASE)


class Hole(AssertionError):
    """A judge's model read the blocked word: the sidecar let it through unchecked."""


SCOPE = "class 10 (scope): the default prompt scope last_user leaves "
SHAPE = "class 4 (prompt shapes): "

#: case id -> the hole it shows (for every judge), or judge -> the hole (for those judges).
HOLES: dict[str, str | dict[str, str]] = {
    # class 2: the sidecar reads every body as UTF-8; Express honours the content-type's
    # charset (iconv-lite), and in UTF-7 the ASCII "+AGI-azinga" is "bazinga". uvicorn/FastAPI
    # ignore the charset, so their model reads "+AGI-azinga".
    **{f"{api}-utf7_charset{suffix}": {"express": (
        "class 2 (parser differentials): a body sent with charset=utf-7 is read as UTF-8 by the "
        "sidecar and as UTF-7 by Express: '+AGI-azinga' is checked, 'bazinga' is read")}
       for api, suffix in (("chat", "_one_letter"), ("chat", "_whole_word"), ("messages", ""),
                           ("responses", ""), ("completions", ""))},
    # Chat Completions
    "chat-parts_input_text": SHAPE + "a chat part of type input_text is not read (vLLM reads it)",
    "chat-parts_output_text": SHAPE + "a chat part of type output_text is not read "
                                      "(vLLM reads it)",
    "chat-parts_refusal": SHAPE + "a chat part of type refusal is not read (vLLM reads it)",
    "chat-parts_thinking": SHAPE + "a chat part of type thinking is not read (vLLM reads it)",
    "chat-parts_plain_string": SHAPE + "a plain string in a chat content list is not read "
                                       "(vLLM reads it)",
    "chat-parts_split_word": SHAPE + "a phrase split over two text parts of one message: each "
                                     "part is checked as its own block",
    "chat-parts_split_word_strings": SHAPE + "a phrase split over two plain-string parts of one "
                                             "message is not read whole (nor at all)",
    "chat-role_custom_human": SHAPE + "a custom role ('human', which vLLM accepts and the "
                                      "template renders) is not read under last_user",
    "chat-role_upper_case": SHAPE + "role 'User' is not 'user': no user turn is found and "
                                    "nothing is checked",
    "chat-role_with_space": SHAPE + "role 'user ' (a trailing space) is not 'user': no user "
                                    "turn is found and nothing is checked",
    "chat-earlier_user_turn": SCOPE + "an earlier user turn unchecked",
    "chat-empty_last_user_turn": SCOPE + "every user turn but an empty last one unchecked",
    "chat-system_prompt": SCOPE + "the system prompt unchecked",
    "chat-developer_prompt": SCOPE + "the developer message unchecked",
    "chat-assistant_prefill": SCOPE + "an assistant prefill (the last message) unchecked",
    "chat-assistant_parts": SCOPE + "an assistant turn (content parts) unchecked",
    "chat-tool_result": SCOPE + "a tool result (role tool) unchecked",
    "chat-tool_call_arguments": SCOPE + "an assistant turn's tool-call arguments unchecked",
    "chat-assistant_reasoning_content": SCOPE + "an assistant turn's reasoning_content unchecked",
    "chat-tool_description": SHAPE + "tool definitions (the template renders them) are never "
                                     "checked",
    "chat-documents": SHAPE + "chat documents (vLLM hands them to the template) are never "
                              "checked",
    # Anthropic Messages
    "messages-split_word_blocks": SHAPE + "a phrase split over two text blocks of one message: "
                                          "each block is checked as its own block",
    "messages-system_string": SCOPE + "the system prompt (a string) unchecked",
    "messages-system_blocks": SCOPE + "the system prompt (text blocks) unchecked",
    "messages-earlier_user_turn": SCOPE + "an earlier user turn unchecked",
    "messages-assistant_prefill": SCOPE + "an assistant prefill (the last message) unchecked",
    "messages-tool_result_string": SCOPE + "a tool_result (string content) unchecked",
    "messages-tool_result_blocks": SCOPE + "a tool_result (text blocks) unchecked",
    "messages-tool_use_input": SCOPE + "an assistant tool_use input unchecked",
    "messages-thinking_block": SCOPE + "an assistant thinking block unchecked",
    "messages-document_content_source": SHAPE + "a document block with a content source is "
                                                "not read",
    "messages-document_title": SHAPE + "a document block's title is not read",
    "messages-document_context": SHAPE + "a document block's context is not read",
    "messages-search_result": SHAPE + "a search_result block's content is not read",
    "messages-search_result_title": SHAPE + "a search_result block's title is not read",
    "messages-role_custom_human": {"express": SHAPE + "a role other than user/assistant "
                                   "('human': the Anthropic API refuses it, an Express server "
                                   "reads it) is not read"},
    "messages-tool_description": SHAPE + "tool definitions are never checked",
    # Responses
    "responses-split_word_parts": SHAPE + "a phrase split over two input_text parts of one "
                                          "item: each part is checked as its own block",
    "responses-earlier_user_item": SCOPE + "an earlier user item unchecked",
    "responses-instructions": SCOPE + "the instructions unchecked",
    "responses-system_item": SCOPE + "a system item unchecked",
    "responses-developer_item": SCOPE + "a developer item unchecked",
    "responses-assistant_item": SCOPE + "an assistant item (output_text) unchecked",
    "responses-function_call_output": SCOPE + "a function_call_output unchecked",
    "responses-function_call_arguments": SCOPE + "a function_call's arguments unchecked",
    "responses-reasoning_summary": SCOPE + "a reasoning item's summary unchecked",
    "responses-prompt_variable_string": SHAPE + "prompt.variables (a string) are never checked",
    "responses-prompt_variable_input_text": SHAPE + "prompt.variables (an input_text part) are "
                                                    "never checked",
    "responses-tool_description": SHAPE + "tool definitions are never checked",
    # legacy Completions
    "completions-suffix": SHAPE + "the Completions suffix is never checked",
}


def hole(case: Case, judge: str) -> str | None:
    reason = HOLES.get(case.id)
    if isinstance(reason, dict):
        return reason.get(judge)
    return reason


def params() -> Iterator[Any]:
    for case in ALL_CASES:
        for judge in JUDGES:
            reason = hole(case, judge)
            marks = [pytest.mark.xfail(strict=True, raises=Hole, reason=reason)] if reason else []
            yield pytest.param(judge, case, id=f"{judge}-{case.id}", marks=marks)


def send(stack: JudgedStack, case: Case, case_id: str) -> Answer:
    headers = [*case.headers, (CASE_HEADER, case_id)]
    trailers = [("x-checksum", "abc")] if case.transport.endswith("trailers") else []
    if case.transport.startswith("http1"):
        return http1(stack.port, "POST", case.request_path, headers, case.body,
                     chunked="chunked" in case.transport, trailers=trailers)
    return http2(stack.port, "POST", case.request_path, headers, case.body, trailers)


def error_type(body: bytes) -> str:
    """The ``error.type`` of a JSON error body (OpenAI or Anthropic shape), or ''."""
    try:
        value = json.loads(body)
    except ValueError:
        return ""
    error = value.get("error") if isinstance(value, dict) else None
    return str(error.get("type", "")) if isinstance(error, dict) else ""


def verdict(stack: JudgedStack, case_id: str, answer: Answer) -> str:
    """What happened to the request, or ``Hole`` when the judge's model read the word."""
    records = stack.judge.records(case_id)
    read = [text for record in records for text in record["texts"] if READ.search(text)]
    if read:
        raise Hole(f"the {stack.name} judge's model read {read!r} (answer {answer.status}); "
                   f"records: {records!r}")
    kind = error_type(answer.body)
    if kind.startswith("guardrail_"):
        assert not records, f"refused with {kind}, yet the judge saw it: {records!r}"
        return f"refused {answer.status} {kind}"
    if answer.status == 0 and not records:
        return "reset by envoy (no answer)"
    if 400 <= answer.status < 500 and not records:
        return f"refused {answer.status} by envoy"
    if not records:
        return f"judge: no record, answer {answer.status}"
    outcomes = sorted({record["outcome"] for record in records})
    return f"judge: {'/'.join(outcomes)}, word not read (answer {answer.status})"


@pytest.mark.parametrize(("target", "case"), list(params()), indirect=["target"])
def test_the_model_never_reads_what_the_guard_let_through(
        target: JudgedStack, case: Case, record_property: Any) -> None:
    case_id = uuid.uuid4().hex
    answer = send(target, case, case_id)
    record_property("judge", target.name)
    record_property("case", case.id)
    try:
        outcome = verdict(target, case_id, answer)
    except Hole:
        record_property("outcome", "hole")
        raise
    record_property("outcome", outcome)
