"""The option table: every knob of the sidecar, parsed from flags, environment and the
configuration file once, at start-up, into ``extproc.settings.values.Settings``.

Owns the table (flag, where the value goes in ``Settings``, help, default, parser), the
per-route keys (``ROUTE_FIELDS``), the checks of the route selectors, ``load_settings`` and
``render_settings`` (``--print-config``). Nothing else in the package reads the environment
(boto3 reads its own standard AWS variables); nothing here runs at import time.

Precedence: command-line flag, then environment variable, then the configuration file, then
default.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from extproc.domain.cost import format_price_table, parse_price_table
from extproc.domain.errors import ConfigError
from extproc.domain.failure import FailurePolicy, parse_failure_policy
from extproc.domain.values import (
    Api,
    GuardrailId,
    GuardrailRef,
    GuardrailVersion,
    InputCheck,
    PoisonedTools,
    PromptScope,
    SignedPromptMask,
    StreamMode,
    UncheckedImages,
    UnknownTraffic,
)
from extproc.domain.windows import Strategy, WindowPolicy
from extproc.observe.logs import LogFormat
from extproc.settings.values import (
    DEFAULT_ROUTE_NAME,
    METRICS_OFF,
    ClientSettings,
    EventLoop,
    GuardrailCalls,
    GuardrailClientKind,
    RoutePolicy,
    RouteSelector,
    RuntimeSettings,
    SelectorSource,
    ServerSettings,
    Settings,
    StreamSettings,
    available_cpus,
    host_port,
)

if TYPE_CHECKING:
    from extproc.settings.file import RawSelector

ENV_PREFIX = "EXTPROC_"

# Bedrock's own patterns for the ApplyGuardrail URI members (botocore service model).
_GUARDRAIL_ID_RE = re.compile(
    r"(([a-z0-9]+)|(arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:guardrail/[a-z0-9]+))"
)
_GUARDRAIL_VERSION_RE = re.compile(r"(([1-9][0-9]{0,7})|(DRAFT))")


@dataclass(frozen=True, slots=True)
class _Option:
    """One setting: its flag, where its value goes in ``Settings`` (a dotted path), its help,
    its default as text (None: required) and its parser (``(text, where) -> value``)."""

    flag: str
    target: str
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


def _parse_prices(value: str, where: str) -> Mapping[str, float]:
    try:
        return parse_price_table(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


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


def _parse_metrics_listen(value: str, where: str) -> str:
    if value.strip().lower() == METRICS_OFF:
        return METRICS_OFF
    host, port = _parse_listen(value, where)
    return host_port(host, port)


#: Query parameters a ``--shared-state`` URL may carry (redis-py's names): the database and
#: TLS settings. Timeouts come from ``--shared-state-timeout``.
SHARED_STATE_QUERY = ("db", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile",
                      "ssl_cert_reqs", "ssl_check_hostname", "client_name")


def _parse_shared_state(value: str, where: str) -> str | None:
    """A Redis/Valkey URL: ``redis://`` (TCP), ``rediss://`` (TLS) or ``unix://`` (a socket);
    errors never repeat the URL (it may hold a password)."""
    from urllib.parse import parse_qs, urlsplit

    if not value:
        return None
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix") or "://" not in value:
        raise ConfigError(f"{where}: expected redis://HOST[:PORT][/DB], rediss://… (TLS) or "
                          f"unix:///PATH (got a URL of scheme {parts.scheme!r})")
    if scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{where}: a unix:// URL needs the socket's path, "
                              f"e.g. unix:///run/redis/redis.sock")
    else:
        if not parts.hostname:
            raise ConfigError(f"{where}: no host in the URL (redis://HOST[:PORT][/DB])")
        if port == 0:
            raise ConfigError(f"{where}: port 0 is not a port")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ConfigError(f"{where}: the path must be a database number (/0), got /{db}")
    try:
        query = parse_qs(parts.query, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError(f"{where}: the query string does not parse") from None
    unknown = sorted(set(query) - set(SHARED_STATE_QUERY))
    if unknown:
        raise ConfigError(f"{where}: unknown URL parameter(s) {', '.join(unknown)} (known: "
                          f"{', '.join(SHARED_STATE_QUERY)})")
    if "db" in query and not query["db"][0].isdigit():
        raise ConfigError(f"{where}: db must be a number")
    return value


def _parse_prefix(value: str, where: str) -> str:
    if not value or len(value) > 200 or any(c.isspace() for c in value):
        raise ConfigError(f"{where}: {value!r} is not a key prefix (1-200 characters, no "
                          f"whitespace)")
    return value


def _parse_otlp_endpoint(value: str, where: str) -> str | None:
    """``--otlp-endpoint``: empty (tracing off), ``http://HOST:PORT`` (plaintext),
    ``https://HOST:PORT`` (TLS) or ``HOST:PORT`` (as ``OTEL_EXPORTER_OTLP_INSECURE`` says)."""
    text = value.strip()
    if not text:
        return None
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() not in ("http", "https"):
        raise ConfigError(f"{where}: {value!r}: the scheme must be http:// or https://")
    address = (rest if sep else text).rstrip("/")
    if "/" in address:
        raise ConfigError(f"{where}: {value!r}: OTLP over gRPC takes no path, only HOST:PORT")
    _, port = _parse_listen(address, where)
    if port == 0:
        raise ConfigError(f"{where}: {value!r}: port 0 is not a collector's port")
    return text


