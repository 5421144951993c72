"""The Kubernetes packaging (``deploy/kustomize``): ``kubectl kustomize`` renders every overlay
(and the optional components), the rendered core resources validate against the Kubernetes API
schemas offline (``kubernetes-validate``, strict: unknown fields are errors), and the rendered
Deployment stays in step with the option table: every flag and ``EXTPROC_*`` variable is known
and its value valid together with the rendered configuration file, probes hit the gRPC port,
one metrics port per worker of the CPU limit, drain timings fit the grace period."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from extproc.settings.options import OPTIONS, build_parser, load_settings
from extproc.settings.values import Settings

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kustomize"
OVERLAYS = sorted(p.parent.name for p in (KUSTOMIZE / "overlays").glob("*/kustomization.yaml"))
COMPONENTS = sorted(p.parent.name for p in (KUSTOMIZE / "components").glob("*/kustomization.yaml"))
# The oldest Kubernetes the manifests are for (the preStop sleep action is on by default from
# 1.30), and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CORE_GROUPS = ("v1", "apps/v1", "policy/v1", "autoscaling/v2")
CONTAINER = "guardrail-extproc"


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("no kubectl (kubectl kustomize renders the manifests; CI machines have it)")
    return path


def render(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def with_components(overlay: str, tmp_path: Path) -> Path:
    """A kustomization of ``overlay`` plus every optional component (kustomize takes only
    relative paths)."""
    def relative(path: Path) -> str:
        return os.path.relpath(path, tmp_path)

    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [relative(KUSTOMIZE / "overlays" / overlay)],
        "components": [relative(KUSTOMIZE / "components" / c) for c in COMPONENTS],
    }))
    return tmp_path


def one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [r for r in resources if r["kind"] == kind]
    return found


def container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    [found] = [c for c in one(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
               if c["name"] == CONTAINER]
    return found


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(KUSTOMIZE / "overlays" / request.param)


def test_the_packaging_has_its_overlays_and_components() -> None:
    assert OVERLAYS == ["envoy", "envoy-gateway", "istio"]
    assert COMPONENTS == ["autoscaling", "service-monitor", "shared-state", "tracing"]


def test_every_overlay_renders_the_sidecar(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = rendered
    kinds = {r["kind"] for r in resources}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment",
            "PodDisruptionBudget"} <= kinds
    for resource in resources:
        if resource["kind"] not in ("Namespace", "EnvoyFilter") and resource["metadata"].get(
                "namespace") not in ("llm",):
            assert resource["metadata"]["namespace"] == "guardrails", resource["metadata"]


def test_overlay_specific_resources(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, resources = rendered
    kinds = {r["kind"] for r in resources}
    if overlay == "istio":
        assert one(resources, "Namespace")["metadata"]["labels"]["istio-injection"] == "enabled"
        filters = [r for r in resources if r["kind"] == "EnvoyFilter"]
        assert len(filters) == 2
        assert {f["metadata"]["namespace"] for f in filters} == {"istio-system"}
    elif overlay == "envoy-gateway":
        assert {"Backend", "EnvoyExtensionPolicy", "ClientTrafficPolicy",
                "BackendTrafficPolicy"} <= kinds
        config = yaml.safe_load(one(resources, "ConfigMap")["data"]["config.yaml"])
        assert config["route_selectors"][0]["attribute"] == "xds.route_name"
    else:
        assert one(resources, "Service")["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_components_render_on_every_overlay(overlay: str, tmp_path: Path) -> None:
    resources = render(with_components(overlay, tmp_path))
    hpa = one(resources, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "guardrail-extproc"
    assert "replicas" not in one(resources, "Deployment")["spec"]  # the HPA owns it
    monitor = one(resources, "ServiceMonitor")
    service_ports = {p["name"] for p in one(resources, "Service")["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    env = {e["name"]: e for e in one(resources, "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    # shared-state: the store's URL from a Secret (it may hold a password); tracing: OTLP.
    assert env["EXTPROC_SHARED_STATE"]["valueFrom"]["secretKeyRef"] == {
        "name": "guardrail-extproc-shared-state", "key": "url"}
    assert env["EXTPROC_OTLP_ENDPOINT"]["value"].startswith("http://")
    known = {option.env for option in OPTIONS}
    assert {name for name in env if name.startswith("EXTPROC_")} <= known
    loaded = load_settings(["--guardrail-id", "g1"], {"EXTPROC_OTLP_ENDPOINT": env["EXTPROC_OTLP_ENDPOINT"]["value"],
                                "EXTPROC_SHARED_STATE": "rediss://u:p@valkey.cache.svc:6380/0"})
    assert loaded.runtime.otlp_endpoint and loaded.client.shared_state_url
    validate_core(resources)


def core(resources: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (r for r in resources if r["apiVersion"] in CORE_GROUPS)


def validate_core(resources: list[dict[str, Any]]) -> None:
    checked = 0
    for resource in core(resources):
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{resource['kind']}/{resource['metadata']['name']} "
                                     f"(Kubernetes {version}): {exc.message} at "
                                     f"{'.'.join(map(str, exc.path))}") from None
        checked += 1
    assert checked >= 6


def test_rendered_core_resources_validate(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    validate_core(rendered[1])


def test_validation_catches_a_misspelt_field() -> None:
    """The strict schema check is not a formality."""
    resources = render(KUSTOMIZE / "overlays" / "envoy")
    deployment = one(resources, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {
        "grpc": {"port": 50051}}
    with pytest.raises(AssertionError, match="readinesProbe"):
        validate_core([deployment, *[r for r in resources if r is not deployment]])


# -- the Deployment against the option table -----------------------------------------------------


def flag_values(args: list[str]) -> dict[str, str]:
    """``--flag=value`` / ``--flag value`` arguments as a dict (flag -> value)."""
    values: dict[str, str] = {}
    index = 0
    while index < len(args):
        flag = args[index]
        assert flag.startswith("--"), f"not a flag: {flag!r}"
        if "=" in flag:
            name, value = flag.split("=", 1)
        else:
            name, value = flag, args[index + 1]
            index += 1
        values[name] = value
        index += 1
    return values


def sidecar_settings(resources: list[dict[str, Any]], tmp_path: Path) -> Settings:
    """``load_settings`` over the rendered container's arguments and environment, with the
    rendered ConfigMap's file where the pod mounts it."""
    spec = container(resources)
    values = flag_values(list(spec["args"]))
    mount = next(m for m in spec["volumeMounts"] if m["name"] == "config")
    config_path = Path(values["--config"])
    assert config_path.parent == Path(mount["mountPath"])
    files = one(resources, "ConfigMap")["data"]
    assert config_path.name in files
    local = tmp_path / config_path.name
    local.write_text(files[config_path.name])
    argv = [f"{k}={local if k == '--config' else v}" for k, v in values.items()]
    environ = {e["name"]: e["value"] for e in spec.get("env", []) if "value" in e}
    return load_settings(argv, environ)


