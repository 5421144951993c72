"""``extproc.config``: flags, ``EXTPROC_*`` environment variables, defaults, validation; and the
``python -m extproc`` command line's configuration-error and help behaviour."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from extproc.domain.cost import DEFAULT_PRICES
from extproc.domain.errors import ConfigError, ExtprocError
from extproc.domain.failure import FailureMode, FailurePolicy
from extproc.domain.values import (
    Api,
    GuardrailRef,
    InputCheck,
    PoisonedTools,
    PromptScope,
    SignedPromptMask,
    StreamMode,
    UncheckedImages,
    UnknownTraffic,
)
from extproc.domain.windows import Strategy
from extproc.observe.logs import LogFormat
from extproc.settings.options import OPTIONS, build_parser, load_settings
from extproc.settings.values import EventLoop, GuardrailCalls, GuardrailClientKind, Settings
from tests.support import setting
from tests.support import settings as make_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
GID = "gr0abc123xyz"
BASE_ARGV = ["--guardrail-id", GID]

# Spelled out (not derived from OPTIONS) so a renamed variable breaks a test.
ENV_NAMES = {
    "--listen": "EXTPROC_LISTEN",
    "--guardrail-id": "EXTPROC_GUARDRAIL_ID",
    "--guardrail-version": "EXTPROC_GUARDRAIL_VERSION",
    "--input-check": "EXTPROC_INPUT_CHECK",
    "--output-check": "EXTPROC_OUTPUT_CHECK",
    "--reasoning-check": "EXTPROC_REASONING_CHECK",
    "--failure-mode": "EXTPROC_FAILURE_MODE",
    "--guardrail-timeout": "EXTPROC_GUARDRAIL_TIMEOUT",
    "--guardrail-max-attempts": "EXTPROC_GUARDRAIL_MAX_ATTEMPTS",
    "--guardrail-threads": "EXTPROC_GUARDRAIL_THREADS",
    "--guardrail-calls": "EXTPROC_GUARDRAIL_CALLS",
    "--guardrail-client": "EXTPROC_GUARDRAIL_CLIENT",
    "--event-loop": "EXTPROC_EVENT_LOOP",
    "--gc-full-every": "EXTPROC_GC_FULL_EVERY",
    "--gc-young-threshold": "EXTPROC_GC_YOUNG_THRESHOLD",
    "--input-wait": "EXTPROC_INPUT_WAIT",
    "--drain-delay": "EXTPROC_DRAIN_DELAY",
    "--grace-period": "EXTPROC_GRACE_PERIOD",
    "--metadata-namespace": "EXTPROC_METADATA_NAMESPACE",
    "--log-level": "EXTPROC_LOG_LEVEL",
    "--stream-mode": "EXTPROC_STREAM_MODE",
    "--check-strategy": "EXTPROC_CHECK_STRATEGY",
    "--window-chars": "EXTPROC_WINDOW_CHARS",
    "--window-overlap": "EXTPROC_WINDOW_OVERLAP",
    "--window-min-chars": "EXTPROC_WINDOW_MIN_CHARS",
    "--fast-first-window": "EXTPROC_FAST_FIRST_WINDOW",
    "--max-stream-text-units": "EXTPROC_MAX_STREAM_TEXT_UNITS",
    "--keepalive-interval": "EXTPROC_KEEPALIVE_INTERVAL",
    "--streamed-message-timeout": "EXTPROC_STREAMED_MESSAGE_TIMEOUT",
    "--prompt-scope": "EXTPROC_PROMPT_SCOPE",
    "--signed-prompt-mask": "EXTPROC_SIGNED_PROMPT_MASK",
    "--price-table": "EXTPROC_PRICE_TABLE",
    "--shadow": "EXTPROC_SHADOW",
    "--soft-block": "EXTPROC_SOFT_BLOCK",
    "--guardrail-attempt-timeout": "EXTPROC_GUARDRAIL_ATTEMPT_TIMEOUT",
    "--guardrail-max-chars-per-call": "EXTPROC_GUARDRAIL_MAX_CHARS_PER_CALL",
    "--verdict-cache-entries": "EXTPROC_VERDICT_CACHE_ENTRIES",
    "--unknown-traffic": "EXTPROC_UNKNOWN_TRAFFIC",
    "--api": "EXTPROC_API",
    "--mcp-poisoned-tools": "EXTPROC_MCP_POISONED_TOOLS",
    "--unchecked-images": "EXTPROC_UNCHECKED_IMAGES",
    "--verdict-cache-ttl": "EXTPROC_VERDICT_CACHE_TTL",
    "--breaker-failures": "EXTPROC_BREAKER_FAILURES",
    "--breaker-cooldown": "EXTPROC_BREAKER_COOLDOWN",
    "--budget-rps": "EXTPROC_BUDGET_RPS",
    "--budget-text-units": "EXTPROC_BUDGET_TEXT_UNITS",
    "--budget-max-wait": "EXTPROC_BUDGET_MAX_WAIT",
    "--shared-state": "EXTPROC_SHARED_STATE",
    "--shared-state-password-file": "EXTPROC_SHARED_STATE_PASSWORD_FILE",
    "--shared-state-prefix": "EXTPROC_SHARED_STATE_PREFIX",
    "--shared-state-timeout": "EXTPROC_SHARED_STATE_TIMEOUT",
    "--metrics-listen": "EXTPROC_METRICS_LISTEN",
    "--log-format": "EXTPROC_LOG_FORMAT",
    "--audit-include-matches": "EXTPROC_AUDIT_INCLUDE_MATCHES",
    "--config-poll-interval": "EXTPROC_CONFIG_POLL_INTERVAL",
    "--workers": "EXTPROC_WORKERS",
    "--reuse-port": "EXTPROC_REUSE_PORT",
    "--max-held-bytes": "EXTPROC_MAX_HELD_BYTES",
    "--max-streams": "EXTPROC_MAX_STREAMS",
    "--max-request-bytes": "EXTPROC_MAX_REQUEST_BYTES",
    "--max-prompt-images": "EXTPROC_MAX_PROMPT_IMAGES",
    "--tls-cert": "EXTPROC_TLS_CERT",
    "--tls-key": "EXTPROC_TLS_KEY",
    "--tls-client-ca": "EXTPROC_TLS_CLIENT_CA",
    "--otlp-endpoint": "EXTPROC_OTLP_ENDPOINT",
}


def settings_from(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    return load_settings(list(argv or []), dict(env or {}))


def attr(settings: Settings, path: str) -> Any:
    return setting(settings, path)


def config_error(argv: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        settings_from(argv, env)
    return str(info.value)


# --------------------------------------------------------------------------- option table


def test_option_table_matches_the_documented_names() -> None:
    assert {o.flag: o.env for o in OPTIONS} == ENV_NAMES
    assert len({o.dest for o in OPTIONS}) == len(OPTIONS)


def test_defaults() -> None:
    s = settings_from(BASE_ARGV)
    assert s == make_settings(guardrail=GuardrailRef(GID, "DRAFT"))  # type: ignore[arg-type]
    assert attr(s, "listen_host") == "127.0.0.1"
    assert attr(s, "listen_port") == 50051
    assert attr(s, "listen") == "127.0.0.1:50051"
    assert s.guardrail.id == GID
    assert s.guardrail.version == "DRAFT"
    assert attr(s, "input_check") is InputCheck.PRE_CALL
    assert attr(s, "output_check") is True
    assert attr(s, "failure_mode") == FailurePolicy()
    assert attr(s, "guardrail_timeout_s") == 5.0
    assert attr(s, "guardrail_max_attempts") == 3
    assert attr(s, "guardrail_threads") == 32
    assert attr(s, "gc_full_every") == 100
    assert attr(s, "gc_young_threshold") == 10_000
    assert attr(s, "input_wait_s") == 0.5
    assert attr(s, "drain_delay_s") == 0.0
    assert attr(s, "grace_period_s") == 30.0
    assert attr(s, "metadata_namespace") == "guardrail"
    assert attr(s, "log_level") == "INFO"
    assert attr(s, "aws_region") is None
    assert attr(s, "metrics_listen") == "127.0.0.1:9464"
    assert attr(s, "metrics_address") == ("127.0.0.1", 9464)
    assert attr(s, "log_format") is LogFormat.JSON
    assert attr(s, "audit_include_matches") is False


def test_numeric_defaults_have_the_right_types() -> None:
    s = settings_from(BASE_ARGV)
    for name in ("guardrail_timeout_s", "input_wait_s", "drain_delay_s", "grace_period_s"):
        assert type(attr(s, name)) is float, name
    for name in ("listen_port", "guardrail_max_attempts", "guardrail_threads"):
        assert type(attr(s, name)) is int, name


def test_settings_are_frozen() -> None:
    s = settings_from(BASE_ARGV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.server.listen_port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.guardrail.id = "other"  # type: ignore[misc]


# (flag, value, Settings attribute, expected) — one row per option at least.
SETS: list[tuple[str, str, str, Any]] = [
    ("--workers", "4", "workers", 4),
    ("--reuse-port", "on", "reuse_port", True),
    ("--max-held-bytes", "0", "max_held_bytes", 0),
    ("--max-streams", "10", "max_streams", 10),
    ("--max-request-bytes", "2048", "max_request_bytes", 2048),
    ("--max-prompt-images", "500", "max_prompt_images", 500),
    ("--prompt-scope", "all_with_system", "prompt_scope", PromptScope.ALL_WITH_SYSTEM),
    ("--signed-prompt-mask", "pass", "signed_prompt_mask", SignedPromptMask.PASS),
    ("--price-table", "content=0.07", "prices",
     MappingProxyType({**DEFAULT_PRICES, "contentPolicyUnits": 0.07})),
    ("--shadow", "on", "shadow", True),
    ("--soft-block", "yes", "soft_block", True),
    ("--guardrail-attempt-timeout", "1.5", "guardrail_attempt_timeout_s", 1.5),
    ("--guardrail-max-chars-per-call", "5000", "guardrail_max_chars_per_call", 5000),
    ("--verdict-cache-entries", "0", "verdict_cache_entries", 0),
    ("--unknown-traffic", "reject", "unknown_traffic", UnknownTraffic.REJECT),
    ("--api", "mcp", "default_route.api", Api.MCP),
    ("--mcp-poisoned-tools", "refuse", "default_route.mcp_poisoned_tools", PoisonedTools.REFUSE),
    ("--unchecked-images", "pass", "unchecked_images", UncheckedImages.PASS),
    ("--verdict-cache-ttl", "60", "verdict_cache_ttl_s", 60.0),
    ("--breaker-failures", "0", "breaker_failures", 0),
    ("--breaker-cooldown", "3", "breaker_cooldown_s", 3.0),
    ("--budget-rps", "25", "budget_rps", 25.0),
    ("--budget-text-units", "0", "budget_text_units", 0.0),
    ("--budget-max-wait", "0.5", "budget_max_wait_s", 0.5),
    ("--shared-state", "redis://cache:6379/0", "shared_state_url", "redis://cache:6379/0"),
    ("--shared-state", "unix:///run/redis.sock", "shared_state_url", "unix:///run/redis.sock"),
    ("--shared-state-prefix", "mesh-a:", "shared_state_prefix", "mesh-a:"),
    ("--shared-state-timeout", "0.2", "shared_state_timeout_s", 0.2),
    ("--metrics-listen", "0.0.0.0:0", "metrics_listen", "0.0.0.0:0"),
    ("--metrics-listen", "[::1]:9100", "metrics_address", ("::1", 9100)),
    ("--metrics-listen", " Off ", "metrics_listen", "off"),
    ("--metrics-listen", "off", "metrics_address", None),
    ("--log-format", "TEXT", "log_format", LogFormat.TEXT),
    ("--log-format", "json", "log_format", LogFormat.JSON),
    ("--audit-include-matches", "on", "audit_include_matches", True),
    ("--config-poll-interval", "0", "config_poll_s", 0.0),
    ("--config-poll-interval", "10", "config_poll_s", 10.0),
    ("--failure-mode", "closed,throttled=open", "failure_mode",
     FailurePolicy(throttled=FailureMode.OPEN)),
    ("--stream-mode", "async", "stream_mode", StreamMode.ASYNC),
    ("--check-strategy", "cumulative", "window.strategy", Strategy.CUMULATIVE),
    ("--window-chars", "900", "window.window_chars", 900),
    ("--window-overlap", "50", "window.overlap_chars", 50),
    ("--window-min-chars", "100", "window.min_chars", 100),
    ("--fast-first-window", "off", "window.fast_first_window", False),
    ("--max-stream-text-units", "7", "window.max_stream_text_units", 7),
    ("--keepalive-interval", "0", "keepalive_s", 0.0),
    ("--streamed-message-timeout", "3", "streamed_message_timeout_s", 3.0),
    ("--listen", "0.0.0.0:8443", "listen_host", "0.0.0.0"),
    ("--listen", "0.0.0.0:8443", "listen_port", 8443),
    ("--listen", "[::1]:9000", "listen_host", "::1"),
    ("--listen", "[::1]:9000", "listen", "[::1]:9000"),
    ("--listen", "localhost:0", "listen_port", 0),
    ("--listen", "sidecar.local:65535", "listen", "sidecar.local:65535"),
    ("--guardrail-id", "zz9plural", "guardrail.id", "zz9plural"),
    ("--guardrail-version", "7", "guardrail.version", "7"),
    ("--guardrail-version", "DRAFT", "guardrail.version", "DRAFT"),
    ("--input-check", "off", "input_check", InputCheck.OFF),
    ("--input-check", "PARALLEL", "input_check", InputCheck.PARALLEL),
    ("--output-check", "off", "output_check", False),
    ("--output-check", "FALSE", "output_check", False),
    ("--output-check", "0", "output_check", False),
    ("--output-check", "no", "output_check", False),
    ("--output-check", "yes", "output_check", True),
    ("--output-check", " True ", "output_check", True),
    ("--output-check", "1", "output_check", True),
    ("--reasoning-check", "off", "reasoning_check", False),
    ("--failure-mode", "open", "failure_mode", FailurePolicy.uniform(FailureMode.OPEN)),
    ("--failure-mode", " Closed ", "failure_mode", FailurePolicy()),
    ("--guardrail-timeout", "2.5", "guardrail_timeout_s", 2.5),
    ("--guardrail-timeout", "0.05", "guardrail_timeout_s", 0.05),
    ("--guardrail-timeout", "120", "guardrail_timeout_s", 120.0),
    ("--guardrail-max-attempts", "1", "guardrail_max_attempts", 1),
    ("--guardrail-max-attempts", "10", "guardrail_max_attempts", 10),
    ("--guardrail-threads", "8", "guardrail_threads", 8),
    ("--guardrail-threads", "1024", "guardrail_threads", 1024),
    ("--guardrail-calls", "thread", "guardrail_calls", GuardrailCalls.THREAD),
    ("--guardrail-calls", "process", "guardrail_calls", GuardrailCalls.PROCESS),
    ("--guardrail-client", "boto3", "guardrail_client", GuardrailClientKind.BOTO3),
    ("--guardrail-client", "lean", "guardrail_client", GuardrailClientKind.LEAN),
    ("--event-loop", "asyncio", "event_loop", EventLoop.ASYNCIO),
    ("--event-loop", "uvloop", "event_loop", EventLoop.UVLOOP),
    ("--gc-full-every", "10", "gc_full_every", 10),
    ("--gc-young-threshold", "700", "gc_young_threshold", 700),
    ("--input-wait", "1.25", "input_wait_s", 1.25),
    ("--input-wait", "0", "input_wait_s", 0.0),
    ("--drain-delay", "3", "drain_delay_s", 3.0),
    ("--drain-delay", "600", "drain_delay_s", 600.0),
    ("--grace-period", "10.5", "grace_period_s", 10.5),
    ("--grace-period", "3600", "grace_period_s", 3600.0),
    ("--metadata-namespace", "envoy.filters.http.guardrail-v2_x",
     "metadata_namespace", "envoy.filters.http.guardrail-v2_x"),
    ("--log-level", "debug", "log_level", "DEBUG"),
    ("--log-level", "Warning", "log_level", "WARNING"),
    ("--log-level", "ERROR", "log_level", "ERROR"),
    ("--otlp-endpoint", "http://127.0.0.1:4317", "otlp_endpoint", "http://127.0.0.1:4317"),
]


def test_set_table_covers_every_option() -> None:
    # TLS files only make sense together; tests/grpc/test_tls.py sets and uses them.
    tls = {"--tls-cert", "--tls-key", "--tls-client-ca"}
    # Needs --shared-state: test_the_password_comes_from_the_url_or_the_file_not_both.
    together = {"--shared-state-password-file"}
    assert {flag for flag, *_ in SETS} == set(ENV_NAMES) - tls - together


def _argv_for(flag: str, value: str) -> list[str]:
    return [flag, value] if flag == "--guardrail-id" else [*BASE_ARGV, flag, value]


@pytest.mark.parametrize(("flag", "value", "field", "expected"), SETS,
                         ids=[f"{f}={v}->{a}" for f, v, a, _ in SETS])
def test_flag_sets_field(flag: str, value: str, field: str, expected: Any) -> None:
    s = settings_from(_argv_for(flag, value))
    assert attr(s, field) == expected
    assert type(attr(s, field)) is type(expected)


@pytest.mark.parametrize(("flag", "value", "field", "expected"), SETS,
                         ids=[f"{f}={v}->{a}" for f, v, a, _ in SETS])
def test_flag_equals_form(flag: str, value: str, field: str, expected: Any) -> None:
    argv = [f"{flag}={value}"] if flag == "--guardrail-id" else [*BASE_ARGV, f"{flag}={value}"]
    assert attr(settings_from(argv), field) == expected


@pytest.mark.parametrize(("flag", "value", "field", "expected"), SETS,
                         ids=[f"{ENV_NAMES[f]}={v}->{a}" for f, v, a, _ in SETS])
def test_env_sets_field(flag: str, value: str, field: str, expected: Any) -> None:
    env = {"EXTPROC_GUARDRAIL_ID": GID, ENV_NAMES[flag]: value}
    s = settings_from([], env)
    assert attr(s, field) == expected
    assert type(attr(s, field)) is type(expected)


def test_only_the_given_option_changes() -> None:
    default = settings_from(BASE_ARGV)
    changed = settings_from([*BASE_ARGV, "--guardrail-threads", "4"])
    assert dataclasses.replace(
        default, client=dataclasses.replace(default.client, threads=4)) == changed


def test_all_flags_together() -> None:
    s = settings_from([
        "--listen", "10.0.0.5:6000", "--guardrail-id", "abc", "--guardrail-version", "12",
        "--input-check", "off", "--output-check", "off", "--failure-mode", "open",
        "--guardrail-timeout", "1", "--guardrail-max-attempts", "2", "--guardrail-threads", "3",
        "--input-wait", "0.25", "--drain-delay", "4", "--grace-period", "5",
        "--metadata-namespace", "gr", "--log-level", "error",
    ], {"AWS_REGION": "eu-west-1"})
    assert s == make_settings(
        guardrail=GuardrailRef("abc", "12"),  # type: ignore[arg-type]
        listen_host="10.0.0.5", listen_port=6000, input_check=InputCheck.OFF,
        output_check=False, failure_mode=FailurePolicy.uniform(FailureMode.OPEN),
        guardrail_timeout_s=1.0,
        guardrail_max_attempts=2, guardrail_threads=3, input_wait_s=0.25, drain_delay_s=4.0,
        grace_period_s=5.0, metadata_namespace="gr", log_level="ERROR", aws_region="eu-west-1",
    )


@pytest.mark.parametrize(
    ("flag", "flag_value", "env_value", "field", "expected"),
    [
        ("--listen", "127.0.0.1:7000", "0.0.0.0:8000", "listen_port", 7000),
        ("--guardrail-id", "fromflag", "fromenv", "guardrail.id", "fromflag"),
        ("--guardrail-version", "3", "4", "guardrail.version", "3"),
        ("--input-check", "parallel", "off", "input_check", InputCheck.PARALLEL),
        ("--output-check", "on", "off", "output_check", True),
        ("--failure-mode", "closed", "open", "failure_mode", FailurePolicy()),
        ("--guardrail-timeout", "1.5", "9", "guardrail_timeout_s", 1.5),
        ("--log-level", "ERROR", "DEBUG", "log_level", "ERROR"),
    ],
)
def test_flag_beats_env(flag: str, flag_value: str, env_value: str, field: str,
                        expected: Any) -> None:
    env = {"EXTPROC_GUARDRAIL_ID": GID, ENV_NAMES[flag]: env_value}
    assert attr(settings_from([flag, flag_value], env), field) == expected


def test_a_valid_flag_hides_an_invalid_env_value() -> None:
    env = {"EXTPROC_GUARDRAIL_ID": GID, "EXTPROC_GUARDRAIL_THREADS": "lots"}
    assert attr(settings_from(["--guardrail-threads", "2"], env), "guardrail_threads") == 2


def test_env_beats_default_and_other_env_vars_are_ignored() -> None:
    env = {"EXTPROC_GUARDRAIL_ID": GID, "EXTPROC_LISTEN": "0.0.0.0:1234",
           "EXTPROC_UNKNOWN": "x", "GUARDRAIL_ID": "nope", "extproc_log_level": "DEBUG"}
    s = settings_from([], env)
    assert attr(s, "listen") == "0.0.0.0:1234"
    assert s.guardrail.id == GID
    assert attr(s, "log_level") == "INFO"


def test_only_the_given_environ_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTPROC_GUARDRAIL_ID", GID)
    monkeypatch.setenv("EXTPROC_LISTEN", "0.0.0.0:1")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    with pytest.raises(ConfigError):
        load_settings([], {})
    s = load_settings(BASE_ARGV, {})
    assert attr(s, "listen_port") == 50051
    assert attr(s, "aws_region") is None


# --------------------------------------------------------------------------- guardrail id / version


def test_missing_guardrail_id_names_flag_and_env() -> None:
    message = config_error([])
    assert "--guardrail-id" in message
    assert "EXTPROC_GUARDRAIL_ID" in message
    assert "required" in message


def test_missing_guardrail_id_is_a_config_error_subclass() -> None:
    with pytest.raises(ExtprocError):
        settings_from([])


def test_empty_guardrail_id_flag() -> None:
    message = config_error(["--guardrail-id", ""])
    assert message.startswith("--guardrail-id")
    assert "required" in message


def test_empty_guardrail_id_env() -> None:
    message = config_error([], {"EXTPROC_GUARDRAIL_ID": ""})
    assert message.startswith("EXTPROC_GUARDRAIL_ID")
    assert "required" in message


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "gr0abc123xyz",
        "0",
        "a" * 2048,
        "arn:aws:bedrock:us-east-1:123456789012:guardrail/gr0abc123xyz",
        "arn:aws-us-gov:bedrock:us-gov-west-1:123456789012:guardrail/abc",
        "arn:aws-cn:bedrock:cn-north-1:123456789012:guardrail/abc",
        "arn:aws-iso-b:bedrock:us-isob-east-1:123456789012:guardrail/x1",
    ],
    ids=["short", "typical", "digit", "max-length", "arn", "arn-gov", "arn-cn", "arn-iso"],
)
def test_valid_guardrail_ids(value: str) -> None:
    assert settings_from(["--guardrail-id", value]).guardrail.id == value
    assert settings_from([], {"EXTPROC_GUARDRAIL_ID": value}).guardrail.id == value


@pytest.mark.parametrize(
    "value",
    [
        "ABC",
        "gr-abc",
        "gr_abc",
        "abc def",
        " abc",
        "abc\n",
        "a" * 2049,
        "arn:aws:bedrock:us-east-1:12345:guardrail/abc",
        "arn:aws:bedrock:us-east-1:123456789012:guardrail/",
        "arn:aws:bedrock:us-east-1:123456789012:guardrail/ABC",
        "arn:aws:bedrock:us-east-1:123456789012:knowledge-base/abc",
        "arn:aws:s3:::my-bucket",
        "arn:aws:bedrock:us-east-1:123456789012:guardrail/abc:1",
        "arn:aws:bedrock::123456789012:guardrail/abc",
    ],
    ids=["upper", "dash", "underscore", "space", "leading-space", "newline", "too-long",
         "short-account", "no-id", "upper-id", "wrong-resource", "s3", "versioned-arn",
         "no-region"],
)
def test_invalid_guardrail_ids(value: str) -> None:
    message = config_error(["--guardrail-id", value])
    assert message.startswith("--guardrail-id: ")
    assert "is not a guardrail id" in message
    env_message = config_error([], {"EXTPROC_GUARDRAIL_ID": value})
    assert env_message.startswith("EXTPROC_GUARDRAIL_ID: ")


@pytest.mark.parametrize("value", ["1", "9", "10", "12345678", "99999999", "DRAFT"])
def test_valid_guardrail_versions(value: str) -> None:
    assert settings_from([*BASE_ARGV, "--guardrail-version", value]).guardrail.version == value


@pytest.mark.parametrize(
    "value",
    ["0", "01", "-1", "1.0", "123456789", "draft", "Draft", "DRAFT1", " 1", "v1", "", "latest"],
)
def test_invalid_guardrail_versions(value: str) -> None:
    message = config_error([*BASE_ARGV, "--guardrail-version", value])
    assert message.startswith("--guardrail-version: ")
    assert "is not a guardrail version" in message
    assert "DRAFT" in message
    env_message = config_error(BASE_ARGV, {"EXTPROC_GUARDRAIL_VERSION": value})
    assert env_message.startswith("EXTPROC_GUARDRAIL_VERSION: ")


# --------------------------------------------------------------------------- bad values


BAD: list[tuple[str, str, tuple[str, ...]]] = [
    ("--workers", "0", ("outside",)),
    ("--reuse-port", "sure", ("is not a boolean",)),
    ("--max-held-bytes", "-1", ("outside",)),
    ("--max-streams", "lots", ("is not a int",)),
    ("--max-request-bytes", "-5", ("outside",)),
    ("--max-prompt-images", "-1", ("outside",)),
    ("--tls-cert", "/nonexistent/cert.pem", ("cannot read",)),
    ("--tls-key", "/nonexistent/key.pem", ("cannot read",)),
    ("--tls-client-ca", "/nonexistent/ca.pem", ("cannot read",)),
    ("--prompt-scope", "some", ("is not one of", "last_user")),
    ("--signed-prompt-mask", "strip", ("is not one of", "refuse", "pass")),
    ("--price-table", "content=cheap", ("'cheap'", "is not a price")),
    ("--shadow", "perhaps", ("is not a boolean",)),
    ("--soft-block", "2", ("is not a boolean",)),
    ("--guardrail-attempt-timeout", "0", ("outside",)),
    ("--guardrail-max-chars-per-call", "10", ("outside",)),
    ("--verdict-cache-entries", "-1", ("outside",)),
    ("--unknown-traffic", "allow", ("is not one of", "generic")),
    ("--api", "grpc", ("is not one of", "auto", "mcp")),
    ("--mcp-poisoned-tools", "hide", ("is not one of", "remove", "refuse")),
    ("--unchecked-images", "allow", ("is not one of", "reject")),
    ("--verdict-cache-ttl", "0", ("outside",)),
    ("--breaker-failures", "-1", ("outside",)),
    ("--breaker-cooldown", "0", ("outside",)),
    ("--budget-rps", "-1", ("outside",)),
    ("--budget-text-units", "x", ("is not a float",)),
    ("--budget-max-wait", "-1", ("outside",)),
    ("--shared-state", "memcached://cache", ("expected redis://",)),
    ("--shared-state-password-file", "/nonexistent/pw", ("cannot read",)),
    ("--shared-state-prefix", "has space", ("is not a key prefix",)),
    ("--shared-state-timeout", "0", ("outside", "0.001..10")),
    ("--metrics-listen", "9464", ("expected HOST:PORT",)),
    ("--metrics-listen", "localhost:99999", ("port must be 0-65535",)),
    ("--metrics-listen", "no", ("expected HOST:PORT",)),
    ("--log-format", "xml", ("is not one of", "json", "text")),
    ("--audit-include-matches", "maybe", ("is not a boolean",)),
    ("--config-poll-interval", "-1", ("outside",)),
    ("--stream-mode", "eventually", ("is not one of", "sync", "async")),
    ("--check-strategy", "sometimes", ("is not one of", "windowed", "cumulative")),
    ("--window-chars", "0", ("outside",)),
    ("--window-overlap", "-1", ("outside",)),
    ("--window-min-chars", "x", ("is not a int",)),
    ("--fast-first-window", "maybe", ("is not a boolean",)),
    ("--max-stream-text-units", "0", ("outside",)),
    ("--keepalive-interval", "-1", ("outside",)),
    ("--streamed-message-timeout", "0", ("outside",)),
    ("--listen", "127.0.0.1", ("expected HOST:PORT", "'127.0.0.1'")),
    ("--listen", "50051", ("expected HOST:PORT",)),
    ("--listen", ":50051", ("expected HOST:PORT",)),
    ("--listen", "", ("expected HOST:PORT",)),
    ("--listen", "localhost:http", ("port must be a number", "'http'")),
    ("--listen", "localhost:", ("port must be a number",)),
    ("--listen", "localhost:50o51", ("port must be a number",)),
    ("--listen", "localhost:65536", ("port must be 0-65535", "65536")),
    ("--listen", "localhost:-1", ("port must be 0-65535",)),
    ("--listen", "localhost:99999999", ("port must be 0-65535",)),
    ("--input-check", "sometimes", ("'sometimes'", "is not one of", "off", "parallel")),
    ("--input-check", "", ("is not one of", "off", "parallel")),
    ("--failure-mode", "maybe", ("'maybe'", "is not a failure mode", "closed or open")),
    ("--output-check", "enabled", ("'enabled'", "not a boolean", "on/off", "true/false")),
    ("--output-check", "", ("not a boolean", "on/off")),
    ("--reasoning-check", "maybe", ("'maybe'", "not a boolean", "on/off")),
    ("--guardrail-timeout", "fast", ("'fast'", "not a float")),
    ("--guardrail-timeout", "0", ("outside", "0.05..120")),
    ("--guardrail-timeout", "0.049", ("outside", "0.05..120")),
    ("--guardrail-timeout", "120.5", ("outside", "0.05..120")),
    ("--guardrail-timeout", "nan", ("outside", "0.05..120")),
    ("--guardrail-timeout", "inf", ("outside", "0.05..120")),
    ("--guardrail-max-attempts", "2.5", ("'2.5'", "int")),
    ("--guardrail-max-attempts", "0", ("outside", "1..10")),
    ("--guardrail-max-attempts", "11", ("outside", "1..10")),
    ("--guardrail-threads", "many", ("'many'", "int")),
    ("--guardrail-threads", "0", ("outside", "1..1024")),
    ("--guardrail-threads", "1025", ("outside", "1..1024")),
    ("--input-wait", "-0.1", ("outside", "0..60")),
    ("--input-wait", "61", ("outside", "0..60")),
    ("--drain-delay", "601", ("outside", "0..600")),
    ("--drain-delay", "soon", ("not a float",)),
    ("--grace-period", "3601", ("outside", "0..3600")),
    ("--grace-period", "-1", ("outside", "0..3600")),
    ("--metadata-namespace", "", ("not a valid metadata namespace",)),
    ("--metadata-namespace", "has space", ("'has space'", "not a valid metadata namespace")),
    ("--metadata-namespace", "a/b", ("not a valid metadata namespace",)),
    ("--log-level", "TRACE", ("'TRACE'", "DEBUG", "INFO", "WARNING", "ERROR")),
    ("--log-level", "CRITICAL", ("DEBUG", "INFO", "WARNING", "ERROR")),
    ("--guardrail-calls", "fork", ("is not one of", "process", "thread")),
    ("--guardrail-client", "botocore", ("is not one of", "lean", "boto3")),
    ("--event-loop", "trio", ("is not one of", "auto", "uvloop", "asyncio")),
    ("--gc-full-every", "-1", ("outside", "0..1000000")),
    ("--gc-young-threshold", "-1", ("outside", "0..100000000")),
    ("--otlp-endpoint", "grpc://collector:4317", ("'grpc://collector:4317'", "http:// or https://")),
    ("--otlp-endpoint", "http://collector:4318/v1/traces", ("takes no path", "HOST:PORT")),
    ("--otlp-endpoint", "collector", ("expected HOST:PORT",)),
    ("--otlp-endpoint", "http://collector:0", ("port 0",)),
]


def test_bad_table_covers_every_validated_option() -> None:
    covered = {flag for flag, *_ in BAD} | {"--guardrail-id", "--guardrail-version"}
    assert covered == set(ENV_NAMES)


@pytest.mark.parametrize(("flag", "value", "fragments"), BAD,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_flag_value_names_the_flag(flag: str, value: str, fragments: tuple[str, ...]) -> None:
    message = config_error([*BASE_ARGV, f"{flag}={value}"])
    assert message.startswith(f"{flag}: "), message
    assert ENV_NAMES[flag] not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message


@pytest.mark.parametrize(("flag", "value", "fragments"), BAD,
                         ids=[f"{ENV_NAMES[f]}={v!r}" for f, v, _ in BAD])
def test_bad_env_value_names_the_env_var(flag: str, value: str,
                                         fragments: tuple[str, ...]) -> None:
    message = config_error(BASE_ARGV, {ENV_NAMES[flag]: value})
    assert message.startswith(f"{ENV_NAMES[flag]}: "), message
    assert flag not in message.replace(ENV_NAMES[flag], "")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_config_errors_do_not_chain_parsing_exceptions() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from([*BASE_ARGV, "--guardrail-threads", "many"])
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ is True


def test_first_bad_option_in_table_order_is_reported() -> None:
    message = config_error(["--log-level", "LOUD", "--listen", "nowhere"])
    assert message.startswith("--listen: ")


# --------------------------------------------------------------------------- AWS_REGION


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"AWS_REGION": "eu-central-1"}, "eu-central-1"),
        ({"AWS_REGION": ""}, None),
        ({}, None),
        ({"AWS_DEFAULT_REGION": "us-west-2"}, None),
        ({"EXTPROC_AWS_REGION": "us-west-2"}, None),
    ],
    ids=["set", "empty", "unset", "default-region-left-to-boto3", "no-extproc-variant"],
)
def test_aws_region(env: dict[str, str], expected: str | None) -> None:
    assert settings_from(BASE_ARGV, env).client.aws_region == expected


def test_aws_region_is_not_a_flag() -> None:
    with pytest.raises(SystemExit) as info:
        settings_from([*BASE_ARGV, "--aws-region", "eu-west-1"])
    assert info.value.code == 2


# --------------------------------------------------------------------------- parser


def test_build_parser_has_every_flag_defaulting_to_none() -> None:
    parser = build_parser()
    assert parser.prog == "guardrail-extproc"
    assert build_parser("custom").prog == "custom"
    namespace = vars(parser.parse_args([]))
    assert namespace == {o.dest: None for o in OPTIONS} | {"config": None,
                                                            "print_config": False}


def test_build_parser_help_names_every_env_var_and_default() -> None:
    text = build_parser().format_help()
    flat = " ".join(text.split())
    for flag, env in ENV_NAMES.items():
        assert flag in flat
        assert f"[env {env}]" in flat
    assert "(default: 127.0.0.1:50051)" in flat
    assert "(default: DRAFT)" in flat
    assert "AWS_REGION" in flat


def test_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        settings_from([*BASE_ARGV, "--no-such-flag"])
    assert info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


# --------------------------------------------------------------------------- the command line


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EXTPROC_") and k not in ("AWS_REGION", "PYTHONWARNINGS")}
    env["COLUMNS"] = "80"
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def assert_one_config_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stderr.endswith("\n")
    assert lines[0].startswith("guardrail-extproc: configuration error: ")
    return lines[0]


def test_cli_without_guardrail_id_exits_2_with_one_line() -> None:
    line = assert_one_config_error_line(run_cli(env=clean_env()))
    assert "--guardrail-id" in line
    assert "EXTPROC_GUARDRAIL_ID" in line


def test_cli_bad_env_value_names_the_variable() -> None:
    result = run_cli(env=clean_env(EXTPROC_GUARDRAIL_ID=GID, EXTPROC_LISTEN="nowhere"))
    line = assert_one_config_error_line(result)
    assert "EXTPROC_LISTEN" in line
    assert "expected HOST:PORT" in line


def test_cli_bad_flag_value_names_the_flag() -> None:
    result = run_cli("--guardrail-id", GID, "--failure-mode", "sideways", env=clean_env())
    line = assert_one_config_error_line(result)
    assert "--failure-mode" in line
    assert "closed or open" in line


def test_cli_help_exits_0_and_mentions_every_env_var() -> None:
    result = run_cli("--help", env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    flat = " ".join(result.stdout.split())
    assert flat.startswith("usage: ")
    for flag, env in ENV_NAMES.items():
        assert flag in flat
        assert env in flat, env
    for aws in ("AWS_REGION", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME"):
        assert aws in flat


def test_window_min_chars_cannot_exceed_window_chars() -> None:
    message = config_error([*BASE_ARGV, "--window-chars", "100", "--window-min-chars", "200"])
    assert "--window-min-chars" in message and "--window-chars" in message


# --------------------------------------------------------------------------- workers


def test_workers_auto_is_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import extproc.settings.values as settings_values

    monkeypatch.setattr(settings_values.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(settings_values, "_cgroup_cpu_quota", lambda: None)
    assert settings_from(BASE_ARGV + ["--workers", "auto"]).server.workers == 4
    assert settings_from(BASE_ARGV).server.workers == 4  # the default
    assert settings_from(BASE_ARGV + ["--workers", "3"]).server.workers == 3
    monkeypatch.setattr(settings_values, "_cgroup_cpu_quota", lambda: 1.5)  # a pod's limit: 1500m
    assert settings_values.available_cpus() == 2
    monkeypatch.setattr(settings_values, "_cgroup_cpu_quota", lambda: 0.25)
    assert settings_values.available_cpus() == 1
    monkeypatch.setattr(settings_values, "_cgroup_cpu_quota", lambda: 16.0)  # above the affinity
    assert settings_values.available_cpus() == 4


# --------------------------------------------------------------------------- shared state


def test_shared_state_is_off_by_default_and_takes_redis_rediss_and_unix_urls() -> None:
    client = settings_from(BASE_ARGV).client
    assert client.shared_state_url is None and client.shared_state_timeout_s == 0.05
    assert client.shared_state_prefix == "guardrail-extproc:"
    for url in ("redis://cache:6379/0", "rediss://user:pw@cache.example:6380/2?ssl_ca_certs=/ca",
                "unix:///run/redis.sock?db=1", "REDIS://h"):
        assert settings_from([*BASE_ARGV, "--shared-state", url]).client.shared_state_url == url


@pytest.mark.parametrize(("url", "message"), [
    ("http://:hunter2@cache:6379", "expected redis://"),
    ("cache:6379", "expected redis://"),
    ("redis://:hunter2@:6379", "no host"),
    ("redis://:hunter2@cache:http", "not a valid URL"),
    ("redis://:hunter2@cache:6379/zero", "database number"),
    ("redis://:hunter2@cache:6379/0?socket_timeout=5", "unknown URL parameter(s) socket_timeout"),
    ("unix://", "socket's path"),
])
def test_a_bad_shared_state_url_is_a_clear_start_up_error_without_its_password(
        url: str, message: str) -> None:
    error = config_error([*BASE_ARGV, "--shared-state", url])
    assert message in error and "--shared-state" in error
    assert "hunter2" not in error


def test_print_config_shows_the_shared_state_url_without_its_password() -> None:
    from extproc.settings.options import render_settings

    settings = settings_from([*BASE_ARGV, "--shared-state", "rediss://app:hunter2@cache:6380/1"])
    rendered = render_settings(settings)
    assert "shared_state: rediss://app:***@cache:6380/1" in rendered
    assert "hunter2" not in rendered


def test_the_password_comes_from_the_url_or_the_file_not_both(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    ok = settings_from([*BASE_ARGV, "--shared-state", "redis://cache",
                        "--shared-state-password-file", str(secret)])
    assert ok.client.shared_state_password_file == str(secret)
    error = config_error([*BASE_ARGV, "--shared-state", "redis://:pw@cache",
                          "--shared-state-password-file", str(secret)])
    assert "give one of them" in error
    assert "needs --shared-state" in config_error(
        [*BASE_ARGV, "--shared-state-password-file", str(secret)])


# --------------------------------------------------------------------------- tracing


def test_tracing_is_off_by_default() -> None:
    assert settings_from(BASE_ARGV).runtime.otlp_endpoint is None


@pytest.mark.parametrize("value", ["http://127.0.0.1:4317", "https://collector.example:4317",
                                   "collector:4317", "http://[::1]:4317/"])
def test_otlp_endpoint_accepts_grpc_addresses(value: str) -> None:
    assert settings_from([*BASE_ARGV, "--otlp-endpoint", value]).runtime.otlp_endpoint == value
    from_env = settings_from(BASE_ARGV, {"EXTPROC_OTLP_ENDPOINT": value})
    assert from_env.runtime.otlp_endpoint == value