def _parse_namespace(value: str, where: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
        raise ConfigError(f"{where}: {value!r} is not a valid metadata namespace")
    return value


OPTIONS: tuple[_Option, ...] = (
    _Option("--listen", "server.listen", "gRPC listen address HOST:PORT (port 0 picks a free port)",
            "127.0.0.1:50051", _parse_listen),
    _Option("--tls-cert", "server.tls_cert", "PEM certificate chain: serve gRPC over TLS (with "
            "--tls-key)", "", _parse_file),
    _Option("--tls-key", "server.tls_key", "PEM private key of --tls-cert", "", _parse_file),
    _Option("--tls-client-ca", "server.tls_client_ca", "PEM CA bundle: require and verify client "
            "certificates (mTLS)", "", _parse_file),
    _Option("--guardrail-id", "default_route.guardrail.id", "Bedrock guardrail identifier (id or "
            "ARN); required", None, _parse_guardrail_id),
    _Option("--guardrail-version", "default_route.guardrail.version", "guardrail version number or "
            "DRAFT", "DRAFT", _parse_guardrail_version),
    _Option("--input-check", "default_route.input_check", "prompt check: pre_call (before the "
            "upstream is contacted), parallel (while the upstream runs) or off",
            "pre_call", _enum_parser(InputCheck)),
    _Option("--prompt-scope", "default_route.prompt_scope", "prompt text checked: whole_request "
            "(every text a model may read, one check per message or field), last_user, all "
            "(messages) or all_with_system", "whole_request", _enum_parser(PromptScope)),
    _Option("--unknown-traffic", "default_route.unknown_traffic", "requests no format recognises: "
            "generic (every string of their JSON checked, answers too), reject (403 before the "
            "upstream) or pass (unchecked, logged and counted)", "generic",
            _enum_parser(UnknownTraffic)),
    _Option("--api", "default_route.api", "the API a route's requests speak: auto (each "
            "request's method and path say) or mcp (every request is MCP over Streamable HTTP, "
            "whatever its path)", "auto", _enum_parser(Api)),
    _Option("--mcp-poisoned-tools", "default_route.mcp_poisoned_tools", "an MCP tools/list "
            "answer with a tool the guardrail blocks (name, description, schema descriptions): "
            "remove (those tools are taken out of the list, each checked alone) or refuse (a "
            "JSON-RPC error for the request); either is logged and counted", "remove",
            _enum_parser(PoisonedTools)),
    _Option("--unchecked-images", "default_route.unchecked_images", "prompt images the "
            "guardrail cannot be given (a remote URL or file id, GIF or WebP, over 4 MB or "
            "8000x8000 pixels, undecodable): reject (400 before the upstream) or pass "
            "(unchecked, logged and counted)", "reject", _enum_parser(UncheckedImages)),
    _Option("--signed-prompt-mask", "default_route.signed_prompt_mask", "a prompt the guardrail "
            "masked, on a request the client signed with AWS SigV4 (a rewritten body fails the "
            "signature): refuse (blocked before the upstream) or pass (sent unmasked, logged "
            "and counted); a request Envoy signs after the sidecar is rewritten as any other",
            "refuse", _enum_parser(SignedPromptMask)),
    _Option("--output-check", "default_route.output_check", "check answers, streamed and not "
            "(on/off)", "on", _parse_bool),
    _Option("--reasoning-check", "default_route.reasoning_check", "check the model's reasoning "
            "text (thinking, reasoning_content, thought parts) like its answer (on/off; off: "
            "passed unchecked, logged and counted)", "on", _parse_bool),
    _Option("--shadow", "default_route.shadow", "detect-only rollout: check everything, never "
            "block or rewrite, count and log what would have happened", "off", _parse_bool),
    _Option("--soft-block", "default_route.soft_block", "end a blocked answer with the guardrail's "
            "message as normal content and a content-filter finish reason instead of an error",
            "off", _parse_bool),
    _Option("--failure-mode", "default_route.failure_mode", "when the guardrail gives no verdict: "
            "closed, open, or per error class, e.g. closed,throttled=open,timeout=open (classes: "
            "throttled, timeout, server_error, input_too_large, rejected, circuit_open, budget, "
            "overload)", "closed", _parse_failure_policy),
    _Option("--guardrail-timeout", "client.timeout_s", "seconds one ApplyGuardrail call may take, "
            "retries included", "5", _number_parser(float, 0.05, 120)),
    _Option("--guardrail-max-attempts", "client.max_attempts", "ApplyGuardrail attempts per call: "
            "retries with backoff and jitter for throttling, timeouts and 5xx, within "
            "--guardrail-timeout", "3", _number_parser(int, 1, 10)),
    _Option("--guardrail-attempt-timeout", "client.attempt_timeout_s", "seconds one attempt may "
            "take", "2", _number_parser(float, 0.05, 120)),
    _Option("--guardrail-max-chars-per-call", "client.max_chars_per_call", "larger inputs are "
            "split into several calls (Bedrock rejects calls over the per-policy text-unit quota)",
            "25000", _number_parser(int, 1000, 10_000_000)),
    _Option("--verdict-cache-entries", "client.verdict_cache_entries", "prompt texts known to "
            "pass, kept per process so that a conversation's history is checked once (about 200 "
            "bytes each; 0: every text is checked every time)", "100000",
            _number_parser(int, 0, 100_000_000)),
    _Option("--price-table", "streams.prices", "USD per 1,000 text units by policy, for the "
            "cost figures (defaults: AWS's public prices; AWS's bill is the authority), e.g. "
            "content=0.15,topic=0.15,sensitive_information=0.1", "aws", _parse_prices),
    _Option("--verdict-cache-ttl", "client.verdict_cache_ttl_s", "seconds a pass is kept in the "
            "verdict cache", "3600", _number_parser(float, 1, 30 * 86400)),
    _Option("--breaker-failures", "client.breaker_failures", "consecutive failed attempts that "
            "also open the circuit breaker (0: off; at high concurrency a short run of failures is "
            "common, so the breaker opens by default only when 80%% of at least 20 attempts in "
            "30 s failed)", "0", _number_parser(int, 0, 10_000)),
    _Option("--breaker-cooldown", "client.breaker_cooldown_s", "seconds the breaker stays open "
            "before a probe call", "10", _number_parser(float, 0.1, 3600)),
    _Option("--budget-rps", "client.budget_rps", "ApplyGuardrail requests per second this process "
            "may send (token bucket; 0: unlimited): your account's quota divided by the processes "
            "that share it; with --shared-state, all of them together: the quota itself", "0",
            _number_parser(float, 0, 100_000)),
    _Option("--budget-text-units", "client.budget_text_units", "text units per second this process "
            "may send (0: unlimited): the smallest per-policy quota divided by the processes that "
            "share it; with --shared-state, all of them together", "0",
            _number_parser(float, 0, 1_000_000)),
    _Option("--shared-state", "client.shared_state_url", "Redis or Valkey URL (redis://HOST:PORT/"
            "DB, rediss:// for TLS, unix:///PATH; a password as redis://:PASSWORD@HOST or in "
            "--shared-state-password-file): the budgets (--budget-rps, --budget-text-units, then "
            "for all replicas together) and the verdict cache are shared by every process using "
            "it; empty: each process keeps its own", "", _parse_shared_state),
    _Option("--shared-state-password-file", "client.shared_state_password_file", "file holding "
            "the --shared-state password (trailing newline ignored)", "", _parse_file),
    _Option("--shared-state-prefix", "client.shared_state_prefix", "prefix of every key the "
            "sidecar writes in the shared store", "guardrail-extproc:", _parse_prefix),
    _Option("--shared-state-timeout", "client.shared_state_timeout_s", "seconds one shared-state "
            "operation may take; then (and until the store answers again) this process's own "
            "budget and cache serve", "0.05", _number_parser(float, 0.001, 10)),
    _Option("--budget-max-wait", "client.budget_max_wait_s", "seconds a call may wait for budget "
            "before it fails as 'budget'", "0.25", _number_parser(float, 0, 60)),
    _Option("--guardrail-threads", "client.threads", "threads running boto3 calls (concurrent "
            "calls per process)", "32", _number_parser(int, 1, 1024)),
    _Option("--guardrail-calls", "client.calls", "where boto3 calls run: process (a child process, "
            "so they never hold the event loop's GIL) or thread (this process's thread pool)",
            "process", _enum_parser(GuardrailCalls)),
    _Option("--guardrail-client", "client.client", "how ApplyGuardrail is called: lean "
            "(botocore's credentials, SigV4 signing and error model; one keep-alive POST per "
            "call) or boto3 (boto3's client, about 3x the CPU per call)",
            "lean", _enum_parser(GuardrailClientKind)),
    _Option("--event-loop", "runtime.event_loop", "asyncio event loop: auto (uvloop when "
            "installed), uvloop or asyncio", "auto", _enum_parser(EventLoop)),
    _Option("--gc-full-every", "runtime.gc_full_every", "Python runs a full garbage collection (a "
            "pause that grows with the text streams hold) once per this many generation-1 ones; "
            "Python's own default is 10; 0 leaves it as Python has it (with --gc-young-threshold 0 "
            "as well, the collector is untouched and the start-up heap unfrozen)",
            "100", _number_parser(int, 0, 1_000_000)),
    _Option("--gc-young-threshold", "runtime.gc_young_threshold", "Python runs a young garbage "
            "collection once this many more container objects were created than freed (Python's "
            "default: 700; held events are several each, so a low threshold walks them again and "
            "again); generation 1 is then collected every third young collection; 0 leaves both as "
            "Python has them", "10000", _number_parser(int, 0, 100_000_000)),
    _Option("--input-wait", "streams.input_wait_s", "seconds the response-headers answer may wait "
            "for a pending prompt verdict; keep it below Envoy's message_timeout",
            "0.5", _number_parser(float, 0, 60)),
    _Option("--drain-delay", "server.drain_delay_s", "seconds between NOT_SERVING and closing the "
            "listener on SIGTERM", "0", _number_parser(float, 0, 600)),
    _Option("--grace-period", "server.grace_period_s", "seconds in-flight streams get to finish on "
            "SIGTERM", "30", _number_parser(float, 0, 3600)),
    _Option("--metadata-namespace", "streams.metadata_namespace", "dynamic metadata namespace for "
            "Envoy's access log", "guardrail", _parse_namespace),
    _Option("--log-level", "runtime.log_level", "DEBUG, INFO, WARNING or ERROR",
            "INFO", _parse_log_level),
    _Option("--stream-mode", "default_route.stream_mode", "sync: no text before a passing check; "
            "async: release at once, check beside the stream", "sync", _enum_parser(StreamMode)),
    _Option("--check-strategy", "default_route.window.strategy", "windowed (new text + overlap, "
            "linear cost) or cumulative (the whole answer each time)",
            "windowed", _enum_parser(Strategy)),
    _Option("--window-chars", "default_route.window.window_chars", "new characters per check "
            "(800 + 200 overlap = 1 text unit)", "800", _number_parser(int, 1, 100_000)),
    _Option("--window-overlap", "default_route.window.overlap_chars", "characters of "
            "already-checked text repeated at the start of each window (and held back in sync "
            "mode)", "200", _number_parser(int, 0, 10_000)),
    _Option("--window-min-chars", "default_route.window.min_chars", "new characters that trigger a "
            "check mid-stream (the first check and the end of the stream do not wait); unset, at "
            "most --window-chars", "800", _number_parser(int, 1, 100_000)),
    _Option("--fast-first-window", "default_route.window.fast_first_window", "release the first "
            "checked text at once but for the word it may end inside (time to first token = "
            "the first word boundary + one round trip)", "on", _parse_bool),
    _Option("--max-stream-text-units", "default_route.window.max_stream_text_units", "cumulative "
            "strategy: text units per policy one stream may spend before falling back to windows",
            "100", _number_parser(int, 1, 1_000_000)),
    _Option("--workers", "server.workers", "server processes sharing the listen port "
            "(SO_REUSEPORT) to use more than one core; auto: the CPUs this process may use "
            "(affinity and cgroup CPU quota); worker i serves metrics on the metrics port + i",
            "auto", _parse_workers),
    _Option("--reuse-port", "server.reuse_port", "bind the listen port with SO_REUSEPORT (set for "
            "workers; for processes started by other means)", "off", _parse_bool),
    _Option("--max-held-bytes", "streams.max_held_bytes", "bytes one stream may hold back "
            "(unchecked text, a partial event); beyond it the failure policy's 'overload' class "
            "decides (0: no limit)", "4194304", _number_parser(int, 0, 1 << 34)),
    _Option("--max-request-bytes", "streams.max_request_bytes", "largest request body (prompt) "
            "checked, inflated; larger ones get 413 before anything goes upstream (keep it at most "
            "Envoy's buffer limit, per_connection_buffer_limit_bytes, 1 MiB by default; 0: no "
            "limit)", "1048576", _number_parser(int, 0, 1 << 34)),
    _Option("--max-prompt-images", "streams.max_prompt_images", "distinct images one prompt "
            "may have checked (not counting those the verdict cache knows); those beyond are "
            "unchecked images (too_large) that --unchecked-images refuses or passes: each image "
            "is a billed call unit and spends Bedrock's 25 images a second quota (0: no limit)",
            "100", _number_parser(int, 0, 1_000_000)),
    _Option("--max-streams", "streams.max_streams", "streams this process guards at once; beyond "
            "it the failure policy's 'overload' class decides (closed: 503; open: unchecked) (0: "
            "no limit)", "2000", _number_parser(int, 0, 10_000_000)),
    _Option("--keepalive-interval", "streams.keepalive_s", "seconds of silence before an SSE "
            "comment keep-alive while text is held (0: off)", "5", _number_parser(float, 0, 3600)),
    _Option("--streamed-message-timeout", "streams.streamed_message_timeout_s", "STREAMED "
            "fallback: override_message_timeout while the final answer waits for a check (must be "
            "<= Envoy's max_message_timeout)", "10", _number_parser(float, 0.001, 3600)),
    _Option("--metrics-listen", "server.metrics_listen", "Prometheus /metrics address HOST:PORT "
            "(port 0 picks a free port), or off", "127.0.0.1:9464", _parse_metrics_listen),
    _Option("--otlp-endpoint", "runtime.otlp_endpoint", "OpenTelemetry collector for traces, "
            "OTLP over gRPC: http://HOST:PORT (plaintext), https://HOST:PORT (TLS) or HOST:PORT; "
            "empty: no tracing. The standard OTEL_* variables apply (README \"Tracing\")", "",
            _parse_otlp_endpoint),
    _Option("--log-format", "runtime.log_format", "json (one object per line) or text", "json",
            _enum_parser(LogFormat)),
    _Option("--audit-include-matches", "runtime.audit_include_matches", "audit records show "
            "matched text, cut to its first and last character (on/off)", "off", _parse_bool),
    _Option("--config-poll-interval", "runtime.config_poll_s", "seconds between looks at the "
            "configuration file (--config): a change is loaded, validated and applied to new "
            "streams, as on SIGHUP (0: on SIGHUP only)", "2", _number_parser(float, 0, 3600)),
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
                        help=f"YAML configuration file: options by name with underscores, "
                        f"per-route policies under 'routes' and how Envoy's attributes, "
                        f"metadata or a header pick them under 'route_selectors' (flags and "
                        f"environment variables win over it) [env {CONFIG_ENV}]")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration as YAML and exit")
    for option in OPTIONS:
        default = f" (default: {option.default})" if option.default is not None else ""
        parser.add_argument(option.flag, dest=option.dest, default=None,
                            help=f"{option.help}{default} [env {option.env}]")
    return parser


CONFIG_ENV = ENV_PREFIX + "CONFIG"

# Per-route settings (configuration file ``routes.<name>.<key>``; Envoy metadata
# ``x-guardrail-<key with dashes>``): key -> (path in RoutePolicy, parser).
ROUTE_FIELDS: Mapping[str, tuple[str, Callable[[str, str], Any]]] = {
    "guardrail_id": ("guardrail.id", _parse_guardrail_id),
    "guardrail_version": ("guardrail.version", _parse_guardrail_version),
    "enabled": ("enabled", _parse_bool),
    "input_check": ("input_check", _enum_parser(InputCheck)),
    "unknown_traffic": ("unknown_traffic", _enum_parser(UnknownTraffic)),
    "api": ("api", _enum_parser(Api)),
    "mcp_poisoned_tools": ("mcp_poisoned_tools", _enum_parser(PoisonedTools)),
    "unchecked_images": ("unchecked_images", _enum_parser(UncheckedImages)),
    "prompt_scope": ("prompt_scope", _enum_parser(PromptScope)),
    "signed_prompt_mask": ("signed_prompt_mask", _enum_parser(SignedPromptMask)),
    "output_check": ("output_check", _parse_bool),
    "reasoning_check": ("reasoning_check", _parse_bool),
    "stream_mode": ("stream_mode", _enum_parser(StreamMode)),
    "shadow": ("shadow", _parse_bool),
    "soft_block": ("soft_block", _parse_bool),
    "failure_mode": ("failure_mode", _parse_failure_policy),
    "window_chars": ("window.window_chars", _number_parser(int, 1, 100_000)),
    "window_overlap": ("window.overlap_chars", _number_parser(int, 0, 10_000)),
    "window_min_chars": ("window.min_chars", _number_parser(int, 1, 100_000)),
}


def _get(value: Any, path: str) -> Any:
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _replaced(value: Any, changes: Mapping[str, Any]) -> Any:
    """``value`` (a frozen dataclass) with the dotted paths of ``changes`` set."""
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, new in changes.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = new
        else:
            direct[head] = new
    for head, inner in nested.items():
        direct[head] = _replaced(getattr(value, head), inner)
    return dataclasses.replace(value, **direct)


def _check_window(window: WindowPolicy, where: str) -> None:
    if window.min_chars > window.window_chars:
        raise ConfigError(f"{where}: window_min_chars ({window.min_chars}) must not exceed "
                          f"window_chars ({window.window_chars})")


def apply_route_values(base: RoutePolicy, values: Mapping[str, tuple[str, str]],
                       ) -> RoutePolicy:
    """``base`` with route settings applied; ``values``: key -> (raw value, where).
    Raises ``ConfigError`` naming the place of a bad value."""
    changes: dict[str, Any] = {}
    for key, (raw, where) in values.items():
        target, parse = ROUTE_FIELDS[key]
        changes[target] = parse(raw, where)
    policy: RoutePolicy = _replaced(base, changes)
    if any(target.startswith("window.") for target in changes):
        where = values.get("window_min_chars", values.get("window_chars", ("", "window")))[1]
        _check_window(policy.window, where)
    return policy


# RFC 9110 field names as Envoy hands them over (lower case); no pseudo-headers: a selector
# header must be one that Envoy itself sets, not the client's request line.
_HEADER_NAME_RE = re.compile(r"[a-z0-9!#$%&'*+\-.^_`|~]+")
#: The attribute carrying route metadata: Envoy sends it as protobuf text, read by path.
ROUTE_METADATA_ATTRIBUTE = "xds.route_metadata"


def metadata_path(key: str) -> tuple[str, ...]:
    """``namespace:key:key`` (Envoy's ``%DYNAMIC_METADATA(...)%`` spelling) as its parts."""
    return tuple(key.split(":"))


def _check_selector_key(source: SelectorSource, key: str, where: str) -> str:
    if source is SelectorSource.HEADER:
        key = key.lower()
        if not _HEADER_NAME_RE.fullmatch(key):
            raise ConfigError(f"{where}: {key!r} is not a header name (pseudo-headers such as "
                              ":path come from the client; use a header Envoy sets)")
    elif source is SelectorSource.ATTRIBUTE:
        if key == ROUTE_METADATA_ATTRIBUTE:
            raise ConfigError(f"{where}: Envoy sends {key} as protobuf text; read a value in it "
                              f"with route_metadata: NAMESPACE:KEY instead")
    else:
        parts = metadata_path(key)
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"{where}: {key!r} is not a metadata path NAMESPACE:KEY[:KEY...] "
                              f"(e.g. guardrail:route)")
    return key


