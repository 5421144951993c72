"""The gRPC transport: ``envoy.service.ext_proc.v3.ExternalProcessor/Process`` on ``grpc.aio``,
plus the standard gRPC health service on the same port.

Thin on purpose: one ``StreamProcessor`` per RPC, built once the first message is in (its route
policy comes from the RPC's initial metadata and, with route selectors configured, from that
message: ``extproc.settings.routes``), a read loop that hands it each message, answers written in
order through its ``Outbox``. Envoy ending the RPC (half-close or cancellation) is the normal end
of a stream. Nothing here decides anything about guardrails.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc import envoy
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.domain.cache import VerdictCache, verdict_cache
from extproc.domain.client import GuardrailClient
from extproc.formats import StreamFormat, all_formats
from extproc.observe.audit import AuditLog
from extproc.observe.logs import bind_stream, unbind_stream
from extproc.observe.metrics import NULL_RECORDER, Recorder
from extproc.observe.tracing import Tracer
from extproc.settings.routes import RouteResolver
from extproc.settings.values import Settings
from extproc.stream.processor import Admission, StreamProcessor
from extproc.stream.sinks import Outbox

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """The ext_proc service: a read loop per stream around a ``StreamProcessor``."""

    def __init__(
        self,
        settings: Settings,
        guardrail: GuardrailClient,
        formats: tuple[StreamFormat, ...] | None = None,
        recorder: Recorder = NULL_RECORDER,
        audit: AuditLog | None = None,
        cache_factory: Callable[[int, float], VerdictCache] = verdict_cache,
        tracer: Tracer | None = None,
    ) -> None:
        self._settings = settings
        self._tracer = tracer
        self._guardrail = guardrail
        self._formats = formats if formats is not None else all_formats()
        self._recorder = recorder
        self._audit = (audit if audit is not None
                       else AuditLog(settings.runtime.audit_include_matches))
        self._ids = itertools.count(1)
        self.routes = RouteResolver(settings)
        self.admission = Admission(settings.streams.max_streams)
        # Prompt texts known to pass: one cache per process (with a shared store behind it
        # when ``cache_factory`` says so), kept across reloads unless its size or time to live
        # changed.
        self._cache_factory = cache_factory
        self._settings_cache = (settings.client.verdict_cache_entries,
                                settings.client.verdict_cache_ttl_s)
        self.verdict_cache = cache_factory(*self._settings_cache)
        self.active_streams = 0

    @property
    def settings(self) -> Settings:
        return self._settings

    def reconfigure(self, settings: Settings) -> None:
        """Serve new streams with ``settings`` (a configuration reload): their route policies
        and per-stream limits. Streams already running keep what they started with; the route
        counters carry on."""
        old = self.routes
        routes = RouteResolver(settings)
        routes.invalid = old.invalid
        routes.unknown = old.unknown
        self._settings = settings
        self.routes = routes
        self.admission.limit = settings.streams.max_streams
        before = self._settings_cache
        now = (settings.client.verdict_cache_entries, settings.client.verdict_cache_ttl_s)
        if now != before:
            self.verdict_cache = self._cache_factory(*now)
            self._settings_cache = now

    def route_stats(self) -> Mapping[str, Any]:
        """The current route resolver's counters (read at scrape time)."""
        return self.routes.stats()

    async def Process(self, request_iterator: Any, context: Any) -> None:  # noqa: N802
        stream_id = f"s{next(self._ids)}"
        # Every record this stream logs (its tasks and timers too) carries the id as a field.
        stream_token = bind_stream(stream_id)

        async def write(message: Any) -> None:
            # A write fails only once the RPC is over (Envoy cancelled it, the connection
            # dropped, the stop's grace ran out): the normal end of a stream, with nobody left
            # to answer. Guardrail tasks write too, so the error must not escape into them.
            try:
                await context.write(message)
            except grpc.aio.AbortError:
                raise
            except grpc.aio.BaseError as exc:
                log.debug("RPC already over, answer dropped (%s)", type(exc).__name__)

        outbox = Outbox(write)
        # Read everything needed from the context now: after a cancellation some context
        # calls crash grpcio (performance-notes.md).
        metadata = tuple(context.invocation_metadata() or ())
        processor: StreamProcessor | None = None
        self.active_streams += 1
        try:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            # The first message carries the request attributes (ext_proc.md section 6).
            facts = envoy.route_facts(request) if self.routes.reads_facts else None
            route = self.routes.select(metadata, facts)
            # Tracing on: Envoy's trace context for its ext_proc call (traceparent, ...).
            carrier = (None if self._tracer is None else
                       {key: value for key, value in metadata if isinstance(value, str)})
            processor = StreamProcessor(
                self._settings, self._guardrail, self._formats, outbox, stream_id,
                route.policy, route_name=route.name, recorder=self._recorder,
                audit=self._audit, admission=self.admission, verdict_cache=self.verdict_cache,
                tracer=self._tracer, trace_carrier=carrier,
            )
            while request is not grpc.aio.EOF:
                await processor.handle(request)
                request = await context.read()
        except asyncio.CancelledError:
            # Envoy cancels the side stream once it needs nothing more (ext_proc.md 1).
            raise
        except Exception:
            log.exception("unexpected error; ending the RPC")
            raise
        finally:
            if processor is not None:
                processor.close()
            self.active_streams -= 1
            unbind_stream(stream_token)


