"""The local ApplyGuardrail endpoint's image content blocks, through boto3's real client and
through the sidecar's Bedrock client (thread pool and call process): validation as Bedrock
documents it, image rules (SHA-256, PNG text chunks), assessments and coverage boto3 parses."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.domain.client import ImageBlock
from extproc.domain.values import Source
from extproc.domain.verdict import Outcome
from extproc.guardrail.bedrock import BedrockGuardrailClient
from extproc.localbedrock import LocalBedrock, PolicyError, default_policy, parse_policy
from extproc.localbedrock.policy import png_texts
from extproc.settings.values import GuardrailCalls
from testkit.images import GIF, jpeg, png
from tests.integration.test_localbedrock import _RESPONSE_SHAPE, Caller, check_shape
from tests.support import isolate_aws_env, settings

MARKER = "guardrail-demo:violence"
BLOCKED = png(4, 4, text={"Comment": f"please {MARKER} here"})
CLEAN = png(4, 4, seed=9)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalBedrock]:
    with LocalBedrock(default_policy()) as lb:
        yield lb


@pytest.fixture()
def caller(server: LocalBedrock) -> Iterator[Caller]:
    server.policy = default_policy()
    server.reset_stats()
    c = Caller(server.url)
    yield c
    c.close()


def image(data: bytes, fmt: str = "png") -> dict[str, Any]:
    return {"image": {"format": fmt, "source": {"bytes": data}}}


def apply(caller: Caller, *content: dict[str, Any], source: str = "INPUT") -> dict[str, Any]:
    response: dict[str, Any] = caller.client.apply_guardrail(
        guardrailIdentifier="demoguardrail", guardrailVersion="DRAFT", source=source,
        content=list(content))
    check_shape(caller.raw[-1], _RESPONSE_SHAPE)
    return response


def test_a_clean_image_passes_with_its_coverage_and_image_units(
        caller: Caller, server: LocalBedrock) -> None:
    resp = apply(caller, {"text": {"text": "what is in this picture?"}}, image(CLEAN))
    assert resp["action"] == "NONE"
    assert resp["guardrailCoverage"]["images"] == {"guarded": 1, "total": 1}
    assert resp["usage"]["contentPolicyImageUnits"] == 1
    metrics = resp["assessments"][0]["invocationMetrics"]
    assert metrics["guardrailCoverage"]["images"] == {"guarded": 1, "total": 1}
    last = server.stats.last
    assert last is not None and last.images == (hashlib.sha256(CLEAN).hexdigest(),)


def test_a_png_text_marker_blocks_with_an_image_content_filter_finding(caller: Caller) -> None:
    resp = apply(caller, {"text": {"text": "describe"}}, image(BLOCKED))
    assert resp["action"] == "GUARDRAIL_INTERVENED"
    assert resp["outputs"] == [{"text": default_policy().blocked_input_message}]
    filters = resp["assessments"][0]["contentPolicy"]["filters"]
    assert filters == [{"type": "VIOLENCE", "confidence": "HIGH", "filterStrength": "HIGH",
                        "action": "BLOCKED", "detected": True}]


def test_a_sha256_rule_blocks_that_image_only(caller: Caller, server: LocalBedrock) -> None:
    photo = jpeg(32, 32)
    server.policy = parse_policy({"input": {"images": [
        {"sha256": hashlib.sha256(photo).hexdigest(), "type": "SEXUAL"}]}})
    assert apply(caller, image(photo, "jpeg"))["action"] == "GUARDRAIL_INTERVENED"
    assert apply(caller, image(jpeg(32, 33), "jpeg"))["action"] == "NONE"


def test_without_image_rules_images_are_counted_not_guarded(
        caller: Caller, server: LocalBedrock) -> None:
    resp = apply(caller, image(BLOCKED), source="OUTPUT")  # the rule is an INPUT one
    assert resp["action"] == "NONE"
    assert resp["guardrailCoverage"]["images"] == {"guarded": 0, "total": 1}
    assert resp["usage"]["contentPolicyImageUnits"] == 0


def test_masked_text_beside_an_image_has_one_output_per_text_block(caller: Caller) -> None:
    resp = apply(caller, {"text": {"text": "mail a@example.com"}}, image(CLEAN),
                 {"text": {"text": "and b@example.com"}})
    assert resp["action"] == "GUARDRAIL_INTERVENED"
    assert [o["text"] for o in resp["outputs"]] == ["mail {EMAIL}", "and {EMAIL}"]


@pytest.mark.parametrize(("block", "message"), [
    (image(GIF, "gif"), "Member must satisfy enum value set: [png, jpeg]"),
    (image(CLEAN, "jpeg"), "is not a valid jpeg image (it is png)"),
    (image(b"not an image at all"), "is not a valid png image"),
    (image(png(1, 1, claimed=(9000, 10))), "exceeds the maximum allowed size"),
    (image(b"\x89PNG\r\n\x1a\n" + b"\x00" * (4 * 1024 * 1024)), "exceeds the maximum allowed"),
])
def test_invalid_images_are_validation_exceptions(caller: Caller, block: dict[str, Any],
                                                  message: str) -> None:
    with pytest.raises(caller.exceptions.ValidationException) as info:
        apply(caller, block)
    assert message in info.value.response["Error"]["Message"]
    assert "content.1.member.image" in info.value.response["Error"]["Message"]


def test_more_than_twenty_images_is_a_validation_exception(caller: Caller) -> None:
    with pytest.raises(caller.exceptions.ValidationException) as info:
        apply(caller, *[image(png(2, 2, seed=n)) for n in range(21)])
    assert "The number of images (21) exceeds the maximum allowed (20)" in \
        info.value.response["Error"]["Message"]
    assert apply(caller, *[image(png(2, 2, seed=n)) for n in range(20)])["action"] == "NONE"


def test_image_rules_are_validated() -> None:
    with pytest.raises(PolicyError, match="exactly one of sha256, png_text"):
        parse_policy({"input": {"images": [{"type": "HATE"}]}})
    with pytest.raises(PolicyError, match="64 lower-case hex"):
        parse_policy({"input": {"images": [{"sha256": "abc"}]}})


def test_png_text_chunks_are_read_without_trusting_lengths() -> None:
    assert png_texts(BLOCKED) == [f"please {MARKER} here"]
    assert png_texts(BLOCKED[:40]) == []
    assert png_texts(b"\x89PNG\r\n\x1a\n\xff\xff\xff\xfftEXt") == []


@pytest.mark.parametrize("calls", list(GuardrailCalls))
def test_the_sidecars_client_sends_image_blocks(calls: GuardrailCalls, server: LocalBedrock,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """ImageBlock through BedrockGuardrailClient: boto3 in a thread, or in the call process
    (the bytes cross the wire in base64)."""
    server.policy = default_policy()
    isolate_aws_env(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", server.url)
    client = BedrockGuardrailClient(settings(aws_region="us-east-1", guardrail_calls=calls),
                                    max_attempts=1)
    guardrail = settings().guardrail

    async def run() -> tuple[Outcome, Outcome]:
        clean = await client.apply(guardrail, Source.INPUT, ["hi", ImageBlock("png", CLEAN)])
        blocked = await client.apply(guardrail, Source.INPUT, [ImageBlock("png", BLOCKED)])
        return clean.outcome, blocked.outcome

    try:
        assert asyncio.run(run()) == (Outcome.PASS, Outcome.BLOCK)
    finally:
        client.close()
    hashes = [call.images for call in server.stats.recent[-2:]]
    assert hashes == [(hashlib.sha256(CLEAN).hexdigest(),), (hashlib.sha256(BLOCKED).hexdigest(),)]