def build_selectors(raw: Sequence[RawSelector], routes: Mapping[str, RoutePolicy],
                    ) -> tuple[RouteSelector, ...]:
    """The file's ``route_selectors`` checked against its routes; raises ``ConfigError``
    naming the entry and key."""
    known = sorted({*routes, DEFAULT_ROUTE_NAME})
    selectors: list[RouteSelector] = []
    for entry in raw:
        source = SelectorSource(entry.source)
        key = _check_selector_key(source, entry.key.value, entry.key.where)
        table: list[tuple[str, str]] = []
        for value, route in entry.routes:
            if route.value not in routes and route.value != DEFAULT_ROUTE_NAME:
                raise ConfigError(f"{route.where}: unknown route {route.value!r} (known: "
                                  f"{', '.join(known)})")
            table.append((value.value, route.value))
        if not table and not routes:
            raise ConfigError(f"{entry.where}: without a 'routes' table the value must name a "
                              f"route, but the file configures no routes")
        selectors.append(RouteSelector(source, key, tuple(table)))
    return tuple(selectors)


def _selector_dict(selector: RouteSelector) -> dict[str, Any]:
    out: dict[str, Any] = {selector.source.value: selector.key}
    if selector.routes:
        out["routes"] = dict(selector.routes)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, FailurePolicy):
        return str(value)
    if isinstance(value, Mapping):  # (the price table)
        return format_price_table(value)
    return value


