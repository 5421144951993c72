"""Test support shared by the tiers: Envoy message builders and a scriptable guardrail fake."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from extproc._pb.envoy.config.core.v3 import base_pb2
from extproc._pb.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.domain.errors import GuardrailError
from extproc.domain.values import GuardrailRef, Source
from extproc.domain.verdict import GuardrailVerdict, classify
from extproc.settings.values import (
    ClientSettings,
    RoutePolicy,
    RuntimeSettings,
    ServerSettings,
    Settings,
    StreamSettings,
)

ProcessingMode = processing_mode_pb2.ProcessingMode
T = TypeVar("T")

#: The messages every API's error carries (``extproc.formats``' client-facing errors).
VIOLATION_MESSAGE = "Violated guardrail policy"
UNAVAILABLE_MESSAGE = "Guardrail unavailable"
#: The OpenAI-style JSON error body of a blocked request or non-streamed answer.
CHAT_VIOLATION_BODY = (b'{"error": {"message": "Violated guardrail policy", "code": 400, '
                       b'"type": "guardrail_violation"}}')
#: The OpenAI-style terminal frames of a streamed answer, byte for byte (the one copy).
BLOCK_FRAME = (
    b'data: {"error": {"message": "Violated guardrail policy", "code": 400, '
    b'"type": "guardrail_violation"}}\n\ndata: [DONE]\n\n'
)
UNAVAILABLE_FRAME = (
    b'data: {"error": {"message": "Guardrail unavailable", "code": 503, '
    b'"type": "guardrail_unavailable"}}\n\ndata: [DONE]\n\n'
)


#: How long a test waits for something that should happen at once on an idle machine: generous,
#: so that a busy machine only makes a test slower, never makes it fail.
WAIT_S = 30.0


def wait_until(predicate: Callable[[], T | bool | None], timeout: float = WAIT_S,
               what: str = "condition", interval: float = 0.01) -> T:
    """Poll ``predicate`` (blocking) until it returns something truthy, and return that; an
    ``AssertionError`` naming ``what`` after ``timeout`` seconds. A wait, never a measurement:
    no assertion may depend on how long it took."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def eventually(predicate: Callable[[], T | bool | None], timeout: float = WAIT_S,
                     what: str = "condition", interval: float = 0.005) -> T:
    """``wait_until`` for the event loop: polls without blocking it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def isolate_aws_env(monkeypatch: Any) -> None:
    """An AWS environment for boto3 that reads nothing from the machine: no profile, files,
    instance metadata or container credentials; region us-east-1 and test keys."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_BEARER_TOKEN_BEDROCK", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


#: ``settings()`` keyword -> (section of ``Settings``, field): the tests name each knob by its
#: option (``max_held_bytes``, ``guardrail_timeout_s``), wherever it lives.
_SECTION_OF: dict[str, tuple[str, str]] = {
    **{name: ("server", name) for name in (
        "listen_host", "listen_port", "tls_cert", "tls_key", "tls_client_ca", "drain_delay_s",
        "grace_period_s", "workers", "reuse_port", "metrics_listen")},
    **{name: ("client", name.removeprefix("guardrail_")) for name in (
        "guardrail_timeout_s", "guardrail_max_attempts", "guardrail_attempt_timeout_s",
        "guardrail_max_chars_per_call", "guardrail_threads", "guardrail_calls",
        "guardrail_client")},
    **{name: ("client", name) for name in (
        "breaker_failures", "breaker_cooldown_s", "budget_rps", "budget_text_units",
        "budget_max_wait_s", "aws_region", "verdict_cache_entries", "verdict_cache_ttl_s",
        "shared_state_url", "shared_state_password_file", "shared_state_prefix",
        "shared_state_timeout_s")},
    **{name: ("runtime", name) for name in (
        "event_loop", "gc_full_every", "gc_young_threshold", "log_level", "log_format",
        "audit_include_matches", "config_poll_s", "otlp_endpoint")},
    **{name: ("streams", name) for name in (
        "input_wait_s", "metadata_namespace", "keepalive_s", "streamed_message_timeout_s",
        "max_held_bytes", "max_request_bytes", "max_prompt_images", "max_streams", "prices")},
    **{name: ("default_route", name) for name in (
        "guardrail", "input_check", "prompt_scope", "signed_prompt_mask", "output_check",
        "reasoning_check", "shadow", "soft_block", "failure_mode", "stream_mode", "window",
        "unknown_traffic", "unchecked_images", "enabled")},
}


def setting(settings: Settings, name: str) -> Any:
    """A setting by option name (``listen_port``, ``guardrail_timeout_s``), or a dotted path
    below one (``window.min_chars``, ``guardrail.id``), wherever it lives in ``Settings``."""
    head, _, rest = name.partition(".")
    value: Any = settings
    if head in _SECTION_OF:
        section, field_name = _SECTION_OF[head]
        value = getattr(getattr(settings, section), field_name)
    elif head in ("listen", "metrics_address"):
        value = getattr(settings.server, head)
    else:
        value = getattr(settings, head)
    for part in rest.split(".") if rest else ():
        value = getattr(value, part)
    return value


