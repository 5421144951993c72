"""The real BedrockGuardrailClient (boto3, thread pool) wrapped in ResilientGuardrail, against
the real local ApplyGuardrail endpoint with error injection: retries, rejections, hangs within
the deadline, oversize input split and merged, the breaker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from extproc.domain.errors import (
    GuardrailCircuitOpen,
    GuardrailRejected,
    GuardrailServerError,
    GuardrailThrottled,
    GuardrailTimeout,
)
from extproc.domain.values import Source
from extproc.domain.verdict import Outcome
from extproc.guardrail import build_client
from extproc.guardrail.bedrock import BedrockGuardrailClient
from extproc.guardrail.breaker import OPEN
from extproc.guardrail.config import ResilienceConfig
from extproc.guardrail.resilient import ResilientGuardrail
from extproc.localbedrock import LocalBedrock, default_policy, error_marker, text_units
from tests.support import WAIT_S, isolate_aws_env, settings

BLOCKED_OUTPUT = "Sorry, the answer was withheld by the output guardrail."

# Quick backoffs so that the tests do not sleep for long; timeouts no call reaches, since no
# test using them is about them (was 3 s and 1 s: an attempt slowed past 1 s by a busy machine
# was retried, and the calls counted changed); the rest are the defaults.
FAST = ResilienceConfig(deadline_s=2 * WAIT_S, attempt_timeout_s=WAIT_S, backoff_base_s=0.01,
                        throttle_backoff_base_s=0.02, backoff_max_s=0.05)


@pytest.fixture
def bedrock(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalBedrock]:
    """A local endpoint, and an AWS environment that points boto3 at it and nowhere else."""
    isolate_aws_env(monkeypatch)
    with LocalBedrock(default_policy(), port=0) as lb:
        monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", lb.url)
        yield lb


def make_client(config: ResilienceConfig = FAST) -> ResilientGuardrail:
    return build_client(settings(aws_region="us-east-1"), config)


@pytest.fixture
def client(bedrock: LocalBedrock) -> Iterator[ResilientGuardrail]:
    c = make_client()
    yield c
    c.close()


GUARDRAIL = settings().guardrail


def outcomes(lb: LocalBedrock) -> list[str]:
    return [call.outcome for call in lb.stats.recent]


# --------------------------------------------------------------------------- the inner client


async def test_wrapped_bedrock_client_makes_a_single_attempt(
        bedrock: LocalBedrock, client: ResilientGuardrail) -> None:
    inner = client.inner
    assert isinstance(inner, BedrockGuardrailClient)
    assert inner.max_attempts == 1 and inner.timeout == FAST.attempt_timeout_s
    assert inner.endpoint_url == bedrock.url and inner.region == "us-east-1"
    bedrock.inject_error("throttle", count=1)
    with pytest.raises(GuardrailThrottled):
        await inner.apply(GUARDRAIL, Source.INPUT, ["hello"])
    assert bedrock.stats.calls == 1  # botocore did not retry


async def test_unwrapped_client_keeps_botocore_attempts(bedrock: LocalBedrock) -> None:
    plain = BedrockGuardrailClient(settings(aws_region="us-east-1", guardrail_max_attempts=2))
    try:
        assert plain.max_attempts == 2
        bedrock.inject_error("internal", count=1)
        verdict = await plain.apply(GUARDRAIL, Source.INPUT, ["hello"])
        assert verdict.outcome is Outcome.PASS
        assert outcomes(bedrock) == ["error:internal", "NONE"]
    finally:
        plain.close()


async def test_per_call_timeout_of_the_bedrock_client(bedrock: LocalBedrock) -> None:
    # The error says which timeout ended the call: the call's 0.2 s, not the client's own
    # (botocore's read timeout, WAIT_S). (Was: the call's duration compared with 1 s.)
    plain = BedrockGuardrailClient(settings(aws_region="us-east-1"), max_attempts=1,
                                   attempt_timeout_s=WAIT_S)
    try:
        bedrock.inject_error("hang")
        with pytest.raises(GuardrailTimeout, match=r"within 0\.20s"):
            await plain.apply(GUARDRAIL, Source.INPUT, ["hello"], timeout=0.2)
    finally:
        bedrock.clear_error()
        plain.close()


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize("kind", ["throttle", "throttle_text_units"])
async def test_throttled_twice_then_success(bedrock: LocalBedrock, client: ResilientGuardrail,
                                            kind: str) -> None:
    bedrock.inject_error(kind, count=2)
    verdict = await client.apply(GUARDRAIL, Source.INPUT, ["hello there"])
    assert verdict.outcome is Outcome.PASS
    assert outcomes(bedrock) == [f"error:{kind}", f"error:{kind}", "NONE"]
    stats = client.stats
    assert stats["attempts"] == 3 and stats["retries"] == 2
    assert stats["attempt_errors"] == {"throttled": 2}


@pytest.mark.parametrize("kind", ["unavailable", "internal"])
async def test_server_errors_are_retried(bedrock: LocalBedrock, client: ResilientGuardrail,
                                         kind: str) -> None:
    bedrock.inject_error(kind, count=1)
    verdict = await client.apply(GUARDRAIL, Source.OUTPUT, ["fine answer"])
    assert verdict.outcome is Outcome.PASS
    assert outcomes(bedrock) == [f"error:{kind}", "NONE"]
    assert client.stats["attempt_errors"] == {"server_error": 1}


async def test_retries_are_bounded_by_max_attempts(bedrock: LocalBedrock,
                                                   client: ResilientGuardrail) -> None:
    text = f"always {error_marker('throttle')} throttled"
    with pytest.raises(GuardrailThrottled):
        await client.apply(GUARDRAIL, Source.INPUT, [text])
    assert bedrock.stats.calls == FAST.max_attempts == 3


@pytest.mark.parametrize("kind", ["access_denied", "not_found", "validation", "service_quota"])
async def test_rejections_are_not_retried(bedrock: LocalBedrock, client: ResilientGuardrail,
                                          kind: str) -> None:
    bedrock.inject_error(kind)
    with pytest.raises(GuardrailRejected) as info:
        await client.apply(GUARDRAIL, Source.INPUT, ["hello"])
    assert info.value.error_class == "rejected"
    assert bedrock.stats.calls == 1
    assert client.stats["retries"] == 0


async def test_hang_times_out_within_the_deadline(bedrock: LocalBedrock) -> None:
    # What ended the call is read from the counts, not from the time it took. (Was: a 0.8 s
    # deadline, 0.3 s attempts and the call's duration compared with 0.9 s; on a busy machine
    # the duration passed it, and a late first timeout left no time for a second attempt.)
    config = ResilienceConfig(deadline_s=2.0, attempt_timeout_s=0.2, backoff_base_s=0.01,
                              max_attempts=50, breaker_failures=0)
    client = make_client(config)
    try:
        bedrock.inject_error("hang")
        with pytest.raises(GuardrailTimeout):
            await client.apply(GUARDRAIL, Source.INPUT, ["hello"])
        attempts = client.stats["attempts"]
        # Every hung attempt lasts its whole 0.2 s (a timeout never fires early), so the 2 s
        # deadline holds ten or so of the 50 allowed: fewer than 50 is the deadline at work.
        # A first attempt ends 1.8 s before the deadline, leaving time for another unless
        # the event loop stalls for that long.
        assert 2 <= attempts < config.max_attempts
        # All timeouts; the last, cut short by the deadline, may be ended by the deadline's
        # own backstop instead (fires 10 ms later: both at once when the loop was stalled),
        # and is then not counted as an attempt error.
        errors = client.stats["attempt_errors"]
        assert set(errors) == {"timeout"} and attempts - 1 <= errors["timeout"] <= attempts
        assert client.stats["failures"] == {"timeout": 1}
        bedrock.clear_error()
        verdict = await client.apply(GUARDRAIL, Source.INPUT, ["hello"])
        assert verdict.outcome is Outcome.PASS
    finally:
        client.close()


async def test_breaker_stops_calling_a_failing_endpoint(bedrock: LocalBedrock) -> None:
    client = make_client(replace(FAST, max_attempts=1, breaker_failures=3,
                                 breaker_cooldown_s=60))
    try:
        bedrock.inject_error("unavailable")
        for _ in range(3):
            with pytest.raises(GuardrailServerError):
                await client.apply(GUARDRAIL, Source.INPUT, ["hello"])
        assert client.breaker_state(GUARDRAIL) == OPEN
        for _ in range(5):
            with pytest.raises(GuardrailCircuitOpen):
                await client.apply(GUARDRAIL, Source.INPUT, ["hello"])
        assert bedrock.stats.calls == 3
    finally:
        client.close()


# --------------------------------------------------------------------------- oversize input


def filler(n_chars: int, tag: str) -> str:
    return " ".join(f"{tag}{i:04d}" for i in range(n_chars // 6 + 1))[:n_chars]


async def test_too_large_is_split_and_masks_are_merged(bedrock: LocalBedrock,
                                                       client: ResilientGuardrail) -> None:
    bedrock.max_text_units_per_call = 3
    first = "Write to ann@example.com now. " + filler(3_500, "a") + \
        " or to bob@example.org later. " + filler(3_000, "b") + " ref TKT-123456 end"
    second = "ticket TKT-654321 please"
    third = filler(2_500, "c")
    verdict = await client.apply(GUARDRAIL, Source.OUTPUT, [first, second, third])
    assert verdict.outcome is Outcome.MASK
    assert verdict.outputs == (
        first.replace("ann@example.com", "{EMAIL}").replace("bob@example.org", "{EMAIL}")
        .replace("TKT-123456", "{TicketId}"),
        "ticket {TicketId} please",
        third,
    )
    recent = bedrock.stats.recent
    assert recent[0].outcome == "error:too_large"  # 7+1+3 text units in one call
    served = [call for call in recent if not call.outcome.startswith("error:")]
    assert len(served) >= 3 and all(call.text_units <= 3 for call in served)
    # (parts run concurrently: the endpoint saw them in any order)
    assert sum(len(t) for call in served for t in call.texts) == len(first + second + third)
    assert bedrock.stats.calls == len(recent)
    assert dict(verdict.usage) == dict(bedrock.stats.billed_text_units)
    stats = client.stats
    assert stats["too_large"] >= 1 and stats["splits"] == 1
    assert stats["learned_max_units"]["testguardrail:1:OUTPUT"] <= 3


async def test_a_block_in_one_split_part_blocks_the_whole(bedrock: LocalBedrock,
                                                          client: ResilientGuardrail) -> None:
    bedrock.max_text_units_per_call = 2
    texts = ["mail ann@example.com " + filler(2_500, "a"), filler(2_000, "b") + " 123-45-6789"]
    verdict = await client.apply(GUARDRAIL, Source.OUTPUT, texts)
    assert verdict.outcome is Outcome.BLOCK
    assert verdict.outputs == (BLOCKED_OUTPUT,)
    assert any(f.name == "US_SOCIAL_SECURITY_NUMBER" for f in verdict.findings)


async def test_proactive_split_never_meets_the_default_limit(
        bedrock: LocalBedrock, client: ResilientGuardrail) -> None:
    text = "Contact ann@example.com. " + filler(40_000, "d")
    verdict = await client.apply(GUARDRAIL, Source.INPUT, [text])
    assert verdict.outcome is Outcome.MASK
    assert verdict.outputs == (text.replace("ann@example.com", "{EMAIL}"),)
    assert all(not call.outcome.startswith("error:") for call in bedrock.stats.recent)
    assert all(sum(text_units(t) for t in call.texts) <= 25 for call in bedrock.stats.recent)
    assert bedrock.stats.calls == 2
