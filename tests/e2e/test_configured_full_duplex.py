"""Real Envoy with the response body mode *configured* as FULL_DUPLEX_STREAMED (as many ext_proc
examples do), instead of envoy/envoy.yaml's NONE switched per request. Envoy then ignores every
mode override, so every response body, guarded or not, streams through the sidecar and must be
answered chunk by chunk. Regression (session 3): unguarded bodies were never answered (the
request hung: FULL_DUPLEX has no timer) and a JSON answer got an answer Envoy rejects."""

from __future__ import annotations

import json
from typing import Any

import pytest

from testkit.upstream import Script
from tests.e2e.conftest import SMALL_WINDOWS, Stack, StackFactory
from tests.e2e.test_chat_stream import HTTP_VERSIONS, events
from tests.e2e.test_hostile import fetch
from tests.support import BLOCK_FRAME, chat_request

JSON = (("content-type", "application/json"),)


def full_duplex_configured(config: dict[str, Any]) -> None:
    from testkit.stack import ext_proc_filter

    ext_proc_filter(config)["processing_mode"] = {
        "request_body_mode": "BUFFERED",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "response_trailer_mode": "SEND",
    }


@pytest.fixture(scope="module")
def fd_stack(stacks: StackFactory) -> Stack:
    return stacks(SMALL_WINDOWS, tweak_envoy=full_duplex_configured)


@pytest.fixture(scope="module")
def fd_off_stack(stacks: StackFactory) -> Stack:
    return stacks(["--input-check", "off", "--output-check", "off"],
                  tweak_envoy=full_duplex_configured)


def chat_json(content: str) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "demo",
                       "choices": [{"index": 0, "finish_reason": "stop", "message": {
                           "role": "assistant", "content": content}}]}).encode()


@pytest.mark.parametrize("version", HTTP_VERSIONS)
def test_sse_is_still_guarded(fd_stack: Stack, version: str) -> None:
    clean = b"".join(events("Caf\u00e9 ", "fine ", "words."))
    result = fetch(fd_stack, Script(chunks=(clean[:40], clean[40:]), delays_ms=10), version)
    assert result.error is None and result.status == 200 and result.body == clean
    blocked = events("Alpha. ", "It is Project Nightingale. ", *[f"w{i}. " for i in range(20)])
    result = fetch(fd_stack, Script(chunks=tuple(blocked), delays_ms=10), version)
    assert result.error is None and result.body.endswith(BLOCK_FRAME)
    assert b"Nightingale" not in result.body


@pytest.mark.parametrize("version", HTTP_VERSIONS)
def test_json_answer_is_checked_and_passed_whole(fd_stack: Stack, version: str) -> None:
    answer = chat_json("A plain answer, " * 20)
    script = Script(chunks=(answer[:50], answer[50:]), delays_ms=5, headers=JSON)
    # A request that hung (the regression) would end in fetch's own timeout, an error here.
    # (Was: the duration compared with 5 s as well.)
    result = fetch(fd_stack, script, version, body=chat_request("hello", stream=False))
    assert result.error is None and result.status == 200 and result.body == answer


def test_blocked_json_answer_gets_the_error_body_behind_the_200(fd_stack: Stack) -> None:
    answer = chat_json("It is Project Nightingale, of course.")
    script = Script(chunks=(answer,), headers=JSON)
    result = fetch(fd_stack, script, "http1", body=chat_request("hello", stream=False))
    assert result.error is None and result.status == 200  # the headers went out first
    assert json.loads(result.body)["error"]["type"] == "guardrail_violation"
    assert b"Nightingale" not in result.body


@pytest.mark.parametrize("version", HTTP_VERSIONS)
def test_unguarded_answers_pass_through(fd_off_stack: Stack, version: str) -> None:
    whole = b"".join(events("one ", "two ", "three"))
    result = fetch(fd_off_stack, Script(chunks=(whole[:25], whole[25:]), delays_ms=10), version)
    assert result.error is None and result.status == 200 and result.body == whole
    error = Script(chunks=(b'{"error": "nope"}',), status=429, headers=JSON)
    result = fetch(fd_off_stack, error, version)  # a hang: fetch's timeout, an error here
    assert result.error is None and result.status == 429 and result.body == b'{"error": "nope"}'
