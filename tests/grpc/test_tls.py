"""TLS and mTLS on the gRPC listener, with certificates made for the test."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.domain.errors import ConfigError
from extproc.settings.options import load_settings
from extproc.transport.server import start_server
from tests.support import WAIT_S, FakeGuardrail, settings


def make_cert(name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
              ca: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_cert("test-ca", None, ca=True)
    server = make_cert("localhost", ca, ca=False)
    client = make_cert("envoy", ca, ca=False)
    files = {"ca": pem(ca[0]), "server": pem(server[0]), "server_key": key_pem(server[1]),
             "client": pem(client[0]), "client_key": key_pem(client[1])}
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


async def health_check(port: int, credentials: grpc.ChannelCredentials) -> int:
    options = (("grpc.ssl_target_name_override", "localhost"),)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S)
        return int(answer.status)


async def test_tls_listener_serves_a_verified_client(pki: dict[str, Path]) -> None:
    running = await start_server(settings(listen_host="127.0.0.1", listen_port=0,
                                          tls_cert=str(pki["server"]),
                                          tls_key=str(pki["server_key"])), FakeGuardrail())
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        assert await health_check(running.port, credentials) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.server.stop(0)


async def test_mtls_rejects_a_client_without_a_certificate(pki: dict[str, Path]) -> None:
    running = await start_server(settings(
        listen_host="127.0.0.1", listen_port=0, tls_cert=str(pki["server"]),
        tls_key=str(pki["server_key"]), tls_client_ca=str(pki["ca"])), FakeGuardrail())
    try:
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=pki["ca"].read_bytes(), private_key=pki["client_key"].read_bytes(),
            certificate_chain=pki["client"].read_bytes())
        assert await health_check(running.port, with_cert) == \
            health_pb2.HealthCheckResponse.SERVING
        without = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_check(running.port, without)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.server.stop(0)


def test_tls_settings_are_validated(pki: dict[str, Path], tmp_path: Path) -> None:
    base = ["--guardrail-id", "abc"]
    with pytest.raises(ConfigError, match="go together"):
        load_settings([*base, "--tls-cert", str(pki["server"])], {})
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        load_settings([*base, "--tls-client-ca", str(pki["ca"])], {})
    with pytest.raises(ConfigError, match="--tls-key: cannot read"):
        load_settings([*base, "--tls-cert", str(pki["server"]), "--tls-key",
                       str(tmp_path / "missing.pem")], {})
