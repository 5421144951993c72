"""Settings: every knob of the sidecar, parsed from flags and environment once, at start-up.

Owns the option table (flag, environment variable, default, validation) and the frozen
``Settings`` value handed to the server. Nothing else in the package reads the environment
(boto3 reads its own standard AWS variables); nothing here runs at import time.

Precedence: command-line flag, then environment variable, then default.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NewType

from extproc.errors import ConfigError
from extproc.failure import FailureMode, FailurePolicy, parse_failure_policy
from extproc.logs import LogFormat
from extproc.policy import StreamMode, Strategy, WindowPolicy

GuardrailId = NewType("GuardrailId", str)
GuardrailVersion = NewType("GuardrailVersion", str)

ENV_PREFIX = "EXTPROC_"

# Bedrock's own patterns for the ApplyGuardrail URI members (botocore service model).
_GUARDRAIL_ID_RE = re.compile(
    r"(([a-z0-9]+)|(arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:guardrail/[a-z0-9]+))"
)
_GUARDRAIL_VERSION_RE = re.compile(r"(([1-9][0-9]{0,7})|(DRAFT))")


class GuardrailCalls(enum.Enum):
    """Where the blocking boto3 calls run (``extproc.callproc`` says why)."""

    PROCESS = "process"  # a child process: boto3 never holds the event loop's GIL
    THREAD = "thread"  # a thread pool of this process


class EventLoop(enum.Enum):
    """The asyncio event loop implementation (``bench/README.md`` has the measurements)."""

    AUTO = "auto"  # uvloop when it is installed, else asyncio's own
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class InputCheck(enum.Enum):
    """When the prompt is checked with source INPUT."""

    OFF = "off"
    PRE_CALL = "pre_call"  # checked before the request goes upstream (a block never reaches it)
    PARALLEL = "parallel"  # checked while the upstream call runs; the answer is held until it passes


class PromptScope(enum.Enum):
    """Which prompt text is checked."""

    LAST_USER = "last_user"
    ALL = "all"
    ALL_WITH_SYSTEM = "all_with_system"


@dataclass(frozen=True, slots=True)
class GuardrailRef:
    """Which guardrail to apply."""

    id: GuardrailId
    version: GuardrailVersion


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """What the sidecar does for the requests of one route (defaults: the process settings;
    overridden per route from Envoy, see ``extproc.routes``)."""

    guardrail: GuardrailRef
    enabled: bool = True
    input_check: InputCheck = InputCheck.PRE_CALL
    prompt_scope: PromptScope = PromptScope.LAST_USER
    output_check: bool = True
    stream_mode: StreamMode = StreamMode.SYNC
    shadow: bool = False
    soft_block: bool = False
    failure_mode: FailurePolicy = FailurePolicy()
    window: WindowPolicy = WindowPolicy()


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration of one sidecar process."""

    guardrail: GuardrailRef
    listen_host: str = "127.0.0.1"
    listen_port: int = 50051
    input_check: InputCheck = InputCheck.PRE_CALL
    prompt_scope: PromptScope = PromptScope.LAST_USER
    output_check: bool = True
    shadow: bool = False
    soft_block: bool = False
    failure_mode: FailurePolicy = FailurePolicy()
    guardrail_timeout_s: float = 5.0
    guardrail_max_attempts: int = 3
    guardrail_threads: int = 32
    guardrail_calls: GuardrailCalls = GuardrailCalls.PROCESS
    event_loop: EventLoop = EventLoop.AUTO
    gc_full_every: int = 100
    gc_young_threshold: int = 10_000
    input_wait_s: float = 0.5
    drain_delay_s: float = 0.0
    grace_period_s: float = 30.0
    metadata_namespace: str = "guardrail"
    log_level: str = "INFO"
    stream_mode: StreamMode = StreamMode.SYNC
    window: WindowPolicy = WindowPolicy()
    keepalive_s: float = 5.0
    streamed_message_timeout_s: float = 10.0
    guardrail_attempt_timeout_s: float = 2.0
    guardrail_max_chars_per_call: int = 25_000
    breaker_failures: int = 0
    breaker_cooldown_s: float = 10.0
    budget_rps: float = 0.0
    budget_text_units: float = 0.0
    budget_max_wait_s: float = 0.25
    workers: int = field(default_factory=lambda: available_cpus())
    reuse_port: bool = False
    max_held_bytes: int = 4 * 1024 * 1024
    max_request_bytes: int = 1024 * 1024
    max_streams: int = 2000
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    metrics_listen: str = "127.0.0.1:9464"  # HOST:PORT or "off"
    log_format: LogFormat = LogFormat.JSON
    audit_include_matches: bool = False
    aws_region: str | None = None  # AWS_REGION; None leaves it to boto3 (AWS_DEFAULT_REGION, profile)
    routes: Mapping[str, RoutePolicy] = field(default_factory=dict)

    @property
    def default_route(self) -> RoutePolicy:
        """The route policy built from the process-wide settings."""
        return RoutePolicy(
            guardrail=self.guardrail,
            input_check=self.input_check,
            prompt_scope=self.prompt_scope,
            output_check=self.output_check,
            stream_mode=self.stream_mode,
            shadow=self.shadow,
            soft_block=self.soft_block,
            failure_mode=self.failure_mode,
            window=self.window,
        )

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the Prometheus endpoint, or None when ``--metrics-listen off``."""
        if self.metrics_listen == METRICS_OFF:
            return None
        return _parse_listen(self.metrics_listen, "--metrics-listen")


@dataclass(frozen=True, slots=True)
class _Option:
    flag: str
    help: str
    default: str | None
    parse: Callable[[str, str], Any]

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def _parse_listen(value: str, where: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{where}: expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{where}: port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}: port must be 0-65535, got {port}")
    return host, port


def _parse_guardrail_id(value: str, where: str) -> GuardrailId:
    if not value:
        raise ConfigError(
            f"{where} is required: the Bedrock guardrail identifier (id or ARN) to apply"
        )
    if len(value) > 2048 or not _GUARDRAIL_ID_RE.fullmatch(value):
        raise ConfigError(
            f"{where}: {value!r} is not a guardrail id ([a-z0-9]+) or guardrail ARN"
        )
    return GuardrailId(value)


def _parse_guardrail_version(value: str, where: str) -> GuardrailVersion:
    if not _GUARDRAIL_VERSION_RE.fullmatch(value):
        raise ConfigError(f"{where}: {value!r} is not a guardrail version (1-99999999 or DRAFT)")
    return GuardrailVersion(value)


def _enum_parser(kind: type[enum.Enum]) -> Callable[[str, str], Any]:
    def parse(value: str, where: str) -> Any:
        try:
            return kind(value.strip().lower())
        except ValueError:
            allowed = ", ".join(str(m.value) for m in kind)
            raise ConfigError(f"{where}: {value!r} is not one of: {allowed}") from None

    return parse


def _parse_failure_policy(value: str, where: str) -> FailurePolicy:
    try:
        return parse_failure_policy(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _parse_file(value: str, where: str) -> str | None:
    if not value:
        return None
    try:
        with open(value, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {value!r} ({exc.strerror})") from None
    return value


def _parse_bool(value: str, where: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: {value!r} is not a boolean (on/off, true/false)")


def _number_parser(
    kind: type[int] | type[float], low: float, high: float
) -> Callable[[str, str], Any]:
    def parse(value: str, where: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a {kind.__name__}") from None
        if not low <= number <= high:
            raise ConfigError(f"{where}: {number} is outside {low}..{high}")
        return number

    return parse


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a pod's CPU
    limit; rounded up), at least 1. ``os.cpu_count()`` would give the node's cores."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    """The CPU quota in CPUs (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``), or None."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as handle:
            quota, period = handle.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as q, \
                open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as p:
            value, period_us = int(q.read()), int(p.read())
        return value / period_us if value > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def _parse_workers(value: str, where: str) -> int:
    if value.strip().lower() == "auto":
        return available_cpus()
    parsed: int = _number_parser(int, 1, 256)(value, where)
    return parsed


