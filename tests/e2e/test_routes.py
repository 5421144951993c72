"""Per-route policy in one Envoy: routes carry ``x-guardrail-*`` settings to the sidecar as
ext_proc gRPC initial metadata (``ExtProcPerRoute.overrides.grpc_initial_metadata``), or turn
the filter off (``ExtProcPerRoute.disabled``).

Routes of the stack below (each ``prefix_rewrite`` to ``/``, same upstream):

* ``/route-a/``: guardrail ``guardrailaaa``;
* ``/route-b/``: guardrail ``guardrailbbb``, async stream mode;
* ``/route-off/``: ext_proc disabled by Envoy: no side stream at all;
* ``/route-unguarded/``: ``x-guardrail-enabled: off``: a side stream, but no check;
* ``/route-shadow/``: guardrail ``guardrailsss`` in shadow mode: checked, never changed;
* ``/route-passing/``: ``x-guardrail-unknown-traffic: pass``: what no format recognises passes
  unchecked (an LLM call is still guarded);
* ``/route-rejecting/``: ``x-guardrail-unknown-traffic: reject``: it is refused;
* ``/`` (the catch-all): the sidecar's default, guardrail ``demoguardrail``.

Which guardrail checked what is read back from the local Bedrock endpoint's recorded calls.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from typing import Any

import httpx
import openai
import pytest

from extproc.localbedrock import RecordedCall
from tests.e2e.conftest import GUARDRAIL_ID, SMALL_WINDOWS, Stack, StackFactory, with_routes
from tests.e2e.test_apis import (
    BLOCKED_DELTAS,
    EMAIL,
    MASKED_EXPECTED,
    MASKED_TEXT,
    VIOLATION,
    AnthropicAPI,
    ChatAPI,
    anthropic_client,
    json_script,
    openai_client,
    post_raw,
    sse_script,
    wait_settled,
)
from tests.support import BLOCK_FRAME, WAIT_S

ROUTES: dict[str, dict[str, str] | None] = {
    "/route-a/": {"x-guardrail-id": "guardrailaaa"},
    "/route-b/": {"x-guardrail-id": "guardrailbbb", "x-guardrail-mode": "async"},
    "/route-off/": None,
    "/route-unguarded/": {"x-guardrail-enabled": "off"},
    "/route-shadow/": {"x-guardrail-id": "guardrailsss", "x-guardrail-shadow": "on"},
    "/route-passing/": {"x-guardrail-unknown-traffic": "pass"},
    "/route-rejecting/": {"x-guardrail-unknown-traffic": "reject"},
}
CHAT = ChatAPI()
EXT_PROC_STATS = "http.llm.ext_proc."


@pytest.fixture(scope="module")
def routes_stack(stacks: StackFactory) -> Stack:
    return stacks(SMALL_WINDOWS, tweak_envoy=with_routes(ROUTES))


class Calls:
    """The guardrail calls made while the block ran (waits for earlier streams' calls to stop
    first, and for this block's last calls after)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.calls: list[RecordedCall] = []

    def __enter__(self) -> Calls:
        wait_settled(self.stack)
        self.count = self.stack.bedrock.stats.calls
        self.since = time.time()
        return self

    def __exit__(self, *exc: Any) -> None:
        wait_settled(self.stack)
        stats = self.stack.bedrock.stats
        self.calls = [c for c in stats.recent if c.timestamp >= self.since]
        self.total = stats.calls - self.count

    def ids(self) -> set[str]:
        return {c.guardrail_id for c in self.calls}

    def sources(self) -> set[str]:
        return {c.source for c in self.calls}

    def outcomes(self, source: str) -> list[str]:
        return [c.outcome for c in self.calls if c.source == source]


def access_log(stack: Stack, request_id: str, timeout: float = WAIT_S) -> dict[str, Any]:
    """Envoy's JSON access log entry of the request with this ``x-request-id`` (the logged
    path is the rewritten one, so requests are found by id)."""
    deadline = time.monotonic() + timeout
    while True:
        # Envoy flushes access logs every 10 s by default; reopening them flushes at once.
        urllib.request.urlopen(urllib.request.Request(
            f"{stack.envoy.admin_url}/reopen_logs", method="POST"), timeout=2).close()
        time.sleep(0.05)
        for line in stack.envoy.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and request_id in line:
                entry: dict[str, Any] = json.loads(line)
                if entry.get("request_id") == request_id:
                    return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no access log entry for request {request_id}")
        time.sleep(0.2)


def new_request_id() -> str:
    return f"route-test-{uuid.uuid4()}"


def guardrail_metadata(entry: dict[str, Any]) -> dict[str, Any]:
    value = entry.get("guardrail")
    if isinstance(value, str):
        value = json.loads(value) if value not in ("", "-") else {}
    return value or {}


def violating_stream(stack: Stack, delays_ms: float = 10) -> tuple[str, bytes]:
    events = CHAT.stream_events(BLOCKED_DELTAS)
    return stack.llm.register(sse_script(events, delays_ms=delays_ms)), b"".join(events)


# -- a route with its own guardrail ---------------------------------------------------------


def test_route_a_checks_prompt_and_answer_with_its_guardrail(routes_stack: Stack) -> None:
    stack = routes_stack
    clean = CHAT.stream_events(["The museum ", "opens at nine ", "and closes at six."])
    script_id = stack.llm.register(sse_script(clean, delays_ms=10))
    request_id = new_request_id()
    with Calls(stack) as calls:
        received: list[str] = []
        with openai_client(stack, script_id, prefix="/route-a") as sdk:
            stream = sdk.chat.completions.create(
                model=CHAT.model, stream=True, extra_headers={"x-request-id": request_id},
                messages=[{"role": "user", "content": "When does the museum open?"}])
            for chunk in stream:
                received += [c.delta.content for c in chunk.choices if c.delta.content]
    assert "".join(received) == "The museum opens at nine and closes at six."
    record = stack.llm.record_for_script(script_id)
    assert record.path == "/v1/chat/completions"  # the route's prefix was rewritten
    assert calls.ids() == {"guardrailaaa"}
    assert calls.sources() == {"INPUT", "OUTPUT"}
    assert calls.outcomes("INPUT") == ["NONE"]
    assert any("When does the museum open?" in t for c in calls.calls for t in c.texts)
    entry = access_log(stack, request_id)
    assert entry["response_code"] == 200
    metadata = guardrail_metadata(entry)
    assert metadata["guardrail_id"] == "guardrailaaa"
    assert metadata["outcome"] == "pass"


def test_route_a_blocks_with_its_guardrail(routes_stack: Stack) -> None:
    stack = routes_stack
    script_id, whole = violating_stream(stack)
    with Calls(stack) as calls:
        response, body = post_raw(stack, "/route-a/v1/chat/completions",
                                  CHAT.request("The project?", True), script_id)
    assert response.status_code == 200
    assert body.endswith(BLOCK_FRAME)
    assert whole.startswith(body[: -len(BLOCK_FRAME)])
    assert b"Nightingale" not in body
    assert calls.ids() == {"guardrailaaa"}
    assert "GUARDRAIL_INTERVENED" in calls.outcomes("OUTPUT")

    prompt_script = stack.llm.register(sse_script(CHAT.stream_events(["never"])))
    with Calls(stack) as calls:
        with pytest.raises(openai.BadRequestError) as caught:
            with openai_client(stack, prompt_script, prefix="/route-a") as sdk:
                sdk.chat.completions.create(
                    model=CHAT.model, messages=[{"role": "user", "content": "bazinga!"}])
    assert VIOLATION in str(caught.value)
    assert stack.llm.records_for_script(prompt_script) == []
    assert [(c.guardrail_id, c.source, c.outcome) for c in calls.calls] == [
        ("guardrailaaa", "INPUT", "GUARDRAIL_INTERVENED")]


def test_route_a_policy_applies_to_every_api(routes_stack: Stack) -> None:
    """The route's guardrail is a property of the route, not of the API: Anthropic Messages
    through route A are checked (and masked) by guardrailaaa too."""
    stack = routes_stack
    api = AnthropicAPI()
    script_id = stack.llm.register(json_script(api.json_answer(MASKED_TEXT)))
    with Calls(stack) as calls:
        with anthropic_client(stack, script_id, prefix="/route-a") as sdk:
            answer = sdk.messages.create(model=api.model, max_tokens=256,
                                         messages=[{"role": "user", "content": "Contact?"}])
    assert answer.content[0].text == MASKED_EXPECTED
    assert EMAIL not in answer.model_dump_json()
    assert calls.ids() == {"guardrailaaa"}
    assert calls.sources() == {"INPUT", "OUTPUT"}
    assert stack.llm.record_for_script(script_id).path == "/v1/messages"


# -- a second route: another guardrail, async mode --------------------------------------------


def test_route_b_uses_its_guardrail_and_async_mode(routes_stack: Stack) -> None:
    stack = routes_stack
    clean = CHAT.stream_events(["one ", "two ", "three ", "four."])
    script_id = stack.llm.register(sse_script(clean, delays_ms=10))
    request_id = new_request_id()
    with Calls(stack) as calls:
        response, body = post_raw(stack, "/route-b/v1/chat/completions",
                                  CHAT.request("Count to four", True), script_id,
                                  headers={"x-request-id": request_id})
    assert response.status_code == 200
    assert body == b"".join(clean)
    assert calls.ids() == {"guardrailbbb"}
    assert calls.sources() == {"INPUT", "OUTPUT"}
    metadata = guardrail_metadata(access_log(stack, request_id))
    assert metadata["guardrail_id"] == "guardrailbbb"
    assert metadata["mode"] == "async"

    violating, whole = violating_stream(stack)
    with Calls(stack) as calls:
        response, body = post_raw(stack, "/route-b/v1/chat/completions",
                                  CHAT.request("The project?", True), violating)
    # Async mode releases at once and still ends the stream with the frame.
    assert body.endswith(BLOCK_FRAME)
    assert whole.startswith(body[: -len(BLOCK_FRAME)])
    assert calls.ids() == {"guardrailbbb"}
    assert "GUARDRAIL_INTERVENED" in calls.outcomes("OUTPUT")


def test_catch_all_route_keeps_the_default_guardrail(routes_stack: Stack) -> None:
    stack = routes_stack
    script_id, _ = violating_stream(stack)
    with Calls(stack) as calls:
        _, body = post_raw(stack, "/v1/chat/completions", CHAT.request("The project?", True),
                           script_id)
    assert body.endswith(BLOCK_FRAME)
    assert calls.ids() == {GUARDRAIL_ID}
    assert calls.sources() == {"INPUT", "OUTPUT"}


# -- routes without checks --------------------------------------------------------------------


def test_route_off_has_no_side_stream_and_no_check(routes_stack: Stack) -> None:
    stack = routes_stack
    script_id, whole = violating_stream(stack)
    before = stack.envoy.stats(EXT_PROC_STATS)
    with Calls(stack) as calls:
        response, body = post_raw(stack, "/route-off/v1/chat/completions",
                                  CHAT.request("bazinga: the project?", True), script_id)
    after = stack.envoy.stats(EXT_PROC_STATS)
    assert response.status_code == 200
    assert body == whole  # blocked content passes untouched
    record = stack.llm.record_for_script(script_id)
    assert record.completed and not record.peer_closed
    assert json.loads(record.body)["messages"][0]["content"] == "bazinga: the project?"
    assert record.header("accept-encoding") == "gzip"  # the sidecar never saw the request
    assert calls.calls == [] and calls.total == 0
    for stat in ("streams_started", "stream_msgs_sent"):
        name = EXT_PROC_STATS + stat
        assert after.get(name, 0) == before.get(name, 0), name


def test_route_with_guardrail_enabled_off_passes_untouched(routes_stack: Stack) -> None:
    stack = routes_stack
    script_id, whole = violating_stream(stack)
    before = stack.envoy.stats(EXT_PROC_STATS)
    with Calls(stack) as calls:
        response, body = post_raw(stack, "/route-unguarded/v1/chat/completions",
                                  CHAT.request("bazinga: the project?", True), script_id)
    after = stack.envoy.stats(EXT_PROC_STATS)
    assert response.status_code == 200
    assert body == whole
    record = stack.llm.record_for_script(script_id)
    assert record.completed and not record.peer_closed
    assert calls.calls == [] and calls.total == 0
    # A side stream, answered with one message: the request headers, then skip.
    started = EXT_PROC_STATS + "streams_started"
    sent = EXT_PROC_STATS + "stream_msgs_sent"
    assert after[started] - before.get(started, 0) == 1
    assert after[sent] - before.get(sent, 0) == 1

    json_id = stack.llm.register(json_script(CHAT.json_answer("".join(BLOCKED_DELTAS))))
    with Calls(stack) as calls:
        with openai_client(stack, json_id, prefix="/route-unguarded") as sdk:
            answer = sdk.chat.completions.create(
                model=CHAT.model, messages=[{"role": "user", "content": "bazinga"}])
    assert answer.choices[0].message.content == "".join(BLOCKED_DELTAS)
    assert calls.total == 0


# -- unknown traffic ----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/embeddings"), ("POST", "/v1/files"), ("PUT", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions/extra"), ("POST", "/healthz"), ("GET", "/v1/models"),
])
def test_what_no_format_recognises_passes_untouched_where_the_route_says_pass(
        routes_stack: Stack, method: str, path: str) -> None:
    stack = routes_stack
    request = bytes(range(256)) * 400  # 100 KiB, binary
    answer = b"data: Project Nightingale\n\n" + bytes(range(256))
    script_id = stack.llm.register(sse_script([answer[:10], answer[10:]]))
    before = stack.envoy.stats(EXT_PROC_STATS)
    with Calls(stack) as calls:
        with httpx.Client(timeout=WAIT_S) as http:
            response = http.request(method, f"{stack.url}/route-passing{path}", content=request,
                                    headers={"content-type": "application/octet-stream",
                                             "x-fake-script": script_id})
    after = stack.envoy.stats(EXT_PROC_STATS)
    assert response.status_code == 200 and response.content == answer
    assert stack.llm.record_for_script(script_id).body == request
    assert calls.total == 0
    sent = EXT_PROC_STATS + "stream_msgs_sent"
    assert after[sent] - before.get(sent, 0) == 1  # the request headers, nothing else
    # An LLM call on the same route is still guarded.
    blocked_id = stack.llm.register(json_script(CHAT.json_answer("fine")))
    response, body = post_raw(stack, "/route-passing/v1/chat/completions",
                              CHAT.request("bazinga now", False), blocked_id)
    assert response.status_code == 400
    assert json.loads(body)["error"]["type"] == "guardrail_violation"


