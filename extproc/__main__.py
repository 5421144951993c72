"""Command line: ``guardrail-extproc`` / ``python -m extproc``.

Reads flags and environment into ``Settings`` (a bad value exits 2 with one clear line),
configures logging, builds the Bedrock client, starts the Prometheus endpoint
(``--metrics-listen``), serves until SIGTERM or SIGINT, then drains: health NOT_SERVING,
``--drain-delay``, in-flight streams get ``--grace-period``, exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from extproc import heap
from extproc.config import EventLoop, Settings, load_settings, render_settings
from extproc.errors import ConfigError
from extproc.guardrail import BedrockGuardrailClient
from extproc.logs import configure_logging
from extproc.metrics import NULL_RECORDER, MetricsServer, PrometheusRecorder, Recorder, \
    start_metrics_server
from extproc.resilience import ResilienceConfig, ResilientGuardrail
from extproc.server import start_server
from extproc.workers import supervise

log = logging.getLogger("extproc")


def resilience_config(settings: Settings) -> ResilienceConfig:
    """Retries, breaker and budget from the settings."""
    return ResilienceConfig(
        deadline_s=settings.guardrail_timeout_s,
        attempt_timeout_s=min(settings.guardrail_attempt_timeout_s, settings.guardrail_timeout_s),
        max_attempts=settings.guardrail_max_attempts,
        max_chars_per_call=settings.guardrail_max_chars_per_call,
        breaker_failures=settings.breaker_failures,
        breaker_cooldown_s=settings.breaker_cooldown_s,
        budget_rps=settings.budget_rps,
        budget_text_units_per_s=settings.budget_text_units,
        budget_max_wait_s=settings.budget_max_wait_s,
    )


async def serve(settings: Settings) -> None:
    """Run the sidecar until SIGTERM/SIGINT, then drain and return."""
    bedrock = BedrockGuardrailClient(
        settings, max_attempts=1, attempt_timeout_s=settings.guardrail_attempt_timeout_s)
    guardrail = ResilientGuardrail(bedrock, resilience_config(settings))
    metrics: MetricsServer | None = None
    prometheus: PrometheusRecorder | None = None
    try:
        address = settings.metrics_address
        prometheus = PrometheusRecorder(standard_collectors=True) if address is not None else None
        recorder: Recorder = NULL_RECORDER
        if prometheus is not None:
            prometheus.watch_resilience(lambda: guardrail.stats)
            recorder = prometheus
        try:
            running = await start_server(settings, guardrail, recorder=recorder)
        except RuntimeError as exc:
            raise ConfigError(f"--listen {settings.listen}: cannot bind ({exc})") from None
        if prometheus is not None and address is not None:
            host, port = address
            try:
                metrics = start_metrics_server(prometheus.registry, host, port)
            except OSError as exc:
                await running.server.stop(None)
                raise ConfigError(
                    f"--metrics-listen {settings.metrics_listen}: cannot bind ({exc})") from None
            # Before the listening line: whoever waits for that line can read this one.
            log.info("metrics on http://%s:%d/metrics",
                     f"[{host}]" if ":" in host else host, metrics.port)
        if settings.gc_full_every or settings.gc_young_threshold:
            # The start-up heap is done growing.
            heap.settle(settings.gc_full_every or None, young=settings.gc_young_threshold or None)
        log.info("garbage collector: thresholds %s, %d start-up objects frozen",
                 gc.get_threshold(), gc.get_freeze_count())
        # Before the listening line: from then on a SIGTERM must drain, not kill.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "guardrail-extproc listening on %s:%d (guardrail %s version %s, region %s, "
            "endpoint %s, input check %s, output check %s, failure mode %s, event loop %s, "
            "guardrail calls in a %s)",
            settings.listen_host, running.port, settings.guardrail.id,
            settings.guardrail.version, bedrock.region, bedrock.endpoint_url,
            settings.input_check.value, "on" if settings.output_check else "off",
            settings.failure_mode, type(loop).__module__.split(".")[0],
            settings.guardrail_calls.value,
        )
        await stop.wait()
        log.info(
            "shutting down: NOT_SERVING, drain delay %.1fs, grace period %.1fs, %d streams "
            "in flight", settings.drain_delay_s, settings.grace_period_s,
            running.processor.active_streams,
        )
        await running.drain_and_stop(settings.drain_delay_s, settings.grace_period_s)
        log.info("stopped")
    finally:
        if metrics is not None:
            metrics.close()
        if prometheus is not None:
            prometheus.close()
        guardrail.close()


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
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        settings = load_settings(args, os.environ)
    except ConfigError as exc:
        print(f"guardrail-extproc: configuration error: {exc}", file=sys.stderr)
        return 2
    if "--print-config" in args:
        print(render_settings(settings), end="")
        return 0
    # boto3/botocore at DEBUG would log request bodies (prompts and answers): capped at INFO.
    configure_logging(settings.log_level, settings.log_format, sys.stderr)
    if settings.workers > 1:
        return supervise(settings, args)
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(serve(settings))
    except ConfigError as exc:
        print(f"guardrail-extproc: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
