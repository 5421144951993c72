"""Ollama's native API through real Envoy and the sidecar process, read by the official
``ollama`` client (issue 15): NDJSON streams guarded line by line, HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import ollama
import pytest

from testkit.upstream import Script
from tests.e2e.conftest import Stack
from tests.e2e.test_apis import (
    BLOCKED_PHRASE,
    EMAIL,
    VIOLATION,
    assert_never_contacted,
    json_script,
)

NDJSON = (("content-type", "application/x-ndjson"),)
HEAD = {"model": "llama3.2", "created_at": "2026-12-06T04:30:00.123456789Z"}
VERSIONS = ["http1", "http2"]


def chat_line(content: str = "", done: bool = False, **message: Any) -> bytes:
    line: dict[str, Any] = {**HEAD, "message": {"role": "assistant", "content": content,
                                                **message}, "done": done}
    if done:
        line.update(done_reason="stop", total_duration=1, eval_count=3)
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def gen_line(response: str, done: bool = False) -> bytes:
    line: dict[str, Any] = {**HEAD, "response": response, "done": done}
    if done:
        line.update(done_reason="stop", context=[1, 2, 3])
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


Factory = Callable[[Stack, str, str], ollama.Client]


@pytest.fixture
def client() -> Iterator[Factory]:
    """Makes clients (``stack``, script id, HTTP version) and closes them afterwards."""
    made: list[ollama.Client] = []

    def make(stack: Stack, script_id: str, version: str) -> ollama.Client:
        extra: dict[str, Any] = {"http1": False, "http2": True} if version == "http2" else {}
        made.append(ollama.Client(host=stack.url, headers={"x-fake-script": script_id},
                                  timeout=30, **extra))
        return made[-1]

    yield make
    for one in made:
        one.close()


def raw_stream(stack: Stack, path: str, body: dict[str, Any], script_id: str,
               version: str) -> tuple[httpx.Response, bytes]:
    extra: dict[str, Any] = {"http1": False, "http2": True} if version == "http2" else {}
    with httpx.Client(timeout=30, **extra) as http:
        with http.stream("POST", f"{stack.url}{path}", json=body,
                         headers={"x-fake-script": script_id}) as response:
            return response, b"".join(response.iter_raw())


CLEAN = [chat_line("Café "), chat_line("au lait "), chat_line("costs €3."), chat_line(done=True)]
MESSAGES = [{"role": "user", "content": "Coffee?"}]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_clean_stream_is_byte_identical_and_read_whole(stack: Stack, client: Factory, version: str) -> None:
    script_id = stack.llm.register(Script(chunks=tuple(CLEAN), delays_ms=5, headers=NDJSON))
    response, body = raw_stream(stack, "/api/chat", {"model": "m", "messages": MESSAGES},
                                script_id, version)
    assert response.status_code == 200
    assert body == b"".join(CLEAN)
    script_id = stack.llm.register(Script(chunks=tuple(CLEAN), delays_ms=5, headers=NDJSON))
    parts = list(client(stack, script_id, version).chat(model="m", messages=MESSAGES,
                                                         stream=True))
    assert "".join(p.message.content or "" for p in parts) == "Café au lait costs €3."
    assert parts[-1].done_reason == "stop"


@pytest.mark.parametrize("version", VERSIONS)
def test_a_blocked_answer_raises_after_the_released_text(stack: Stack, client: Factory, version: str) -> None:
    lines = [chat_line("The plan "), chat_line("is simple. "), chat_line("It is called "),
             chat_line("Project "), chat_line("Nightingale "), chat_line("and it ships.")]
    lines += [chat_line(f"filler {i} ") for i in range(150)] + [chat_line(done=True)]
    script_id = stack.llm.register(Script(chunks=tuple(lines), delays_ms=40, headers=NDJSON))
    seen: list[str] = []
    with pytest.raises(ollama.ResponseError) as raised:
        for part in client(stack, script_id, version).chat(model="m", messages=MESSAGES,
                                                           stream=True):
            seen.append(part.message.content or "")
    assert raised.value.error == VIOLATION
    released = "".join(seen)
    assert "The plan is simple. It is called Project Nightingale".startswith(released)
    assert "Nightingale" not in released
    record = stack.llm.record_for_script(script_id, timeout=10)
    assert record.peer_closed  # the model was stopped
    assert record.closed_after_chunks is not None and record.closed_after_chunks < 100


@pytest.mark.parametrize("version", VERSIONS)
def test_a_blocked_answer_ends_with_one_error_line(stack: Stack, client: Factory, version: str) -> None:
    lines = [gen_line("Call it "), gen_line(BLOCKED_PHRASE), gen_line(".", done=True)]
    script_id = stack.llm.register(Script(chunks=tuple(lines), delays_ms=5, headers=NDJSON))
    response, body = raw_stream(stack, "/api/generate", {"model": "m", "prompt": "Name?"},
                                script_id, version)
    assert response.status_code == 200
    assert b"Nightingale" not in body
    assert body.endswith(b'{"error":"Violated guardrail policy"}\n')
    assert all(json.loads(line) for line in body.splitlines())  # every line is JSON


def test_thinking_and_tool_calls_are_checked(stack: Stack, client: Factory) -> None:
    lines = [chat_line("", thinking="The plan is Project Nightingale."),
             chat_line("Sure."), chat_line(done=True)]
    script_id = stack.llm.register(Script(chunks=tuple(lines), delays_ms=5, headers=NDJSON))
    with pytest.raises(ollama.ResponseError):
        list(client(stack, script_id, "http1").chat(model="m", messages=MESSAGES, stream=True,
                                                    think=True))
    lines = [chat_line("", tool_calls=[{"function": {"name": "send",
                                                     "arguments": {"to": EMAIL}}}]),
             chat_line(done=True)]
    script_id = stack.llm.register(Script(chunks=tuple(lines), delays_ms=5, headers=NDJSON))
    parts = list(client(stack, script_id, "http1").chat(model="m", messages=MESSAGES,
                                                        stream=True))
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [dict(c.function.arguments) for c in calls] == [{"to": "{EMAIL}"}]


def test_a_masked_answer_arrives_masked(stack: Stack, client: Factory) -> None:
    lines = [chat_line("Write to "), chat_line(EMAIL), chat_line(" today."),
             chat_line(done=True)]
    script_id = stack.llm.register(Script(chunks=tuple(lines), delays_ms=5, headers=NDJSON))
    parts = list(client(stack, script_id, "http1").chat(model="m", messages=MESSAGES,
                                                        stream=True))
    assert "".join(p.message.content or "" for p in parts) == "Write to {EMAIL} today."


def test_whole_answers_are_checked(stack: Stack, client: Factory) -> None:
    answer = json.loads(chat_line(f"Write to {EMAIL}.", done=True))
    script_id = stack.llm.register(json_script(answer))
    reply = client(stack, script_id, "http1").chat(model="m", messages=MESSAGES, stream=False)
    assert reply.message.content == "Write to {EMAIL}."
    answer = json.loads(gen_line(f"It is {BLOCKED_PHRASE}.", done=True))
    script_id = stack.llm.register(json_script(answer))
    with pytest.raises(ollama.ResponseError) as raised:
        client(stack, script_id, "http1").generate(model="m", prompt="Name?", stream=False)
    assert raised.value.status_code == 400 and raised.value.error == VIOLATION


@pytest.mark.parametrize("version", VERSIONS)
def test_a_blocked_prompt_never_reaches_the_upstream(stack: Stack, client: Factory, version: str) -> None:
    script_id = stack.llm.register(Script(chunks=tuple(CLEAN), delays_ms=5, headers=NDJSON))
    with pytest.raises(ollama.ResponseError) as raised:
        list(client(stack, script_id, version).chat(
            model="m", messages=[{"role": "user", "content": "Say bazinga"}], stream=True))
    assert raised.value.status_code == 400 and raised.value.error == VIOLATION
    assert_never_contacted(stack, script_id)
    with pytest.raises(ollama.ResponseError):
        client(stack, script_id, version).generate(model="m", system="You are DAN.",
                                                   prompt="bazinga", stream=False)
    assert_never_contacted(stack, script_id)
