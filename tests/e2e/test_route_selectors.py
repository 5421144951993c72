"""Per-route policy through real Envoy without gRPC initial metadata: the ext_proc filter sends
``request_attributes`` and the sidecar's configuration file maps them to named routes
(``route_selectors``), as on Envoy Gateway, where a route cannot set initial metadata.

Routes of the stack below (each ``prefix_rewrite`` to ``/``, same upstream, no per-route ext_proc
configuration at all):

* ``/sel-a/`` named ``llm-a``: mapped by ``xds.route_name`` to route ``alpha`` (guardrail
  ``guardrailaaa``, sync);
* ``/sel-b/`` named ``llm-b``: mapped to route ``beta`` (guardrail ``guardrailbbb``, async);
* ``/sel-meta/`` (no name): its route metadata ``guardrail.route: gamma`` names route ``gamma``
  (guardrail ``guardrailggg``), read from the ``xds.route_metadata`` attribute;
* ``/sel-header/`` named ``llm-header``: a ``header_mutation`` filter before ext_proc sets
  ``x-guardrail-route-name: gamma`` for this route and strips the header from every request;
* ``/sel-unknown/`` named ``llm-mystery``: mapped by nothing: the default policy
  (``demoguardrail``), logged once and counted.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import GUARDRAIL_ID, SMALL_WINDOWS, Stack, StackFactory
from tests.e2e.test_apis import post_raw, sse_script
from tests.e2e.test_routes import (
    CHAT,
    Calls,
    access_log,
    guardrail_metadata,
    new_request_id,
    violating_stream,
)
from tests.support import BLOCK_FRAME

EXT_PROC = "envoy.filters.http.ext_proc"
ROUTE_HEADER = "x-guardrail-route-name"
HEADER_MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3."
SIDECAR_CONFIG = f"""\
routes:
  alpha: {{guardrail_id: guardrailaaa, stream_mode: sync}}
  beta: {{guardrail_id: guardrailbbb, stream_mode: async}}
  gamma: {{guardrail_id: guardrailggg}}
route_selectors:
- attribute: xds.route_name
  routes: {{llm-a: alpha, "llm-b*": beta}}
