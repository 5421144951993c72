"""HTTP front end of the local ApplyGuardrail-compatible endpoint.

This module owns:

* :class:`LocalBedrock`, an HTTP/1.1 (keep-alive) server answering
  ``POST /guardrail/{guardrailIdentifier}/version/{guardrailVersion}/apply`` in Bedrock's
  rest-json protocol, so that boto3's unmodified ``bedrock-runtime`` client parses every success
  and every error into its modeled shape / exception class;
* request validation (ValidationException 400, ResourceNotFoundException 404), image content
  blocks included: format ``png`` or ``jpeg`` and bytes of that format, at most 4 MB and
  8000x8000 pixels an image, at most 20 images a call (AWS's documented limits, see
  ``extproc.images``; the messages follow Bedrock's validation wording, AWS's exact text for
  these limits is not published);
* the test knobs: added latency (+ jitter), error injection (next N calls, a fraction of calls,
  or every call; plus deterministic ``__GUARDRAIL_ERROR_<KIND>__`` markers in the text), the
  per-call size limit (``max_text_units_per_call``), and their HTTP form ``POST /_control``;
* call statistics (``LocalBedrock.stats`` and ``GET /_stats``).

The guardrail semantics themselves live in :mod:`extproc.localbedrock.policy`.

Control endpoint (``POST /_control``, JSON object; every member optional; answers the new state,
which ``GET /_control`` also returns)::

    {"latency_ms": 50, "latency_jitter_ms": 10,
     "max_text_units_per_call": 25,            # null/0 disables the automatic too_large error
     "error": {"kind": "throttle", "count": 2} # next 2 calls fail
            | {"kind": "internal", "rate": 0.5, "seed": 7}   # ~half the calls fail
            | {"kind": "unavailable"}          # every call fails until cleared
            | null,                            # clear
     "error_markers": true,                    # honour __GUARDRAIL_ERROR_<KIND>__ in texts
     "policy": {...policy mapping, as in the YAML file...},
     "reset_stats": true}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import random
import re
import select
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import MappingProxyType, TracebackType
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from extproc.images import MAX_IMAGES_PER_CALL, ImageRefused, inspect

from .policy import Policy, PolicyError, default_policy, parse_policy, text_units

__all__ = [
    "DEFAULT_ERROR_MARKER_PREFIX",
    "DEFAULT_MAX_TEXT_UNITS_PER_CALL",
    "ERROR_KINDS",
    "ErrorInjection",
    "LocalBedrock",
    "RecordedCall",
    "Stats",
    "error_marker",
]

DEFAULT_ERROR_MARKER_PREFIX: Final = "__GUARDRAIL_ERROR_"
DEFAULT_MAX_TEXT_UNITS_PER_CALL: Final = 25
MAX_BODY_BYTES: Final = 32 * 1024 * 1024


@dataclass(frozen=True)
class _ErrorSpec:
    status: int
    code: str


#: Error kinds understood by injection and markers: kind -> (HTTP status, x-amzn-errortype).
#: ``hang`` (no answer at all) is handled separately.
ERROR_KINDS: Final[Mapping[str, _ErrorSpec | None]] = MappingProxyType({
    "throttle": _ErrorSpec(429, "ThrottlingException"),
    "throttle_text_units": _ErrorSpec(429, "ThrottlingException"),
    "too_large": _ErrorSpec(429, "ThrottlingException"),
    "internal": _ErrorSpec(500, "InternalServerException"),
    "unavailable": _ErrorSpec(503, "ServiceUnavailableException"),
    "access_denied": _ErrorSpec(403, "AccessDeniedException"),
    "not_found": _ErrorSpec(404, "ResourceNotFoundException"),
    "validation": _ErrorSpec(400, "ValidationException"),
    "service_quota": _ErrorSpec(400, "ServiceQuotaExceededException"),
    "hang": None,
})

_VERSION_RE: Final = re.compile(r"[1-9][0-9]{0,7}|DRAFT")
_IDENTIFIER_RE: Final = re.compile(
    r"([a-z0-9]+)|(arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:guardrail/([a-z0-9]+))"
)
_APPLY_PATH_RE: Final = re.compile(r"^/guardrail/(?P<id>[^/]*)/version/(?P<version>[^/]*)/apply/?$")
_SOURCES: Final = ("INPUT", "OUTPUT")
_QUALIFIERS: Final = ("grounding_source", "query", "guard_content")
_OUTPUT_SCOPES: Final = ("INTERVENTIONS", "FULL")
_UNSATISFIED: Final = "failed to satisfy constraint: Member must"  # Bedrock's validation wording


def error_marker(kind: str, prefix: str = DEFAULT_ERROR_MARKER_PREFIX) -> str:
    """The text marker that deterministically triggers error ``kind``, e.g.
    ``error_marker("throttle") == "__GUARDRAIL_ERROR_THROTTLE__"``."""
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}; known: {', '.join(ERROR_KINDS)}")
    return f"{prefix}{kind.upper()}__"


@dataclass(frozen=True)
class ErrorInjection:
    """Make calls fail with ``kind``: the next ``count`` calls, a ``rate`` fraction of calls
    (random, seedable), or - with neither - every call until cleared."""

    kind: str
    count: int | None = None
    rate: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {self.kind!r}; known: {', '.join(ERROR_KINDS)}")
        if self.count is not None and self.rate is not None:
            raise ValueError("give either count or rate, not both")
        if self.count is not None and (
            isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0
        ):
            raise ValueError("count must be a non-negative integer")
        if self.rate is not None and (
            isinstance(self.rate, bool) or not isinstance(self.rate, (int, float))
            or not 0.0 <= self.rate <= 1.0
        ):
            raise ValueError("rate must be a number between 0 and 1")

    @classmethod
    def from_json(cls, data: Any) -> ErrorInjection | None:
        if data is None:
            return None
        if isinstance(data, str):
            return cls(kind=data)
        if not isinstance(data, Mapping):
            raise ValueError("error must be null, a kind string or an object")
        unknown = set(data) - {"kind", "count", "rate", "seed"}
        if unknown:
            raise ValueError(f"error: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(kind=data.get("kind", ""), count=data.get("count"), rate=data.get("rate"),
                   seed=data.get("seed"))


@dataclass(frozen=True)
class RecordedCall:
    """One ApplyGuardrail call as seen by the endpoint (for test assertions)."""

    guardrail_identifier: str
    guardrail_id: str
    guardrail_version: str
    source: str
    texts: tuple[str, ...]
    outcome: str  # "NONE", "GUARDRAIL_INTERVENED" or "error:<kind>"
    action_reason: str | None
    status: int
    text_units: int
    timestamp: float
    images: tuple[str, ...] = ()  # SHA-256 (hex) of each image block, in order


@dataclass(frozen=True)
class Stats:
    """A snapshot of the endpoint's counters."""

    calls: int = 0  # every apply request received, valid or not
    by_source: Mapping[str, int] = field(default_factory=dict)
    # NONE / GUARDRAIL_INTERVENED / error:<kind>
    by_outcome: Mapping[str, int] = field(default_factory=dict)
    errors: int = 0
    text_units: int = 0  # sum over evaluated calls of sum(ceil(len/1000)) per block
    billed_text_units: Mapping[str, int] = field(default_factory=dict)  # per usage member
    recent: tuple[RecordedCall, ...] = ()

    @property
    def last(self) -> RecordedCall | None:
        return self.recent[-1] if self.recent else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["recent"] = [asdict(c) for c in self.recent]
        return data


