"""A block read by the Vercel AI SDK (``ai`` with ``@ai-sdk/openai`` and ``@ai-sdk/anthropic``,
pinned in ``tests/clients/node/package.json``), through real Envoy and the sidecar process.

An application built on the AI SDK decides from the SDK's reading of an error whether to call
again: ``streamText`` itself retries a retryable error raised before any output (two retries by
default), and a retryable error part mid-stream invites the application to. A guardrail block is
a policy decision: calling again only spends another answer on the same refusal. So every
terminal frame must read as a non-retryable client error, early (before any text) and late
(after released text), for each API the SDK speaks.

Regression (issue 14, class 11): the Responses ``event: error`` frame carried
``code: "guardrail_violation"``, which the SDK maps to status 500, retryable: ``streamText``
sent the request three times, and a mid-stream error part said ``isRetryable: true``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.test_apis import (
    API,
    APIS,
    BLOCKED_DELTAS,
    BLOCKED_PHRASE,
    VIOLATION,
    api_param,
    sse_script,
)
from tests.node import NodeUnavailable, node_ready

CLIENT_DIR = Path(__file__).resolve().parents[1] / "clients" / "node"
#: The block lands before any text is released: the phrase is in the first delta.
EARLY_DELTAS = ["Project Nightingale ", "is the plan. "] + [f"filler {i:02d} " for i in range(30)]
TIMEOUT_S = 60


def ai_sdk_stream(stack: Stack, api: API, script_id: str) -> dict[str, Any]:
    """One ``streamText`` call with the SDK's default retries, and what the application saw."""
    try:
        node = node_ready(CLIENT_DIR)
    except NodeUnavailable as exc:
        pytest.fail(str(exc))
    done = subprocess.run(
        [node, str(CLIENT_DIR / "ai_sdk_stream.mjs"), "--api", api.name,
         "--base-url", f"{stack.url}/v1", "--header", f"x-fake-script={script_id}",
         "--max-retries", "2"],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print("the application saw:", json.dumps(seen, indent=1))  # shown when a test fails
    return seen


def test_the_client_speaks_every_api() -> None:
    assert sorted(a.name for a in APIS) == ["anthropic", "chat", "responses"]


def assert_not_retryable(api: API, error: dict[str, Any]) -> None:
    """The SDK's reading of a guardrail error: a client error, never one worth calling again."""
    assert error["message"] == VIOLATION
    if error["isRetryable"] is not None:
        # An error the SDK classified (an APICallError, or the Responses provider's stream
        # error): status and retryability are its verdict.
        assert error["isRetryable"] is False
        assert error["statusCode"] == 400
    elif api.name == "chat":
        # The Chat provider passes the chunk's ``error`` object on: its code is the status.
        assert error["code"] == 400
    else:
        # So does the Anthropic provider; the SDK retries only ``overloaded_error``.
        assert error["type"] == "guardrail_violation"


@api_param
def test_ai_sdk_block_before_any_text_is_not_retried(stack: Stack, api: API) -> None:
    script_id = stack.llm.register(sse_script(api.stream_events(EARLY_DELTAS), delays_ms=10))
    seen = ai_sdk_stream(stack, api, script_id)
    assert seen["text"] == ""
    [error] = seen["errors"]
    assert_not_retryable(api, error)
    # The behaviour that matters: the model was asked once, not three times.
    assert len(stack.llm.records_for_script(script_id)) == 1


@api_param
def test_ai_sdk_block_after_released_text_is_not_retryable(stack: Stack, api: API) -> None:
    script_id = stack.llm.register(sse_script(api.stream_events(BLOCKED_DELTAS), delays_ms=10))
    seen = ai_sdk_stream(stack, api, script_id)
    assert seen["text"] and "".join(BLOCKED_DELTAS).startswith(seen["text"])
    assert BLOCKED_PHRASE not in seen["text"] and "Nightingale" not in seen["text"]
    [error] = seen["errors"]
    assert_not_retryable(api, error)
    assert seen["finishReason"] == "error"
    assert len(stack.llm.records_for_script(script_id)) == 1
