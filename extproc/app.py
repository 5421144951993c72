"""The composition root: builds the guardrail client stack, the metrics recorder and the gRPC
server from ``Settings``, serves until SIGTERM/SIGINT, then drains (health NOT_SERVING,
``--drain-delay``, in-flight streams get ``--grace-period``).

The only module that puts the parts together; each part is given what it needs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from extproc.domain.cache import VerdictCache, verdict_cache
from extproc.domain.errors import ConfigError
from extproc.guardrail import build_client
from extproc.guardrail.bedrock import BedrockGuardrailClient
from extproc.observe import heap
from extproc.observe.metrics import (
    NULL_RECORDER,
    MetricsServer,
    PrometheusRecorder,
    Recorder,
    start_metrics_server,
)
from extproc.observe.tracing import Tracer
from extproc.settings.reload import FileStamp, Reloader, config_path
from extproc.settings.values import EventLoop, Settings
from extproc.shared import open_shared_state
from extproc.transport.server import RunningServer, start_server

if TYPE_CHECKING:
    from extproc.shared.store import SharedState

log = logging.getLogger("extproc")


async def serve(settings: Settings, argv: Sequence[str] = (),
                environ: Mapping[str, str] | None = None) -> None:
    """Run the sidecar until SIGTERM/SIGINT, then drain and return. With a configuration file
    named in ``argv`` or ``environ`` (the process's own), it is read again on change and on
    SIGHUP (``extproc.settings.reload``)."""
    tracer = build_tracer(settings.runtime.otlp_endpoint)
    shared = open_shared_state(settings.client)
    budget = None
    cache_factory: Callable[[int, float], VerdictCache] = verdict_cache
    if shared is not None:
        from extproc.shared.budget import SharedBudget
        from extproc.shared.cache import shared_verdict_cache

        await shared.start()
        client = settings.client
        if client.budget_rps or client.budget_text_units:
            budget = SharedBudget(shared, client.budget_rps, client.budget_text_units)

        def shared_cache(entries: int, ttl_s: float) -> VerdictCache:
            assert shared is not None
            return shared_verdict_cache(shared, entries, ttl_s)

        cache_factory = shared_cache

    guardrail = build_client(settings, budget=budget, tracer=tracer)
    bedrock = guardrail.inner
    assert isinstance(bedrock, BedrockGuardrailClient), "BUG: build_client wraps Bedrock"
    server, runtime = settings.server, settings.runtime
    metrics: MetricsServer | None = None
    prometheus: PrometheusRecorder | None = None
    try:
        address = server.metrics_address
        prometheus = PrometheusRecorder(standard_collectors=True) if address is not None else None
        recorder: Recorder = NULL_RECORDER
        if prometheus is not None:
            prometheus.watch_resilience(lambda: guardrail.stats)
            if shared is not None:
                prometheus.watch_shared_state(lambda: shared.stats)
            recorder = prometheus
        try:
            running = await start_server(settings, guardrail, recorder=recorder,
                                         cache_factory=cache_factory, tracer=tracer)
        except RuntimeError as exc:
            raise ConfigError(f"--listen {server.listen}: cannot bind ({exc})") from None
        if shared is not None:
            _report_shared_state(shared, running)
        if prometheus is not None:
            prometheus.watch_routes(running.processor.route_stats)
        if prometheus is not None and address is not None:
            host, port = address
            try:
                metrics = start_metrics_server(prometheus.registry, host, port)
            except OSError as exc:
                await running.server.stop(None)
                raise ConfigError(
                    f"--metrics-listen {server.metrics_listen}: cannot bind ({exc})") from None
            # Before the listening line: whoever waits for that line can read this one.
            log.info("metrics on http://%s:%d/metrics",
                     f"[{host}]" if ":" in host else host, metrics.port)
        if runtime.gc_full_every or runtime.gc_young_threshold:
            # The start-up heap is done growing.
            heap.settle(runtime.gc_full_every or None, young=runtime.gc_young_threshold or None)
        log.info("garbage collector: thresholds %s, %d start-up objects frozen",
                 gc.get_threshold(), gc.get_freeze_count())
        # Before the listening line: from then on a SIGTERM must drain, not kill.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        route = settings.default_route
        log.info(
            "guardrail-extproc listening on %s:%d (guardrail %s version %s, region %s, "
            "endpoint %s, input check %s, output check %s, failure mode %s, event loop %s, "
            "guardrail calls in a %s)",
            server.listen_host, running.port, route.guardrail.id,
            route.guardrail.version, bedrock.region, bedrock.endpoint_url,
            route.input_check.value, "on" if route.output_check else "off",
            route.failure_mode, type(loop).__module__.split(".")[0],
            settings.client.calls.value,
        )
        watching = _watch_config(settings, argv, environ, running, recorder)
        await stop.wait()
        if watching is not None:
            watching.cancel()
        log.info(
            "shutting down: NOT_SERVING, drain delay %.1fs, grace period %.1fs, %d streams "
            "in flight", server.drain_delay_s, server.grace_period_s,
            running.processor.active_streams,
        )
        await running.drain_and_stop(server.drain_delay_s, server.grace_period_s)
        log.info("stopped")
    finally:
        if metrics is not None:
            metrics.close()
        if prometheus is not None:
            prometheus.close()
        guardrail.close()
        if shared is not None:
            await shared.close()
        if tracer is not None:
            tracer.shutdown()  # the spans still queued, exported (bounded)


def _report_shared_state(shared: SharedState, running: RunningServer) -> None:
    """The store's state as a health detail (``HEALTH_SERVICE``), kept current."""
    from extproc.shared.store import HEALTH_SERVICE

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def changed(up: bool) -> None:
        task = loop.create_task(running.set_detail(HEALTH_SERVICE, up))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    shared.on_change = changed
    changed(shared.up)


def build_tracer(endpoint: str | None) -> Tracer | None:
    """The OTLP tracer for ``--otlp-endpoint``, or None (tracing off: OpenTelemetry is not even
    imported)."""
    if endpoint is None:
        return None
    try:
        from extproc.observe.otel import build_tracer as build_otel_tracer
    except ImportError as exc:
        raise ConfigError(f"--otlp-endpoint: the OpenTelemetry SDK or its OTLP exporter is not "
                          f"installed ({exc})") from None
    tracer = build_otel_tracer(endpoint)
    log.info("traces to %s (OTLP/gRPC)", endpoint)
    return tracer


def _watch_config(settings: Settings, argv: Sequence[str], environ: Mapping[str, str] | None,
                  running: RunningServer, recorder: Recorder) -> asyncio.Task[None] | None:
    """With a configuration file: reload it on SIGHUP and, every ``--config-poll-interval``
    seconds, when it changed. Returns the polling task, if any."""
    env = dict(os.environ if environ is None else environ)
    path = config_path(argv, env)
    if path is None:
        return None
    reloader = Reloader(path, argv, env, settings, running.processor.reconfigure,
                        recorder.config_reloaded)
    recorder.config_loaded(reloader.hash)
    log.info("configuration %s from %s (reloaded on SIGHUP%s)", reloader.hash, path,
             f" and on change, looked at every {settings.runtime.config_poll_s:g}s"
             if settings.runtime.config_poll_s > 0 else "")
    loop = asyncio.get_running_loop()
    stamp = FileStamp(path)
    loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
    interval = settings.runtime.config_poll_s
    if interval <= 0:
        return None

    async def poll() -> None:
        while True:
            await asyncio.sleep(interval)
            if stamp.changed():
                reloader.reload(f"{path} changed")

    return loop.create_task(poll())


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to serve on: uvloop costs less CPU per message than asyncio's own loop
    (``bench/README.md``); ``None`` means asyncio's default."""
    if kind is EventLoop.ASYNCIO:
        return None
    try:
        import uvloop
    except ImportError:
        if kind is EventLoop.UVLOOP:
            raise ConfigError("--event-loop uvloop: the uvloop package is not installed") from None
        return None
    return uvloop.new_event_loop