@dataclass
class RunningServer:
    """A started server: its bound port and the handles needed to stop it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    processor: ExternalProcessor

    async def set_detail(self, service: str, serving: bool) -> None:
        """A health detail: ``service``'s status alone (the sidecar's own is unchanged)."""
        await self.health.set(service, health_pb2.HealthCheckResponse.SERVING if serving
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def drain_and_stop(
        self, drain_delay_s: float, grace_s: float, *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """NOT_SERVING, wait ``drain_delay_s`` for load balancers to notice, then stop
        accepting and give in-flight streams ``grace_s`` to finish. ``sleep`` (the drain
        delay's) is for tests."""
        await self.set_serving(False)
        if drain_delay_s > 0:
            await sleep(drain_delay_s)
        await self.server.stop(grace_s)


#: gRPC's default largest message a server receives (4 MiB).
GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
#: Room in one ext_proc message besides the body it carries (headers, framing).
_MESSAGE_SLACK = 64 * 1024


def max_message_bytes(max_request_bytes: int) -> int:
    """The largest ext_proc message the server receives: gRPC's default, or more when
    ``--max-request-bytes`` allows a prompt that Envoy sends as one larger message (a buffered
    body); -1 (no limit) when that limit is off. Otherwise the stream would fail with
    RESOURCE_EXHAUSTED (an opaque 500 from Envoy) before the sidecar could answer 413."""
    if max_request_bytes <= 0:
        return -1
    return max(GRPC_DEFAULT_MAX_MESSAGE, max_request_bytes + _MESSAGE_SLACK)


def server_options(reuse_port: bool = False,
                   max_message: int = GRPC_DEFAULT_MAX_MESSAGE) -> Sequence[tuple[str, Any]]:
    """gRPC server channel options.

    ``so_reuseport`` is off unless asked for (``--workers``, ``--reuse-port``), so that a second
    process on the same port fails loudly instead of silently sharing it. Keepalive pings from
    Envoy are allowed so idle HTTP/2 connections to the sidecar survive. ``max_message``: the
    largest message received (``max_message_bytes``).
    """
    return (
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_receive_message_length", max_message),
    )


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS for the listener; with ``tls_client_ca``, client certificates are required (mTLS)."""
    server = settings.server
    assert server.tls_cert and server.tls_key, "BUG: TLS credentials without files"
    with open(server.tls_cert, "rb") as cert, open(server.tls_key, "rb") as key:
        pair = (key.read(), cert.read())
    root = None
    if server.tls_client_ca:
        with open(server.tls_client_ca, "rb") as ca:
            root = ca.read()
    return grpc.ssl_server_credentials([pair], root_certificates=root,
                                       require_client_auth=root is not None)


async def start_server(settings: Settings, guardrail: GuardrailClient, *,
                       recorder: Recorder = NULL_RECORDER,
                       cache_factory: Callable[[int, float], VerdictCache] = verdict_cache,
                       tracer: Tracer | None = None) -> RunningServer:
    """Bind, register the ext_proc and health services, start; returns the bound port."""
    server = grpc.aio.server(options=server_options(
        settings.server.reuse_port, max_message_bytes(settings.streams.max_request_bytes)))
    processor = ExternalProcessor(settings, guardrail, recorder=recorder,
                                  cache_factory=cache_factory, tracer=tracer)
    pb_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # add_*_port raise RuntimeError when they cannot bind.
    if settings.server.tls_cert and settings.server.tls_key:
        port = server.add_secure_port(settings.server.listen, server_credentials(settings))
    else:
        port = server.add_insecure_port(settings.server.listen)
    await server.start()
    running = RunningServer(server=server, port=port, health=health_servicer, processor=processor)
    await running.set_serving(True)
    return running
