"""``--workers N``: N processes share one port; SIGTERM drains them all; exit 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import WAIT_S, wait_until

LISTENING = re.compile(r"guardrail-extproc listening on 127\.0\.0\.1:(\d+)")


def env() -> dict[str, str]:
    values = dict(os.environ)
    values.update(AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x",
                  AWS_ENDPOINT_URL_BEDROCK_RUNTIME="http://127.0.0.1:9", PYTHONUNBUFFERED="1")
    return values


def wait_for_ports(log: Path, count: int, proc: subprocess.Popen[bytes]) -> list[int]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        ports = [int(p) for p in LISTENING.findall(log.read_text(errors="replace"))]
        if len(ports) >= count:
            return ports
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError(f"workers not up:\n{log.read_text()}")


def pids_of_workers(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def start_workers(log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m extproc --workers 2`` on a free port, its output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "extproc", "--workers", "2", "--listen", "127.0.0.1:0",
             "--metrics-listen", "off", "--guardrail-id", "testguardrail", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env())


def test_workers_share_one_port_and_drain_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "workers.log"
    proc = start_workers(log, "--grace-period", "5")
    try:
        ports = wait_for_ports(log, 2, proc)
        assert len(set(ports)) == 1, ports  # one port, two processes
        workers = pids_of_workers(proc.pid)
        assert len(workers) == 2
        for _ in range(6):  # new connections: the kernel spreads them over the workers
            with grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or \
                "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        assert log.read_text().count('"stopped"') + log.read_text().count(": stopped") >= 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_dead_worker_is_restarted(tmp_path: Path) -> None:
    log = tmp_path / "workers.log"
    proc = start_workers(log)
    try:
        wait_for_ports(log, 2, proc)
        first = pids_of_workers(proc.pid)
        os.kill(first[0], signal.SIGKILL)
        ports = wait_for_ports(log, 3, proc)
        assert len(set(ports)) == 1
        assert first[0] not in pids_of_workers(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sighup_reloads_the_configuration_in_every_worker(tmp_path: Path) -> None:
    """The supervisor passes SIGHUP on; each worker reads the file again (no polling here)."""
    config = tmp_path / "config.yaml"
    config.write_text("shadow: off\n")
    log = tmp_path / "workers.log"
    proc = start_workers(log, "--config", str(config), "--config-poll-interval", "0")
    try:
        wait_for_ports(log, 2, proc)
        config.write_text("shadow: on\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: log.read_text(errors="replace").count(
            "configuration reloaded (SIGHUP)") == 2, what="both workers to reload")
        assert proc.poll() is None and len(pids_of_workers(proc.pid)) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
