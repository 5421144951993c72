"""The lean ApplyGuardrail client (``extproc.guardrail.lean``) against boto3's: the same SigV4
signature for the same request, credentials and time; the same error class and message for
every failure LocalBedrock injects; credentials refreshed as botocore refreshes them; HTTP
answers read right (chunked, ``Connection: close``, a kept-alive connection the server
dropped); and the same verdicts and errors through both clients, in a thread pool and in the
call process."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import botocore.session
import pytest

from extproc.domain.errors import (
    GuardrailError,
    GuardrailInputTooLarge,
    GuardrailRejected,
    GuardrailServerError,
    GuardrailThrottled,
    GuardrailTimeout,
)
from extproc.domain.values import Source
from extproc.domain.verdict import Outcome
from extproc.guardrail.bedrock import (
    BedrockGuardrailClient,
    apply_request,
    boto3_client,
    lean_client,
    map_boto_error,
)
from extproc.guardrail.lean import (
    OPERATION,
    LeanApplyGuardrail,
    apply_body,
    apply_path,
    parse_answer,
)
from extproc.guardrail.parent import CallProcess
from extproc.localbedrock import LocalBedrock, default_policy
from extproc.localbedrock.server import ERROR_KINDS
from extproc.settings.values import GuardrailCalls, GuardrailClientKind
from tests.grpc.test_tls import key_pem, make_cert, pem
from tests.support import settings

GUARDRAIL = settings().guardrail
# botocore reads naive UTC times (get_current_datetime drops the tzinfo)
FROZEN = datetime.datetime(2026, 3, 14, 15, 9, 26, tzinfo=datetime.UTC).replace(tzinfo=None)
ARN = "arn:aws:bedrock:us-east-1:123456789012:guardrail/abc123def456"
OK_ANSWER = {"action": "NONE", "outputs": [], "assessments": [],
             "usage": {"topicPolicyUnits": 1}}


@pytest.fixture
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's signers (boto3's and the lean client's) read this time."""
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *_, **__: FROZEN)


# ----------------------------------------------------------------- a scripted HTTP server


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Script:
    """What the server answers: raw bytes per request (default: a 200 with ``OK_ANSWER``)."""

    answers: list[bytes] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    #: Close the connection after the next answer without saying so in it.
    close_silently: bool = False
    #: Set once the server closed a connection.
    closed: threading.Event = field(default_factory=threading.Event)


def http_answer(status: int, body: bytes, headers: dict[str, str] | None = None,
                reason: str = "X") -> bytes:
    head = [f"HTTP/1.1 {status} {reason}"]
    all_headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
                   **(headers or {})}
    head += [f"{k}: {v}" for k, v in all_headers.items() if v]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


OK_BYTES = http_answer(200, json.dumps(OK_ANSWER).encode())


@pytest.fixture
def scripted() -> Iterator[tuple[str, Script]]:
    """A keep-alive HTTP/1.1 server on 127.0.0.1, port 0, that records each request and writes
    the next scripted answer as raw bytes (then closes when the answer says ``close``)."""
    with serve(Script()) as served:
        yield served