class _Hang:
    """Sentinel result: do not answer."""


_HANG: Final = _Hang()


@dataclass(frozen=True)
class _Reply:
    status: int
    body: Mapping[str, Any]
    error_code: str | None = None


class _GuardrailError(Exception):
    def __init__(self, kind: str, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.code = code
        self.message = message


class _ValidationError(Exception):
    pass


# --------------------------------------------------------------------------- HTTP plumbing


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True  # server_close() joins handler threads (we close their sockets first)

    def __init__(self, address: tuple[str, int], app: LocalBedrock) -> None:
        self.app = app
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's socket.getfqdn() (a reverse DNS lookup).
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        try:  # headers and body go out in separate writes: avoid Nagle/delayed-ACK stalls
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with self._conns_lock:
            self._conns.add(conn)
        return conn, addr

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) or self.app._stopping.is_set():
            return  # client went away / server stopping
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "local-bedrock"
    server: _HTTPServer

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.app.log_requests:
            sys.stderr.write(f"local-bedrock: {self.address_string()} {format % args}\n")

    # -- body / replies

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            size = 0
            while True:
                line = self.rfile.readline(1024)
                n = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                size += n
                if size > MAX_BODY_BYTES:
                    raise _ValidationError("Request body too large")
                chunks.append(self.rfile.read(n))
                self.rfile.readline(1024)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise _ValidationError("Request body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, status: int, body: Any, *, error_code: str | None = None,
                   request_id: str | None = None) -> None:
        payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amzn-RequestId", request_id or str(uuid.uuid4()))
        if error_code:
            self.send_header("x-amzn-ErrorType", error_code)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def _not_found(self) -> None:
        self._send_json(404, {"message": f"No route for {self.command} {self.path}"},
                        error_code="UnknownOperationException")

    # -- routes

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        app = self.server.app
        if path == "/_stats":
            self._send_json(200, app.stats.to_dict())
        elif path == "/_control":
            self._send_json(200, app.control_state())
        elif path in ("/_health", "/healthz"):
            self._send_json(200, {"status": "ok"})
        else:
            self._not_found()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        app = self.server.app
        request_id = str(uuid.uuid4())
        try:
            body = self._read_body()
        except (ValueError, _ValidationError) as exc:
            self.close_connection = True
            self._send_json(400, {"message": str(exc) or "Malformed request body"},
                            error_code="ValidationException")
            return
        if path == "/_control":
            try:
                data = json.loads(body or b"{}")
                state = app.configure_from_json(data)
            except (ValueError, PolicyError) as exc:
                self._send_json(400, {"message": str(exc)}, error_code="ValidationException")
                return
            self._send_json(200, state)
            return
        match = _APPLY_PATH_RE.match(path)
        if match is None:
            self._not_found()
            return
        reply = app._apply(unquote(match["id"]), unquote(match["version"]), body, request_id)
        if isinstance(reply, _Hang):
            self._hang()
            return
        self._send_json(reply.status, reply.body, error_code=reply.error_code,
                        request_id=request_id)

    def do_PUT(self) -> None:
        self._read_body()
        self._not_found()

    def _hang(self) -> None:
        """Never answer: wait until the client closes the connection or the server stops."""
        self.close_connection = True
        conn = self.connection
        stopping = self.server.app._stopping
        while not stopping.is_set():
            try:
                readable, _, _ = select.select([conn], [], [], 0.05)
                if readable and conn.recv(1, socket.MSG_PEEK) == b"":
                    return  # client gave up
            except (OSError, ValueError):
                return