def _route_dict(route: RoutePolicy) -> dict[str, Any]:
    return {key: _plain(_get(route, target)) for key, (target, _) in ROUTE_FIELDS.items()}


def render_settings(settings: Settings) -> str:
    """The effective configuration as YAML, in the configuration file's own shape."""
    import yaml

    out: dict[str, Any] = {}
    for option in OPTIONS:
        if option.target == "server.listen":
            value: Any = settings.server.listen
        elif option.target == "client.shared_state_url":
            value = settings.client.shared_state_redacted  # never a password
        else:
            value = _get(settings, option.target)
        if value is not None:
            out[option.dest] = _plain(value)
    out["routes"] = {name: _route_dict(route) for name, route in settings.routes.items()}
    out["route_selectors"] = [_selector_dict(selector) for selector in settings.selectors]
    return str(yaml.safe_dump(out, sort_keys=False))


#: The sections of ``Settings`` built from options, and their types.
_SECTIONS: Mapping[str, Callable[..., Any]] = {
    "server": ServerSettings, "client": ClientSettings, "runtime": RuntimeSettings,
    "streams": StreamSettings, "default_route.window": WindowPolicy,
    "default_route.guardrail": GuardrailRef,
}


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Parse and validate; raises ``ConfigError`` naming the flag, the environment variable or
    the configuration file's key. Precedence: flag, environment, file, default."""
    from extproc.settings.file import load_file

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
            defaulted.add(option.target)
        if raw is None:
            raw = ""
            where = f"{option.flag} / {option.env}"
        values[option.target] = option.parse(raw, where)
    window_chars = values["default_route.window.window_chars"]
    if "default_route.window.min_chars" in defaulted:
        # Unset, the trigger follows a smaller window instead of contradicting it.
        values["default_route.window.min_chars"] = min(
            values["default_route.window.min_chars"], window_chars)
    values["server.listen_host"], values["server.listen_port"] = values.pop("server.listen")
    values["client.aws_region"] = environ.get("AWS_REGION") or None
    if bool(values["server.tls_cert"]) != bool(values["server.tls_key"]):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if values["server.tls_client_ca"] and not values["server.tls_cert"]:
        raise ConfigError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    if values["client.shared_state_password_file"]:
        from urllib.parse import urlsplit

        url = values["client.shared_state_url"]
        if url is None:
            raise ConfigError("--shared-state-password-file needs --shared-state")
        if urlsplit(url).password is not None:
            raise ConfigError("--shared-state: the URL holds a password and "
                              "--shared-state-password-file names another; give one of them")
    if values["default_route.window.min_chars"] > window_chars:
        raise ConfigError(
            f"--window-min-chars ({values['default_route.window.min_chars']}) must not exceed "
            f"--window-chars ({window_chars})"
        )
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    route: dict[str, Any] = {}
    for target, value in values.items():
        section, _, name = target.rpartition(".")
        if section == "default_route":
            route[name] = value
        else:
            sections[section][name] = value
    built = {name: make(**sections[name]) for name, make in _SECTIONS.items()}
    default_route = RoutePolicy(window=built.pop("default_route.window"),
                                guardrail=built.pop("default_route.guardrail"), **route)
    settings = Settings(default_route=default_route, **built)
    if file_config is None or not (file_config.routes or file_config.selectors):
        return settings
    routes = {
        name: apply_route_values(settings.default_route,
                                 {k: (raw.value, raw.where) for k, raw in entries.items()})
        for name, entries in file_config.routes.items()
    }
    return dataclasses.replace(settings, routes=routes,
                               selectors=build_selectors(file_config.selectors, routes))
