"""Metrics: the ``Recorder`` seam the stream code calls at its decision points, a Prometheus
implementation behind it (served on its own HTTP port) and a no-op one.

Owns metric names, labels and their bounds. Label values are bounded by construction: route
names come from the configuration (``extproc.settings.routes``: anything else is
``default``), formats from the code, sources, actions, outcomes and error classes from fixed
sets; finding names (topic names, filter and PII types, regex names) and usage members come
from the guardrail, so each
kind keeps at most ``max_names`` distinct values and counts the rest as ``other``. Request ids
and text never become labels.

Cost: nothing here runs per body chunk. Per stream, a few dict lookups of pre-bound label
children and their increments; per guardrail call, one pass over the verdict's findings and
usage. The bytes held back from clients are summed at scrape time from the live guards
(``track_held``), and the resilience counters are read from ``ResilientGuardrail.stats`` at
scrape time, so neither costs the hot path anything. With the standard collectors, each
garbage collection's pause is timed (``gc.callbacks``: two clock reads per collection): a pause
stops the event loop, and full collections were the p99 latency at 100 held streams
(``extproc.observe.heap``).

Must not log, decide, or see prompts, answers or matched text.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.domain.cost import policy_label
from extproc.domain.errors import ERROR_CLASSES
from extproc.domain.verdict import GuardrailVerdict, Outcome

PREFIX: Final = "guardrail_extproc_"
DEFAULT_ROUTE: Final = "default"
NO_FORMAT: Final = "none"
#: The format label of a guarded route's request no format recognises, let through unchecked
#: (``--unknown-traffic pass``).
UNRECOGNISED: Final = "unrecognised"
OTHER: Final = "other"

#: ``Source.value`` -> label.
SOURCES: Final[Mapping[str, str]] = {"INPUT": "input", "OUTPUT": "output"}

#: What became of a stream, as ``extproc.stream.record.StreamRecord.outcome_label`` names it.
STREAM_OUTCOMES: Final = (
    "pass", "block", "soft_block", "input_block", "mask", "unavailable", "failed_open",
    "shadow_would_block", "shadow_would_mask", "skipped", "cancelled", "too_large",
    "unreadable", "invalid", "image_refused",
)
VERDICT_ACTIONS: Final = ("pass", "mask", "block", "detect_only")
FAILURE_MODES: Final = ("closed", "open")
#: How the sidecar takes a guarded answer's body from Envoy.
BODY_MODES: Final = ("full_duplex_streamed", "streamed", "buffered")
BREAKER_STATES: Final = ("closed", "open", "half_open")
#: ``extproc.settings.reload.RESULTS``.
RELOAD_RESULTS: Final = ("applied", "unchanged", "refused")

_FINDING_ACTIONS: Final[Mapping[str, str]] = {
    "BLOCKED": "blocked", "ANONYMIZED": "anonymized", "NONE": "detected",
}
_NAME_CHARS: Final = 64
_CACHE_LIMIT: Final = 4096

LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RELEASED_BUCKETS: Final = (0, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000)
GC_PAUSE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class HeldBytes(Protocol):
    """Something holding response bytes back from the client (an ``OutputGuard``)."""

    @property
    def held_bytes(self) -> int: ...


class Recorder(Protocol):
    """What the stream code reports. Labels passed in are already bounded (see the module
    docstring); implementations bound the ones that come from the guardrail."""

    def stream_started(self, route: str, fmt: str) -> None:
        """An ext_proc stream's request headers were seen (``fmt``: ``none`` if not an LLM
        call)."""

    def stream_finished(self, route: str, fmt: str, outcome: str) -> None:
        """The stream ended; ``outcome`` is one of ``STREAM_OUTCOMES``."""

    def body_mode(self, mode: str) -> None:
        """A guarded answer's body is taken in ``mode`` (one of ``BODY_MODES``)."""

    def verdict(self, source: str, verdict: GuardrailVerdict, seconds: float) -> None:
        """A guardrail call (``source``: ``Source.value``) returned ``verdict``."""

    def guardrail_error(self, source: str, error_class: str, failure_mode: str,
                        seconds: float) -> None:
        """A guardrail call failed; ``failure_mode`` (closed/open) is what the stream did."""

    def released_before_block(self, chars: int) -> None:
        """Characters of model text the client had when its answer was blocked."""

    def reasoning_unchecked(self, route: str, chars: int) -> None:
        """Characters of reasoning text a route's ``reasoning_check off`` let through."""

    def images_unchecked(self, route: str, reason: str, action: str) -> None:
        """A prompt image the guardrail could not be given (``reason``: an
        ``extproc.images.Reason`` value) was rejected or passed (``action``)."""

    def cost(self, route: str, policy: str, usd: float) -> None:
        """A guardrail call's cost for one policy type (``extproc.domain.cost``)."""

    def mcp_message(self, route: str, method: str, outcome: str) -> None:
        """An MCP stream ended (``method``: a bounded label, ``extproc.formats.mcp``)."""

    def mcp_poisoned_tools(self, route: str, action: str, count: int) -> None:
        """``count`` tools of a ``tools/list`` answer blocked (``action``: removed or
        refused)."""

    def track_held(self, holder: HeldBytes) -> None:
        """Count ``holder.held_bytes`` in the held-bytes gauge until ``untrack_held``."""

    def untrack_held(self, holder: HeldBytes) -> None: ...

    def config_loaded(self, digest: str) -> None:
        """The configuration ``digest`` serves (``config_info``)."""

    def config_reloaded(self, result: str, digest: str) -> None:
        """A reload ended with ``result`` (``extproc.settings.reload.RESULTS``); ``digest``
        serves now."""