def settings(**overrides: Any) -> Settings:
    """Settings for tests: the guardrail ``testguardrail`` version 1, and ``overrides`` by
    option name (see ``_SECTION_OF``); ``routes`` as is."""
    sections: dict[str, dict[str, Any]] = {
        "default_route": {"guardrail": GuardrailRef("testguardrail", "1")}}  # type: ignore[arg-type]
    for name, value in overrides.items():
        if name == "routes":
            continue
        section, field_name = _SECTION_OF[name]
        sections.setdefault(section, {})[field_name] = value
    return Settings(
        default_route=RoutePolicy(**sections["default_route"]),
        server=ServerSettings(**sections.get("server", {})),
        client=ClientSettings(**sections.get("client", {})),
        runtime=RuntimeSettings(**sections.get("runtime", {})),
        streams=StreamSettings(**sections.get("streams", {})),
        routes=overrides.get("routes", {}),
    )


def _header_map(headers: Sequence[tuple[str, str]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]
    )


def request_headers(
    path: str = "/v1/chat/completions",
    method: str = "POST",
    extra: Sequence[tuple[str, str]] = (("accept-encoding", "gzip"),),
    end_of_stream: bool = False,
) -> pb.ProcessingRequest:
    headers = [(":method", method), (":path", path), (":authority", "llm"),
               ("content-type", "application/json"), *extra]
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=_header_map(headers), end_of_stream=end_of_stream)
    )


def request_body(body: bytes, end_of_stream: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def chat_request(prompt: str, stream: bool = True) -> bytes:
    return json.dumps(
        {"model": "demo", "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    ).encode()


def response_headers(
    status: int = 200, content_type: str = "text/event-stream", end_of_stream: bool = False
) -> pb.ProcessingRequest:
    headers = [(":status", str(status)), ("content-type", content_type)]
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(headers=_header_map(headers), end_of_stream=end_of_stream)
    )


def response_body(body: bytes, end_of_stream: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def chunk_event(content: str | None = None, finish_reason: str | None = None) -> bytes:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "demo",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def bedrock_response(outcome: str, texts: Sequence[str] = ()) -> dict[str, Any]:
    """A Bedrock-shaped ApplyGuardrail answer for the fake."""
    usage = {"topicPolicyUnits": 0, "contentPolicyUnits": 0, "wordPolicyUnits": 1,
             "sensitiveInformationPolicyUnits": 0, "sensitiveInformationPolicyFreeUnits": 0,
             "contextualGroundingPolicyUnits": 0}
    if outcome == "block":
        return {"action": "GUARDRAIL_INTERVENED", "outputs": [{"text": "Sorry."}], "usage": usage,
                "assessments": [{"wordPolicy": {"customWords": [
                    {"match": "x", "action": "BLOCKED", "detected": True}]}}]}
    if outcome == "mask":
        return {"action": "GUARDRAIL_INTERVENED", "usage": usage,
                "outputs": [{"text": t} for t in texts],
                "assessments": [{"sensitiveInformationPolicy": {"piiEntities": [
                    {"match": "a@b.c", "type": "EMAIL", "action": "ANONYMIZED",
                     "detected": True}]}}]}
    if outcome == "detect":
        return {"action": "NONE", "outputs": [], "usage": usage,
                "assessments": [{"sensitiveInformationPolicy": {"piiEntities": [
                    {"match": "555", "type": "PHONE", "action": "NONE", "detected": True}]}}]}
    return {"action": "NONE", "outputs": [], "usage": usage, "assessments": []}


@dataclass
class Call:
    source: Source
    texts: list[str]


@dataclass
class FakeGuardrail:
    """Verdicts by rule: any ``blocked`` word -> block, ``masked`` -> mask, ``detected`` ->
    detect-only; ``error`` raises it; ``hold`` makes calls wait until released."""

    blocked: tuple[str, ...] = ("forbidden",)
    masked: tuple[str, ...] = ()
    detected: tuple[str, ...] = ()
    error: GuardrailError | None = None
    calls: list[Call] = field(default_factory=list)
    hold: asyncio.Event | None = None
    in_flight: int = 0
    max_in_flight: int = 0

    async def apply(self, guardrail: GuardrailRef, source: Source,
                    texts: Sequence[str]) -> GuardrailVerdict:
        self.calls.append(Call(source, list(texts)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            else:
                await asyncio.sleep(0)
            if self.error is not None:
                raise self.error
            joined = " ".join(texts).lower()
            if any(word in joined for word in self.blocked):
                return classify(bedrock_response("block"))
            if any(word in joined for word in self.masked):
                return classify(bedrock_response("mask", texts))
            if any(word in joined for word in self.detected):
                return classify(bedrock_response("detect"))
            return classify(bedrock_response("pass"))
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        pass


def body_of(response: pb.ProcessingResponse) -> tuple[bytes, bool]:
    """(body, end_of_stream) of a FULL_DUPLEX response body answer."""
    streamed = response.response_body.response.body_mutation.streamed_response
    return streamed.body, streamed.end_of_stream
