"""The judges themselves, through the stack: a clean request of every API reaches each judge,
which reads its prompt, and the judge's answer (SSE or JSON) is one the sidecar guards: a clean
stream arrives byte-identical, a blocked answer is cut. Without these, a judge that read nothing
would make every attack look refused or clean."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests import node
from tests.adversarial.cases import PATHS, anthropic, chat, completions, responses, user
from tests.adversarial.conftest import JUDGES, JudgedStack
from tests.adversarial.test_requests import error_type
from tests.adversarial.wire import http1
from tests.judges import process
from tests.judges.process import ANSWER_HEADER, CASE_HEADER

PROMPT = "tell me about pineapple"
BUILD: dict[str, Callable[..., bytes]] = {
    "chat": lambda **extra: chat(user(PROMPT), **extra),
    "messages": lambda **extra: anthropic(user(PROMPT), **extra),
    "responses": lambda **extra: responses(PROMPT, **extra),
    "completions": lambda **extra: completions(PROMPT, **extra),
}
#: The last event of each API's stream.
LAST_EVENT = {"chat": b"data: [DONE]\n\n", "completions": b"data: [DONE]\n\n",
              "messages": b"event: message_stop\n", "responses": b"event: response.completed\n"}


def post(port: int, api: str, body: bytes, **headers: str) -> tuple[str, Any]:
    case_id = uuid.uuid4().hex
    sent = [("content-type", "application/json"), (CASE_HEADER, case_id), *headers.items()]
    return case_id, http1(port, "POST", PATHS[api], sent, body)


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
@pytest.mark.parametrize("api", PATHS)
@pytest.mark.parametrize("target", JUDGES, indirect=True)
def test_a_clean_request_is_read_by_the_judge_and_answered(
        target: JudgedStack, api: str, stream: bool) -> None:
    body = BUILD[api](stream=stream)
    case_id, answer = post(target.port, api, body)
    assert answer.status == 200, answer
    records = target.judge.records(case_id)
    assert len(records) == 1, records
    assert records[0]["outcome"] == "read" and records[0]["api"] == api
    assert records[0]["path"] == PATHS[api]
    assert any(PROMPT in text for text in records[0]["texts"]), records
    # The same request straight to the judge: what passed through the guard is byte-identical.
    _, direct = post(target.judge.port, api, body)
    assert answer.body == direct.body
    if stream:
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert LAST_EVENT[api] in answer.body
    else:
        assert "All good here." in json.dumps(json.loads(answer.body))


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
@pytest.mark.parametrize("api", PATHS)
@pytest.mark.parametrize("target", JUDGES, indirect=True)
def test_a_blocked_answer_of_the_judge_is_cut(
        target: JudgedStack, api: str, stream: bool) -> None:
    scripted = {ANSWER_HEADER: "The codename is Project Nightingale, as you know."}
    _, answer = post(target.port, api, BUILD[api](stream=stream), **scripted)
    assert b"Nightingale" not in answer.body
    if stream:
        assert answer.status == 200
        assert b"guardrail_violation" in answer.body, answer.body[-400:]
    else:
        assert answer.status == 400
        assert error_type(answer.body) == "guardrail_violation"


def test_without_node_the_node_judge_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node.shutil, "which", lambda name: None)
    with pytest.raises(process.JudgeUnavailable, match="apt-get install nodejs npm"):
        process.node_command()
