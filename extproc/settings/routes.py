"""Per-route policy: what Envoy says about a stream's route, turned into a ``RoutePolicy``.

Envoy can say it in three ways (``shared/docs/ext_proc.md`` section 6); the sidecar reads all:

1. gRPC initial metadata on the side stream (``ExtProcPerRoute.overrides.grpc_initial_metadata``,
   plain Envoy and Istio):

   =========================  ===================================================================
   ``x-guardrail-route``      a route named in the configuration file (its whole policy)
   (any route setting)        ``x-guardrail-`` + the setting with dashes
                              (``x-guardrail-stream-mode``)
   ``x-guardrail-id``         guardrail id or ARN
   ``x-guardrail-version``    guardrail version
   ``x-guardrail-enabled``    ``off``: the sidecar lets this route's traffic through untouched
   ``x-guardrail-input``      ``pre_call`` / ``parallel`` / ``off``
   ``x-guardrail-prompt-scope`` ``whole_request`` / ``last_user`` / ``all`` / ``all_with_system``
   ``x-guardrail-unknown-traffic`` ``generic`` / ``reject`` / ``pass``
   ``x-guardrail-api``        ``auto`` / ``mcp`` (every request of the route is MCP)
   ``x-guardrail-mcp-poisoned-tools`` ``remove`` / ``refuse``
   ``x-guardrail-unchecked-images`` ``reject`` / ``pass``
   ``x-guardrail-output``     ``on`` / ``off``
   ``x-guardrail-mode``       ``sync`` / ``async``
   ``x-guardrail-shadow``     ``on`` / ``off``
   ``x-guardrail-soft-block`` ``on`` / ``off``
   ``x-guardrail-failure-mode`` ``closed`` / ``open``
   ``x-guardrail-window-chars``, ``x-guardrail-window-overlap``, ``x-guardrail-window-min-chars``
   =========================  ===================================================================

2. The configuration file's ``route_selectors``, for Envoys that cannot set initial metadata per
   route (Envoy Gateway's ``EnvoyExtensionPolicy``): each reads one value from the first message,
   an ext_proc request attribute (``xds.route_name``, ``xds.virtual_host_name``,
   ``xds.cluster_name``), a path into the route's metadata (the ``xds.route_metadata``
   attribute) or into forwarded dynamic metadata (``metadata_options``), or a request header
   that Envoy sets, and maps it to a configured route.

3. Nothing: the default policy.

Precedence: a configured ``x-guardrail-route`` wins; else the selectors in file order, the first
whose value maps to a route; else the default. The single ``x-guardrail-*`` keys then apply on
top of the chosen route. A route name the configuration does not know (an unknown
``x-guardrail-route``, a selector value that maps to nothing) and streams for which Envoy sent
none of the values the selectors read get the default policy; each distinct case is logged once,
and every such stream is counted (``unknown``). A value that does not parse is ignored (the route
keeps its other settings), logged once per distinct problem and counted (``invalid``): Envoy's
configuration is outside our start-up validation, and a typo must not turn a guardrail off.
Turning a route off (``x-guardrail-enabled: off`` or Envoy's ``disabled: true``) is explicit.

The route label of metrics is the chosen configured route's name or ``default``: it stays bounded
by the configuration whatever Envoy sends.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from extproc.domain.errors import ConfigError
from extproc.settings.options import ROUTE_FIELDS, apply_route_values, metadata_path
from extproc.settings.values import (
    DEFAULT_ROUTE_NAME,
    RoutePolicy,
    RouteSelector,
    SelectorSource,
    Settings,
)

if TYPE_CHECKING:
    from extproc.envoy import RouteFacts

log = logging.getLogger(__name__)

PREFIX = "x-guardrail-"
ROUTE_KEY = PREFIX + "route"
# metadata key -> route setting key: x-guardrail-stream-mode -> stream_mode, plus short aliases.
_KEYS: Mapping[str, str] = {
    **{PREFIX + key.replace("_", "-"): key for key in ROUTE_FIELDS},
    PREFIX + "id": "guardrail_id",
    PREFIX + "version": "guardrail_version",
    PREFIX + "input": "input_check",
    PREFIX + "output": "output_check",
    PREFIX + "mode": "stream_mode",
}
#: Why a stream got the default policy although route information was expected.
UNMAPPED = "unmapped"  # a route name or selector value the configuration does not map
MISSING = "missing"  # Envoy sent none of the values the selectors read
UNKNOWN_REASONS = (UNMAPPED, MISSING)

_CACHE_LIMIT = 1024
_WARN_LIMIT = 256


@dataclass(frozen=True, slots=True)
class Selection:
    """A stream's route: its metrics label (a configured route name or ``default``) and its
    policy."""

    name: str
    policy: RoutePolicy


def _scalar(value: Any) -> str | None:
    """A selector value as text: strings as they are, booleans and whole numbers the way
    Envoy's CEL prints them; anything else (a map, a list, nothing) is no value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else str(value)
    return None


def _walk(value: Any, path: Sequence[str]) -> str | None:
    """The scalar at ``path`` in nested mappings; a list on the way is searched element by
    element (Envoy Gateway's route metadata keeps its resources in a list)."""
    if not path:
        return _scalar(value)
    if isinstance(value, Mapping):
        return _walk(value.get(path[0]), path[1:]) if path[0] in value else None
    if isinstance(value, list):
        for item in value:
            found = _walk(item, path)
            if found is not None:
                return found
    return None


