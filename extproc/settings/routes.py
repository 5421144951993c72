"""Per-route policy: what Envoy says about a route, turned into a ``RoutePolicy``.

Envoy sends per-route settings as gRPC initial metadata on the side stream
(``ExtProcPerRoute.overrides.grpc_initial_metadata``, ``shared/docs/ext_proc.md`` section 6):

=========================  ===================================================================
``x-guardrail-route``      a route named in the configuration file (its whole policy)
(any route setting)        ``x-guardrail-`` + its name with dashes, e.g. ``x-guardrail-stream-mode``
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

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from extproc.domain.errors import ConfigError
from extproc.settings.options import ROUTE_FIELDS, apply_route_values
from extproc.settings.values import RoutePolicy, Settings

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
        for key, value in sorted(values.items()):
            setting = _KEYS.get(key)
            if setting is None:
                self._warn(f"{key}: unknown setting")
                continue
            try:
                policy = apply_route_values(policy, {setting: (value, key)})
            except ConfigError as exc:
                self._warn(str(exc))
        return policy
