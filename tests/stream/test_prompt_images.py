"""The state machine with image prompts, fed scripted Envoy messages and a guardrail fake that
judges image blocks: what is sent, what is refused, what is cached, what is passed."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Sequence
from typing import Any

from extproc.domain.cache import MemoryVerdictCache
from extproc.domain.client import Content, ImageBlock
from extproc.domain.errors import GuardrailRejected
from extproc.domain.failure import FailureMode, FailurePolicy
from extproc.domain.values import GuardrailRef, InputCheck, Source, UncheckedImages
from extproc.domain.verdict import GuardrailVerdict, classify
from extproc.formats import all_formats
from extproc.stream.processor import StreamProcessor
from extproc.stream.sinks import Outbox
from testkit.images import b64, data_url, png
from tests.support import (
    bedrock_response,
    request_body,
    request_headers,
    response_headers,
    settings,
)

CLEAN = png(4, 4, seed=1)
BLOCKED = png(4, 4, text={"Comment": "forbidden"})


class ImageGuardrail:
    """Blocks a text holding ``forbidden`` and a PNG whose bytes hold it; records calls."""

    def __init__(self, screens_images: bool = True) -> None:
        self.calls: list[list[Content]] = []
        self.screens_images = screens_images  # False: the image modality is off

    async def apply(self, guardrail: GuardrailRef, source: Source,
                    texts: Sequence[Content]) -> GuardrailVerdict:
        self.calls.append(list(texts))
        await asyncio.sleep(0)
        for item in texts:
            data = item.data if isinstance(item, ImageBlock) else item.encode()
            if b"forbidden" in data and (self.screens_images or isinstance(item, str)):
                return classify(bedrock_response("block"))
        answer = bedrock_response("pass")
        images = sum(isinstance(item, ImageBlock) for item in texts)
        if images:
            answer["guardrailCoverage"] = {"images": {
                "guarded": images if self.screens_images else 0, "total": images}}
        return classify(answer)

    def close(self) -> None:
        pass


class Harness:
    def __init__(self, guardrail: ImageGuardrail | None = None, cache: Any = None,
                 **overrides: Any) -> None:
        self.guardrail = guardrail or ImageGuardrail()
        self.sent: list[Any] = []

        async def write(message: Any) -> None:
            self.sent.append(message)

        extra = {"verdict_cache": cache} if cache is not None else {}
        self.processor = StreamProcessor(settings(**overrides), self.guardrail, all_formats(),
                                         Outbox(write), "t1", **extra)

    async def send(self, body: dict[str, Any]) -> None:
        await self.processor.handle(request_headers())
        await self.processor.handle(request_body(json.dumps(body).encode()))
        for _ in range(20):
            await asyncio.sleep(0)

    def status(self) -> int | None:
        last = self.sent[-1]
        if last.WhichOneof("response") == "immediate_response":
            return int(last.immediate_response.status.code)
        return None

    def error_type(self) -> str:
        error = json.loads(self.sent[-1].immediate_response.body)["error"]
        return str(error["type"])

    def record(self) -> dict[str, Any]:
        return dict(self.processor.record.to_metadata())


def chat(*urls: str, text: str = "what is this?") -> dict[str, Any]:
    parts: list[Any] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"model": "demo", "messages": [{"role": "user", "content": parts}]}


async def test_an_image_goes_to_the_guardrail_as_an_image_block_after_the_text() -> None:
    h = Harness()
    await h.send(chat(data_url(CLEAN)))
    assert h.guardrail.calls == [["what is this?", ImageBlock("png", CLEAN)]]
    assert h.status() is None  # the held request goes on
    assert h.record()["images"] == 1


async def test_a_blocked_image_is_the_apis_400() -> None:
    h = Harness()
    await h.send(chat(data_url(BLOCKED)))
    assert h.status() == 400
    assert h.error_type() == "guardrail_violation"


async def test_a_blocked_image_checked_in_parallel_is_refused_at_the_answer() -> None:
    h = Harness(input_check=InputCheck.PARALLEL)
    await h.send(chat(data_url(BLOCKED)))
    await h.processor.handle(response_headers())
    assert h.status() == 400


async def test_an_image_over_4_mb_is_refused_before_any_call_even_without_a_request_limit(
        ) -> None:
    huge = png(2, 2) + b"\x00" * (4 * 1024 * 1024)
    h = Harness(max_request_bytes=0)
    await h.send(chat(data_url(huge)))
    assert h.status() == 400
    assert h.error_type() == "guardrail_image_too_large"
    assert h.guardrail.calls == []


async def test_with_unchecked_images_pass_a_url_is_counted_and_left_out() -> None:
    h = Harness(unchecked_images=UncheckedImages.PASS)
    await h.send(chat("https://example.com/cat.png", data_url(CLEAN)))
    assert h.guardrail.calls == [["what is this?", ImageBlock("png", CLEAN)]]
    assert h.status() is None
    assert h.record()["images_unchecked"] == 1


async def test_in_shadow_mode_an_unchecked_image_passes() -> None:
    h = Harness(shadow=True)
    await h.send(chat("https://example.com/cat.png"))
    assert h.record()["images_unchecked"] == 1
    assert all(m.WhichOneof("response") != "immediate_response" for m in h.sent)


async def test_an_image_that_passed_is_not_sent_again() -> None:
    cache = MemoryVerdictCache(100, 60.0, clock=lambda: 0.0)
    guardrail = ImageGuardrail()
    await Harness(guardrail, cache).send(chat(data_url(CLEAN)))
    await Harness(guardrail, cache).send(chat(data_url(CLEAN), text="and now?"))
    assert guardrail.calls[1] == ["and now?"]
    anthropic = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": b64(CLEAN)}}]}]}
    second = Harness(guardrail, cache)
    await second.processor.handle(request_headers(path="/v1/messages"))
    await second.processor.handle(request_body(json.dumps(anthropic).encode()))
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(guardrail.calls) == 2  # the same bytes in another API: known, no call
    assert second.record()["cached_images"] == 1


async def test_images_the_guardrail_did_not_screen_are_refused_by_default() -> None:
    """A guardrail whose content filters do not have the image modality on answers NONE for
    every image, with ``guardrailCoverage.images.guarded`` 0: that is no check."""
    h = Harness(ImageGuardrail(screens_images=False))
    await h.send(chat(data_url(BLOCKED)))
    assert h.status() == 400
    assert h.error_type() == "guardrail_image_not_guarded"
    assert h.record()["outcome"] == "image_refused"


async def test_images_the_guardrail_did_not_screen_pass_with_unchecked_images_pass() -> None:
    cache = MemoryVerdictCache(100, 60.0, clock=lambda: 0.0)
    guardrail = ImageGuardrail(screens_images=False)
    h = Harness(guardrail, cache, unchecked_images=UncheckedImages.PASS)
    await h.send(chat(data_url(CLEAN)))
    assert h.status() is None
    assert h.record()["images_unchecked"] == 1
    await Harness(guardrail, cache, unchecked_images=UncheckedImages.PASS).send(
        chat(data_url(CLEAN)))
    assert guardrail.calls[1] == [ImageBlock("png", CLEAN)]  # not remembered as checked


async def test_an_image_part_spelt_with_json_escapes_is_found() -> None:
    url = data_url(BLOCKED, "application/octet-stream")
    body = json.dumps(chat(url)).replace('"image_url"', '"\\u0069mage_url"')
    assert "image" not in body
    assert json.loads(body)["messages"][0]["content"][1]["type"] == "image_url"
    h = Harness()
    await h.processor.handle(request_headers())
    await h.processor.handle(request_body(body.encode()))
    for _ in range(20):
        await asyncio.sleep(0)
    assert h.status() == 400
    assert any(isinstance(item, ImageBlock) for item in h.guardrail.calls[0])


async def test_regression_an_image_whose_media_type_is_upper_case_is_not_skipped() -> None:
    """The pre-check that skips bodies without images looked for a lower-case "image" only; a
    Gemini blob of type ``IMAGE/PNG`` (media types are case-insensitive, and the finder reads
    it as an image) passed unread."""
    body = {"model": "demo", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"inlineData": {"mimeType": "IMAGE/PNG", "data": b64(BLOCKED)}}]}]}
    assert "image" not in json.dumps(body)
    h = Harness()
    await h.send(body)
    assert h.status() == 400
    assert any(isinstance(item, ImageBlock) for item in h.guardrail.calls[0])


async def test_regression_the_same_image_repeated_in_one_prompt_is_sent_once() -> None:
    """Each copy of one image went to the guardrail: a prompt of a few hundred copies of one
    tiny PNG cost as many billed image units and calls (20 a call) as distinct images."""
    h = Harness()
    await h.send(chat(*[data_url(CLEAN)] * 50, data_url(BLOCKED)))
    sent = [item for item in h.guardrail.calls[0] if isinstance(item, ImageBlock)]
    assert sent == [ImageBlock("png", CLEAN), ImageBlock("png", BLOCKED)]
    assert h.status() == 400
    assert h.record()["images"] == 51


class RejectingImages(ImageGuardrail):
    """Bedrock answering ``ValidationException`` for a call holding an image it cannot read (a
    PNG whose pixel data does not inflate passes the sidecar's header checks)."""

    async def apply(self, guardrail: GuardrailRef, source: Source,
                    texts: Sequence[Content]) -> GuardrailVerdict:
        self.calls.append(list(texts))
        if any(isinstance(item, ImageBlock) for item in texts):
            raise GuardrailRejected("ValidationException (400): invalid image")
        return classify(bedrock_response("pass"))


async def test_regression_an_image_bedrock_refuses_is_an_unchecked_image_not_an_outage() -> None:
    """With ``--failure-mode open``, an image crafted for Bedrock to refuse made the call fail
    and the prompt was released unchecked: ``--unchecked-images reject`` was bypassed."""
    h = Harness(RejectingImages(), failure_mode=FailurePolicy.uniform(FailureMode.OPEN))
    await h.send(chat(data_url(BLOCKED)))
    assert h.status() == 400
    assert h.error_type() == "guardrail_image_unreadable"
    assert h.record()["outcome"] == "image_refused"


async def test_regression_a_prompt_of_thousands_of_tiny_images_is_refused_before_any_call(
        ) -> None:
    """A 1 MiB prompt holds thousands of distinct tiny PNGs: each was sent to the guardrail,
    twenty a call, each billed as an image unit (about $5 a request at the default price
    table, against cents for the same bytes of text) and each spending the account's 25
    images a second quota, which then throttled every other route's images for minutes."""
    images = [png(1, 1, seed=i) for i in range(12)]
    h = Harness(max_prompt_images=10)
    await h.send(chat(*(data_url(image) for image in images)))
    assert h.status() == 400
    assert h.error_type() == "guardrail_image_too_large"
    assert h.guardrail.calls == []
    passing = Harness(max_prompt_images=10, unchecked_images=UncheckedImages.PASS)
    await passing.send(chat(*(data_url(image) for image in images)))
    sent = [item for item in passing.guardrail.calls[0] if isinstance(item, ImageBlock)]
    assert len(sent) == 10
    assert passing.record()["images_unchecked"] == 2
    copies = Harness(max_prompt_images=10)  # copies of one image are one image
    await copies.send(chat(*[data_url(CLEAN)] * 12))
    assert copies.status() is None


async def test_images_the_cache_knows_do_not_count_against_max_prompt_images() -> None:
    """A conversation resends its earlier images: those already checked cost nothing and do
    not count against ``--max-prompt-images``."""
    cache = MemoryVerdictCache(100, 60.0, clock=lambda: 0.0)
    guardrail = ImageGuardrail()
    first = [png(1, 1, seed=i) for i in range(8)]
    await Harness(guardrail, cache, max_prompt_images=10).send(
        chat(*(data_url(image) for image in first)))
    later = Harness(guardrail, cache, max_prompt_images=10)
    await later.send(chat(*(data_url(image) for image in first),
                          *(data_url(png(1, 1, seed=100 + i)) for i in range(8))))
    assert later.status() is None
    assert sum(isinstance(item, ImageBlock) for item in guardrail.calls[-1]) == 8


async def test_an_image_in_a_gzipped_body_spelt_with_escapes_is_found() -> None:
    """The skip-if-no-image pre-check reads the inflated body: gzip hides nothing."""
    url = data_url(BLOCKED, "application/octet-stream")
    body = json.dumps(chat(url)).replace('"image_url"', '"\\u0069mage_url"').encode()
    h = Harness()
    await h.processor.handle(request_headers(extra=(("content-encoding", "gzip"),)))
    await h.processor.handle(request_body(gzip.compress(body)))
    for _ in range(20):
        await asyncio.sleep(0)
    assert h.status() == 400
    assert any(isinstance(item, ImageBlock) for item in h.guardrail.calls[0])
