"""The YAML configuration file: read it, check its shape, hand back raw values with their place.

Owns only syntax: which keys exist and where each value came from (``file.yaml: routes.a.
stream_mode``), so that ``extproc.settings.options`` can validate every value with the same parsers as
flags and environment variables and name the key in any error. Shape::

    guardrail_id: abc123            # any option, by its flag name with underscores
    stream_mode: sync
    failure_mode: closed,throttled=open
    routes:                         # per-route policies, selected by x-guardrail-route
      openai:
        guardrail_id: prod
        guardrail_version: "3"
        input_check: pre_call
      canary:
        shadow: true

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


@dataclass(frozen=True, slots=True)
class Raw:
    """A value as written, and where: ``path: key``."""

    value: str
    where: str


@dataclass(frozen=True, slots=True)
class FileConfig:
    """The file's option values and its routes, unvalidated."""

    path: str
    values: Mapping[str, Raw] = field(default_factory=dict)
    routes: Mapping[str, Mapping[str, Raw]] = field(default_factory=dict)


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
    top = {k: v for k, v in data.items() if k != ROUTES_KEY}
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
    return FileConfig(path, values, routes)