class NullRecorder:
    """Records nothing (tests, in-process use)."""

    def stream_started(self, route: str, fmt: str) -> None:
        pass

    def stream_finished(self, route: str, fmt: str, outcome: str) -> None:
        pass

    def body_mode(self, mode: str) -> None:
        pass

    def verdict(self, source: str, verdict: GuardrailVerdict, seconds: float) -> None:
        pass

    def guardrail_error(self, source: str, error_class: str, failure_mode: str,
                        seconds: float) -> None:
        pass

    def released_before_block(self, chars: int) -> None:
        pass

    def reasoning_unchecked(self, route: str, chars: int) -> None:
        pass

    def images_unchecked(self, route: str, reason: str, action: str) -> None:
        pass

    def cost(self, route: str, policy: str, usd: float) -> None:
        pass

    def mcp_message(self, route: str, method: str, outcome: str) -> None:
        pass

    def mcp_poisoned_tools(self, route: str, action: str, count: int) -> None:
        pass

    def track_held(self, holder: HeldBytes) -> None:
        pass

    def untrack_held(self, holder: HeldBytes) -> None:
        pass

    def config_loaded(self, digest: str) -> None:
        pass

    def config_reloaded(self, result: str, digest: str) -> None:
        pass


NULL_RECORDER: Final = NullRecorder()


# --------------------------------------------------------------------------- pure helpers




def verdict_action(verdict: GuardrailVerdict) -> str:
    """``block``, ``mask``, ``detect_only`` (passed with detected findings) or ``pass``."""
    if verdict.outcome is Outcome.BLOCK:
        return "block"
    if verdict.outcome is Outcome.MASK:
        return "mask"
    return "detect_only" if verdict.detected_only else "pass"


#: A ``usage`` member as a policy label (``sensitiveInformationPolicyFreeUnits`` ->
#: ``sensitive_information_free``): the labels of ``text_units`` and ``cost_usd`` agree.
usage_policy = policy_label