@contextlib.contextmanager
def serve(script: Script, tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, Script]]:

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            script.connections += 1

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            script.seen.append(Seen("POST", self.path,
                                    {k.lower(): v for k, v in self.headers.items()}, body))
            answer = script.answers.pop(0) if script.answers else OK_BYTES
            self.wfile.write(answer)
            self.wfile.flush()
            if script.close_silently or b"Connection: close" in answer.split(b"\r\n\r\n")[0]:
                script.close_silently = False
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def shutdown_request(self, request: Any) -> None:
            super().shutdown_request(request)
            script.closed.set()

    server = Server(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        yield (f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"), script
    finally:
        server.shutdown()
        server.server_close()


def make_lean(url: str, credentials: Any = None, **kwargs: Any) -> LeanApplyGuardrail:
    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    return LeanApplyGuardrail(
        endpoint_url=url, region="us-east-1", signing_name=model.signing_name,
        credentials=credentials or botocore.credentials.Credentials("AKIDTEST", "s3cr3t"),
        operation_model=model.operation_model(OPERATION), ssl_context=None,
        timeout_s=kwargs.pop("timeout_s", 5.0), connect_timeout_s=2.0, **kwargs)


# ----------------------------------------------------------------- SigV4, checked from outside


def sigv4_expected(seen: Seen, secret: str) -> str:
    """The signature of a received request, computed from the wire as AWS's SigV4 description
    says (an independent check of both clients' signers)."""
    auth = seen.headers["authorization"]
    parts = dict(item.strip().split("=", 1) for item in auth.split(" ", 1)[1].split(","))
    _, date, region, service, _ = parts["Credential"].split("/")
    signed = parts["SignedHeaders"].split(";")
    canonical = "\n".join([
        seen.method,
        quote(seen.path, safe="/~"),  # every service but S3: the encoded path encoded again
        "",
        "".join(f"{name}:{' '.join(seen.headers[name].split())}\n" for name in signed),
        ";".join(signed),
        hashlib.sha256(seen.body).hexdigest(),
    ])
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", seen.headers["x-amz-date"], scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def signature_of(seen: Seen) -> str:
    return seen.headers["authorization"].rsplit("Signature=", 1)[1]


def test_lean_signature_equals_botocores_for_the_same_request(
        aws_env: None, frozen_time: None, scripted: tuple[str, Script],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, script = scripted
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", url)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "the-session-token")
    texts = ["héllo \U0001f30d", "second text"]
    boto = boto3_client("us-east-1", threads=1, timeout_s=5, max_attempts=1)
    boto.apply_guardrail(**apply_request(ARN, "DRAFT", "OUTPUT", texts))
    boto.close()
    lean = lean_client("us-east-1", threads=1, timeout_s=5, max_attempts=1)
    assert lean is not None
    lean.call(apply_path(ARN, "DRAFT"), apply_body("OUTPUT", texts))
    lean.close()  # (its connections; signing needs none)
    by_boto, by_lean = script.seen
    # The same target (the ARN's ':' and '/' encoded as botocore encodes URI labels), time,
    # credential scope and session token; the same body, as JSON.
    assert by_lean.path == by_boto.path == f"/guardrail/{quote(ARN, safe='')}/version/DRAFT/apply"
    assert json.loads(by_lean.body) == json.loads(by_boto.body)
    for name in ("x-amz-date", "x-amz-security-token", "host", "content-type"):
        assert by_lean.headers[name] == by_boto.headers[name], name
    scope = "Credential=testing/20260314/us-east-1/bedrock/aws4_request"
    assert scope in by_lean.headers["authorization"]
    assert scope in by_boto.headers["authorization"]
    # Both signatures are right, checked from the wire with the secret.
    assert signature_of(by_boto) == sigv4_expected(by_boto, "testing")
    assert signature_of(by_lean) == sigv4_expected(by_lean, "testing")
    # boto3 signs the same headers as the lean client (its amz-sdk-* ones are added after
    # signing): for boto3's own body (botocore's JSON spacing), the lean client's
    # Authorization header is boto3's, character for character.
    assert by_boto.headers["authorization"].split("SignedHeaders=")[1].startswith(
        "content-type;host;x-amz-date;x-amz-security-token,")
    assert lean.signed_headers(by_boto.path, by_boto.body)["Authorization"] == \
        by_boto.headers["authorization"]


def test_lean_signature_equals_botocore_sigv4auth_exactly(frozen_time: None) -> None:
    """The lean client's headers for a request are exactly botocore's SigV4Auth over the same
    AWSRequest (same credentials, frozen time)."""
    lean = make_lean("https://bedrock-runtime.us-east-1.amazonaws.com")
    body = apply_body("INPUT", ["hello"])
    path = apply_path("abc123", "1")
    headers = lean.signed_headers(path, body)
    reference = botocore.awsrequest.AWSRequest(
        method="POST", url="https://bedrock-runtime.us-east-1.amazonaws.com" + path, data=body,
        headers={"Content-Type": "application/json", "User-Agent": headers["User-Agent"]})
    botocore.auth.SigV4Auth(botocore.credentials.Credentials("AKIDTEST", "s3cr3t"), "bedrock",
                            "us-east-1").add_auth(reference)
    assert headers["Authorization"] == reference.headers["Authorization"]
    assert headers["X-Amz-Date"] == "20260314T150926Z"
    assert headers["Host"] == "bedrock-runtime.us-east-1.amazonaws.com"
    lean.close()


def test_a_tampered_request_does_not_verify(frozen_time: None,
                                            scripted: tuple[str, Script]) -> None:
    # The verifier above can say no: the check is not vacuous.
    url, script = scripted
    lean = make_lean(url)
    lean.call(apply_path("abc", "1"), apply_body("INPUT", ["hello"]))
    seen = script.seen[0]
    assert signature_of(seen) == sigv4_expected(seen, "s3cr3t")
    tampered = Seen(seen.method, seen.path, seen.headers, seen.body.replace(b"hello", b"hellO"))
    assert signature_of(tampered) != sigv4_expected(tampered, "s3cr3t")
    lean.close()


# ----------------------------------------------------------------- credentials


def test_expiring_credentials_are_refreshed_before_signing(
        scripted: tuple[str, Script]) -> None:
    url, script = scripted
    now = datetime.datetime.now(datetime.UTC)
    issued: list[str] = []

    def refresh() -> dict[str, str]:
        n = len(issued) + 1
        issued.append(f"AKIDNEW{n}")
        return {"access_key": f"AKIDNEW{n}", "secret_key": f"secret{n}",
                "token": f"token{n}", "expiry_time": (now + datetime.timedelta(hours=1)).isoformat()}

    credentials = botocore.credentials.RefreshableCredentials.create_from_metadata(
        metadata={"access_key": "AKIDOLD", "secret_key": "old", "token": "oldtoken",
                  # within botocore's mandatory refresh window (10 minutes)
                  "expiry_time": (now + datetime.timedelta(minutes=2)).isoformat()},
        refresh_using=refresh, method="test")
    lean = make_lean(url, credentials)
    lean.call(apply_path("abc", "1"), apply_body("INPUT", ["one"]))
    lean.call(apply_path("abc", "1"), apply_body("INPUT", ["two"]))
    first, second = script.seen
    assert issued == ["AKIDNEW1"]  # refreshed once, then good for an hour
    for seen in (first, second):
        assert "Credential=AKIDNEW1/" in seen.headers["authorization"]
        assert seen.headers["x-amz-security-token"] == "token1"
        assert signature_of(seen) == sigv4_expected(seen, "secret1")
    lean.close()


# ----------------------------------------------------------------- errors: as boto3 maps them


def boto3_error(client: Any, texts: list[str]) -> GuardrailError:
    try:
        client.apply_guardrail(**apply_request("testguardrail", "1", "INPUT", texts))
    except Exception as exc:  # noqa: BLE001 - mapped below, as the sidecar does
        error = map_boto_error(exc)
        assert error is not None, exc
        return error
    raise AssertionError("boto3's call did not fail")


def lean_error(lean: LeanApplyGuardrail, texts: list[str]) -> GuardrailError:
    with pytest.raises(GuardrailError) as info:
        lean.call(apply_path("testguardrail", "1"), apply_body("INPUT", texts))
    return info.value


EXPECTED_CLASS = {
    "throttle": GuardrailThrottled, "throttle_text_units": GuardrailThrottled,
    "too_large": GuardrailInputTooLarge, "internal": GuardrailServerError,
    "unavailable": GuardrailServerError, "access_denied": GuardrailRejected,
    "not_found": GuardrailRejected, "validation": GuardrailRejected,
    "service_quota": GuardrailRejected, "hang": GuardrailTimeout,
}


@pytest.mark.parametrize("kind", list(ERROR_KINDS))
def test_every_injected_error_maps_to_the_same_error_as_boto3s(
        bedrock: LocalBedrock, kind: str) -> None:
    timeout = 0.3 if kind == "hang" else 5.0
    boto = boto3_client("us-east-1", threads=1, timeout_s=timeout, max_attempts=1)
    lean = lean_client("us-east-1", threads=1, timeout_s=timeout, max_attempts=1)
    assert lean is not None
    try:
        bedrock.inject_error(kind, count=2)
        by_boto = boto3_error(boto, ["hello"])
        by_lean = lean_error(lean, ["hello"])
        assert type(by_lean) is type(by_boto) is EXPECTED_CLASS[kind]
        if kind != "hang":  # (a timeout's message names botocore's exception: equal too)
            # The message carries the request id LocalBedrock makes up per call: compare
            # what precedes it.
            assert str(by_lean).split("requestId")[0] == str(by_boto).split("requestId")[0]
        else:
            assert str(by_lean) == str(by_boto) == "ReadTimeoutError"
    finally:
        bedrock.clear_error()
        boto.close()
        lean.close()


def test_connection_refused_is_a_server_error_as_with_boto3(
        aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalBedrock(default_policy(), port=0) as lb:
        url = lb.url  # a port nobody listens on once it is stopped
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", url)
    boto = boto3_client("us-east-1", threads=1, timeout_s=2, max_attempts=1)
    lean = lean_client("us-east-1", threads=1, timeout_s=2, max_attempts=1)
    assert lean is not None
    by_boto, by_lean = boto3_error(boto, ["hi"]), lean_error(lean, ["hi"])
    assert type(by_lean) is type(by_boto) is GuardrailServerError
    assert str(by_lean).startswith("EndpointConnectionError: Could not connect")
    assert str(by_lean).split(":")[0] == str(by_boto).split(":")[0]
    boto.close()
    lean.close()


@pytest.mark.parametrize(("answer", "expected"), [
    # no x-amzn-ErrorType: the code comes from the body, as botocore reads it
    (http_answer(400, b'{"__type": "ValidationException", "message": "bad"}'),
     GuardrailRejected),
    (http_answer(429, b'{"message": "Input text size (30 text units) exceeds the maximum '
                      b'allowed (25 text units)"}'), GuardrailInputTooLarge),
    (http_answer(429, b""), GuardrailThrottled),
    (http_answer(502, b"<html>bad gateway</html>", {"Content-Type": "text/html"}),
     GuardrailServerError),
    (http_answer(403, b"not json at all", {"x-amzn-ErrorType": "AccessDeniedException:http"}),
     GuardrailRejected),
])
def test_error_answers_without_the_usual_shape_map_as_boto3_maps_them(
        aws_env: None, scripted: tuple[str, Script], monkeypatch: pytest.MonkeyPatch,
        answer: bytes, expected: type[GuardrailError]) -> None:
    url, script = scripted
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", url)
    script.answers += [answer, answer]
    boto = boto3_client("us-east-1", threads=1, timeout_s=5, max_attempts=1)
    lean = lean_client("us-east-1", threads=1, timeout_s=5, max_attempts=1)
    assert lean is not None
    by_boto, by_lean = boto3_error(boto, ["x"]), lean_error(lean, ["x"])
    assert type(by_lean) is type(by_boto) is expected
    assert str(by_lean) == str(by_boto)
    boto.close()
    lean.close()


@pytest.mark.parametrize("answer", [
    b"SMTP ready\r\n\r\n",  # not HTTP
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",  # header line too long
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"action\"",  # cut short, closed
    b"",  # closed without an answer
])
async def test_broken_answers_are_server_errors_as_with_boto3(
        aws_env: None, scripted: tuple[str, Script], monkeypatch: pytest.MonkeyPatch,
        answer: bytes) -> None:
    # Through the sidecar's client, as the failure policy sees them. (boto3 reads a body cut
    # short as an answer without an action; the lean client as a closed connection: both are
    # server errors.)
    url, script = scripted
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", url)
    for kind in GuardrailClientKind:
        client = BedrockGuardrailClient(
            settings(aws_region="us-east-1", guardrail_calls=GuardrailCalls.THREAD,
                     guardrail_client=kind), max_attempts=1, attempt_timeout_s=5)
        try:
            assert client.client_kind is kind
            script.answers.append(answer)
            script.close_silently = True
            with pytest.raises(GuardrailServerError):
                await client.apply(GUARDRAIL, Source.INPUT, ["x"])
            # and the next call, on a new connection, works
            verdict = await client.apply(GUARDRAIL, Source.INPUT, ["x"])
            assert verdict.outcome is Outcome.PASS
        finally:
            client.close()


def test_a_2xx_answer_that_is_not_a_json_object_is_a_server_error() -> None:
    for body in (b"<html>", b"[1, 2]", b""):
        with pytest.raises(GuardrailServerError):
            parse_answer(body)
    assert parse_answer(b'{"action": "NONE"}') == {"action": "NONE"}


# ----------------------------------------------------------------- HTTP and keep-alive


def test_calls_share_one_kept_alive_connection(scripted: tuple[str, Script]) -> None:
    url, script = scripted
    lean = make_lean(url)
    for _ in range(5):
        assert parse_answer(lean.call(apply_path("a", "1"), apply_body("INPUT", ["x"])))
    assert script.connections == 1 and lean.pool.connections_made == 1
    lean.close()


def test_chunked_and_closing_answers_are_read_and_the_next_call_reconnects(
        scripted: tuple[str, Script]) -> None:
    url, script = scripted
    body = json.dumps(OK_ANSWER).encode()
    chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7])
                          for i in range(0, len(body), 7))
               + b"0\r\n\r\n")
    script.answers += [chunked, http_answer(200, body, {"Connection": "close"})]
    lean = make_lean(url)
    for _ in range(3):
        answer = lean.call(apply_path("a", "1"), apply_body("INPUT", ["x"]))
        assert parse_answer(answer) == OK_ANSWER
    # the chunked answer kept the connection; the closing one did not
    assert lean.pool.connections_made == 2 and script.connections == 2
    lean.close()


