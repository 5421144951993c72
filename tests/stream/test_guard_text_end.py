"""The answer's text ends before its stream does: the last check goes out on the event that
says so (a choice's ``finish_reason``, Anthropic's ``stop_reason``, Responses'
``response.completed``), not on the end of the body, which may come much later (a usage chunk,
``[DONE]``, a slow upstream)."""

from __future__ import annotations

from extproc.domain.values import InputCheck, StreamMode
from tests.stream.test_guard import content_of, words
from tests.stream.test_stream_processor import Harness
from tests.support import (
    BLOCK_FRAME,
    FakeGuardrail,
    chunk_event,
    request_headers,
    response_body,
    response_headers,
)

DONE = b"data: [DONE]\n\n"


async def start(h: Harness, pieces: list[str]) -> bytes:
    """Headers and the text events, one body message each; the bytes of those events."""
    await h.feed(request_headers(), response_headers())
    events = [chunk_event(p) for p in pieces]
    for event in events:
        await h.feed(response_body(event))
        await h.settle()
    return b"".join(events)


async def test_sync_checks_and_releases_the_tail_on_the_finish_event() -> None:
    guard = FakeGuardrail()
    h = Harness(guard, input_check=InputCheck.OFF, stream_mode=StreamMode.SYNC)
    pieces = words(300)  # under min_chars: only the first window is checked while it streams
    text_events = await start(h, pieces)
    assert len(guard.calls) == 1
    assert content_of(h.client_bytes()) != "".join(pieces)  # the tail is held
    finish = chunk_event(finish_reason="stop")
    await h.feed(response_body(finish))
    await h.settle()
    # No end of body yet: the finish event alone started the last check and released the text.
    assert len(guard.calls) == 2
    assert guard.calls[1].texts[0].endswith(pieces[-1])
    assert h.client_bytes() == text_events
    await h.feed(response_body(DONE))
    await h.settle()
    # The events after the text wait for the end of the body: a client that stops at [DONE]
    # must not hang up before the body's last message (with the stream's metadata) goes out.
    assert h.client_bytes() == text_events
    await h.feed(response_body(b"", end_of_stream=True))
    await h.settle()
    assert len(guard.calls) == 2  # nothing left to check at the end
    assert h.client_bytes() == text_events + finish + DONE
    assert h.body_answers()[-1] == (finish + DONE, True)  # with the end of stream


async def test_sync_finish_event_with_a_blocked_tail_ends_the_stream_before_done() -> None:
    h = Harness(FakeGuardrail(), input_check=InputCheck.OFF, stream_mode=StreamMode.SYNC)
    await start(h, [*words(100), "forbidden ", *words(100)])
    await h.feed(response_body(chunk_event(finish_reason="stop")))
    await h.settle()
    body = h.client_bytes()
    assert body.endswith(BLOCK_FRAME)
    assert "forbidden" not in content_of(body)
    assert h.body_answers()[-1][1] is True


async def test_text_after_the_finish_event_is_still_checked_before_release() -> None:
    # A misbehaving upstream keeps sending content after finish_reason: the end of the text was
    # only a hint, withdrawn by the new text, which waits for a check like any other.
    guard = FakeGuardrail()
    h = Harness(guard, input_check=InputCheck.OFF, stream_mode=StreamMode.SYNC)
    await start(h, words(50))
    await h.feed(response_body(chunk_event(finish_reason="stop")))
    await h.settle()
    calls = len(guard.calls)
    await h.feed(response_body(chunk_event("forbidden words")))
    await h.settle()
    assert "forbidden" not in content_of(h.client_bytes())  # held
    await h.feed(response_body(DONE), response_body(b"", end_of_stream=True))
    await h.settle()
    assert len(guard.calls) == calls + 1
    assert "forbidden" in guard.calls[-1].texts[0]
    assert h.client_bytes().endswith(BLOCK_FRAME)
    assert "forbidden" not in content_of(h.client_bytes())


async def test_async_checks_the_tail_on_the_finish_event() -> None:
    guard = FakeGuardrail()
    h = Harness(guard, input_check=InputCheck.OFF, stream_mode=StreamMode.ASYNC)
    await start(h, words(300))
    assert len(guard.calls) == 1
    await h.feed(response_body(chunk_event(finish_reason="stop")))
    await h.settle()
    assert len(guard.calls) == 2


async def test_regression_an_mcp_get_stream_holds_no_event_after_checked_text() -> None:
    """Bug: on an MCP ``GET`` stream (the server's own messages, a stream that may never end),
    once a message with text was read (a logging notification, a sampling request), the
    events without text behind it (``notifications/tools/list_changed``) waited for the next
    checked text or the end of the body, which may never come."""
    guard = FakeGuardrail()
    h = Harness(guard, stream_mode=StreamMode.SYNC)
    await h.feed(request_headers(path="/mcp", method="GET", end_of_stream=True),
                 response_headers())
    log = (b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/message",'
           b'"params":{"level":"info","data":"indexing done"}}\n\n')
    changed = (b'event: message\ndata: {"jsonrpc":"2.0",'
               b'"method":"notifications/tools/list_changed"}\n\n')
    await h.feed(response_body(log))
    await h.settle()
    assert len(guard.calls) == 1 and h.client_bytes() == log
    await h.feed(response_body(changed))
    await h.settle()
    assert h.client_bytes() == log + changed
