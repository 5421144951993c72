"""Stream modes through real Envoy: async mode, and the STREAMED fallback for Envoy < 1.34."""

from __future__ import annotations

import pytest

from testkit.upstream import CANNED_ANSWERS, Script
from tests.e2e.conftest import SMALL_WINDOWS, Stack, StackFactory, use_config
from tests.e2e.test_chat_stream import events, post_stream, read_sdk_stream
from tests.support import BLOCK_FRAME, WAIT_S

#: A pause of the upstream that no test waits out.
ENDLESS_MS = 10 * WAIT_S * 1000


@pytest.fixture(scope="module")
def async_stack(stacks: StackFactory) -> Stack:
    return stacks([*SMALL_WINDOWS, "--stream-mode", "async", "--input-check", "off"])


@pytest.fixture(scope="module")
def streamed_stack(stacks: StackFactory) -> Stack:
    return stacks(SMALL_WINDOWS, tweak_envoy=use_config("envoy/envoy-streamed.yaml"))


def violating_script(filler: int = 30) -> tuple[tuple[bytes, ...], int]:
    """A stream with the blocked phrase at a known position; returns it and that position."""
    parts = ["Alpha beta gamma. ", "Delta epsilon. ", "It is Project ", "Nightingale, ",
             "yes. "] + [f"more words {i}. " for i in range(filler)]
    position = len("".join(parts[:2])) + len("It is ")
    return tuple(events(*parts)), position


def model_text(body: bytes) -> str:
    import json

    text = ""
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: {") and b'"choices"' in block:
            for choice in json.loads(block[6:])["choices"]:
                text += choice.get("delta", {}).get("content") or ""
    return text


def test_async_clean_stream_is_byte_identical(async_stack: Stack) -> None:
    chunks = tuple(events("one ", "two ", "three"))
    script_id = async_stack.llm.register(Script(chunks=chunks, delays_ms=10))
    _, body = post_stream(async_stack, script_id, "http1")
    assert body == b"".join(chunks)


def test_async_blocks_within_one_window_after_the_violation(async_stack: Stack) -> None:
    chunks, position = violating_script()
    # Once one window and its overlap (the SMALL_WINDOWS settings) of text has followed the
    # violation, the upstream pauses for longer than any wait here: the block must come during
    # the pause, from the text before it, however long the checks take. (Was: 30 ms between
    # all chunks, and the text that arrived during a check's round trip counted against the
    # bound: a busy machine stretched the round trip past it.)
    delays = [30.0] * len(chunks)
    sent = 0
    for index, chunk in enumerate(chunks):
        sent += len(model_text(chunk))
        if sent > position + 120 + 40:
            delays[index] = ENDLESS_MS
            break
    script_id = async_stack.llm.register(Script(chunks=chunks, delays_ms=tuple(delays)))
    _, body = post_stream(async_stack, script_id, "http2")  # no block: its timeout, an error
    assert body.endswith(BLOCK_FRAME)
    assert body.count(b"data: [DONE]") == 1
    released = model_text(body[: -len(BLOCK_FRAME)])
    leaked_after_violation = max(0, len(released) - position)
    # At most one window (window + overlap characters) plus the text that arrived during the
    # check's round trip (here: none, the upstream pauses).
    assert leaked_after_violation <= 120 + 40 + 40


def test_streamed_fallback_clean_stream_is_byte_identical(streamed_stack: Stack) -> None:
    whole = b"".join(events("Caf\u00e9 ", "na\u00efve ", "fine."))
    chunks = (whole[:30], whole[30:61], whole[61:])
    script_id = streamed_stack.llm.register(Script(chunks=chunks, delays_ms=20))
    response, body = post_stream(streamed_stack, script_id, "http1")
    assert response.status_code == 200
    assert body == whole


@pytest.mark.parametrize("version", ["http1", "http2"])
def test_streamed_fallback_blocks_with_the_frame(streamed_stack: Stack, version: str) -> None:
    chunks, _ = violating_script(filler=5)
    script_id = streamed_stack.llm.register(Script(chunks=chunks, delays_ms=30))
    response, body = post_stream(streamed_stack, script_id, version)
    assert response.status_code == 200
    assert body.endswith(BLOCK_FRAME)
    assert b"Nightingale" not in body
    assert b"".join(chunks).startswith(body[: -len(BLOCK_FRAME)])
    # STREAMED cannot end the body early: the upstream ran to its end.
    assert streamed_stack.llm.record_for_script(script_id).completed


def test_streamed_fallback_masks(streamed_stack: Stack) -> None:
    text = read_sdk_stream(streamed_stack, "my email please")
    assert text == CANNED_ANSWERS["email"].replace("jane.doe@example.com", "{EMAIL}")


def test_streamed_fallback_passes_non_llm_traffic(streamed_stack: Stack) -> None:
    import httpx

    with httpx.Client(timeout=10) as http:
        answer = http.get(f"{streamed_stack.url}/v1/models")
    assert answer.status_code == 200
    assert b'"object"' in answer.content


def test_streamed_fallback_survives_checks_longer_than_message_timeout(
        stacks: StackFactory) -> None:
    # Envoy's message_timeout is 2 s on this listener; each guardrail call takes 2.3 s. The
    # final chunk's answer waits for the final check under override_message_timeout.
    streamed_stack = stacks(
        [*SMALL_WINDOWS, "--input-check", "off", "--guardrail-attempt-timeout", "4",
         "--guardrail-timeout", "8"], tweak_envoy=use_config("envoy/envoy-streamed.yaml"))
    streamed_stack.bedrock.set_latency(2300)
    chunks = tuple(events("slow ", "but ", "fine."))
    script_id = streamed_stack.llm.register(Script(chunks=chunks, delays_ms=5))
    response, body = post_stream(streamed_stack, script_id, "http1")
    assert response.status_code == 200
    assert body == b"".join(chunks)