def test_a_kept_alive_connection_the_server_closed_is_not_reused(
        scripted: tuple[str, Script]) -> None:
    url, script = scripted
    lean = make_lean(url)
    # The server closes the connection after answering, without saying so in the answer (an
    # idle timeout): the idle connection reads end of file, and the next call must not use it.
    script.close_silently = True
    lean.call(apply_path("a", "1"), apply_body("INPUT", ["x"]))
    assert script.closed.wait(10)
    assert lean.pool._idle[0].dropped()
    assert parse_answer(lean.call(apply_path("a", "1"), apply_body("INPUT", ["y"])))
    assert lean.pool.connections_made == 2
    lean.close()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Script, Path]]:
    """The scripted server over TLS (a certificate for localhost from a test CA)."""
    ca = make_cert("test-ca", None, ca=True)
    cert, key = make_cert("localhost", ca, ca=False)
    (tmp_path / "ca.pem").write_bytes(pem(ca[0]))
    (tmp_path / "server.pem").write_bytes(pem(cert) + key_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem")
    with serve(Script(), context) as (url, script):
        yield url, script, tmp_path / "ca.pem"


def test_tls_is_verified_with_botocores_ca_bundle(
        aws_env: None, tls_server: tuple[str, Script, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, script, ca = tls_server
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", url)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    lean = lean_client("us-east-1", threads=1, timeout_s=5, max_attempts=1)
    assert lean is not None
    assert parse_answer(lean.call(apply_path("a", "1"), apply_body("INPUT", ["x"]))) == OK_ANSWER
    assert script.seen[0].headers["host"] == url.removeprefix("https://")
    lean.close()


def test_an_unverifiable_certificate_fails_as_with_boto3(
        aws_env: None, tls_server: tuple[str, Script, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, script, _ = tls_server  # the test CA is not among the default ones
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", url)
    boto = boto3_client("us-east-1", threads=1, timeout_s=5, max_attempts=1)
    lean = lean_client("us-east-1", threads=1, timeout_s=5, max_attempts=1)
    assert lean is not None
    by_boto, by_lean = boto3_error(boto, ["x"]), lean_error(lean, ["x"])
    assert type(by_lean) is type(by_boto) is GuardrailServerError
    assert str(by_lean).startswith("SSLError: SSL validation failed")
    assert "CERTIFICATE_VERIFY_FAILED" in str(by_lean) and "CERTIFICATE_VERIFY_FAILED" in str(
        by_boto)
    assert script.seen == []
    boto.close()
    lean.close()


def test_a_proxy_for_the_endpoint_makes_the_calls_go_through_boto3(
        bedrock: LocalBedrock, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert lean_client("us-east-1", threads=1, timeout_s=5, max_attempts=1) is None
    client = BedrockGuardrailClient(
        settings(aws_region="us-east-1", guardrail_calls=GuardrailCalls.THREAD,
                 guardrail_client=GuardrailClientKind.LEAN), max_attempts=1)
    assert client.client_kind is GuardrailClientKind.BOTO3
    client.close()


def test_a_bedrock_api_key_makes_the_calls_go_through_boto3(
        bedrock: LocalBedrock, monkeypatch: pytest.MonkeyPatch) -> None:
    # boto3 then sends "Authorization: Bearer ...", not a SigV4 signature
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "an-api-key")
    assert lean_client("us-east-1", threads=1, timeout_s=5, max_attempts=1) is None


def test_an_ipv6_endpoint_is_signed_and_sent_with_a_bracketed_host(frozen_time: None) -> None:
    lean = make_lean("http://[::1]:8443")
    headers = lean.signed_headers(apply_path("a", "1"), apply_body("INPUT", ["x"]))
    assert headers["Host"] == "[::1]:8443"
    reference = botocore.awsrequest.AWSRequest(
        method="POST", url="http://[::1]:8443" + apply_path("a", "1"),
        data=apply_body("INPUT", ["x"]), headers={"Content-Type": "application/json"})
    botocore.auth.SigV4Auth(botocore.credentials.Credentials("AKIDTEST", "s3cr3t"), "bedrock",
                            "us-east-1").add_auth(reference)
    assert headers["Authorization"] == reference.headers["Authorization"]
    lean.close()


def test_max_attempts_retries_transient_errors_like_botocore(
        scripted: tuple[str, Script]) -> None:
    url, script = scripted
    slept: list[float] = []
    script.answers += [http_answer(503, b'{"message": "busy"}',
                                   {"x-amzn-ErrorType": "ServiceUnavailableException"}),
                       http_answer(429, b'{"message": "slow down"}',
                                   {"x-amzn-ErrorType": "ThrottlingException"})]
    lean = make_lean(url, max_attempts=3, sleep=slept.append)
    assert parse_answer(lean.call(apply_path("a", "1"), apply_body("INPUT", ["x"])))
    assert len(script.seen) == 3 and len(slept) == 2
    assert all(0 <= s <= 1 for s in slept[:1]) and all(0 <= s <= 2 for s in slept)
    script.answers.append(http_answer(400, b'{"message": "no"}',
                                      {"x-amzn-ErrorType": "ValidationException"}))
    with pytest.raises(GuardrailRejected):
        lean.call(apply_path("a", "1"), apply_body("INPUT", ["x"]))
    assert len(script.seen) == 4  # a rejection is not retried
    lean.close()


def test_endpoint_url_path_prefix_is_kept(scripted: tuple[str, Script]) -> None:
    url, script = scripted
    lean = make_lean(url + "/proxy/prefix/")
    lean.call(apply_path("a", "1"), apply_body("INPUT", ["x"]))
    assert script.seen[0].path == "/proxy/prefix/guardrail/a/version/1/apply"
    lean.close()


# ----------------------------------------------------------------- through the sidecar's client


async def test_a_request_of_the_other_kind_gets_an_error_answer_not_silence(
        bedrock: LocalBedrock) -> None:
    """Regression guard: a lean call process answers a JSON (boto3) request with an error
    instead of dropping it (the caller would wait for its timeout), and a boto3 one a raw
    request."""
    for kind in ("lean", "boto3"):
        process = CallProcess(region="us-east-1", threads=2, timeout_s=5, max_attempts=1,
                              client=kind)
        try:
            assert process.client == kind
            with pytest.raises(GuardrailServerError, match="BUG"):
                if kind == "lean":
                    await process.call("testguardrail", "1", "INPUT", ["hello"])
                else:
                    await process.call_raw(apply_path("testguardrail", "1"),
                                           apply_body("INPUT", ["hello"]))
        finally:
            process.close()


@pytest.mark.parametrize("calls", list(GuardrailCalls))
@pytest.mark.parametrize("kind", list(GuardrailClientKind))
async def test_both_clients_give_the_same_verdicts_and_errors_both_ways(
        bedrock: LocalBedrock, calls: GuardrailCalls, kind: GuardrailClientKind) -> None:
    client = BedrockGuardrailClient(
        settings(aws_region="us-east-1", guardrail_calls=calls, guardrail_client=kind),
        max_attempts=1, attempt_timeout_s=5)
    try:
        assert client.client_kind is kind
        assert client.endpoint_url == bedrock.url and client.region == "us-east-1"
        clean = await client.apply(GUARDRAIL, Source.OUTPUT, ["The lighthouse is tall."])
        assert clean.outcome is Outcome.PASS and clean.text_units > 0
        blocked = await client.apply(GUARDRAIL, Source.OUTPUT, ["About Project Nightingale."])
        assert blocked.outcome is Outcome.BLOCK
        masked = await client.apply(GUARDRAIL, Source.OUTPUT, ["Mail jane.doe@example.com"])
        assert masked.outcome is Outcome.MASK
        assert masked.outputs == ("Mail {EMAIL}",)
        errors: list[type[GuardrailError]] = []
        for injected in ("throttle", "too_large", "internal", "access_denied"):
            bedrock.inject_error(injected, count=1)
            with pytest.raises(GuardrailError) as info:
                await client.apply(GUARDRAIL, Source.INPUT, ["hello"])
            errors.append(type(info.value))
        assert errors == [GuardrailThrottled, GuardrailInputTooLarge, GuardrailServerError,
                          GuardrailRejected]
        texts = [call.texts for call in bedrock.stats.recent]
        assert texts[:3] == [("The lighthouse is tall.",), ("About Project Nightingale.",),
                             ("Mail jane.doe@example.com",)]
    finally:
        bedrock.clear_error()
        client.close()

