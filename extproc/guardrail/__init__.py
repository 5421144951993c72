"""Guardrail clients behind ``extproc.domain.client.GuardrailClient``.

Modules: ``bedrock`` (boto3, the AWS error mapping; the only importer of boto3), ``lean`` (the
call without boto3's per-call machinery: botocore's signer, a keep-alive connection), ``parent`` /
``child`` / ``wire`` (the calls in a child process), ``resilient`` (deadline, retries, splitting,
breaker, budget around any client), ``breaker``, ``budget``, ``splitting`` and ``config`` (its
mechanics and knobs). ``build_client`` is the one place the production stack is put together.

Importing this package does not import boto3: ``build_client`` imports ``bedrock`` when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from extproc.guardrail.config import ResilienceConfig

if TYPE_CHECKING:
    from extproc.guardrail.budget import Budget
    from extproc.guardrail.resilient import ResilientGuardrail
    from extproc.observe.tracing import Tracer
    from extproc.settings.values import Settings


def resilience_config(settings: Settings) -> ResilienceConfig:
    """Retries, breaker and budget from the settings."""
    return ResilienceConfig(
        deadline_s=settings.client.timeout_s,
        attempt_timeout_s=min(settings.client.attempt_timeout_s, settings.client.timeout_s),
        max_attempts=settings.client.max_attempts,
        max_chars_per_call=settings.client.max_chars_per_call,
        breaker_failures=settings.client.breaker_failures,
        breaker_cooldown_s=settings.client.breaker_cooldown_s,
        budget_rps=settings.client.budget_rps,
        budget_text_units_per_s=settings.client.budget_text_units,
        budget_max_wait_s=settings.client.budget_max_wait_s,
    )


def build_client(settings: Settings, config: ResilienceConfig | None = None, *,
                 budget: Budget | None = None,
                 tracer: Tracer | None = None) -> ResilientGuardrail:
    """The production client: Bedrock with a single botocore attempt (the wrapper retries),
    wrapped in ``ResilientGuardrail``; ``config`` defaults to ``resilience_config(settings)``;
    ``budget``: a shared one (else the process's own buckets of ``config``); with a
    ``tracer``, every attempt is a span."""
    from extproc.guardrail.bedrock import BedrockGuardrailClient
    from extproc.guardrail.resilient import ResilientGuardrail

    config = config or resilience_config(settings)
    inner = BedrockGuardrailClient(settings, max_attempts=1,
                                   attempt_timeout_s=config.attempt_timeout_s)
    return ResilientGuardrail(inner, config, budget=budget, tracer=tracer)