def test_what_no_format_recognises_is_refused_where_the_route_says_reject(
        routes_stack: Stack) -> None:
    stack = routes_stack
    script_id = stack.llm.register(json_script({"data": []}))
    response, body = post_raw(stack, "/route-rejecting/v1/embeddings",
                              {"model": "e", "input": "hello"}, script_id)
    assert response.status_code == 403
    assert json.loads(body)["error"]["type"] == "guardrail_unrecognised_request"
    assert stack.llm.records_for_script(script_id) == []


# -- shadow -----------------------------------------------------------------------------------


def test_shadow_route_checks_everything_and_changes_nothing(routes_stack: Stack) -> None:
    stack = routes_stack
    script_id, whole = violating_stream(stack)
    request_id = new_request_id()
    with Calls(stack) as calls:
        response, body = post_raw(stack, "/route-shadow/v1/chat/completions",
                                  CHAT.request("bazinga: the project?", True), script_id,
                                  headers={"x-request-id": request_id})
    assert response.status_code == 200
    assert body == whole  # byte-identical, violation and all
    record = stack.llm.record_for_script(script_id)
    assert record.completed and not record.peer_closed
    # The prompt would have been blocked, the answer too: counted, not enforced.
    assert calls.ids() == {"guardrailsss"}
    assert calls.outcomes("INPUT") == ["GUARDRAIL_INTERVENED"]
    assert "GUARDRAIL_INTERVENED" in calls.outcomes("OUTPUT")
    metadata = guardrail_metadata(access_log(stack, request_id))
    assert metadata["guardrail_id"] == "guardrailsss"
    assert metadata["mode"] == "shadow"
    assert metadata["outcome"] == "pass"
    assert metadata.get("would_block", 0) >= 1
    assert metadata.get("would_block_input") is True


def test_shadow_route_passes_a_violating_json_answer(routes_stack: Stack) -> None:
    stack = routes_stack
    answer = CHAT.json_answer("".join(BLOCKED_DELTAS[:10]))
    script_id = stack.llm.register(json_script(answer))
    with Calls(stack) as calls:
        response, body = post_raw(stack, "/route-shadow/v1/chat/completions",
                                  CHAT.request("The project?", False), script_id)
    assert response.status_code == 200
    assert json.loads(body) == answer
    assert calls.ids() == {"guardrailsss"}
    assert calls.outcomes("OUTPUT") == ["GUARDRAIL_INTERVENED"]


