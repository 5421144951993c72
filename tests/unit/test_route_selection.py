"""Route policy without gRPC initial metadata: the configuration file's ``route_selectors``
(ext_proc request attributes, route metadata, forwarded metadata, a header), their checks at
start-up, their precedence against ``x-guardrail-*`` metadata, and the default policy for
routes the configuration does not know (logged once, counted per stream)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry, generate_latest

from extproc import envoy
from extproc._pb.envoy.config.core.v3 import base_pb2
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.domain.errors import ConfigError
from extproc.domain.values import StreamMode
from extproc.envoy import RouteFacts
from extproc.observe.metrics import PrometheusRecorder
from extproc.settings.options import load_settings, render_settings
from extproc.settings.routes import MISSING, UNMAPPED, RouteResolver
from extproc.settings.values import RouteSelector, SelectorSource, Settings

CONFIG = """\
guardrail_id: fallback
routes:
  openai:
    guardrail_id: openaiguard
  anthropic:
    guardrail_id: anthropicguard
    stream_mode: async
  canary:
    shadow: true
route_selectors:
- attribute: xds.route_name
  routes:
    "httproute/llm/openai/rule/0/match/0/*": openai
    "httproute/llm/anthropic/*": anthropic
    "internal-*": default
- route_metadata: "envoy-gateway:resources:annotations:guardrail-route"
- metadata: "guardrail:route"
- header: X-Guardrail-Route-Name
"""

# Envoy Gateway's route metadata as Envoy prints it into the xds.route_metadata attribute
# (the shape read on Envoy 1.40: protobuf text on one line).
EG_ROUTE_METADATA = (
    'filter_metadata { key: "envoy-gateway" value { fields { key: "resources" value { '
    'list_value { values { struct_value { fields { key: "annotations" value { struct_value { '
    'fields { key: "guardrail-route" value { string_value: "canary" } } } } } fields { key: '
    '"kind" value { string_value: "HTTPRoute" } } } } } } } } } '
)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "extproc.yaml"
    path.write_text(text)
    return str(path)


def load(tmp_path: Path, text: str = CONFIG) -> Settings:
    return load_settings(["--config", write(tmp_path, text)], {})


def facts(attributes: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
          headers: dict[str, str] | None = None) -> RouteFacts:
    return RouteFacts(attributes or {}, metadata or {}, headers or {})


def route_name(value: str) -> RouteFacts:
    return facts({"xds.route_name": value})


@pytest.fixture
def resolver(tmp_path: Path) -> RouteResolver:
    return RouteResolver(load(tmp_path))


# -- the configuration file --------------------------------------------------------------------


def test_selectors_are_read_in_file_order(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings.selectors == (
        RouteSelector(SelectorSource.ATTRIBUTE, "xds.route_name", (
            ("httproute/llm/openai/rule/0/match/0/*", "openai"),
            ("httproute/llm/anthropic/*", "anthropic"),
            ("internal-*", "default"))),
        RouteSelector(SelectorSource.ROUTE_METADATA,
                      "envoy-gateway:resources:annotations:guardrail-route"),
        RouteSelector(SelectorSource.METADATA, "guardrail:route"),
        RouteSelector(SelectorSource.HEADER, "x-guardrail-route-name"),  # lower-cased
    )


def test_print_config_round_trips_the_selectors(tmp_path: Path) -> None:
    settings = load(tmp_path)
    rendered = render_settings(settings)
    assert "route_selectors:" in rendered
    assert load(tmp_path, rendered) == settings


@pytest.mark.parametrize(("selectors", "fragments"), [
    ("- attribute: xds.route_name\n  routes: {a: nosuch}\n",
     ["extproc.yaml: route_selectors[0].routes['a']: unknown route 'nosuch'",
      "known: anthropic, canary, default, openai"]),
    ("- attribute: xds.route_name\n  header: x-a\n",
     ["route_selectors[0]: give exactly one of", "(got attribute, header)"]),
    ("- routes: {a: openai}\n", ["route_selectors[0]: give exactly one of"]),
    ("- attribute: xds.route_name\n  route: {a: openai}\n",
     ["route_selectors[0].route: unknown key"]),
    ("- header: ':path'\n", ["route_selectors[0].header:", "pseudo-headers"]),
    ("- header: 'x guard'\n", ["route_selectors[0].header:", "not a header name"]),
    ("- metadata: guardrail\n", ["route_selectors[0].metadata:", "NAMESPACE:KEY"]),
    ("- route_metadata: 'guardrail::route'\n", ["route_selectors[0].route_metadata:"]),
    ("- attribute: xds.route_metadata\n", ["route_selectors[0].attribute:", "route_metadata:"]),
    ("- attribute: ''\n", ["route_selectors[0].attribute: expected a non-empty name"]),
    ("- attribute: xds.route_name\n  routes: [a, b]\n",
     ["route_selectors[0].routes: expected a mapping"]),
    ("- xds.route_name\n", ["route_selectors[0]: expected a mapping"]),
    ("  attribute: xds.route_name\n", ["route_selectors: expected a list"]),
    ("- attribute: xds.route_name\n- header: x-route\n  routes: {a: canary, b: [1]}\n",
     ["route_selectors[1].routes['b']: expected a route name"]),
])
def test_selector_errors_name_the_file_and_entry(tmp_path: Path, selectors: str,
                                                 fragments: list[str]) -> None:
    head = CONFIG.split("route_selectors:")[0]
    with pytest.raises(ConfigError) as info:
        load(tmp_path, head + "route_selectors:\n" + selectors)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_a_selector_naming_routes_needs_routes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"route_selectors\[0\]: without a 'routes' table"):
        load(tmp_path, "guardrail_id: abc\nroute_selectors:\n- attribute: xds.route_name\n")
    # With a table that only maps to the default, no routes are needed.
    settings = load(tmp_path, "guardrail_id: abc\nroute_selectors:\n"
                              "- attribute: xds.route_name\n  routes: {a: default}\n")
    assert settings.routes == {} and len(settings.selectors) == 1


# -- selection -----------------------------------------------------------------------------------


def test_route_name_attribute_selects_the_route_by_pattern(resolver: RouteResolver) -> None:
    openai = resolver.select([], route_name("httproute/llm/openai/rule/0/match/0/api_example_com"))
    anthropic = resolver.select([], route_name("httproute/llm/anthropic/rule/1/match/0/*"))
    assert (openai.name, openai.policy.guardrail.id) == ("openai", "openaiguard")
    assert (anthropic.name, anthropic.policy.guardrail.id) == ("anthropic", "anthropicguard")
    assert anthropic.policy.stream_mode is StreamMode.ASYNC
    assert resolver.unknown == {UNMAPPED: 0, MISSING: 0}


def test_exact_values_win_over_patterns(tmp_path: Path) -> None:
    settings = load(tmp_path, CONFIG.replace(
        '    "internal-*": default\n', '    "internal-*": default\n    internal-canary: canary\n'))
    resolver = RouteResolver(settings)
    assert resolver.select([], route_name("internal-canary")).name == "canary"
    assert resolver.select([], route_name("internal-other")).name == "default"


def test_mapping_to_default_is_not_an_unknown_route(resolver: RouteResolver) -> None:
    selection = resolver.select([], route_name("internal-embeddings"))
    assert selection.name == "default" and selection.policy.guardrail.id == "fallback"
    assert resolver.unknown == {UNMAPPED: 0, MISSING: 0}


def test_route_metadata_path_reads_envoy_gateway_annotations(resolver: RouteResolver) -> None:
    selection = resolver.select([], facts({"xds.route_name": "httproute/llm/other/rule/0",
                                           "xds.route_metadata": EG_ROUTE_METADATA}))
    # The route name maps to nothing; the next selector, the route's annotation, does.
    assert selection.name == "canary" and selection.policy.shadow
    assert resolver.unknown == {UNMAPPED: 0, MISSING: 0}


def test_forwarded_metadata_and_header_selectors(resolver: RouteResolver) -> None:
    by_metadata = resolver.select([], facts(metadata={"guardrail": {"route": "anthropic"}}))
    by_header = resolver.select([], facts(headers={"x-guardrail-route-name": "openai"}))
    assert by_metadata.name == "anthropic" and by_header.name == "openai"


def test_first_selector_that_maps_wins(resolver: RouteResolver) -> None:
    selection = resolver.select([], facts(
        {"xds.route_name": "httproute/llm/openai/rule/0/match/0/h"},
        {"guardrail": {"route": "anthropic"}}, {"x-guardrail-route-name": "canary"}))
    assert selection.name == "openai"


def test_initial_metadata_route_wins_and_single_keys_apply_on_top(
        resolver: RouteResolver) -> None:
    selection = resolver.select(
        [("x-guardrail-route", "canary"), ("x-guardrail-mode", "async")],
        route_name("httproute/llm/openai/rule/0/match/0/h"))
    assert selection.name == "canary"
    assert selection.policy.shadow and selection.policy.stream_mode is StreamMode.ASYNC
    keys_only = resolver.select([("x-guardrail-id", "zzz")],
                                route_name("httproute/llm/openai/rule/0/match/0/h"))
    assert keys_only.name == "openai" and keys_only.policy.guardrail.id == "zzz"


def test_unknown_initial_metadata_route_falls_through_to_the_selectors(
        resolver: RouteResolver) -> None:
    selection = resolver.select([("x-guardrail-route", "typo")],
                                route_name("httproute/llm/anthropic/rule/0/match/0/h"))
    assert selection.name == "anthropic"
    assert resolver.invalid == 1  # the bad metadata is still reported
    assert resolver.unknown == {UNMAPPED: 0, MISSING: 0}


def test_unknown_route_gets_the_default_logged_once_counted_per_stream(
        resolver: RouteResolver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="extproc.settings.routes")
    for _ in range(3):
        selection = resolver.select([], route_name("httproute/llm/mystery/rule/0/match/0/h"))
        assert selection.name == "default"  # the metrics label stays bounded
        assert selection.policy.guardrail.id == "fallback"
    assert resolver.unknown == {UNMAPPED: 3, MISSING: 0}
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1, logged
    assert "unknown route, default policy used" in logged[0]
    assert "httproute/llm/mystery/rule/0/match/0/h" in logged[0]


def test_a_by_name_selector_value_that_names_no_route_is_unknown(
        resolver: RouteResolver) -> None:
    selection = resolver.select([], facts(headers={"x-guardrail-route-name": "nosuch"}))
    assert selection.name == "default" and resolver.unknown[UNMAPPED] == 1


def test_no_route_information_at_all_is_counted_as_missing(
        resolver: RouteResolver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="extproc.settings.routes")
    assert resolver.select([], facts()).name == "default"
    assert resolver.select([], None).name == "default"
    assert resolver.unknown == {UNMAPPED: 0, MISSING: 2}
    assert len(caplog.records) == 1
    assert "request_attributes" in caplog.records[0].getMessage()


def test_without_selectors_only_initial_metadata_counts(tmp_path: Path) -> None:
    resolver = RouteResolver(load(tmp_path, CONFIG.split("route_selectors:")[0]))
    assert not resolver.reads_facts
    assert resolver.select([]).name == "default"
    assert resolver.select([("x-guardrail-route", "canary")]).name == "canary"
    assert resolver.select([("x-guardrail-route", "typo")]).name == "default"
    assert resolver.unknown == {UNMAPPED: 1, MISSING: 0}


@pytest.mark.parametrize(("value", "expected"), [
    (True, "true"), (3.0, "3"), (2.5, "2.5"), ("", ""), ({"a": 1}, None), (None, None),
])
def test_attribute_values_as_text(tmp_path: Path, value: Any, expected: str | None) -> None:
    settings = load(tmp_path, "guardrail_id: abc\nroutes: {r: {shadow: true}}\n"
                              "route_selectors:\n- attribute: a\n  routes: {'*': r}\n")
    selection = RouteResolver(settings).select([], facts({"a": value}))
    assert selection.name == ("r" if expected is not None else "default")


def test_route_counters_are_exported(resolver: RouteResolver) -> None:
    resolver.select([], route_name("nowhere"))
    resolver.select([("x-guardrail-colour", "red")], facts())
    registry = CollectorRegistry()
    PrometheusRecorder(registry).watch_routes(resolver.stats)
    text = generate_latest(registry).decode()
    assert 'guardrail_extproc_unknown_route_streams_total{reason="unmapped"} 1.0' in text
    assert 'guardrail_extproc_unknown_route_streams_total{reason="missing"} 1.0' in text
    assert "guardrail_extproc_route_settings_invalid_total 1.0" in text


# -- reading the first message -------------------------------------------------------------------


def test_route_facts_read_attributes_metadata_and_headers() -> None:
    attributes = struct_pb2.Struct()
    attributes.update({"xds.route_name": "r1", "xds.listener_direction": 0.0})
    forwarded = struct_pb2.Struct()
    forwarded.update({"route": "canary"})
    request = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key="X-Route", raw_value=b"a")])),
        metadata_context=base_pb2.Metadata(filter_metadata={"guardrail": forwarded}),
    )
    request.attributes[envoy.ATTRIBUTES_KEY].CopyFrom(attributes)
    read = envoy.route_facts(request)
    assert read.attributes == {"xds.route_name": "r1", "xds.listener_direction": 0.0}
    assert read.metadata == {"guardrail": {"route": "canary"}}
    assert read.headers == {"x-route": "a"}
    assert read.route_metadata() == {}
    assert envoy.route_facts(pb.ProcessingRequest()) == RouteFacts()


def test_route_metadata_text_with_typed_metadata_and_braces_in_strings() -> None:
    text = ('filter_metadata { key: "g{" value { fields { key: "route" value { string_value: '
            '"a}\\"b" } } } } typed_filter_metadata { key: "x" value { '
            '[type.googleapis.com/envoy.unknown.Thing] { size: 1 } } }')
    assert envoy.parse_route_metadata(text) == {"g{": {"route": 'a}"b'}}
    assert envoy.parse_route_metadata(EG_ROUTE_METADATA) == {"envoy-gateway": {"resources": [
        {"annotations": {"guardrail-route": "canary"}, "kind": "HTTPRoute"}]}}
    assert envoy.parse_route_metadata("filter_metadata {") is None
    assert facts({"xds.route_metadata": "nonsense {"}).route_metadata() is None