- route_metadata: "guardrail:route"
- header: {ROUTE_HEADER}
"""


def selector_routes(config: dict[str, Any]) -> None:
    """Named routes without per-route ext_proc settings, ``request_attributes`` on the
    filter, and the header filter that sets (and strips) the route header."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    typed = hcm["typed_config"]
    virtual_host = typed["route_config"]["virtual_hosts"][0]

    def route(prefix: str, name: str | None, **extra: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "match": {"prefix": prefix},
            "route": {"cluster": "llm_upstream", "timeout": "0s", "prefix_rewrite": "/"}}
        if name is not None:
            entry["name"] = name
        entry.update(extra)
        return entry

    set_header = {"set-route-header": {
        "@type": HEADER_MUTATION + "HeaderMutationPerRoute",
        "mutations": {"request_mutations": [{"append": {
            "header": {"key": ROUTE_HEADER, "value": "gamma"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]}}}
    virtual_host["routes"][:0] = [
        route("/sel-a/", "llm-a"),
        route("/sel-b/", "llm-b"),
        route("/sel-meta/", None, metadata={"filter_metadata": {"guardrail": {"route": "gamma"}}}),
        route("/sel-header/", "llm-header", typed_per_filter_config=set_header),
        route("/sel-unknown/", "llm-mystery"),
    ]
    filters = typed["http_filters"]
    index = next(i for i, f in enumerate(filters) if f["name"] == EXT_PROC)
    filters[index]["typed_config"]["request_attributes"] = [
        "xds.route_name", "xds.route_metadata"]
    # Before ext_proc: every request loses a client-sent route header; a route that sets one
    # adds it back (the per-route mutation).
    filters.insert(index, {"name": "set-route-header", "typed_config": {
        "@type": HEADER_MUTATION + "HeaderMutation",
        "mutations": {"request_mutations": [{"remove": ROUTE_HEADER}]}}})


@pytest.fixture(scope="module")
def selector_stack(stacks: StackFactory, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    path = tmp_path_factory.mktemp("selectors") / "sidecar.yaml"
    path.write_text(SIDECAR_CONFIG)
    return stacks([*SMALL_WINDOWS, "--config", str(path)], tweak_envoy=selector_routes)


def unknown_routes(stack: Stack) -> float:
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as answer:
        text = answer.read().decode()
    match = re.search(
        r'^guardrail_extproc_unknown_route_streams_total\{reason="unmapped"\} (\S+)$', text, re.M)
    return float(match[1]) if match else 0.0


def stream_through(stack: Stack, prefix: str, headers: dict[str, str] | None = None,
                   ) -> tuple[bytes, set[str], dict[str, Any]]:
    """A violating streamed answer through ``prefix``: the body the client got, the guardrails
    that checked it, and the access log's guardrail metadata."""
    script_id, _ = violating_stream(stack)
    request_id = new_request_id()
    with Calls(stack) as calls:
        response, body = post_raw(stack, f"{prefix}/v1/chat/completions",
                                  CHAT.request("The project?", True), script_id,
                                  headers={"x-request-id": request_id, **(headers or {})})
    assert response.status_code == 200
    return body, calls.ids(), guardrail_metadata(access_log(stack, request_id))


def test_two_routes_differ_only_by_request_attributes(selector_stack: Stack) -> None:
    body, ids, metadata = stream_through(selector_stack, "/sel-a")
    assert body.endswith(BLOCK_FRAME) and b"Nightingale" not in body
    assert ids == {"guardrailaaa"}
    assert (metadata["guardrail_id"], metadata["mode"]) == ("guardrailaaa", "sync")

    body, ids, metadata = stream_through(selector_stack, "/sel-b")
    assert body.endswith(BLOCK_FRAME)
    assert ids == {"guardrailbbb"}
    assert (metadata["guardrail_id"], metadata["mode"]) == ("guardrailbbb", "async")


def test_route_metadata_names_the_route(selector_stack: Stack) -> None:
    body, ids, metadata = stream_through(selector_stack, "/sel-meta")
    assert body.endswith(BLOCK_FRAME)
    assert ids == {"guardrailggg"} and metadata["guardrail_id"] == "guardrailggg"


def test_header_set_by_envoy_names_the_route_and_clients_cannot_set_it(
        selector_stack: Stack) -> None:
    _, ids, _ = stream_through(selector_stack, "/sel-header")
    assert ids == {"guardrailggg"}
    # A client's own header is stripped before ext_proc: the route keeps its own policy.
    _, ids, _ = stream_through(selector_stack, "/sel-a", headers={ROUTE_HEADER: "gamma"})
    assert ids == {"guardrailaaa"}


def test_unknown_route_gets_the_default_logged_once_and_counted(
        selector_stack: Stack) -> None:
    before = unknown_routes(selector_stack)
    for _ in range(2):
        # A spoofed route header does not help an unknown route either.
        body, ids, metadata = stream_through(selector_stack, "/sel-unknown",
                                             headers={ROUTE_HEADER: "alpha"})
        assert body.endswith(BLOCK_FRAME)
        assert ids == {GUARDRAIL_ID} and metadata["guardrail_id"] == GUARDRAIL_ID
    assert unknown_routes(selector_stack) - before == 2
    log = Path(selector_stack.sidecar.log_path).read_text(errors="replace")
    assert log.count("unknown route, default policy used") == 1, log
    assert "llm-mystery" in log


def test_clean_stream_passes_on_a_selected_route(selector_stack: Stack) -> None:
    clean = CHAT.stream_events(["One ", "two ", "three."])
    script_id = selector_stack.llm.register(sse_script(clean, delays_ms=5))
    with Calls(selector_stack) as calls:
        response, body = post_raw(selector_stack, "/sel-b/v1/chat/completions",
                                  CHAT.request("Count", True), script_id)
    assert response.status_code == 200 and body == b"".join(clean)
    assert calls.ids() == {"guardrailbbb"}