class _Names:
    """At most ``limit`` distinct values per kind; later ones are ``other``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: dict[str, set[str]] = {}

    def admit(self, kind: str, value: str) -> str:
        value = value[:_NAME_CHARS] or OTHER
        seen = self._seen.setdefault(kind, set())
        if value in seen or value == OTHER:
            return value
        if len(seen) >= self._limit:
            return OTHER
        seen.add(value)
        return value


# --------------------------------------------------------------------------- Prometheus


class PrometheusRecorder:
    """Prometheus metrics in their own registry (``registry``); see the module docstring."""

    def __init__(self, registry: CollectorRegistry | None = None, *, max_names: int = 50,
                 standard_collectors: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self._gc_pauses: GCPauses | None = None
        if standard_collectors:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)
            self._gc_pauses = GCPauses(reg)
        self._names = _Names(max_names)
        self._started = Counter(
            PREFIX + "streams_started", "ext_proc streams whose request headers were seen",
            ("route", "format"), registry=reg)
        self._finished = Counter(
            PREFIX + "streams_finished", "ext_proc streams ended, by what became of them",
            ("route", "format", "outcome"), registry=reg)
        self._in_flight = Gauge(
            PREFIX + "streams_in_flight", "ext_proc streams open now", registry=reg)
        self._body_modes = Counter(
            PREFIX + "response_body_mode", "guarded answers by the Envoy body mode they are "
            "taken in (FULL_DUPLEX_STREAMED, STREAMED fallback, BUFFERED JSON)", ("mode",),
            registry=reg)
        self._verdicts = Counter(
            PREFIX + "verdicts", "guardrail verdicts by source and action",
            ("source", "action"), registry=reg)
        self._findings = Counter(
            PREFIX + "findings", "guardrail findings by policy type, name and action "
            "(detected: detect-only, not acted on)", ("policy", "name", "action"),
            registry=reg)
        self._units = Counter(
            PREFIX + "text_units", "text units billed, per policy (ApplyGuardrail usage)",
            ("source", "policy"), registry=reg)
        self._latency = Histogram(
            PREFIX + "guardrail_call_duration_seconds", "ApplyGuardrail call time as the "
            "stream waits for it (retries and splits included)", ("source",),
            buckets=LATENCY_BUCKETS, registry=reg)
        self._errors = Counter(
            PREFIX + "guardrail_errors", "guardrail calls without a verdict, by error class "
            "and what the failure policy did (closed: ended the stream, open: released)",
            ("source", "error_class", "failure_mode"), registry=reg)
        self._released = Histogram(
            PREFIX + "chars_released_before_block", "characters of model text the client "
            "already had when its answer was blocked", buckets=RELEASED_BUCKETS, registry=reg)
        self._cost = Counter(
            PREFIX + "cost_usd", "guardrail calls' cost in USD by route and policy type: text "
            "units x the price table (--price-table; AWS's bill is the authority)",
            ("route", "policy"), registry=reg)
        self._cost_children: dict[tuple[str, str], Counter] = {}
        self._reasoning_unchecked = Counter(
            PREFIX + "reasoning_unchecked_chars", "characters of reasoning text passed "
            "unchecked because the route sets reasoning_check off", ("route",), registry=reg)
        self._mcp_messages = Counter(
            PREFIX + "mcp_messages", "MCP requests (ext_proc streams of an MCP route) by "
            "JSON-RPC method (known methods by name, else notification, response, batch, "
            "stream for a GET, other) and outcome", ("route", "method", "outcome"),
            registry=reg)
        self._mcp_poisoned = Counter(
            PREFIX + "mcp_poisoned_tools", "tools of MCP tools/list answers the guardrail "
            "blocked, by what became of them (removed, refused)", ("route", "action"),
            registry=reg)
        self._images_unchecked = Counter(
            PREFIX + "images_unchecked", "prompt images the guardrail could not be given (a "
            "remote URL or file id, GIF/WebP, too large, undecodable) by route, reason and "
            "action: rejected, or passed on routes with unchecked_images pass",
            ("route", "reason", "action"), registry=reg)
        self._reloads = Counter(
            PREFIX + "config_reloads", "configuration file reloads (on change or SIGHUP) by "
            "result: applied, unchanged, refused (the loaded configuration keeps serving)",
            ("result",), registry=reg)
        self._reload_children = {result: self._reloads.labels(result)
                                 for result in RELOAD_RESULTS}
        self._config_info = Gauge(
            PREFIX + "config_info", "1 for the configuration this process serves, by the hash "
            "of its effective settings (as --print-config prints them)", ("hash",),
            registry=reg)
        self._config_hash: str | None = None
        held = Gauge(PREFIX + "held_bytes", "response bytes held back from clients now, "
                     "all streams", registry=reg)
        self._held: set[HeldBytes] = set()
        held.set_function(self._held_bytes)
        # Pre-bound children: the per-stream and per-call paths only look them up.
        self._body_children = {mode: self._body_modes.labels(mode) for mode in BODY_MODES}
        self._verdict_children = {
            (value, action): self._verdicts.labels(label, action)
            for value, label in SOURCES.items() for action in VERDICT_ACTIONS
        }
        self._latency_children = {value: self._latency.labels(label)
                                  for value, label in SOURCES.items()}
        self._started_children: dict[tuple[str, str], Counter] = {}
        self._finished_children: dict[tuple[str, str, str], Counter] = {}
        self._finding_children: dict[tuple[str, str, str], Counter] = {}
        self._unit_children: dict[tuple[str, str], Counter] = {}
        self._error_children: dict[tuple[str, str, str], Counter] = {}

    # -- streams

    def stream_started(self, route: str, fmt: str) -> None:
        key = (route, fmt)
        child = self._started_children.get(key)
        if child is None:
            child = self._started_children[key] = self._started.labels(route, fmt)
        child.inc()
        self._in_flight.inc()

    def stream_finished(self, route: str, fmt: str, outcome: str) -> None:
        key = (route, fmt, outcome)
        child = self._finished_children.get(key)
        if child is None:
            label = outcome if outcome in STREAM_OUTCOMES else OTHER
            child = self._finished_children[key] = self._finished.labels(route, fmt, label)
        child.inc()
        self._in_flight.dec()

    def body_mode(self, mode: str) -> None:
        child = self._body_children.get(mode)
        if child is not None:
            child.inc()

    def released_before_block(self, chars: int) -> None:
        self._released.observe(chars)

    def reasoning_unchecked(self, route: str, chars: int) -> None:
        self._reasoning_unchecked.labels(route).inc(chars)

    def images_unchecked(self, route: str, reason: str, action: str) -> None:
        self._images_unchecked.labels(route, reason, action).inc()

    def cost(self, route: str, policy: str, usd: float) -> None:
        key = (route, policy)
        child = self._cost_children.get(key)
        if child is None:
            child = self._cost_children[key] = self._cost.labels(route, policy)
        child.inc(usd)

    def mcp_message(self, route: str, method: str, outcome: str) -> None:
        label = outcome if outcome in STREAM_OUTCOMES else OTHER
        self._mcp_messages.labels(route, method, label).inc()

    def mcp_poisoned_tools(self, route: str, action: str, count: int) -> None:
        self._mcp_poisoned.labels(route, action).inc(count)

    # -- guardrail calls

    def verdict(self, source: str, verdict: GuardrailVerdict, seconds: float) -> None:
        latency = self._latency_children.get(source)
        if latency is None:
            return
        latency.observe(seconds)
        self._verdict_children[source, verdict_action(verdict)].inc()
        for finding in verdict.findings:
            action = finding.action
            if action == "NONE" and not finding.detected:
                continue
            self._finding_child(finding.policy, finding.name, action).inc()
        for key, units in verdict.usage.items():
            # Members ending in "Units" are billed text units (others count policies).
            if units > 0 and key.endswith("Units"):
                self._unit_child(source, key).inc(units)

    def guardrail_error(self, source: str, error_class: str, failure_mode: str,
                        seconds: float) -> None:
        latency = self._latency_children.get(source)
        if latency is None:
            return
        latency.observe(seconds)
        key = (source, error_class, failure_mode)
        child = self._error_children.get(key)
        if child is None:
            child = self._errors.labels(
                SOURCES[source], error_class if error_class in ERROR_CLASSES else OTHER,
                failure_mode if failure_mode in FAILURE_MODES else OTHER)
            self._error_children[key] = child
        child.inc()

    def _finding_child(self, policy: str, name: str, action: str) -> Counter:
        key = (policy, name, action)
        child = self._finding_children.get(key)
        if child is not None:
            return child
        label = self._names.admit("finding:" + policy, name)
        if label == OTHER and name != OTHER:
            return self._finding_child(policy, OTHER, action)
        child = self._findings.labels(
            self._names.admit("policy", policy), label, _FINDING_ACTIONS.get(action, OTHER))
        if len(self._finding_children) < _CACHE_LIMIT:
            self._finding_children[key] = child
        return child

    def _unit_child(self, source: str, key: str) -> Counter:
        cache_key = (source, key)
        child = self._unit_children.get(cache_key)
        if child is None:
            policy = self._names.admit("usage", usage_policy(key))
            child = self._units.labels(SOURCES[source], policy)
            if len(self._unit_children) < _CACHE_LIMIT:
                self._unit_children[cache_key] = child
        return child

    # -- configuration

    def config_loaded(self, digest: str) -> None:
        if digest == self._config_hash:
            return
        if self._config_hash is not None:
            self._config_info.remove(self._config_hash)
        self._config_info.labels(digest).set(1)
        self._config_hash = digest

    def config_reloaded(self, result: str, digest: str) -> None:
        child = self._reload_children.get(result)
        if child is not None:
            child.inc()
        self.config_loaded(digest)

    # -- held bytes (read at scrape time, from the HTTP server's thread)

    def track_held(self, holder: HeldBytes) -> None:
        self._held.add(holder)

    def untrack_held(self, holder: HeldBytes) -> None:
        self._held.discard(holder)

    def _held_bytes(self) -> float:
        # tuple() copies the set in one C call: safe while the event loop adds and removes.
        return float(sum(holder.held_bytes for holder in tuple(self._held)))

    # -- resilience

    def watch_resilience(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        """Export a ``ResilientGuardrail``'s counters (``stats``: its ``stats`` property)."""
        self.registry.register(ResilienceCollector(stats))

    def watch_shared_state(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        """Export the shared store's health and fallbacks (``stats``: ``SharedState.stats``)."""
        self.registry.register(SharedStateCollector(stats))

    def watch_routes(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        """Export a ``RouteResolver``'s counters (``stats``: its ``stats`` method)."""
        self.registry.register(RouteCollector(stats))

    def close(self) -> None:
        """Stop timing garbage collections (the recorder is done)."""
        if self._gc_pauses is not None:
            self._gc_pauses.close()
            self._gc_pauses = None


class GCPauses:
    """``gc_pause_seconds{generation}``: how long each garbage collection stopped this process
    (and with it the event loop), timed by a ``gc.callbacks`` hook."""

    def __init__(self, registry: CollectorRegistry) -> None:
        histogram = Histogram(
            PREFIX + "gc_pause_seconds", "garbage collection pauses of the serving process (the "
            "event loop stops meanwhile), by generation (0: young, see --gc-young-threshold; "
            "2: full collections, see --gc-full-every)", ("generation",),
            buckets=GC_PAUSE_BUCKETS, registry=registry)
        self._children = [histogram.labels(str(generation)) for generation in range(3)]
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: Mapping[str, Any]) -> None:
        # Collections never overlap (the collector holds the GIL and does not re-enter).
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info.get("generation", 2)
        if 0 <= generation <= 2:
            self._children[generation].observe(time.perf_counter() - self._started)

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


class ResilienceCollector(Collector):
    """Retries, breaker and budget counters of ``ResilientGuardrail``, read at scrape time."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def _snapshot(self) -> Mapping[str, Any]:
        # The event loop's thread updates the counters while we copy them; a copy that races
        # a new dict entry raises and is simply taken again.
        for _ in range(5):
            try:
                return self._stats()
            except RuntimeError:
                continue
        return {}

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        if not stats:
            return

        def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, value=float(stats.get(key, 0)))

        yield counter("bedrock_calls", "apply() calls of the resilient client", "calls")
        yield counter("bedrock_attempts", "ApplyGuardrail requests sent (retries included)",
                      "attempts")
        yield counter("bedrock_retries", "ApplyGuardrail retries", "retries")
        yield counter("bedrock_split_calls", "calls made for input split over the per-call "
                      "limit", "split_calls")
        yield counter("breaker_fast_fails", "attempts failed fast by an open circuit breaker",
                      "breaker_fast_fails")
        yield counter("budget_rejections", "attempts refused by the client-side budget",
                      "budget_rejections")
        yield counter("budget_waits", "attempts that waited for client-side budget",
                      "budget_waits")
        yield counter("budget_wait_seconds", "time attempts waited for budget",
                      "budget_wait_s")
        errors = CounterMetricFamily(PREFIX + "bedrock_attempt_errors",
                                     "failed ApplyGuardrail attempts by error class",
                                     labels=("error_class",))
        for name, value in sorted(dict(stats.get("attempt_errors", {})).items()):
            errors.add_metric((name,), float(value))
        yield errors
        failures = CounterMetricFamily(PREFIX + "bedrock_call_failures",
                                       "apply() calls that gave no verdict, by error class",
                                       labels=("error_class",))
        for name, value in sorted(dict(stats.get("failures", {})).items()):
            failures.add_metric((name,), float(value))
        yield failures
        transitions = CounterMetricFamily(PREFIX + "breaker_transitions",
                                          "circuit breaker state changes",
                                          labels=("from_state", "to_state"))
        for key, value in sorted(dict(stats.get("breaker_transitions", {})).items()):
            old, _, new = str(key).partition("->")
            transitions.add_metric((old, new), float(value))
        yield transitions
        state = GaugeMetricFamily(PREFIX + "breaker_state", "1 for each guardrail's current "
                                  "circuit breaker state", labels=("guardrail", "state"))
        for guardrail, current in sorted(dict(stats.get("breaker_states", {})).items()):
            for name in BREAKER_STATES:
                state.add_metric((guardrail, name), 1.0 if current == name else 0.0)
        yield state


#: ``extproc.shared.store.OPERATIONS``: what the local state serves when the store does not.
SHARED_STATE_OPERATIONS: Final = ("budget", "cache_get", "cache_put")


class SharedStateCollector(Collector):
    """The shared store (``--shared-state``), read from ``SharedState.stats`` at scrape time:
    ``shared_state_up`` and ``shared_state_fallbacks_total{operation}``."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily(
            PREFIX + "shared_state_up", "1 when the last shared-state operation succeeded, 0 "
            "while the store does not answer (budgets and verdict cache are then this "
            "process's own)", value=float(stats.get("up", 0)))
        fallbacks = CounterMetricFamily(
            PREFIX + "shared_state_fallbacks", "shared-state operations served by this "
            "process's own state because the store was slow or down", labels=("operation",))
        counts = dict(stats.get("fallbacks", {}))
        for operation in SHARED_STATE_OPERATIONS:
            fallbacks.add_metric((operation,), float(counts.get(operation, 0)))
        yield fallbacks


class RouteCollector(Collector):
    """Streams that fell back to the default policy, and ignored per-route settings, read
    from the ``RouteResolver`` at scrape time."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        unknown = CounterMetricFamily(
            PREFIX + "unknown_route_streams", "streams given the default policy because "
            "Envoy named a route the configuration does not map (unmapped) or sent none of "
            "the values the route selectors read (missing)", labels=("reason",))
        for reason, value in sorted(dict(stats.get("unknown", {})).items()):
            unknown.add_metric((reason,), float(value))
        yield unknown
        yield CounterMetricFamily(
            PREFIX + "route_settings_invalid", "per-route settings from Envoy that were "
            "ignored (unknown key, unknown route, value that does not parse)",
            value=float(stats.get("invalid", 0)))


# --------------------------------------------------------------------------- the HTTP server


@dataclass
class MetricsServer:
    """The ``/metrics`` HTTP server, running in a daemon thread."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` (port 0 picks one); raises
    ``OSError`` when it cannot bind."""
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(httpd, thread)
