"""Bounded memory: bytes held per stream and streams guarded at once follow the failure policy
of the ``overload`` class."""

from __future__ import annotations

import asyncio
from typing import Any

from extproc.domain.failure import FailureMode, FailurePolicy
from extproc.domain.values import InputCheck
from extproc.domain.verdict import classify
from extproc.formats import all_formats
from extproc.stream.processor import Admission, StreamProcessor
from extproc.stream.sinks import Outbox
from tests.stream.test_stream_processor import Harness
from tests.support import (
    UNAVAILABLE_FRAME,
    Call,
    FakeGuardrail,
    bedrock_response,
    chat_request,
    chunk_event,
    request_body,
    request_headers,
    response_body,
    response_headers,
    settings,
)

OPEN = FailurePolicy(overload=FailureMode.OPEN)


async def test_a_stream_holding_too_much_fails_closed() -> None:
    hold = asyncio.Event()  # the check never returns: everything stays held
    h = Harness(FakeGuardrail(hold=hold), input_check=InputCheck.OFF, max_held_bytes=2000)
    await h.feed(request_headers(), response_headers())
    for _ in range(40):
        await h.feed(response_body(chunk_event("x" * 40)))
    assert h.client_bytes() == UNAVAILABLE_FRAME
    assert h.body_answers()[-1][1] is True
    assert h.processor.record.to_metadata()["error_class"] == "overload"
    hold.set()


async def test_a_stream_holding_too_much_passes_through_when_open() -> None:
    hold = asyncio.Event()
    h = Harness(FakeGuardrail(hold=hold), input_check=InputCheck.OFF, max_held_bytes=2000,
                failure_mode=OPEN)
    await h.feed(request_headers(), response_headers())
    sent = [chunk_event(f"{i:03d}" + "x" * 37) for i in range(60)]
    for event in sent:
        await h.feed(response_body(event))
    await h.feed(response_body(b"data: [DONE]\n\n", end_of_stream=True))
    assert h.client_bytes() == b"".join(sent) + b"data: [DONE]\n\n"
    assert h.body_answers()[-1][1] is True
    assert h.processor.record.to_metadata()["failed_open"] is True
    hold.set()


async def test_an_endless_line_counts_as_held_bytes() -> None:
    h = Harness(FakeGuardrail(), input_check=InputCheck.OFF, max_held_bytes=10_000)
    await h.feed(request_headers(), response_headers())
    for _ in range(30):
        await h.feed(response_body(b"data: " + b"y" * 500))  # no line end, ever
    assert h.client_bytes() == UNAVAILABLE_FRAME


def processor(admission: Admission, sent: list[Any], **overrides: Any) -> StreamProcessor:
    async def write(message: Any) -> None:
        sent.append(message)

    return StreamProcessor(settings(**overrides), FakeGuardrail(), all_formats(), Outbox(write),
                           "t", admission=admission)


async def test_too_many_streams_get_a_503_when_closed() -> None:
    admission = Admission(2)
    sent: list[Any] = []
    first, second, third = (processor(admission, sent) for _ in range(3))
    for p in (first, second, third):
        await p.handle(request_headers())
    assert sent[-1].WhichOneof("response") == "immediate_response"
    assert sent[-1].immediate_response.status.code == 503
    assert admission.active == 2
    first.close()
    assert admission.active == 1
    fourth = processor(admission, sent)
    await fourth.handle(request_headers())
    assert sent[-1].WhichOneof("response") == "request_headers"


async def test_too_many_streams_pass_unchecked_when_open() -> None:
    admission = Admission(1)
    sent: list[Any] = []
    first = processor(admission, sent, failure_mode=OPEN)
    second = processor(admission, sent, failure_mode=OPEN)
    await first.handle(request_headers())
    await second.handle(request_headers())
    assert sent[-1].WhichOneof("response") == "request_headers"
    assert sent[-1].mode_override.response_header_mode != 0  # SKIP: no further messages
    second.close()
    assert admission.active == 1


class MaskThenHold(FakeGuardrail):
    """Masks ``masked`` words in the first output check; every later call waits on ``hold``."""

    async def apply(self, guardrail: Any, source: Any, texts: Any) -> Any:
        first = not self.calls
        self.calls.append(Call(source, list(texts)))
        if not first and self.hold is not None:
            await self.hold.wait()
        return classify(bedrock_response("mask", [t.replace("secret", "{S}") for t in texts]))


async def test_over_limit_before_the_prompt_verdict_ends_the_stream_when_open() -> None:
    """Regression (issue 15 review): failing open over the held limit forwarded the held
    answer before the prompt's verdict (a prompt still being checked could yet be blocked)."""
    hold = asyncio.Event()  # the prompt check never returns: the gate stays pending
    h = Harness(FakeGuardrail(hold=hold), input_check=InputCheck.PARALLEL,
                max_held_bytes=2000, failure_mode=OPEN)
    await h.feed(request_headers(), request_body(chat_request("hi")), response_headers())
    for i in range(60):
        await h.feed(response_body(chunk_event(f"{i:03d}" + "x" * 37)))
    assert h.client_bytes() == UNAVAILABLE_FRAME
    hold.set()


async def test_over_limit_when_open_keeps_the_masks_already_decided() -> None:
    """Regression (issue 15 review): failing open over the held limit forwarded held events as
    they came, undoing masks a verdict had already decided for them."""
    hold = asyncio.Event()
    h = Harness(MaskThenHold(hold=hold), input_check=InputCheck.OFF, max_held_bytes=3000,
                failure_mode=OPEN)
    await h.feed(request_headers(), response_headers())
    sent = [chunk_event("The secret word is out, and then")] + [
        chunk_event(f"{i:03d} " + "y" * 36) for i in range(80)]
    for event in sent:
        await h.feed(response_body(event))
        await h.settle()
    await h.feed(response_body(b"data: [DONE]\n\n", end_of_stream=True))
    shown = h.client_bytes()
    assert b"secret" not in shown and b"{S}" in shown
    assert shown.endswith(b"data: [DONE]\n\n") and b"079 " in shown
    assert h.processor.record.to_metadata()["failed_open"] is True
    hold.set()
