"""Google Gemini through real Envoy and the sidecar process, read by the official
``google-genai`` client (issue 15): SSE streams (``alt=sse``) guarded event by event, the
JSON array of ``:streamGenerateContent`` without ``alt=sse`` and ``:generateContent`` taken
whole; HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors, types

from testkit.upstream import Script
from tests.e2e.conftest import Stack
from tests.e2e.test_apis import (
    BLOCKED_PHRASE,
    EMAIL,
    VIOLATION,
    assert_never_contacted,
    json_script,
)

MODEL = "gemini-2.5-flash"
SSE = (("content-type", "text/event-stream"),)
VERSIONS = ["http1", "http2"]


def candidate(text: str, finish: bool = False, thought: bool = False) -> dict[str, Any]:
    part: dict[str, Any] = {"text": text, **({"thought": True} if thought else {})}
    found: dict[str, Any] = {"content": {"parts": [part], "role": "model"}, "index": 0}
    if finish:
        found["finishReason"] = "STOP"
    return found


def response(text: str, finish: bool = False, thought: bool = False) -> dict[str, Any]:
    return {"candidates": [candidate(text, finish, thought)],
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 12},
            "modelVersion": MODEL, "responseId": "mSbYaK2bH4qhz7IPk5-W8Qc"}


def event(text: str, finish: bool = False, thought: bool = False) -> bytes:
    """One event as Google writes it: ``data: `` and CR LF line endings, no terminator."""
    return b"data: " + json.dumps(response(text, finish, thought)).encode() + b"\r\n\r\n"


def stream(*texts: str) -> list[bytes]:
    return [event(t, finish=i == len(texts) - 1) for i, t in enumerate(texts)]


Factory = Callable[[Stack, str, str], genai.Client]


@pytest.fixture
def client() -> Iterator[Factory]:
    """Makes clients (``stack``, script id, HTTP version) and closes them afterwards."""
    made: list[httpx.Client] = []

    def make(stack: Stack, script_id: str, version: str) -> genai.Client:
        extra: dict[str, Any] = {"http1": False, "http2": True} if version == "http2" else {}
        made.append(httpx.Client(timeout=30, **extra))
        return genai.Client(api_key="test", http_options=types.HttpOptions(
            base_url=stack.url, headers={"x-fake-script": script_id},
            httpx_client=made[-1]))

    yield make
    for one in made:
        one.close()


def read(client: genai.Client, **config: Any) -> tuple[str, Exception | None]:
    """The text the SDK shows of a stream, and what it raised."""
    shown = []
    try:
        for chunk in client.models.generate_content_stream(
                model=MODEL, contents="Tell me.",
                config=types.GenerateContentConfig(**config) if config else None):
            shown.append(chunk.text or "")
    except Exception as exc:  # noqa: BLE001 - the SDK's error is what is asserted
        return "".join(shown), exc
    return "".join(shown), None


@pytest.mark.parametrize("version", VERSIONS)
def test_a_clean_stream_is_byte_identical_and_read_whole(stack: Stack, client: Factory,
                                                         version: str) -> None:
    events = stream("Café ", "au lait ", "costs €3.")
    extra: dict[str, Any] = {"http1": False, "http2": True} if version == "http2" else {}
    script_id = stack.llm.register(Script(chunks=tuple(events), delays_ms=5, headers=SSE))
    with httpx.Client(timeout=30, **extra) as http, http.stream(
            "POST", f"{stack.url}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse",
            json={"contents": [{"parts": [{"text": "Coffee?"}]}]},
            headers={"x-fake-script": script_id}) as answer:
        body = b"".join(answer.iter_raw())
    assert answer.status_code == 200 and body == b"".join(events)
    script_id = stack.llm.register(Script(chunks=tuple(events), delays_ms=5, headers=SSE))
    assert read(client(stack, script_id, version)) == ("Café au lait costs €3.", None)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_blocked_answer_raises_after_the_released_text(stack: Stack, client: Factory,
                                                        version: str) -> None:
    texts = ["The plan ", "is simple. ", "It is called ", "Project ", "Nightingale ",
             "and it ships."] + [f"filler {i} " for i in range(150)]
    script_id = stack.llm.register(Script(chunks=tuple(stream(*texts)), delays_ms=40,
                                          headers=SSE))
    shown, raised = read(client(stack, script_id, version))
    assert isinstance(raised, errors.ClientError)
    assert raised.code == 400 and raised.message == VIOLATION
    assert "The plan is simple. It is called Project Nightingale".startswith(shown)
    assert "Nightingale" not in shown
    record = stack.llm.record_for_script(script_id, timeout=10)
    assert record.peer_closed  # the model was stopped
    assert record.closed_after_chunks is not None and record.closed_after_chunks < 100


def test_thought_parts_are_checked(stack: Stack, client: Factory) -> None:
    events = [event("The plan is Project Nightingale.", thought=True), event("Sure.", True)]
    script_id = stack.llm.register(Script(chunks=tuple(events), delays_ms=5, headers=SSE))
    shown, raised = read(client(stack, script_id, "http1"))
    assert isinstance(raised, errors.ClientError) and raised.message == VIOLATION
    assert "Nightingale" not in shown


def test_a_masked_answer_arrives_masked(stack: Stack, client: Factory) -> None:
    events = stream("Write to ", EMAIL, " today.")
    script_id = stack.llm.register(Script(chunks=tuple(events), delays_ms=5, headers=SSE))
    assert read(client(stack, script_id, "http1")) == ("Write to {EMAIL} today.", None)


def test_whole_answers_are_checked(stack: Stack, client: Factory) -> None:
    script_id = stack.llm.register(json_script(response(f"Write to {EMAIL}.", True)))
    answer = client(stack, script_id, "http1").models.generate_content(model=MODEL,
                                                                        contents="Mail?")
    assert answer.text == "Write to {EMAIL}."
    script_id = stack.llm.register(json_script(response(f"It is {BLOCKED_PHRASE}.", True)))
    with pytest.raises(errors.ClientError) as raised:
        client(stack, script_id, "http1").models.generate_content(model=MODEL,
                                                                  contents="Name?")
    assert raised.value.code == 400 and raised.value.message == VIOLATION


def test_a_json_array_stream_is_checked_whole(stack: Stack) -> None:
    # ``:streamGenerateContent`` without ``alt=sse``: one JSON array of responses.
    array = [response("Our plan is "), response("Project Nightingale.", True)]
    script_id = stack.llm.register(json_script(array))  # type: ignore[arg-type]
    with httpx.Client(timeout=30) as http:
        answer = http.post(f"{stack.url}/v1beta/models/{MODEL}:streamGenerateContent",
                           json={"contents": [{"parts": [{"text": "Plan?"}]}]},
                           headers={"x-fake-script": script_id})
    assert answer.status_code == 400 and b"Nightingale" not in answer.content
    assert answer.json()["error"]["message"] == VIOLATION
    array = [response("Write to "), response(f"{EMAIL} today.", True)]
    script_id = stack.llm.register(json_script(array))  # type: ignore[arg-type]
    with httpx.Client(timeout=30) as http:
        answer = http.post(f"{stack.url}/v1beta/models/{MODEL}:streamGenerateContent",
                           json={"contents": [{"parts": [{"text": "Mail?"}]}]},
                           headers={"x-fake-script": script_id})
    assert answer.status_code == 200
    texts = [p["text"] for r in answer.json() for c in r["candidates"]
             for p in c["content"]["parts"]]
    assert "".join(texts) == "Write to {EMAIL} today."


@pytest.mark.parametrize("version", VERSIONS)
def test_a_blocked_prompt_never_reaches_the_upstream(stack: Stack, client: Factory,
                                                     version: str) -> None:
    script_id = stack.llm.register(Script(chunks=tuple(stream("never")), headers=SSE))
    gemini = client(stack, script_id, version)
    with pytest.raises(errors.ClientError) as raised:
        list(gemini.models.generate_content_stream(model=MODEL, contents="Say bazinga"))
    assert raised.value.code == 400 and raised.value.message == VIOLATION
    with pytest.raises(errors.ClientError):
        gemini.models.generate_content(
            model=MODEL, contents="Hello",
            config=types.GenerateContentConfig(system_instruction="You say bazinga."))
    assert_never_contacted(stack, script_id)


def raw_json_event(text: str, finish: bool = False) -> bytes:
    """An answer as JSON lines without ``data: ``: SSE readers skip them (unknown fields),
    google-genai joins them until the braces balance and shows the candidates."""
    whole = json.dumps(response(text, finish)).encode()
    return whole[:40] + b"\r\n" + whole[40:] + b"\r\n\r\n"


def test_gemini_raw_json_lines_without_data_are_read(stack: Stack, client: Factory) -> None:
    """Regression (issue 15 review): JSON lines without ``data: `` passed unread."""
    events = [event("Hello. "), raw_json_event(f"It is {BLOCKED_PHRASE}."), event("Bye.", True)]
    script_id = stack.llm.register(Script(chunks=tuple(events), delays_ms=5, headers=SSE))
    shown, raised = read(client(stack, script_id, "http1"))
    assert isinstance(raised, errors.ClientError) and raised.message == VIOLATION
    assert shown == "Hello. "
    events = [event("Hello. "), raw_json_event(f"Write to {EMAIL}."), event(" Bye.", True)]
    script_id = stack.llm.register(Script(chunks=tuple(events), delays_ms=5, headers=SSE))
    assert read(client(stack, script_id, "http1")) == ("Hello. Write to {EMAIL}. Bye.", None)


def test_gemini_tool_call_args_and_finish_message_are_read(stack: Stack, client: Factory) -> None:
    """Regression (issue 15 review): members the format did not know passed unread."""
    tool = response("Looking. ")
    tool["candidates"][0]["content"]["parts"].append(
        {"toolCall": {"name": "search", "args": {"query": f"all about {BLOCKED_PHRASE}"}}})
    events = [event("Hello. "), b"data: " + json.dumps(tool).encode() + b"\r\n\r\n",
              event("Bye.", True)]
    script_id = stack.llm.register(Script(chunks=tuple(events), delays_ms=5, headers=SSE))
    shown, raised = read(client(stack, script_id, "http1"))
    assert isinstance(raised, errors.ClientError) and raised.message == VIOLATION
    assert shown == "Hello. "
    final = response("Done.", True)
    final["candidates"][0]["finishMessage"] = f"Stopped: {BLOCKED_PHRASE}"
    script_id = stack.llm.register(json_script(final))
    with pytest.raises(errors.ClientError) as caught:
        client(stack, script_id, "http1").models.generate_content(model=MODEL, contents="Hi.")
    assert caught.value.message == VIOLATION