# --------------------------------------------------------------------------- the endpoint


class LocalBedrock:
    """A local, in-process ApplyGuardrail endpoint (see the module docstring).

    >>> with LocalBedrock(default_policy()) as lb:          # doctest: +SKIP
    ...     client = boto3.client("bedrock-runtime", endpoint_url=lb.url, ...)
    """

    def __init__(
        self,
        policy: Policy | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0,
        *,
        latency_jitter_ms: float = 0,
        error: ErrorInjection | None = None,
        max_text_units_per_call: int | None = DEFAULT_MAX_TEXT_UNITS_PER_CALL,
        error_markers: bool = True,
        error_marker_prefix: str = DEFAULT_ERROR_MARKER_PREFIX,
        recent_limit: int = 100,
        region: str = "us-east-1",
        account_id: str = "123456789012",
        log_requests: bool = False,
    ) -> None:
        self._lock = threading.Lock()
        self._policy = policy if policy is not None else default_policy()
        self._host = host
        self._requested_port = port
        self.latency_ms = latency_ms
        self.latency_jitter_ms = latency_jitter_ms
        self.max_text_units_per_call = max_text_units_per_call
        self.error_markers = error_markers
        self.error_marker_prefix = error_marker_prefix
        self.region = region
        self.account_id = account_id
        self.log_requests = log_requests
        self._error: ErrorInjection | None = None
        self._error_remaining: int | None = None
        self._error_rng = random.Random()
        self._jitter_rng = random.Random()
        self._recent_limit = recent_limit
        self._reset_counters()
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        if error is not None:
            self.inject_error(error)

    # -- lifecycle

    def start(self) -> int:
        """Bind and serve in a background thread; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("LocalBedrock is already running")
        self._stopping.clear()
        server = _HTTPServer((self._host, self._requested_port), self)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-bedrock",
            daemon=True,
        )
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop serving, drop open connections (incl. hanging calls) and join all threads."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalBedrock:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalBedrock is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    # -- knobs

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self._policy = policy

    def set_policy(self, policy: Policy) -> None:
        self._policy = policy

    def set_latency(self, latency_ms: float, jitter_ms: float = 0) -> None:
        self.latency_ms = latency_ms
        self.latency_jitter_ms = jitter_ms

    def inject_error(
        self,
        kind: str | ErrorInjection,
        *,
        count: int | None = None,
        rate: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Make calls fail with ``kind`` (see :data:`ERROR_KINDS`): the next ``count`` calls,
        a ``rate`` fraction of calls, or every call until :meth:`clear_error`."""
        injection = (kind if isinstance(kind, ErrorInjection)
                     else ErrorInjection(kind, count, rate, seed))
        with self._lock:
            self._error = injection
            self._error_remaining = injection.count
            self._error_rng = random.Random(injection.seed)

    def clear_error(self) -> None:
        with self._lock:
            self._error = None
            self._error_remaining = None

    @property
    def error(self) -> ErrorInjection | None:
        return self._error

    def control_state(self) -> dict[str, Any]:
        """The knob settings, as ``GET /_control`` returns them."""
        with self._lock:
            err = self._error
            remaining = self._error_remaining
        error_json: dict[str, Any] | None = None
        if err is not None:
            error_json = {"kind": err.kind}
            if err.count is not None:
                error_json["count"] = remaining
            if err.rate is not None:
                error_json["rate"] = err.rate
                error_json["seed"] = err.seed
        policy = self._policy
        return {
            "latency_ms": self.latency_ms,
            "latency_jitter_ms": self.latency_jitter_ms,
            "max_text_units_per_call": self.max_text_units_per_call,
            "error": error_json,
            "error_markers": self.error_markers,
            "error_marker_prefix": self.error_marker_prefix,
            "error_kinds": list(ERROR_KINDS),
            "policy": policy.name,
            "guardrail_ids": list(policy.guardrail_ids),
        }

    def configure_from_json(self, data: Any) -> dict[str, Any]:
        """Apply a ``POST /_control`` body (see module docstring); returns the new state.
        Raises ValueError / PolicyError without changing anything when the body is invalid."""
        if not isinstance(data, Mapping):
            raise ValueError("control body must be a JSON object")
        allowed = {"latency_ms", "latency_jitter_ms", "max_text_units_per_call", "error",
                   "error_markers", "policy", "reset_stats"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown control key(s): {', '.join(sorted(unknown))}")

        def number(key: str) -> float:
            value = data[key]
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                    or not math.isfinite(value)):
                raise ValueError(f"{key} must be a non-negative number")
            return value

        updates: dict[str, Any] = {}
        for key in ("latency_ms", "latency_jitter_ms"):
            if key in data:
                updates[key] = number(key)
        if "max_text_units_per_call" in data:
            value = data["max_text_units_per_call"]
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError("max_text_units_per_call must be a non-negative integer or null")
            updates["max_text_units_per_call"] = value or None
        if "error_markers" in data:
            if not isinstance(data["error_markers"], bool):
                raise ValueError("error_markers must be true or false")
            updates["error_markers"] = data["error_markers"]
        injection = ErrorInjection.from_json(data["error"]) if "error" in data else None
        policy = parse_policy(data["policy"]) if "policy" in data else None

        for key, value in updates.items():
            setattr(self, key, value)
        if "error" in data:
            if injection is None:
                self.clear_error()
            else:
                self.inject_error(injection)
        if policy is not None:
            self._policy = policy
        if data.get("reset_stats"):
            self.reset_stats()
        return self.control_state()

    # -- stats

    def _reset_counters(self) -> None:
        self._calls = 0
        self._by_source: dict[str, int] = {}
        self._by_outcome: dict[str, int] = {}
        self._errors = 0
        self._text_units = 0
        self._billed: dict[str, int] = {}
        self._recent: deque[RecordedCall] = deque(maxlen=self._recent_limit)

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_counters()

    @property
    def stats(self) -> Stats:
        with self._lock:
            return Stats(
                calls=self._calls,
                by_source=dict(self._by_source),
                by_outcome=dict(self._by_outcome),
                errors=self._errors,
                text_units=self._text_units,
                billed_text_units=dict(self._billed),
                recent=tuple(self._recent),
            )

    def _record(
        self,
        *,
        identifier: str,
        guardrail_id: str,
        version: str,
        source: str | None,
        texts: Sequence[str],
        outcome: str,
        status: int,
        action_reason: str | None = None,
        units: int = 0,
        usage: Mapping[str, int] | None = None,
        images: Sequence[bytes] = (),
    ) -> None:
        with self._lock:
            if source in _SOURCES:
                self._by_source[source] = self._by_source.get(source, 0) + 1
            self._by_outcome[outcome] = self._by_outcome.get(outcome, 0) + 1
            if outcome.startswith("error:"):
                self._errors += 1
            if usage is not None:
                self._text_units += units
                for key, value in usage.items():
                    self._billed[key] = self._billed.get(key, 0) + value
            self._recent.append(
                RecordedCall(
                    guardrail_identifier=identifier,
                    guardrail_id=guardrail_id,
                    guardrail_version=version,
                    source=source or "",
                    texts=tuple(texts),
                    outcome=outcome,
                    action_reason=action_reason,
                    status=status,
                    text_units=units,
                    timestamp=time.time(),
                    images=tuple(hashlib.sha256(data).hexdigest() for data in images),
                )
            )

    # -- the operation

    def _validate(self, identifier: str, version: str,
                  body: bytes) -> tuple[str, str, list[str], bool, list[bytes]]:
        """Returns (bare guardrail id, source, texts, full_scope, image bytes) or raises
        _ValidationError."""
        problems: list[str] = []
        if len(identifier) > 2048 or not _IDENTIFIER_RE.fullmatch(identifier):
            problems.append(
                f"Value '{identifier}' at 'guardrailIdentifier' {_UNSATISFIED} satisfy "
                f"regular expression pattern: {_IDENTIFIER_RE.pattern}"
            )
        if not _VERSION_RE.fullmatch(version):
            problems.append(
                f"Value '{version}' at 'guardrailVersion' {_UNSATISFIED} satisfy "
                "regular expression pattern: ([1-9][0-9]{0,7})|(DRAFT)"
            )
        try:
            data = json.loads(body.decode("utf-8")) if body else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _ValidationError(f"Could not parse request body into json: {exc}") from exc
        if not isinstance(data, dict):
            raise _ValidationError("Could not parse request body into json: expected an object")

        source = data.get("source")
        if source is None:
            problems.append(f"Value null at 'source' {_UNSATISFIED} not be null")
        elif source not in _SOURCES:
            problems.append(
                f"Value '{source}' at 'source' {_UNSATISFIED} satisfy enum value set: "
                "[INPUT, OUTPUT]"
            )
        scope = data.get("outputScope")
        if scope is not None and scope not in _OUTPUT_SCOPES:
            problems.append(
                f"Value '{scope}' at 'outputScope' {_UNSATISFIED} satisfy enum value set: "
                "[INTERVENTIONS, FULL]"
            )
        texts: list[str] = []
        images: list[bytes] = []
        content = data.get("content")
        if content is None:
            problems.append(f"Value null at 'content' {_UNSATISFIED} not be null")
        elif not isinstance(content, list):
            problems.append(f"Value at 'content' {_UNSATISFIED} be a list")
        elif not content:
            problems.append(
                f"Value '[]' at 'content' {_UNSATISFIED} have length greater than or equal to 1")
        else:
            for i, block in enumerate(content, start=1):
                where = f"content.{i}.member"
                if not isinstance(block, dict) or len(block) != 1:
                    problems.append(
                        f"Value at '{where}' {_UNSATISFIED} have exactly one of text, image")
                    continue
                if "image" in block:
                    image, problem = _image_block(block["image"], f"{where}.image")
                    if problem is not None:
                        problems.append(problem)
                    elif image is not None:
                        images.append(image)
                    continue
                text_block = block.get("text")
                if not isinstance(text_block, dict):
                    problems.append(
                        f"Value at '{where}' {_UNSATISFIED} have exactly one of text, image")
                    continue
                text = text_block.get("text")
                if not isinstance(text, str):
                    problems.append(f"Value null at '{where}.text.text' {_UNSATISFIED} not be null")
                    continue
                qualifiers = text_block.get("qualifiers", [])
                if (not isinstance(qualifiers, list)
                        or any(q not in _QUALIFIERS for q in qualifiers)):
                    problems.append(
                        f"Value '{qualifiers}' at '{where}.text.qualifiers' {_UNSATISFIED} "
                        "satisfy constraint: [Member must satisfy enum value set: "
                        "[grounding_source, query, guard_content]]"
                    )
                    continue
                texts.append(text)
        if len(images) > MAX_IMAGES_PER_CALL:
            problems.append(f"The number of images ({len(images)}) exceeds the maximum allowed "
                            f"({MAX_IMAGES_PER_CALL}) for a single request")
        if problems:
            n = len(problems)
            raise _ValidationError(f"{n} validation error{'s' if n > 1 else ''} detected: "
                                   + "; ".join(problems))
        m = _IDENTIFIER_RE.fullmatch(identifier)
        assert m is not None
        bare_id = m.group(1) or m.group(4)
        return bare_id, str(source), texts, scope == "FULL", images

    def _error_for(self, kind: str, *, guardrail_id: str, texts: Sequence[str], policy: Policy,
                   source: str) -> _GuardrailError:
        spec = ERROR_KINDS[kind]
        assert spec is not None
        rules = policy.for_source(source) if source in _SOURCES else policy.input
        policy_name = rules.quota_policy_name
        if kind == "throttle":
            message = ("Too many requests, please wait before trying again. ApplyGuardrail "
                       f"requestId {uuid.uuid4()} got throttled.")
        elif kind == "throttle_text_units":
            message = (
                "Too many requests sent to ApplyGuardrail: On-demand ApplyGuardrail "
                f"{policy_name.capitalize()} policy text units per second limit exceeded"
            )
        elif kind == "too_large":
            units = sum(text_units(t) for t in texts)
            limit = self.max_text_units_per_call or DEFAULT_MAX_TEXT_UNITS_PER_CALL
            message = (
                f"Input text size ({units} text units) exceeds the maximum allowed "
                f"({limit} text units) for the {policy_name} policy (Classic tier)"
            )
        elif kind == "internal":
            message = "The server encountered an internal error while processing the request."
        elif kind == "unavailable":
            message = "Bedrock is unable to process your request at this time. Try again later."
        elif kind == "access_denied":
            message = (
                f"User: arn:aws:iam::{self.account_id}:user/local-bedrock is not authorized to "
                "perform: bedrock:ApplyGuardrail on resource: "
                f"{self._guardrail_arn(guardrail_id)} because no identity-based policy allows the "
                "bedrock:ApplyGuardrail action"
            )
        elif kind == "not_found":
            message = "The guardrail identifier or version provided does not exist."
        elif kind == "validation":
            message = "Malformed input request, please reformat your input and try again."
        else:  # service_quota
            message = ("Your account has exceeded the ApplyGuardrail quota. Request a quota "
                       "increase and try again.")
        return _GuardrailError(kind, spec.status, spec.code, message)

    def _guardrail_arn(self, guardrail_id: str) -> str:
        return f"arn:aws:bedrock:{self.region}:{self.account_id}:guardrail/{guardrail_id}"

    def _marker_kind(self, texts: Sequence[str]) -> str | None:
        if not self.error_markers:
            return None
        prefix = self.error_marker_prefix
        for text in texts:
            start = text.find(prefix)
            while start != -1:
                end = text.find("__", start + len(prefix))
                if end != -1:
                    kind = text[start + len(prefix):end].lower()
                    if kind in ERROR_KINDS:
                        return kind
                start = text.find(prefix, start + 1)
        return None

    def _injected_kind(self) -> str | None:
        with self._lock:
            err = self._error
            if err is None:
                return None
            if err.count is not None:
                if not self._error_remaining:
                    self._error = None
                    self._error_remaining = None
                    return None
                self._error_remaining -= 1
                if self._error_remaining == 0:
                    self._error = None
                    self._error_remaining = None
                return err.kind
            if err.rate is not None:
                return err.kind if self._error_rng.random() < err.rate else None
            return err.kind

    def _delay(self) -> None:
        delay_ms = float(self.latency_ms or 0)
        jitter = float(self.latency_jitter_ms or 0)
        if jitter > 0:
            delay_ms += self._jitter_rng.uniform(0, jitter)
        if delay_ms > 0:
            self._stopping.wait(delay_ms / 1000.0)

    def _apply(self, identifier: str, version: str, body: bytes, request_id: str) -> _Reply | _Hang:
        """Handle one ApplyGuardrail call (everything but the HTTP framing)."""
        started = time.monotonic()
        with self._lock:
            self._calls += 1
        policy = self._policy
        try:
            guardrail_id, source, texts, full_scope, images = self._validate(
                identifier, version, body)
        except _ValidationError as exc:
            self._record(identifier=identifier, guardrail_id="", version=version, source=None,
                         texts=(), outcome="error:validation", status=400)
            return _Reply(400, {"message": str(exc)}, "ValidationException")

        def fail(kind: str) -> _Reply | _Hang:
            units = sum(text_units(t) for t in texts)
            if kind == "hang":
                self._record(identifier=identifier, guardrail_id=guardrail_id, version=version,
                             source=source, texts=texts, outcome="error:hang", status=0,
                             units=units)
                return _HANG
            err = self._error_for(kind, guardrail_id=guardrail_id, texts=texts, policy=policy,
                                  source=source)
            self._record(identifier=identifier, guardrail_id=guardrail_id, version=version,
                         source=source, texts=texts, outcome=f"error:{kind}", status=err.status,
                         units=units)
            return _Reply(err.status, {"message": err.message}, err.code)

        if not policy.serves(guardrail_id, version):
            return fail("not_found")
        self._delay()
        kind = self._marker_kind(texts) or self._injected_kind()
        if kind is not None:
            return fail(kind)
        limit = self.max_text_units_per_call
        if limit and sum(text_units(t) for t in texts) > limit:
            return fail("too_large")

        ev = policy.evaluate(source, texts, full_scope=full_scope, images=images)
        coverage: dict[str, Any] = {"textCharacters": {"guarded": ev.characters_guarded,
                                                       "total": ev.characters_total}}
        if images:
            coverage["images"] = {"guarded": ev.images_guarded, "total": ev.images_total}
        usage = dict(ev.usage)
        assessment: dict[str, Any] = dict(ev.policies)
        assessment["invocationMetrics"] = {
            "guardrailProcessingLatency": round((time.monotonic() - started) * 1000),
            "usage": usage,
            "guardrailCoverage": coverage,
        }
        if policy.report_applied_guardrail_details:
            assessment["appliedGuardrailDetails"] = {
                "guardrailId": guardrail_id,
                "guardrailVersion": version,
                "guardrailArn": self._guardrail_arn(guardrail_id),
                "guardrailOrigin": ["REQUEST"],
                "guardrailOwnership": "SELF",
            }
        response = {
            "usage": usage,
            "action": ev.action,
            "actionReason": ev.action_reason,
            "outputs": [{"text": t} for t in ev.outputs],
            "assessments": [assessment],
            "guardrailCoverage": coverage,
        }
        self._record(identifier=identifier, guardrail_id=guardrail_id, version=version,
                     source=source, texts=texts, outcome=ev.action, status=200,
                     action_reason=ev.action_reason, units=ev.text_units, usage=usage,
                     images=images)
        return _Reply(200, response)


