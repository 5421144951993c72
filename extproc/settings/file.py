"""The YAML configuration file: read it, check its shape, hand back raw values with their place.

Owns only syntax: which keys exist and where each value came from (``file.yaml: routes.a.
stream_mode``), so that ``extproc.settings.options`` can validate every value with the same
parsers as flags and environment variables and name the key in any error. Shape::

    guardrail_id: abc123            # any option, by its flag name with underscores
    stream_mode: sync
    failure_mode: closed,throttled=open
    routes:                         # per-route policies, selected by x-guardrail-route
      openai:                       # or by the route selectors below
        guardrail_id: prod
        guardrail_version: "3"
        input_check: pre_call
      canary:
        shadow: true
    route_selectors:                # what Envoy sends -> a route above (first match wins)
    - attribute: xds.route_name     # an ext_proc request attribute
      routes:
        "httproute/llm/openai/*": openai
    - route_metadata: "guardrail:route"   # its value names the route itself
    - metadata: "guardrail:route"
    - header: x-guardrail-route-name

Unknown keys are errors, not warnings: a misspelt setting must not silently do nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc.domain.errors import ConfigError

ROUTES_KEY = "routes"
SELECTORS_KEY = "route_selectors"
#: The keys naming a selector's source (``extproc.settings.values.SelectorSource``).
SELECTOR_SOURCES = ("attribute", "route_metadata", "metadata", "header")
_SELECTOR_ROUTES = "routes"


@dataclass(frozen=True, slots=True)
class Raw:
    """A value as written, and where: ``path: key``."""

    value: str
    where: str


@dataclass(frozen=True, slots=True)
class RawSelector:
    """One ``route_selectors`` entry as written: its source key, the value it reads, and its
    value -> route table (each with its place)."""

    source: str
    key: Raw
    routes: tuple[tuple[Raw, Raw], ...]
    where: str


@dataclass(frozen=True, slots=True)
class FileConfig:
    """The file's option values, its routes and its route selectors, unvalidated."""

    path: str
    values: Mapping[str, Raw] = field(default_factory=dict)
    routes: Mapping[str, Mapping[str, Raw]] = field(default_factory=dict)
    selectors: tuple[RawSelector, ...] = ()


def _scalar(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ConfigError(f"{where}: expected a single value, got {type(value).__name__}")


def _section(data: Mapping[Any, Any], allowed: Iterable[str], where: str) -> dict[str, Raw]:
    allowed = set(allowed)
    out: dict[str, Raw] = {}
    for key, value in data.items():
        key_where = f"{where}{key}"
        if not isinstance(key, str) or key not in allowed:
            hint = ", ".join(sorted(allowed))
            raise ConfigError(f"{key_where}: unknown setting (known: {hint})")
        out[key] = Raw(_scalar(value, key_where), key_where)
    return out


def _text(value: Any, where: str, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value) == "":
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    return str(value)


def _selector(entry: Any, where: str) -> RawSelector:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping with one of: {', '.join(SELECTOR_SOURCES)}"
                          f" (and optionally {_SELECTOR_ROUTES})")
    unknown = sorted(str(k) for k in entry if k not in (*SELECTOR_SOURCES, _SELECTOR_ROUTES))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: "
                          f"{', '.join((*SELECTOR_SOURCES, _SELECTOR_ROUTES))})")
    sources = [k for k in SELECTOR_SOURCES if k in entry]
    if len(sources) != 1:
        raise ConfigError(f"{where}: give exactly one of {', '.join(SELECTOR_SOURCES)}"
                          + (f" (got {', '.join(sources)})" if sources else ""))
    source = sources[0]
    key = Raw(_text(entry[source], f"{where}.{source}", "a non-empty name"), f"{where}.{source}")
    table = entry.get(_SELECTOR_ROUTES, {}) or {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}.{_SELECTOR_ROUTES}: expected a mapping of value (or pattern) "
                          "to route name")
    routes: list[tuple[Raw, Raw]] = []
    for value, route in table.items():
        value_where = f"{where}.{_SELECTOR_ROUTES}[{str(value)!r}]"
        routes.append((Raw(_text(value, value_where, "a non-empty value or pattern"), value_where),
                       Raw(_text(route, value_where, "a route name"), value_where)))
    return RawSelector(source, key, tuple(routes), where)


def load_file(path: str, option_keys: Iterable[str], route_keys: Iterable[str]) -> FileConfig:
    """Read and shape-check ``path``; raises ``ConfigError`` naming the file and key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{place}") from None
    if data is None:
        return FileConfig(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    routes_data = data.get(ROUTES_KEY, {}) or {}
    selectors_data = data.get(SELECTORS_KEY, []) or []
    top = {k: v for k, v in data.items() if k not in (ROUTES_KEY, SELECTORS_KEY)}
    values = _section(top, option_keys, f"{path}: ")
    if not isinstance(routes_data, Mapping):
        raise ConfigError(f"{path}: {ROUTES_KEY}: expected a mapping of route name to settings")
    route_keys = list(route_keys)
    routes: dict[str, Mapping[str, Raw]] = {}
    for name, settings in routes_data.items():
        where = f"{path}: {ROUTES_KEY}.{name}"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: a route name must be a non-empty string")
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{where}: expected a mapping of settings")
        routes[name] = _section(settings, route_keys, f"{where}.")
    if not isinstance(selectors_data, list):
        raise ConfigError(f"{path}: {SELECTORS_KEY}: expected a list of selectors")
    selectors = tuple(_selector(entry, f"{path}: {SELECTORS_KEY}[{index}]")
                      for index, entry in enumerate(selectors_data))
    return FileConfig(path, values, routes, selectors)
