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

import http.client
import json
import logging
import random
import select
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

from extproc.domain.errors import (
    GuardrailError,
    GuardrailInputTooLarge,
    GuardrailRejected,
    GuardrailServerError,
)

log = logging.getLogger(__name__)

OPERATION: Final = "ApplyGuardrail"
#: The most connections kept idle per pool (more may be open while calls are in flight).
MAX_IDLE: Final = 64
#: botocore's standard retry mode: the longest backoff, seconds.
MAX_BACKOFF_S: Final = 20.0


class FrozenCredentials(Protocol):
    access_key: str
    secret_key: str
    token: str | None


class CredentialSource(Protocol):
    """botocore's ``Credentials`` / ``RefreshableCredentials``."""

    def get_frozen_credentials(self) -> Any: ...


def apply_path(guardrail_id: str, version: str) -> str:
    """The request path of ApplyGuardrail, labels encoded as botocore's rest-json serialiser
    encodes them (an ARN's ``:`` and ``/`` included)."""
    return f"/guardrail/{percent_encode(guardrail_id)}/version/{percent_encode(version)}/apply"


def apply_body(source: str, texts: Sequence[str]) -> bytes:
    """The request body of ApplyGuardrail: compact JSON, built once (``ensure_ascii`` as
    botocore, so lone surrogates are escaped rather than fail to encode)."""
    return json.dumps({"source": source, "content": [{"text": {"text": t}} for t in texts]},
                      separators=(",", ":")).encode()


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


class ConnectionPool:
    """Keep-alive ``http.client`` connections to one endpoint, shared by threads.

    A connection is taken for one request and answer, and put back when the server keeps it
    open; before reuse, an idle connection that became readable (the server closed it, or sent
    something unasked) is dropped. ``post`` raises the botocore exception boto3's urllib3
    session raises for the same failure.
    """

    def __init__(self, endpoint: Endpoint, *, connect_timeout_s: float, read_timeout_s: float,
                 ssl_context: ssl.SSLContext | None) -> None:
        self.endpoint = endpoint
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._ssl = ssl_context
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self.connections_made = 0  # for tests and the bench

    def _connect(self) -> http.client.HTTPConnection:
        e = self.endpoint
        conn: http.client.HTTPConnection
        if e.scheme == "https":
            conn = http.client.HTTPSConnection(e.host, e.port, timeout=self._connect_timeout,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(e.host, e.port, timeout=self._connect_timeout)
        try:
            conn.connect()  # sets TCP_NODELAY
        except ssl.SSLError as exc:
            conn.close()
            raise botocore.exceptions.SSLError(endpoint_url=e.url, error=exc) from exc
        except TimeoutError as exc:
            conn.close()
            raise botocore.exceptions.ConnectTimeoutError(endpoint_url=e.url,
                                                          error=exc) from exc
        except OSError as exc:
            conn.close()
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=e.url,
                                                              error=exc) from exc
        assert conn.sock is not None
        conn.sock.settimeout(self._read_timeout)
        self.connections_made += 1
        return conn

    def _take(self) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if not _dropped(conn):
                return conn
            conn.close()

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def post(self, target: str, headers: dict[str, str],
             body: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One POST: (status, headers, body)."""
        conn = self._take()
        try:
            conn.request("POST", target, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except ssl.SSLError as exc:
            conn.close()
            raise botocore.exceptions.SSLError(endpoint_url=self.endpoint.url,
                                               error=exc) from exc
        except TimeoutError as exc:
            conn.close()
            raise botocore.exceptions.ReadTimeoutError(endpoint_url=self.endpoint.url,
                                                       error=exc) from exc
        except (http.client.HTTPException, OSError) as exc:
            conn.close()
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=self.endpoint.url,
                                                            error=exc) from exc
        except BaseException:
            conn.close()
            raise
        if response.will_close:
            conn.close()
        else:
            self._give_back(conn)
        return response.status, response.headers, data

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle keep-alive connection can no longer be used (readable: closed by the
    server, or data nobody asked for)."""
    sock = conn.sock
    if sock is None:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


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
        self._host = (self.endpoint.host if self.endpoint.port == default_port
                      else f"{self.endpoint.host}:{self.endpoint.port}")

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
        headers = self.signed_headers(path, body)
        try:
            status, response_headers, data = self._pool.post(self.endpoint.prefix + path,
                                                             headers, body)
        except botocore.exceptions.BotoCoreError as exc:
            from extproc.guardrail.bedrock import map_boto_error  # (imports this module)

            error = map_boto_error(exc)
            assert error is not None
            raise error from exc
        if 200 <= status < 300:
            return data
        raise self.error_for(status, response_headers, data)

    def error_for(self, status: int, headers: http.client.HTTPMessage | dict[str, str],
                  body: bytes) -> GuardrailError:
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
