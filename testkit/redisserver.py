"""A real ``redis-server`` (the OS package's) for the shared-state tests and benchmarks.

Listens on a unix socket in its own directory (no port to race for) or, with ``tcp=True``, on
127.0.0.1 and a free port as well (picked by binding port 0; a start that loses the port to
another process is retried). No persistence: a restart starts empty, as a store that lost its
data would. ``stop`` ends it (SIGTERM); ``kill`` is SIGKILL; ``start`` again brings it back on
the same socket and port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from testkit.stack import stop_process, tail

REDIS_SERVER = "/usr/bin/redis-server"


def find_redis_server() -> str | None:
    """The redis-server binary (the OS package's), or None."""
    if Path(REDIS_SERVER).exists():
        return REDIS_SERVER
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process; see the module docstring."""

    def __init__(self, workdir: Path, *, tcp: bool = False, password: str | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) PEM files: the TCP port speaks TLS only (``rediss``)."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path = workdir / "redis.sock"
        self.log_path = workdir / "redis.log"
        self.tcp = tcp or tls is not None
        self.tls = tls
        self.password = password
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        binary = find_redis_server()
        if binary is None:
            raise FileNotFoundError("no redis-server: apt-get install redis-server")
        self.binary = binary

    @property
    def unix_url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket_path}"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` with ``tcp``, else the unix socket's URL."""
        if not self.tcp:
            return self.unix_url
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}localhost:{self.port}/0"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        for attempt in range(3):
            if self.tcp and (self.port == 0 or attempt):
                self.port = _free_port()
            if self._start_once(timeout):
                return self
        raise RuntimeError(f"redis-server did not start:\n{tail(self.log_path)}")

    def _start_once(self, timeout: float) -> bool:
        self.socket_path.unlink(missing_ok=True)
        port = ["--port", str(self.port if self.tcp else 0)]
        if self.tls:
            cert, key = self.tls
            port = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                    "--tls-key-file", str(key), "--tls-auth-clients", "no"]
        args = [self.binary, *port,
                "--bind", "127.0.0.1", "--unixsocket", str(self.socket_path),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--daemonize", "no", "--loglevel", "warning",
                # DEBUG SLEEP: a test blocks the store to see an operation time out.
                "--enable-debug-command", "local"]
        if self.password:
            args += ["--requirepass", self.password]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # e.g. the port was taken meanwhile
            if self._ping():
                return True
            time.sleep(0.01)
        self.stop()
        return False

    def _ping(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(str(self.socket_path))
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: the store vanishes without a goodbye."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