class _Selector:
    """A ``RouteSelector`` ready to match: exact values in a dict, then patterns in order."""

    def __init__(self, selector: RouteSelector) -> None:
        self.source = selector.source
        self.key = selector.key
        self.path = metadata_path(selector.key) if selector.source in (
            SelectorSource.METADATA, SelectorSource.ROUTE_METADATA) else ()
        self.by_name = not selector.routes
        self.exact = dict(selector.routes)
        self.patterns = [(p, r) for p, r in selector.routes if any(c in p for c in "*?[")]

    @property
    def label(self) -> str:
        return f"{self.source.value} {self.key}"

    def value(self, facts: RouteFacts) -> str | None:
        if self.source is SelectorSource.ATTRIBUTE:
            return _scalar(facts.attributes.get(self.key))
        if self.source is SelectorSource.HEADER:
            return facts.headers.get(self.key)
        if self.source is SelectorSource.METADATA:
            return _walk(facts.metadata, self.path)
        metadata = facts.route_metadata()
        return _walk(metadata, self.path) if metadata is not None else None

    def route(self, value: str) -> str | None:
        """The route name ``value`` maps to (unchecked when the value names it), or None."""
        if self.by_name:
            return value
        route = self.exact.get(value)
        if route is not None:
            return route
        for pattern, route in self.patterns:
            if fnmatch.fnmatchcase(value, pattern):
                return route
        return None


class RouteResolver:
    """Turns a stream's invocation metadata and route facts into its ``Selection`` (cached per
    distinct input, so the common case costs a few dict lookups)."""

    def __init__(self, settings: Settings) -> None:
        self._default = settings.default_route
        self._routes = dict(settings.routes)
        self._selectors = tuple(_Selector(s) for s in settings.selectors)
        self._default_selection = Selection(DEFAULT_ROUTE_NAME, self._default)
        self._cache: dict[tuple[Any, ...], tuple[Selection, str | None]] = {}
        self._warned: set[str] = set()
        self.invalid = 0
        self.unknown = dict.fromkeys(UNKNOWN_REASONS, 0)

    @property
    def reads_facts(self) -> bool:
        """Whether any selector reads the first message (else ``select`` needs no facts)."""
        return bool(self._selectors)

    def stats(self) -> Mapping[str, Any]:
        """Counters for the metrics endpoint (read at scrape time)."""
        return {"invalid": self.invalid, "unknown": dict(self.unknown)}

    def resolve(self, metadata: Iterable[tuple[str, Any]],
                facts: RouteFacts | None = None) -> RoutePolicy:
        """The policy of ``select``."""
        return self.select(metadata, facts).policy

    def select(self, metadata: Iterable[tuple[str, Any]],
               facts: RouteFacts | None = None) -> Selection:
        """The route of a stream from its gRPC initial metadata and, when selectors are
        configured, the facts of its first message (see the module docstring)."""
        relevant = tuple(sorted(
            (key, value) for key, value in metadata
            if key.startswith(PREFIX) and isinstance(value, str)
        ))
        values = (tuple(s.value(facts) for s in self._selectors) if facts is not None
                  else (None,) * len(self._selectors))
        if not relevant and not self._selectors:
            return self._default_selection
        key = (relevant, values)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._build(dict(relevant), values)
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[key] = cached
        selection, unknown = cached
        if unknown is not None:
            self.unknown[unknown] += 1
        return selection

    def _warn(self, problem: str) -> None:
        self.invalid += 1
        self._log_once(problem, "per-route setting ignored: %s")

    def _log_once(self, problem: str, template: str) -> None:
        if problem in self._warned or len(self._warned) >= _WARN_LIMIT:
            return
        self._warned.add(problem)
        log.error(template, problem)
        if len(self._warned) == _WARN_LIMIT:
            log.error("further route problems are counted, not logged")

    def _named(self, name: str) -> bool:
        return name in self._routes or name == DEFAULT_ROUTE_NAME

    def _choose(self, explicit: str | None,
                values: Sequence[str | None]) -> tuple[str, str | None]:
        """The route name (or ``default``) and why it is the default if it should not be."""
        unknown: str | None = None
        if explicit is not None:
            if self._named(explicit):
                return explicit, None
            self._warn(f"{ROUTE_KEY}: unknown route {explicit!r}")
            unknown = UNMAPPED
        unmapped: list[str] = []
        for selector, value in zip(self._selectors, values, strict=True):
            if value is None:
                continue
            route = selector.route(value)
            if route is not None and self._named(route):
                return route, None
            unmapped.append(f"{selector.label} {value!r}")
        if unmapped:
            self._log_once(", ".join(unmapped), "unknown route, default policy used: %s")
            return DEFAULT_ROUTE_NAME, UNMAPPED
        if unknown is None and self._selectors:
            sent = ", ".join(s.label for s in self._selectors)
            self._log_once(sent, "Envoy sent no route information the route selectors read "
                           "(%s): default policy used; list the attributes in the ext_proc "
                           "filter's request_attributes (metadata: metadata_options)")
            return DEFAULT_ROUTE_NAME, MISSING
        return DEFAULT_ROUTE_NAME, unknown

    def _build(self, values: dict[str, str],
               selected: Sequence[str | None]) -> tuple[Selection, str | None]:
        name, unknown = self._choose(values.pop(ROUTE_KEY, None), selected)
        policy = self._routes.get(name, self._default)
        for key, value in sorted(values.items()):
            setting = _KEYS.get(key)
            if setting is None:
                self._warn(f"{key}: unknown setting")
                continue
            try:
                policy = apply_route_values(policy, {setting: (value, key)})
            except ConfigError as exc:
                self._warn(str(exc))
        label = name if name in self._routes else DEFAULT_ROUTE_NAME
        return Selection(label, policy), unknown