def _parse_log_level(value: str, where: str) -> str:
    level = value.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{where}: {value!r} is not one of DEBUG, INFO, WARNING, ERROR")
    return level


METRICS_OFF = "off"


def _parse_metrics_listen(value: str, where: str) -> str:
    if value.strip().lower() == METRICS_OFF:
        return METRICS_OFF
    host, port = _parse_listen(value, where)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_namespace(value: str, where: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
        raise ConfigError(f"{where}: {value!r} is not a valid metadata namespace")
    return value


OPTIONS: tuple[_Option, ...] = (
    _Option("--listen", "gRPC listen address HOST:PORT (port 0 picks a free port)",
            "127.0.0.1:50051", _parse_listen),
    _Option("--tls-cert", "PEM certificate chain: serve gRPC over TLS (with --tls-key)", "",
            _parse_file),
    _Option("--tls-key", "PEM private key of --tls-cert", "", _parse_file),
    _Option("--tls-client-ca", "PEM CA bundle: require and verify client certificates (mTLS)",
            "", _parse_file),
    _Option("--guardrail-id", "Bedrock guardrail identifier (id or ARN); required", None,
            _parse_guardrail_id),
    _Option("--guardrail-version", "guardrail version number or DRAFT", "DRAFT",
            _parse_guardrail_version),
    _Option("--input-check", "prompt check: pre_call (before the upstream is contacted), "
            "parallel (while the upstream runs) or off", "pre_call", _enum_parser(InputCheck)),
    _Option("--prompt-scope", "prompt text checked: last_user, all (messages) or "
            "all_with_system", "last_user", _enum_parser(PromptScope)),
    _Option("--output-check", "check answers, streamed and not (on/off)", "on", _parse_bool),
    _Option("--shadow", "detect-only rollout: check everything, never block or rewrite, count "
            "and log what would have happened", "off", _parse_bool),
    _Option("--soft-block", "end a blocked answer with the guardrail's message as normal "
            "content and a content-filter finish reason instead of an error", "off",
            _parse_bool),
    _Option("--failure-mode", "when the guardrail gives no verdict: closed, open, or per error "
            "class, e.g. closed,throttled=open,timeout=open (classes: throttled, timeout, "
            "server_error, input_too_large, rejected, circuit_open, budget, overload)", "closed",
            _parse_failure_policy),
    _Option("--guardrail-timeout", "seconds one ApplyGuardrail call may take, retries included",
            "5", _number_parser(float, 0.05, 120)),
    _Option("--guardrail-max-attempts", "ApplyGuardrail attempts per call: retries with "
            "backoff and jitter for throttling, timeouts and 5xx, within --guardrail-timeout",
            "3", _number_parser(int, 1, 10)),
    _Option("--guardrail-attempt-timeout", "seconds one attempt may take", "2",
            _number_parser(float, 0.05, 120)),
    _Option("--guardrail-max-chars-per-call", "larger inputs are split into several calls "
            "(Bedrock rejects calls over the per-policy text-unit quota)", "25000",
            _number_parser(int, 1000, 10_000_000)),
    _Option("--breaker-failures", "consecutive failed attempts that also open the circuit "
            "breaker (0: off; at high concurrency a short run of failures is common, so the "
            "breaker opens by default only when 80%% of at least 20 attempts in 30 s failed)",
            "0", _number_parser(int, 0, 10_000)),
    _Option("--breaker-cooldown", "seconds the breaker stays open before a probe call", "10",
            _number_parser(float, 0.1, 3600)),
    _Option("--budget-rps", "ApplyGuardrail requests per second this process may send "
            "(token bucket; 0: unlimited): your account's quota divided by the processes that "
            "share it", "0", _number_parser(float, 0, 100_000)),
    _Option("--budget-text-units", "text units per second this process may send (0: "
            "unlimited): the smallest per-policy quota divided by the processes that share it",
            "0", _number_parser(float, 0, 1_000_000)),
    _Option("--budget-max-wait", "seconds a call may wait for budget before it fails as "
            "'budget'", "0.25", _number_parser(float, 0, 60)),
    _Option("--guardrail-threads", "threads running boto3 calls (concurrent calls per process)",
            "32", _number_parser(int, 1, 1024)),
    _Option("--guardrail-calls", "where boto3 calls run: process (a child process, so they "
            "never hold the event loop's GIL) or thread (this process's thread pool)", "process",
            _enum_parser(GuardrailCalls)),
    _Option("--event-loop", "asyncio event loop: auto (uvloop when installed), uvloop or "
            "asyncio", "auto", _enum_parser(EventLoop)),
    _Option("--gc-full-every", "Python runs a full garbage collection (a pause that grows with "
            "the text streams hold) once per this many generation-1 ones; Python's own default "
            "is 10; 0 leaves it as Python has it (with --gc-young-threshold 0 as well, the "
            "collector is untouched and the start-up heap unfrozen)", "100",
            _number_parser(int, 0, 1_000_000)),
    _Option("--gc-young-threshold", "Python runs a young garbage collection once this many more "
            "container objects were created than freed (Python's default: 700; held events are "
            "several each, so a low threshold walks them again and again); generation 1 is then "
            "collected every third young collection; 0 leaves both as Python has them",
            "10000", _number_parser(int, 0, 100_000_000)),
    _Option("--input-wait", "seconds the response-headers answer may wait for a pending prompt "
            "verdict; keep it below Envoy's message_timeout", "0.5",
            _number_parser(float, 0, 60)),
    _Option("--drain-delay", "seconds between NOT_SERVING and closing the listener on SIGTERM",
            "0", _number_parser(float, 0, 600)),
    _Option("--grace-period", "seconds in-flight streams get to finish on SIGTERM", "30",
            _number_parser(float, 0, 3600)),
    _Option("--metadata-namespace", "dynamic metadata namespace for Envoy's access log",
            "guardrail", _parse_namespace),
    _Option("--log-level", "DEBUG, INFO, WARNING or ERROR", "INFO", _parse_log_level),
    _Option("--stream-mode", "sync: no text before a passing check; async: release at once, "
            "check beside the stream", "sync", _enum_parser(StreamMode)),
    _Option("--check-strategy", "windowed (new text + overlap, linear cost) or cumulative "
            "(the whole answer each time)", "windowed", _enum_parser(Strategy)),
    _Option("--window-chars", "new characters per check (800 + 200 overlap = 1 text unit)",
            "800", _number_parser(int, 1, 100_000)),
    _Option("--window-overlap", "characters of already-checked text repeated at the start of "
            "each window (and held back in sync mode)", "200", _number_parser(int, 0, 10_000)),
    _Option("--window-min-chars", "new characters that trigger a check mid-stream (the first "
            "check and the end of the stream do not wait); unset, at most --window-chars", "800",
            _number_parser(int, 1, 100_000)),
    _Option("--fast-first-window", "release the first checked text in full (time to first "
            "token = one round trip)", "on", _parse_bool),
    _Option("--max-stream-text-units", "cumulative strategy: text units per policy one stream "
            "may spend before falling back to windows", "100", _number_parser(int, 1, 1_000_000)),
    _Option("--workers", "server processes sharing the listen port (SO_REUSEPORT) to use "
            "more than one core; auto: the CPUs this process may use (affinity and cgroup "
            "CPU quota); worker i serves metrics on the metrics port + i", "auto",
            _parse_workers),
    _Option("--reuse-port", "bind the listen port with SO_REUSEPORT (set for workers; for "
            "processes started by other means)", "off", _parse_bool),
    _Option("--max-held-bytes", "bytes one stream may hold back (unchecked text, a partial "
            "event); beyond it the failure policy's 'overload' class decides (0: no limit)",
            "4194304", _number_parser(int, 0, 1 << 34)),
    _Option("--max-request-bytes", "largest request body (prompt) checked, inflated; larger "
            "ones get 413 before anything goes upstream (keep it at most Envoy's buffer "
            "limit, per_connection_buffer_limit_bytes, 1 MiB by default; 0: no limit)",
            "1048576", _number_parser(int, 0, 1 << 34)),
    _Option("--max-streams", "streams this process guards at once; beyond it the failure "
            "policy's 'overload' class decides (closed: 503; open: unchecked) (0: no limit)",
            "2000", _number_parser(int, 0, 10_000_000)),
    _Option("--keepalive-interval", "seconds of silence before an SSE comment keep-alive while "
            "text is held (0: off)", "5", _number_parser(float, 0, 3600)),
    _Option("--streamed-message-timeout", "STREAMED fallback: override_message_timeout while "
            "the final answer waits for a check (must be <= Envoy's max_message_timeout)", "10",
            _number_parser(float, 0.001, 3600)),
    _Option("--metrics-listen", "Prometheus /metrics address HOST:PORT (port 0 picks a free "
            "port), or off", "127.0.0.1:9464", _parse_metrics_listen),
    _Option("--log-format", "json (one object per line) or text", "json",
            _enum_parser(LogFormat)),
    _Option("--audit-include-matches", "audit records show matched text, cut to its first "
            "and last character (on/off)", "off", _parse_bool),
)


def build_parser(prog: str = "guardrail-extproc") -> argparse.ArgumentParser:
    """The command-line parser; every flag also reads ``EXTPROC_<FLAG>`` from the environment."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Envoy ext_proc sidecar enforcing AWS Bedrock Guardrails on LLM traffic. "
        "AWS region, endpoint and credentials come from the standard AWS settings "
        "(AWS_REGION, AWS_ENDPOINT_URL_BEDROCK_RUNTIME, the credential chain).",
    )
    parser.add_argument("--config", dest="config", default=None, metavar="FILE",
                        help=f"YAML configuration file: options by name with underscores, and "
                        f"per-route policies under 'routes' (flags and environment variables "
                        f"win over it) [env {CONFIG_ENV}]")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration as YAML and exit")
    for option in OPTIONS:
        default = f" (default: {option.default})" if option.default is not None else ""
        parser.add_argument(option.flag, dest=option.dest, default=None,
                            help=f"{option.help}{default} [env {option.env}]")
    return parser


CONFIG_ENV = ENV_PREFIX + "CONFIG"

# Per-route settings (configuration file ``routes.<name>.<key>``; Envoy metadata
# ``x-guardrail-<key with dashes>``): key -> (RoutePolicy field, or "window.<field>", parser).
ROUTE_FIELDS: Mapping[str, tuple[str, Callable[[str, str], Any]]] = {
    "guardrail_id": ("guardrail.id", _parse_guardrail_id),
    "guardrail_version": ("guardrail.version", _parse_guardrail_version),
    "enabled": ("enabled", _parse_bool),
    "input_check": ("input_check", _enum_parser(InputCheck)),
    "prompt_scope": ("prompt_scope", _enum_parser(PromptScope)),
    "output_check": ("output_check", _parse_bool),
    "stream_mode": ("stream_mode", _enum_parser(StreamMode)),
    "shadow": ("shadow", _parse_bool),
    "soft_block": ("soft_block", _parse_bool),
    "failure_mode": ("failure_mode", _parse_failure_policy),
    "window_chars": ("window.window_chars", _number_parser(int, 1, 100_000)),
    "window_overlap": ("window.overlap_chars", _number_parser(int, 0, 10_000)),
    "window_min_chars": ("window.min_chars", _number_parser(int, 1, 100_000)),
}


def apply_route_values(base: RoutePolicy, values: Mapping[str, tuple[str, str]],
                       ) -> RoutePolicy:
    """``base`` with route settings applied; ``values``: key -> (raw value, where).
    Raises ``ConfigError`` naming the place of a bad value."""
    import dataclasses

    changes: dict[str, Any] = {}
    window: dict[str, Any] = {}
    guardrail = {"id": base.guardrail.id, "version": base.guardrail.version}
    for key, (raw, where) in values.items():
        target, parse = ROUTE_FIELDS[key]
        value = parse(raw, where)
        if target.startswith("window."):
            window[target[len("window."):]] = value
        elif target.startswith("guardrail."):
            guardrail[target[len("guardrail."):]] = value
        else:
            changes[target] = value
    if window:
        new_window = dataclasses.replace(base.window, **window)
        if new_window.min_chars > new_window.window_chars:
            where = values.get("window_min_chars", values.get("window_chars", ("", "window")))[1]
            raise ConfigError(f"{where}: window_min_chars ({new_window.min_chars}) must not "
                              f"exceed window_chars ({new_window.window_chars})")
        changes["window"] = new_window
    changes["guardrail"] = GuardrailRef(GuardrailId(guardrail["id"]),
                                        GuardrailVersion(guardrail["version"]))
    return dataclasses.replace(base, **changes)


def render_settings(settings: Settings) -> str:
    """The effective configuration as YAML, in the configuration file's own shape."""
    import yaml

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, FailurePolicy):
            return str(value)
        return value

    def route_dict(route: RoutePolicy) -> dict[str, Any]:
        return {
            "guardrail_id": route.guardrail.id, "guardrail_version": route.guardrail.version,
            "enabled": route.enabled, "input_check": plain(route.input_check),
            "prompt_scope": plain(route.prompt_scope), "output_check": route.output_check,
            "stream_mode": plain(route.stream_mode), "shadow": route.shadow,
            "soft_block": route.soft_block, "failure_mode": plain(route.failure_mode),
            "window_chars": route.window.window_chars,
            "window_overlap": route.window.overlap_chars,
            "window_min_chars": route.window.min_chars,
        }

    special: dict[str, Any] = {
        "listen": settings.listen,
        "guardrail_id": settings.guardrail.id,
        "guardrail_version": settings.guardrail.version,
        "check_strategy": settings.window.strategy,
        "window_chars": settings.window.window_chars,
        "window_overlap": settings.window.overlap_chars,
        "window_min_chars": settings.window.min_chars,
        "fast_first_window": settings.window.fast_first_window,
        "max_stream_text_units": settings.window.max_stream_text_units,
        "keepalive_interval": settings.keepalive_s,
    }
    out: dict[str, Any] = {}
    for option in OPTIONS:
        if option.dest in special:
            value = special[option.dest]
        elif hasattr(settings, option.dest):
            value = getattr(settings, option.dest)
        else:
            value = getattr(settings, option.dest + "_s")
        if value is not None:
            out[option.dest] = plain(value)
    out["routes"] = {name: route_dict(route) for name, route in settings.routes.items()}
    return str(yaml.safe_dump(out, sort_keys=False))


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Parse and validate; raises ``ConfigError`` naming the flag, the environment variable or
    the configuration file's key. Precedence: flag, environment, file, default."""
    from extproc.configfile import load_file

    args = vars(build_parser().parse_args(list(argv)))
    config_path = args.get("config") or environ.get(CONFIG_ENV)
    file_config = (load_file(config_path, [o.dest for o in OPTIONS], ROUTE_FIELDS)
                   if config_path else None)
    values: dict[str, Any] = {}
    defaulted: set[str] = set()
    for option in OPTIONS:
        raw = args[option.dest]
        where = option.flag
        if raw is None:
            raw = environ.get(option.env)
            where = option.env
        if raw is None and file_config is not None and option.dest in file_config.values:
            raw = file_config.values[option.dest].value
            where = file_config.values[option.dest].where
        if raw is None:
            raw = option.default
            where = f"{option.flag} / {option.env}"
            defaulted.add(option.dest)
        if raw is None:
            raw = ""
            where = f"{option.flag} / {option.env}"
        values[option.dest] = option.parse(raw, where)
    if "window_min_chars" in defaulted:
        # Unset, the trigger follows a smaller window instead of contradicting it.
        values["window_min_chars"] = min(values["window_min_chars"], values["window_chars"])
    host, port = values.pop("listen")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if values["tls_client_ca"] and not values["tls_cert"]:
        raise ConfigError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    window = WindowPolicy(
        strategy=values.pop("check_strategy"),
        window_chars=values.pop("window_chars"),
        overlap_chars=values.pop("window_overlap"),
        min_chars=values.pop("window_min_chars"),
        fast_first_window=values.pop("fast_first_window"),
        max_stream_text_units=values.pop("max_stream_text_units"),
    )
    if window.min_chars > window.window_chars:
        raise ConfigError(
            f"--window-min-chars ({window.min_chars}) must not exceed --window-chars "
            f"({window.window_chars})"
        )
    settings = Settings(
        window=window,
        keepalive_s=values.pop("keepalive_interval"),
        streamed_message_timeout_s=values.pop("streamed_message_timeout"),
        guardrail=GuardrailRef(values.pop("guardrail_id"), values.pop("guardrail_version")),
        listen_host=host,
        listen_port=port,
        guardrail_timeout_s=values.pop("guardrail_timeout"),
        guardrail_max_attempts=values.pop("guardrail_max_attempts"),
        guardrail_attempt_timeout_s=values.pop("guardrail_attempt_timeout"),
        guardrail_max_chars_per_call=values.pop("guardrail_max_chars_per_call"),
        breaker_cooldown_s=values.pop("breaker_cooldown"),
        budget_max_wait_s=values.pop("budget_max_wait"),
        guardrail_threads=values.pop("guardrail_threads"),
        input_wait_s=values.pop("input_wait"),
        drain_delay_s=values.pop("drain_delay"),
        grace_period_s=values.pop("grace_period"),
        aws_region=environ.get("AWS_REGION") or None,
        **values,
    )
    if file_config is None or not file_config.routes:
        return settings
    import dataclasses

    routes = {
        name: apply_route_values(settings.default_route,
                                 {k: (raw.value, raw.where) for k, raw in entries.items()})
        for name, entries in file_config.routes.items()
    }
    return dataclasses.replace(settings, routes=routes)
