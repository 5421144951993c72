"""A real OpenTelemetry collector endpoint for tests and benchmarks: a gRPC server implementing
the OTLP trace service (``opentelemetry.proto.collector.trace.v1``) on 127.0.0.1, port 0,
keeping every span it receives, flattened.

    receiver = OtlpReceiver().start()
    ... run something with --otlp-endpoint receiver.endpoint ...
    spans = receiver.wait_for(lambda spans: len(spans) >= 3)
    receiver.stop()

``wait_for`` blocks on a condition the export handler notifies: no sleep-polling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

#: ``Span.SpanKind`` of the OTLP protocol.
KIND_INTERNAL = 1
KIND_SERVER = 2
KIND_CLIENT = 3
#: ``Status.StatusCode``.
STATUS_ERROR = 2


def any_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a plain Python value (arrays as tuples)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if kind is None:
        return None
    return getattr(value, kind)


def attributes_of(pairs: Sequence[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as received: ids in hex ('' for no parent), its attributes and its resource's."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    attributes: Mapping[str, Any]
    resource: Mapping[str, Any]
    status_code: int

    @property
    def service_name(self) -> str:
        return str(self.resource.get("service.name", ""))


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the gRPC method's name)
        self._receiver.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """The OTLP/gRPC trace service on 127.0.0.1 port 0 (see the module docstring)."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep  # False: count spans only (benchmarks)
        self.count = 0
        self.exports = 0
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """The value for ``--otlp-endpoint``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def add(self, request: Any) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = attributes_of(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(ReceivedSpan(
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(), name=span.name,
                        kind=span.kind, attributes=attributes_of(span.attributes),
                        resource=resource, status_code=span.status.code))
        with self._changed:
            self.exports += 1
            self.count += len(spans)
            if self.keep:
                self._spans.extend(spans)
            self._changed.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool],
                 timeout: float = 30.0, what: str = "spans") -> list[ReceivedSpan]:
        """The spans once ``predicate`` holds for them; ``AssertionError`` after ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self._spans), timeout):
                names = sorted({s.name for s in self._spans})
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"{len(self._spans)} spans received: {names}")
            return list(self._spans)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