def test_deployment_flags_are_known_and_valid(rendered: tuple[str, list[dict[str, Any]]],
                                              tmp_path: Path) -> None:
    _, resources = rendered
    spec = container(resources)
    args = list(spec["args"])
    _, unknown = build_parser().parse_known_args(args)
    assert unknown == [], f"flags the sidecar does not know: {unknown}"
    known_env = {option.env for option in OPTIONS} | {"EXTPROC_CONFIG"}
    for variable in spec.get("env", []):
        if variable["name"].startswith("EXTPROC_"):
            assert variable["name"] in known_env, variable["name"]
    settings = sidecar_settings(resources, tmp_path)  # raises ConfigError on a bad value
    assert settings.guardrail.id


def test_probes_and_ports_match_the_listener(rendered: tuple[str, list[dict[str, Any]]],
                                             tmp_path: Path) -> None:
    _, resources = rendered
    settings = sidecar_settings(resources, tmp_path)
    spec = container(resources)
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert settings.server.listen_host == "0.0.0.0"
    assert ports["grpc"] == settings.server.listen_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"]["port"] == settings.server.listen_port, probe
    service = one(resources, "Service")
    grpc_port = next(p for p in service["spec"]["ports"] if p["targetPort"] == "grpc")
    assert grpc_port["appProtocol"] == "grpc" and grpc_port["name"].startswith("grpc-")


def test_one_metrics_port_per_worker_of_the_cpu_limit(
        rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    _, resources = rendered
    spec = container(resources)
    assert flag_values(list(spec["args"]))["--workers"] == "auto"
    limit = spec["resources"]["limits"]["cpu"]
    cpus = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    workers = math.ceil(cpus)  # what --workers auto reads from the cgroup's cpu.max
    address = sidecar_settings(resources, tmp_path).server.metrics_address
    assert address is not None and address[0] == "0.0.0.0"
    expected = {f"metrics-{i}": address[1] + i for i in range(workers)}
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert {k: v for k, v in ports.items() if k.startswith("metrics-")} == expected
    service_ports = {p["targetPort"] for p in one(resources, "Service")["spec"]["ports"]}
    assert set(expected) <= service_ports


def test_drain_fits_the_termination_grace_period(
        rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    _, resources = rendered
    server = sidecar_settings(resources, tmp_path).server
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container(resources)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop == server.drain_delay_s > 0
    assert pod["terminationGracePeriodSeconds"] >= (
        pre_stop + server.drain_delay_s + server.grace_period_s)


def test_pod_runs_restricted(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """Pod Security Standards, "restricted" profile, and a read-only root filesystem."""
    _, resources = rendered
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for spec in pod["containers"]:
        context = spec["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "hostPort" not in str(spec["ports"])
    assert not any("hostPath" in volume for volume in pod["volumes"])
