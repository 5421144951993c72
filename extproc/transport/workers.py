"""``--workers N``: N server processes on one port, so the sidecar uses more than one core.

The supervisor reserves the port (binding it with SO_REUSEPORT without listening, so port 0
resolves to one real port), starts N copies of itself with ``--workers 1 --reuse-port on`` on
that port, restarts a worker that dies, and on SIGTERM/SIGINT passes the signal on and waits:
each worker drains on its own (NOT_SERVING, drain delay, grace period). SIGHUP is passed on
too: each worker reads the configuration file again (``extproc.settings.reload``). The kernel
spreads new connections across the workers; Envoy keeps few HTTP/2 connections per cluster, so
cap streams per connection on the sidecar cluster (``max_concurrent_streams``) to spread them.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from extproc.settings.values import Settings

log = logging.getLogger("extproc.workers")

RESTART_BACKOFF_S = 1.0


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket holding ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def worker_argv(argv: Sequence[str], settings: Settings, port: int, index: int) -> list[str]:
    listen_host = settings.server.listen_host
    host = f"[{listen_host}]" if ":" in listen_host else listen_host
    args = [sys.executable, "-m", "extproc", *argv, "--workers", "1", "--reuse-port", "on",
            "--listen", f"{host}:{port}"]
    address = settings.server.metrics_address
    if address is not None and address[1] != 0:
        metrics_host = f"[{address[0]}]" if ":" in address[0] else address[0]
        args += ["--metrics-listen", f"{metrics_host}:{address[1] + index}"]
    return args


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.server.workers`` workers until a signal; 0 when every worker stopped
    cleanly."""
    try:
        reserved = reserve_port(settings.server.listen_host, settings.server.listen_port)
    except OSError as exc:
        print(f"guardrail-extproc: configuration error: --listen {settings.server.listen}: cannot "
              f"bind ({exc.strerror})", file=sys.stderr)
        return 2
    port = reserved.getsockname()[1]
    stopping = False
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP  # SIGHUP: reload, passed on
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    workers: list[subprocess.Popen[bytes]] = [
        subprocess.Popen(worker_argv(argv, settings, port, i))
        for i in range(settings.server.workers)
    ]
    log.info("guardrail-extproc supervisor: %d workers on port %d", settings.server.workers, port)
    restarts: dict[int, float] = {}
    forwarded = 0
    try:
        while True:
            while forwarded < len(received):
                for worker in workers:
                    if worker.poll() is None:
                        worker.send_signal(received[forwarded])
                forwarded += 1
            if stopping and all(w.poll() is not None for w in workers):
                break
            for index, worker in enumerate(workers):
                code = worker.poll()
                if code is None or stopping:
                    continue
                if code == 2:
                    log.error("worker %d exited with a configuration error; stopping", index)
                    stopping = True
                    received.append(signal.SIGTERM)
                    break
                if time.monotonic() - restarts.get(index, 0.0) < RESTART_BACKOFF_S:
                    continue
                log.warning("worker %d exited with %d; restarting it", index, code)
                restarts[index] = time.monotonic()
                workers[index] = subprocess.Popen(worker_argv(argv, settings, port, index))
            time.sleep(0.05)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        reserved.close()
    codes = [w.returncode for w in workers]
    return 0 if all(code == 0 for code in codes) else max(code for code in codes if code != 0)
