"""ApplyGuardrail without boto3's per-call machinery (``--guardrail-client lean``, the default).

Measured (``bench/guardrail_call.py``; ``bench/README.md``): one boto3 ``apply_guardrail``
call costs about 0.7 ms of CPU on an idle machine, spent in botocore's event hooks (a dozen
``emit`` per call), parameter validation and serialisation, an ``AWSRequest`` with
``email``-based headers, urllib3, and the model-driven response parser, before the sidecar
encodes the parsed dict again for the frame to its parent. The work the call needs is much
smaller: a JSON body, a SigV4 signature, one POST on a kept-alive connection, and one
``json.loads`` of the answer.

botocore keeps what only it does well, all resolved once at start-up from the boto3 client
``extproc.guardrail.bedrock.lean_client`` builds:

* the credential chain and its refreshes (``get_frozen_credentials()`` per call, which
  refreshes expiring credentials under botocore's lock);
* SigV4 signing (``botocore.auth.SigV4Auth`` over a small ``AWSRequest``);
* the endpoint (``AWS_ENDPOINT_URL_BEDROCK_RUNTIME`` or the region's), TLS verification
  (``AWS_CA_BUNDLE``/the config's ``ca_bundle``), the URI-label encoding of the model;
* error answers: parsed by botocore's rest-json parser for the operation's model into the
  same ``ClientError`` boto3 raises, then ``map_client_error``; transport failures become the
  botocore exceptions boto3's urllib3 session raises, then ``map_boto_error``. One mapping.

What this module does itself: the body (``apply_body``, built once, compact), a pool of
``http.client`` keep-alive connections (a dropped idle connection is noticed before reuse, as
urllib3 does), and no retries unless ``max_attempts`` > 1 (``ResilientGuardrail`` retries;
``max_attempts`` > 1 is botocore's standard mode: transient errors and throttles, jittered
exponential backoff). A successful answer is returned as the body bytes: whoever needs the
verdict parses it once (the parent process, when the calls run in a child).
"""

from __future__ import annotations

import base64
import functools
import json
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import botocore.auth
import botocore.awsrequest
import botocore.exceptions
import botocore.parsers
from botocore.utils import percent_encode

from extproc.domain.client import Content
from extproc.domain.errors import (
    GuardrailError,
    GuardrailInputTooLarge,
    GuardrailRejected,
    GuardrailServerError,
)

OPERATION: Final = "ApplyGuardrail"
#: The most connections kept idle per pool (more may be open while calls are in flight).
MAX_IDLE: Final = 64
#: botocore's standard retry mode: the longest backoff, seconds.
MAX_BACKOFF_S: Final = 20.0


class CredentialSource(Protocol):
    """botocore's ``Credentials`` / ``RefreshableCredentials``."""

    def get_frozen_credentials(self) -> Any: ...


@functools.lru_cache(maxsize=1024)
def apply_path(guardrail_id: str, version: str) -> str:
    """The request path of ApplyGuardrail, labels encoded as botocore's rest-json serialiser
    encodes them (an ARN's ``:`` and ``/`` included)."""
    return f"/guardrail/{percent_encode(guardrail_id)}/version/{percent_encode(version)}/apply"


def apply_body(source: str, texts: Sequence[Content]) -> bytes:
    """The request body of ApplyGuardrail: compact JSON, built once (``ensure_ascii`` as
    botocore, so lone surrogates are escaped rather than fail to encode); an image's bytes
    base64-encoded, as botocore serialises a blob."""
    return json.dumps({"source": source, "content": [
        {"text": {"text": item}} if isinstance(item, str) else
        {"image": {"format": item.format,
                   "source": {"bytes": base64.b64encode(item.data).decode("ascii")}}}
        for item in texts]}, separators=(",", ":")).encode()