def _image_block(image: Any, where: str) -> tuple[bytes | None, str | None]:
    """The bytes of one ``image`` content block, or the validation problem with it."""
    if not isinstance(image, dict):
        return None, f"Value at '{where}' {_UNSATISFIED} be a structure"
    problem = None
    fmt = image.get("format")
    if fmt is None:
        problem = f"Value null at '{where}.format' {_UNSATISFIED} not be null"
    elif fmt not in ("png", "jpeg"):
        problem = (f"Value '{fmt}' at '{where}.format' {_UNSATISFIED} satisfy enum value set: "
                   "[png, jpeg]")
    source = image.get("source")
    encoded = source.get("bytes") if isinstance(source, dict) else None
    if not isinstance(encoded, str):
        return None, problem or f"Value null at '{where}.source.bytes' {_UNSATISFIED} not be null"
    if problem is not None:
        return None, problem
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        return None, f"Value at '{where}.source.bytes' is not valid base64"
    if not data:
        return None, (f"Value at '{where}.source.bytes' {_UNSATISFIED} have length greater "
                      "than or equal to 1")
    try:
        found = inspect(data)
    except ImageRefused as exc:
        if exc.reason.value == "too_large":
            return None, f"The image at '{where}' exceeds the maximum allowed size ({exc.detail})"
        return None, f"The image at '{where}' is not a valid {fmt} image ({exc.detail})"
    if found.format != fmt:
        return None, f"The image at '{where}' is not a valid {fmt} image (it is {found.format})"
    return data, None
