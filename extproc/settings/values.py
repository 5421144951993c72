"""The validated configuration of one sidecar process, as nested frozen values.

``Settings`` groups what each part of the sidecar reads: ``server`` (the gRPC listener, TLS,
draining, metrics, workers), ``client`` (the ApplyGuardrail client: timeouts, retries, breaker,
budget, where the calls run), ``runtime`` (event loop, garbage collector, logs, audit),
``streams`` (per-stream limits and the Envoy facts the state machine needs), ``default_route``
(the ``RoutePolicy`` of a stream whose route says nothing else), ``routes`` (named policies
from the configuration file) and ``selectors`` (how a stream's route picks one of them from what
Envoy sends: ext_proc attributes, route metadata, forwarded metadata, a header).

Values only: parsing, the option table and the configuration file live in
``extproc.settings.options`` and ``extproc.settings.file``. Nothing here reads the environment
or runs at import time.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from extproc.domain.cost import DEFAULT_PRICES
from extproc.domain.failure import FailurePolicy
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
from extproc.domain.windows import WindowPolicy
from extproc.observe.logs import LogFormat

#: ``--metrics-listen off``.
METRICS_OFF = "off"


class GuardrailCalls(enum.Enum):
    """Where the blocking boto3 calls run (``extproc.guardrail.parent`` says why)."""

    PROCESS = "process"  # a child process: boto3 never holds the event loop's GIL
    THREAD = "thread"  # a thread pool of this process


class GuardrailClientKind(enum.Enum):
    """How an ApplyGuardrail call is made (``extproc.guardrail.lean`` says why)."""

    LEAN = "lean"  # botocore signs and maps errors; one keep-alive POST per call
    BOTO3 = "boto3"  # boto3's bedrock-runtime client, every step of it


class EventLoop(enum.Enum):
    """The asyncio event loop implementation (``bench/README.md`` has the measurements)."""

    AUTO = "auto"  # uvloop when it is installed, else asyncio's own
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """What the sidecar does for the requests of one route (defaults: the process settings;
    overridden per route from Envoy, see ``extproc.settings.routes``)."""

    guardrail: GuardrailRef
    enabled: bool = True
    input_check: InputCheck = InputCheck.PRE_CALL
    prompt_scope: PromptScope = PromptScope.WHOLE_REQUEST
    unknown_traffic: UnknownTraffic = UnknownTraffic.GENERIC
    api: Api = Api.AUTO  # ``mcp``: every request of the route is MCP (``extproc.formats.mcp``)
    mcp_poisoned_tools: PoisonedTools = PoisonedTools.REMOVE
    # Prompt images the guardrail cannot be given (``extproc.images``): refused by default.
    unchecked_images: UncheckedImages = UncheckedImages.REJECT
    signed_prompt_mask: SignedPromptMask = SignedPromptMask.REFUSE
    output_check: bool = True
    # Reasoning text (thinking, reasoning_content, thought parts, reasoning summaries) is
    # answer text the client shows: checked unless a route opts out (logged and counted).
    reasoning_check: bool = True
    stream_mode: StreamMode = StreamMode.SYNC
    shadow: bool = False
    soft_block: bool = False
    failure_mode: FailurePolicy = FailurePolicy()
    window: WindowPolicy = WindowPolicy()


class SelectorSource(enum.Enum):
    """Where a ``RouteSelector`` reads its value (``extproc.settings.routes`` says how)."""

    ATTRIBUTE = "attribute"  # an ext_proc request attribute (``request_attributes``)
    ROUTE_METADATA = "route_metadata"  # a path into the ``xds.route_metadata`` attribute
    METADATA = "metadata"  # a path into metadata forwarded by ``metadata_options``
    HEADER = "header"  # a request header that Envoy sets (and strips from clients)


#: The route name a selector may map a value to for the process-level policy.
DEFAULT_ROUTE_NAME = "default"


@dataclass(frozen=True, slots=True)
class RouteSelector:
    """One way of naming a stream's route policy from what Envoy sends.

    ``key``: the attribute name (``xds.route_name``), the header name, or a metadata path
    ``namespace:key:key`` (Envoy's access-log spelling). ``routes``: value or shell-style
    pattern -> configured route name, exact values first, then patterns in file order; empty,
    the value itself must be a configured route name."""

    source: SelectorSource
    key: str
    routes: tuple[tuple[str, str], ...] = ()


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


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The gRPC listener and the process around it."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 50051
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    drain_delay_s: float = 0.0
    grace_period_s: float = 30.0
    workers: int = field(default_factory=available_cpus)
    reuse_port: bool = False
    metrics_listen: str = "127.0.0.1:9464"  # HOST:PORT (validated) or METRICS_OFF

    @property
    def listen(self) -> str:
        return host_port(self.listen_host, self.listen_port)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the Prometheus endpoint, or None when ``--metrics-listen off``."""
        if self.metrics_listen == METRICS_OFF:
            return None
        host, _, port = self.metrics_listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """The ApplyGuardrail client (``extproc.guardrail``)."""

    timeout_s: float = 5.0  # one call, retries included
    attempt_timeout_s: float = 2.0
    max_attempts: int = 3
    max_chars_per_call: int = 25_000
    breaker_failures: int = 0
    breaker_cooldown_s: float = 10.0
    budget_rps: float = 0.0
    budget_text_units: float = 0.0
    budget_max_wait_s: float = 0.25
    threads: int = 32
    calls: GuardrailCalls = GuardrailCalls.PROCESS
    client: GuardrailClientKind = GuardrailClientKind.LEAN
    aws_region: str | None = None  # AWS_REGION; None: boto3's own (AWS_DEFAULT_REGION, profile)
    verdict_cache_entries: int = 100_000  # prompt texts known to pass; 0: no cache
    verdict_cache_ttl_s: float = 3600.0
    # Budgets and verdict cache in Redis/Valkey, shared by every replica (``extproc.shared``);
    # None: each process keeps its own.
    shared_state_url: str | None = None
    shared_state_password_file: str | None = None
    shared_state_prefix: str = "guardrail-extproc:"
    shared_state_timeout_s: float = 0.05  # one store operation; then the local state serves

    @property
    def shared_state_redacted(self) -> str | None:
        """``shared_state_url`` fit for a log line: its password replaced by ``***``."""
        return None if self.shared_state_url is None else redact_url(self.shared_state_url)


def redact_url(url: str) -> str:
    """``url`` with the password of its user part (``user:password@``) replaced by ``***``."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    netloc = f"{user}:***@{host}" if colon else f"{user}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """How the process runs: event loop, garbage collector, logs, the audit trail, traces."""

    event_loop: EventLoop = EventLoop.AUTO
    gc_full_every: int = 100
    gc_young_threshold: int = 10_000
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.JSON
    audit_include_matches: bool = False
    config_poll_s: float = 2.0  # 0: the configuration file is read again on SIGHUP only
    # OTLP/gRPC collector for traces (``extproc.observe.otel``); None: tracing off
    otlp_endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """Per-stream limits, and the Envoy facts the per-stream state machine needs."""

    input_wait_s: float = 0.5
    metadata_namespace: str = "guardrail"
    keepalive_s: float = 5.0
    streamed_message_timeout_s: float = 10.0
    max_held_bytes: int = 4 * 1024 * 1024
    max_request_bytes: int = 1024 * 1024
    max_prompt_images: int = 100  # distinct images a prompt may have checked (0: no limit)
    max_streams: int = 2000
    # ``usage`` member -> USD per 1,000 units (``extproc.domain.cost``; ``--price-table``)
    prices: Mapping[str, float] = field(default_factory=lambda: DEFAULT_PRICES)


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration of one sidecar process."""

    default_route: RoutePolicy
    server: ServerSettings = field(default_factory=ServerSettings)
    client: ClientSettings = ClientSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    streams: StreamSettings = StreamSettings()
    routes: Mapping[str, RoutePolicy] = field(default_factory=dict)
    selectors: tuple[RouteSelector, ...] = ()

    @property
    def guardrail(self) -> GuardrailRef:
        """The default route's guardrail."""
        return self.default_route.guardrail