def parse_answer(body: bytes) -> dict[str, Any]:
    """The ApplyGuardrail answer of a 2xx body: a JSON object, else ``GuardrailServerError``
    (botocore raises ``ResponseParserError`` there, which maps to the same class)."""
    try:
        answer = json.loads(body)
    except ValueError:
        raise GuardrailServerError("ApplyGuardrail answer is not JSON") from None
    if not isinstance(answer, dict):
        raise GuardrailServerError("ApplyGuardrail answer is not a JSON object")
    return answer


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the calls go: scheme, host, port, and the endpoint URL's own path prefix."""

    url: str
    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported endpoint URL {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(url=url.rstrip("/"), scheme=parts.scheme, host=parts.hostname, port=port,
                   prefix=parts.path.rstrip("/"))


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 as this client reads it."""


#: The longest status or header line, and the most header lines, read from an answer.
MAX_LINE: Final = 65_536
MAX_HEADERS: Final = 100


class Connection:
    """One HTTP/1.1 keep-alive connection (TCP, or TLS with the pool's context).

    Requests are written as one buffer (request line, headers and body: no Nagle/delayed-ACK
    stall); answers are read with a buffered reader kept for the connection's life: status
    line, headers (names lower-cased), and a body delimited by ``Content-Length``, chunked
    transfer coding, or the end of the connection.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb")
        self.reusable = True

    def exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(request)
        reader = self._reader
        while True:
            status_line = reader.readline(MAX_LINE + 1)
            if not status_line or len(status_line) > MAX_LINE:
                raise ProtocolError("connection closed before an answer")
            version, _, rest = status_line.partition(b" ")
            code = rest[:3]
            if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
                raise ProtocolError("bad status line")
            status = int(code)
            headers = self._headers()
            if status != 100:  # (never asked for; skipped as any client does)
                break
        connection = headers.get("connection", "").lower()
        self.reusable = (version == b"HTTP/1.1" and "close" not in connection) or (
            version == b"HTTP/1.0" and "keep-alive" in connection)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._chunked()
        elif "content-length" in headers:
            try:
                size = int(headers["content-length"])
            except ValueError:
                raise ProtocolError("bad Content-Length") from None
            body = reader.read(size)
            if len(body) != size:
                raise ProtocolError("connection closed within the answer")
        elif status in (204, 304):
            body = b""
        else:
            body = reader.read()
            self.reusable = False
        return status, headers, body

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = self._reader.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                raise ProtocolError("header line too long")
            if line in (b"\r\n", b"\n", b""):
                if not line:
                    raise ProtocolError("connection closed within the headers")
                return headers
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise ProtocolError("bad header line")
            headers[name.strip().lower()] = value.strip()
        raise ProtocolError("too many headers")

    def _chunked(self) -> bytes:
        reader = self._reader
        parts: list[bytes] = []
        while True:
            line = reader.readline(MAX_LINE + 1)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError("bad chunk size") from None
            if size == 0:
                while reader.readline(MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            chunk = reader.read(size)
            if len(chunk) != size or reader.readline(MAX_LINE + 1) not in (b"\r\n", b"\n"):
                raise ProtocolError("connection closed within a chunk")
            parts.append(chunk)

    def dropped(self) -> bool:
        """Whether this idle connection can no longer be used (readable: closed by the server,
        or data nobody asked for)."""
        if self.sock.fileno() < 0:
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        self._reader.close()
        self.sock.close()


class ConnectionPool:
    """Keep-alive connections to one endpoint, shared by threads.

    A connection is taken for one request and answer, and put back when the server keeps it
    open; before reuse, an idle connection that became readable (the server closed it, or sent
    something unasked) is dropped, as urllib3 does. ``post`` raises the botocore exception
    boto3's urllib3 session raises for the same failure.
    """

    def __init__(self, endpoint: Endpoint, *, connect_timeout_s: float, read_timeout_s: float,
                 ssl_context: ssl.SSLContext | None) -> None:
        self.endpoint = endpoint
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._ssl = ssl_context
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self.connections_made = 0  # for tests and the bench

    def _connect(self) -> Connection:
        e = self.endpoint
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((e.host, e.port), timeout=self._connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if e.scheme == "https":
                context = self._ssl or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=e.host)
        except ssl.SSLError as exc:
            _close(sock)
            raise botocore.exceptions.SSLError(endpoint_url=e.url, error=exc) from exc
        except TimeoutError as exc:
            _close(sock)
            raise botocore.exceptions.ConnectTimeoutError(endpoint_url=e.url,
                                                          error=exc) from exc
        except OSError as exc:
            _close(sock)
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=e.url,
                                                              error=exc) from exc
        sock.settimeout(self._read_timeout)
        self.connections_made += 1
        return Connection(sock)

    def _take(self) -> Connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if not conn.dropped():
                return conn
            conn.close()

    def _give_back(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def post(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """One request (``request_bytes``): (status, headers with lower-case names, body)."""
        conn = self._take()
        try:
            answer = conn.exchange(request)
        except ssl.SSLError as exc:
            conn.close()
            raise botocore.exceptions.SSLError(endpoint_url=self.endpoint.url,
                                               error=exc) from exc
        except TimeoutError as exc:
            conn.close()
            raise botocore.exceptions.ReadTimeoutError(endpoint_url=self.endpoint.url,
                                                       error=exc) from exc
        except (ProtocolError, OSError) as exc:
            conn.close()
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=self.endpoint.url,
                                                            error=exc) from exc
        except BaseException:
            conn.close()
            raise
        if conn.reusable:
            self._give_back(conn)
        else:
            conn.close()
        return answer

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


def request_bytes(target: str, headers: dict[str, str], body: bytes) -> bytes:
    """An HTTP/1.1 POST as one buffer (``headers`` include ``Host``)."""
    lines = [f"POST {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class LeanApplyGuardrail:
    """Blocking ApplyGuardrail calls; thread-safe. See the module docstring."""

    def __init__(
        self,
        *,
        endpoint_url: str,
        region: str,
        signing_name: str,
        credentials: CredentialSource,
        operation_model: Any,
        ssl_context: ssl.SSLContext | None,
        timeout_s: float,
        connect_timeout_s: float,
        max_attempts: int = 1,
        user_agent: str = "guardrail-extproc (lean)",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.endpoint = Endpoint.parse(endpoint_url)
        self.endpoint_url = endpoint_url
        self.region = region
        self.max_attempts = max_attempts
        self._signing_name = signing_name
        self._credentials = credentials
        self._operation = operation_model
        self._parser = botocore.parsers.RestJSONParser()
        self._user_agent = user_agent
        self._sleep = sleep
        self._pool = ConnectionPool(self.endpoint, connect_timeout_s=connect_timeout_s,
                                    read_timeout_s=timeout_s, ssl_context=ssl_context)
        # ``Host`` as botocore signs it (the port only when it is not the scheme's default).
        default_port = 443 if self.endpoint.scheme == "https" else 80
        host = f"[{self.endpoint.host}]" if ":" in self.endpoint.host else self.endpoint.host
        self._host = host if self.endpoint.port == default_port else f"{host}:{self.endpoint.port}"

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    def signed_headers(self, path: str, body: bytes) -> dict[str, str]:
        """The headers of one request, signed with SigV4 by botocore (the credentials are
        frozen per request, which refreshes them when they are about to expire)."""
        url = self.endpoint.url + path
        request = botocore.awsrequest.AWSRequest(
            method="POST", url=url, data=body,
            headers={"Content-Type": "application/json", "User-Agent": self._user_agent})
        botocore.auth.SigV4Auth(self._credentials.get_frozen_credentials(),
                                self._signing_name, self.region).add_auth(request)
        headers = dict(request.headers.items())
        headers["Host"] = self._host
        return headers

    def call(self, path: str, body: bytes) -> bytes:
        """One ApplyGuardrail call (``path`` from ``apply_path``, ``body`` from ``apply_body``):
        the answer's body, or a ``GuardrailError``."""
        attempt = 1
        while True:
            try:
                return self._attempt(path, body)
            except GuardrailError as error:
                if attempt >= self.max_attempts or not _retryable(error):
                    raise
            attempt += 1
            self._sleep(random.random() * min(MAX_BACKOFF_S, 2.0 ** (attempt - 2)))

    def _attempt(self, path: str, body: bytes) -> bytes:
        request = request_bytes(self.endpoint.prefix + path, self.signed_headers(path, body),
                                body)
        try:
            status, response_headers, data = self._pool.post(request)
        except botocore.exceptions.BotoCoreError as exc:
            from extproc.guardrail.bedrock import map_boto_error  # (imports this module)

            error = map_boto_error(exc)
            assert error is not None
            raise error from exc
        if 200 <= status < 300:
            return data
        raise self.error_for(status, response_headers, data)

    def error_for(self, status: int, headers: dict[str, str], body: bytes) -> GuardrailError:
        """The error of an error answer: botocore's rest-json parser reads it as boto3 does
        (code from ``x-amzn-ErrorType`` or the body), then ``map_client_error``."""
        from extproc.guardrail.bedrock import map_client_error  # (imports this module)

        lowered = {name.lower(): value for name, value in headers.items()}
        try:
            parsed = self._parser.parse(
                {"status_code": status, "headers": lowered, "body": body},
                self._operation.output_shape)
        except Exception as exc:  # noqa: BLE001 - botocore's parser fails as it may
            return GuardrailServerError(f"unreadable ApplyGuardrail error answer ({status}): "
                                        f"{type(exc).__name__}")
        return map_client_error(botocore.exceptions.ClientError(parsed, OPERATION))

    def close(self) -> None:
        self._pool.close()


def _retryable(error: GuardrailError) -> bool:
    """botocore's standard mode retries throttles, 5xx and connection errors; never oversize
    input or rejections."""
    return not isinstance(error, (GuardrailInputTooLarge, GuardrailRejected))
