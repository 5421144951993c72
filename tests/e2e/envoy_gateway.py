"""The Envoy configuration that Envoy Gateway generates from ``envoy/envoy-gateway/`` (Envoy
Gateway cannot run here: no cluster). Only the parts that matter to the guardrail, built the way
Envoy Gateway's translator builds them (``internal/xds/translator/extproc.go`` and
``metadata.go``, ``internal/gatewayapi`` route naming, as read in the Envoy Gateway sources):

* one ``envoy.filters.http.ext_proc/<policy>`` HTTP filter per ExtProc of an
  ``EnvoyExtensionPolicy``, ``disabled: true`` in the listener, enabled per route with an empty
  ``config.route.v3.FilterConfig`` (no ``ExtProcPerRoute``: no per-route initial metadata);
* its ``processing_mode``: header modes SEND where ``request``/``response`` is present, else
  SKIP; trailer modes SKIP unless that direction's body is FULL_DUPLEX_STREAMED (then SEND);
  ``allow_mode_override`` as given, no ``allowed_override_modes``;
* ``failure_mode_allow`` (``failOpen``), ``message_timeout``, ``request_attributes``,
  ``metadata_options`` (accessible -> forwarding, writable -> receiving namespaces), the gRPC
  service through the Backend's cluster (HTTP/2 for ``gateway.envoyproxy.io/h2c``) with a 10 s
  gRPC timeout and the Backend's authority;
* routes named ``httproute/<namespace>/<name>/rule/<i>/match/<j>/<hostname>`` with route
  metadata ``envoy-gateway: {resources: [{kind, name, namespace, annotations}]}`` (annotations
  with the ``gateway.envoyproxy.io/`` prefix, stripped of it);
* ``ClientTrafficPolicy`` ``timeout.http.streamIdleTimeout`` -> the connection manager's
  ``stream_idle_timeout``, ``requestReceivedTimeout`` -> its ``request_timeout``;
  ``path.escapedSlashesAction`` -> ``path_with_escaped_slashes_action``, ``normalize_path`` on,
  ``merge_slashes`` unless ``path.disableMergeSlashes``;
  ``BackendTrafficPolicy`` ``timeout.http.requestTimeout`` -> each route's ``timeout``.

Addresses are the test's: the Backend's FQDN becomes the sidecar on 127.0.0.1, every HTTPRoute
backend the fake LLM.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
EG_DIR = ROOT / "envoy" / "envoy-gateway"
EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
HTTP2_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
EG_PREFIX = "gateway.envoyproxy.io/"
BODY_MODES = {"Buffered": "BUFFERED", "BufferedPartial": "BUFFERED_PARTIAL",
              "Streamed": "STREAMED", "FullDuplexStreamed": "FULL_DUPLEX_STREAMED"}
GRPC_TIMEOUT = "10s"  # Envoy Gateway's defaultExtServiceRequestTimeout


def documents(*paths: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in paths:
        docs.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    return docs


def shipped_resources() -> list[dict[str, Any]]:
    """The kustomization's resources plus the example routes."""
    kustomization = yaml.safe_load((EG_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    return documents(*(EG_DIR / name for name in kustomization["resources"]),
                     EG_DIR / "example-routes.yaml")


def by_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def _processing_mode(mode: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for direction in ("request", "response"):
        options = mode.get(direction)
        body = BODY_MODES.get((options or {}).get("body", ""), "NONE")
        result[f"{direction}_header_mode"] = "SEND" if options is not None else "SKIP"
        result[f"{direction}_body_mode"] = body
        result[f"{direction}_trailer_mode"] = "SEND" if body == "FULL_DUPLEX_STREAMED" else "SKIP"
    return result


def ext_proc_filter(policy: Mapping[str, Any], index: int, cluster: str,
                    authority: str) -> dict[str, Any]:
    """The disabled listener filter for ``policy.spec.extProc[index]``."""
    spec = policy["spec"]["extProc"][index]
    mode = spec.get("processingMode") or {}
    config: dict[str, Any] = {
        "@type": EXT_PROC_TYPE,
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster, "authority": authority},
                         "timeout": GRPC_TIMEOUT},
        "processing_mode": _processing_mode(mode),
        "allow_mode_override": bool(mode.get("allowModeOverride", False)),
    }
    if "failOpen" in spec:
        config["failure_mode_allow"] = bool(spec["failOpen"])
    if "messageTimeout" in spec:
        config["message_timeout"] = spec["messageTimeout"]
    for direction in ("request", "response"):
        attributes = (mode.get(direction) or {}).get("attributes")
        if attributes:
            config[f"{direction}_attributes"] = list(attributes)
    metadata = spec.get("metadata") or {}
    if metadata:
        options: dict[str, Any] = {}
        if metadata.get("accessibleNamespaces"):
            options["forwarding_namespaces"] = {"untyped": list(metadata["accessibleNamespaces"])}
        if metadata.get("writableNamespaces"):
            options["receiving_namespaces"] = {"untyped": list(metadata["writableNamespaces"])}
        config["metadata_options"] = options
    meta = policy["metadata"]
    name = (f"envoy.filters.http.ext_proc/envoyextensionpolicy/{meta['namespace']}/"
            f"{meta['name']}/extproc/{index}")
    return {"name": name, "disabled": True, "typed_config": config}


def _route_metadata(route: Mapping[str, Any]) -> dict[str, Any]:
    meta = route["metadata"]
    resource: dict[str, Any] = {"kind": route["kind"], "name": meta["name"],
                                "namespace": meta["namespace"]}
    annotations = {k[len(EG_PREFIX):]: v for k, v in (meta.get("annotations") or {}).items()
                   if k.startswith(EG_PREFIX)}
    if annotations:
        resource["annotations"] = annotations
    return {"filter_metadata": {"envoy-gateway": {"resources": [resource]}}}


def _cluster(name: str, port: int, http2: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "10s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {HTTP2_OPTIONS: {
            "@type": "type.googleapis.com/" + HTTP2_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


ESCAPED_SLASHES = {"KeepUnchanged": "KEEP_UNCHANGED", "RejectRequest": "REJECT_REQUEST",
                   "UnescapeAndForward": "UNESCAPE_AND_FORWARD",
                   "UnescapeAndRedirect": "UNESCAPE_AND_REDIRECT"}


def _path_settings(resources: list[dict[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for policy in by_kind(resources, "ClientTrafficPolicy"):
        found.update(policy["spec"].get("path") or {})
    return found


def _timeouts(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for policy in by_kind(resources, kind):
        found.update(((policy["spec"].get("timeout") or {}).get("http")) or {})
    return found


def bootstrap(resources: list[dict[str, Any]], *, sidecar_port: int,
              upstream_port: int) -> dict[str, Any]:
    """The Envoy bootstrap standing for ``resources`` (one Gateway listener)."""
    [policy] = by_kind(resources, "EnvoyExtensionPolicy")
    backends = {b["metadata"]["name"]: b for b in by_kind(resources, "Backend")}
    filters, clusters = [], []
    for index, ext_proc in enumerate(policy["spec"]["extProc"]):
        [ref] = ext_proc["backendRefs"]
        backend = backends[ref["name"]]
        [endpoint] = backend["spec"]["endpoints"]
        authority = f"{endpoint['fqdn']['hostname']}:{endpoint['fqdn']['port']}"
        cluster = (f"envoyextensionpolicy/{policy['metadata']['namespace']}/"
                   f"{policy['metadata']['name']}/{index}")
        http2 = "gateway.envoyproxy.io/h2c" in backend["spec"].get("appProtocols", [])
        filters.append(ext_proc_filter(policy, index, cluster, authority))
        clusters.append(_cluster(cluster, sidecar_port, http2))

    client = _timeouts(resources, "ClientTrafficPolicy")
    backend_timeouts = _timeouts(resources, "BackendTrafficPolicy")
    routes = []
    for route in by_kind(resources, "HTTPRoute"):
        meta = route["metadata"]
        for rule_index, rule in enumerate(route["spec"]["rules"]):
            cluster = f"httproute/{meta['namespace']}/{meta['name']}/rule/{rule_index}"
            clusters.append(_cluster(cluster, upstream_port, http2=False))
            for match_index, match in enumerate(rule["matches"]):
                action: dict[str, Any] = {"cluster": cluster}
                if "requestTimeout" in backend_timeouts:
                    action["timeout"] = backend_timeouts["requestTimeout"]
                for step in rule.get("filters", []):
                    rewrite = step.get("urlRewrite", {}).get("path", {})
                    if rewrite.get("type") == "ReplacePrefixMatch":
                        action["prefix_rewrite"] = rewrite["replacePrefixMatch"]
                routes.append({
                    "name": f"{cluster}/match/{match_index}/*",
                    "match": {"prefix": match["path"]["value"]},
                    "route": action,
                    "metadata": _route_metadata(route),
                    "typed_per_filter_config": {
                        f["name"]: {"@type": FILTER_CONFIG_TYPE, "config": {}} for f in filters},
                })
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "http-10080",
        "codec_type": "AUTO",
        "access_log": [{"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3."
                     "StdoutAccessLog",
            "log_format": {"json_format": {
                "request_id": "%REQ(X-REQUEST-ID)%", "response_code": "%RESPONSE_CODE%",
                "route_name": "%ROUTE_NAME%", "guardrail": "%DYNAMIC_METADATA(guardrail)%"}}}}],
        "route_config": {"name": "llm/llm-gateway/http", "virtual_hosts": [
            {"name": "llm/llm-gateway/http/*", "domains": ["*"], "routes": routes}]},
        "http_filters": [*filters, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    if "streamIdleTimeout" in client:
        hcm["stream_idle_timeout"] = client["streamIdleTimeout"]
    if "requestReceivedTimeout" in client:
        hcm["request_timeout"] = client["requestReceivedTimeout"]
    # Envoy Gateway normalizes paths (RFC 3986) and merges slashes unless told otherwise; the
    # ClientTrafficPolicy's path.escapedSlashesAction becomes path_with_escaped_slashes_action.
    path = _path_settings(resources)
    hcm["normalize_path"] = True
    hcm["merge_slashes"] = not path.get("disableMergeSlashes", False)
    if "escapedSlashesAction" in path:
        hcm["path_with_escaped_slashes_action"] = ESCAPED_SLASHES[path["escapedSlashesAction"]]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{"name": "llm/llm-gateway/http", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": 0}}, "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}]}],
            "clusters": clusters,
        },
    }


def with_static_full_duplex(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The alternative the extension policy describes: ``response: {body: FullDuplexStreamed}``
    (every response body through the sidecar; overrides ignored by Envoy)."""
    changed = copy.deepcopy(resources)
    for policy in by_kind(changed, "EnvoyExtensionPolicy"):
        for ext_proc in policy["spec"]["extProc"]:
            ext_proc["processingMode"]["response"] = {"body": "FullDuplexStreamed"}
    return changed
