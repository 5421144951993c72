"""Per-route policy: what Envoy says about a route, turned into a ``RoutePolicy``.

Envoy sends per-route settings as gRPC initial metadata on the side stream
(``ExtProcPerRoute.overrides.grpc_initial_metadata``, ``shared/docs/ext_proc.md`` section 6):

=========================  ===================================================================
``x-guardrail-route``      a route named in the configuration file (its whole policy)
``x-guardrail-id``         guardrail id or ARN
``x-guardrail-version``    guardrail version
``x-guardrail-enabled``    ``off``: the sidecar lets this route's traffic through untouched
``x-guardrail-input``      ``pre_call`` / ``parallel`` / ``off``
``x-guardrail-prompt-scope`` ``last_user`` / ``all`` / ``all_with_system``
``x-guardrail-output``     ``on`` / ``off``
``x-guardrail-mode``       ``sync`` / ``async``
``x-guardrail-shadow``     ``on`` / ``off``
``x-guardrail-soft-block`` ``on`` / ``off``
``x-guardrail-failure-mode`` ``closed`` / ``open``
``x-guardrail-window-chars``, ``x-guardrail-window-overlap``, ``x-guardrail-window-min-chars``
=========================  ===================================================================

The named route applies first, then the single keys. A value that does not parse is ignored (the
route keeps its other settings), logged once per distinct problem and counted: Envoy's
configuration is outside our start-up validation, and a typo must not turn a guardrail off.
Turning a route off (``x-guardrail-enabled: off`` or Envoy's ``disabled: true``) is explicit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from extproc.config import (
    GuardrailRef,
    InputCheck,
    PromptScope,
    RoutePolicy,
    Settings,
    _enum_parser,
    _number_parser,
    _parse_bool,
    _parse_failure_policy,
    _parse_guardrail_id,
    _parse_guardrail_version,
)
from extproc.errors import ConfigError
from extproc.policy import StreamMode

log = logging.getLogger(__name__)

PREFIX = "x-guardrail-"
ROUTE_KEY = PREFIX + "route"

_Parser = Callable[[str, str], Any]

# metadata key suffix -> (RoutePolicy field, parser); window keys go into ``window``.
_FIELDS: Mapping[str, tuple[str, _Parser]] = {
    "enabled": ("enabled", _parse_bool),
    "input": ("input_check", _enum_parser(InputCheck)),
    "prompt-scope": ("prompt_scope", _enum_parser(PromptScope)),
    "output": ("output_check", _parse_bool),
    "mode": ("stream_mode", _enum_parser(StreamMode)),
    "shadow": ("shadow", _parse_bool),
    "soft-block": ("soft_block", _parse_bool),
    "failure-mode": ("failure_mode", _parse_failure_policy),
}
_WINDOW_FIELDS: Mapping[str, tuple[str, _Parser]] = {
    "window-chars": ("window_chars", _number_parser(int, 1, 100_000)),
    "window-overlap": ("overlap_chars", _number_parser(int, 0, 10_000)),
    "window-min-chars": ("min_chars", _number_parser(int, 1, 100_000)),
}


class RouteResolver:
    """Turns a stream's invocation metadata into its ``RoutePolicy`` (cached per distinct
    metadata, so the common case costs one dict lookup)."""

    def __init__(self, settings: Settings) -> None:
        self._default = settings.default_route
        self._routes = dict(settings.routes)
        self._cache: dict[tuple[tuple[str, str], ...], RoutePolicy] = {}
        self._warned: set[str] = set()
        self.invalid = 0

    def resolve(self, metadata: Iterable[tuple[str, Any]]) -> RoutePolicy:
        relevant = tuple(sorted(
            (key, value) for key, value in metadata
            if key.startswith(PREFIX) and isinstance(value, str)
        ))
        if not relevant:
            return self._default
        policy = self._cache.get(relevant)
        if policy is None:
            policy = self._build(dict(relevant))
            if len(self._cache) < 1024:
                self._cache[relevant] = policy
        return policy

    def _warn(self, problem: str) -> None:
        self.invalid += 1
        if problem not in self._warned:
            self._warned.add(problem)
            log.error("per-route setting ignored: %s", problem)

    def _build(self, values: dict[str, str]) -> RoutePolicy:
        policy = self._default
        name = values.pop(ROUTE_KEY, None)
        if name is not None:
            named = self._routes.get(name)
            if named is None:
                self._warn(f"{ROUTE_KEY}: unknown route {name!r}")
            else:
                policy = named
        changes: dict[str, Any] = {}
        window_changes: dict[str, Any] = {}
        guardrail_id, version = policy.guardrail.id, policy.guardrail.version
        for key, value in values.items():
            suffix = key[len(PREFIX):]
            try:
                if suffix == "id":
                    guardrail_id = _parse_guardrail_id(value, key)
                elif suffix == "version":
                    version = _parse_guardrail_version(value, key)
                elif suffix in _FIELDS:
                    field_name, parse = _FIELDS[suffix]
                    changes[field_name] = parse(value, key)
                elif suffix in _WINDOW_FIELDS:
                    field_name, parse = _WINDOW_FIELDS[suffix]
                    window_changes[field_name] = parse(value, key)
                else:
                    self._warn(f"{key}: unknown setting")
            except ConfigError as exc:
                self._warn(str(exc))
        if window_changes:
            window = dataclasses.replace(policy.window, **window_changes)
            if window.min_chars > window.window_chars:
                self._warn("x-guardrail-window-min-chars exceeds x-guardrail-window-chars")
                window = dataclasses.replace(window, min_chars=window.window_chars)
            changes["window"] = window
        changes["guardrail"] = GuardrailRef(guardrail_id, version)
        return dataclasses.replace(policy, **changes)
