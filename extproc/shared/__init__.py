"""State shared by every replica through Redis or Valkey (``--shared-state``), off by default.

``store`` owns the connection and what happens when the store is slow or down: every operation
has a bounded time (``--shared-state-timeout``); one that fails, and every operation after it
until a background ping gets an answer again (with backoff), is served by this process's own
state, logged (rate-limited), counted (``fallbacks``) and reported (``up``, the gRPC health
service ``guardrail_extproc.shared_state``). ``budget`` keeps the request and text-unit token
buckets in the store (one Lua script per take, on the store's clock); ``cache`` puts the
verdict cache's passes there, behind the process's own ``MemoryVerdictCache``.

``open_shared_state`` is the only entry point the composition root uses; importing this package
does not import redis (only ``store`` does, when a URL is configured).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from extproc.settings.values import ClientSettings
    from extproc.shared.store import SharedState


def open_shared_state(client: ClientSettings) -> SharedState | None:
    """The store of ``--shared-state`` (not yet connected: ``await state.start()``), or None
    when it is not configured. Raises ``ConfigError`` for a password file that cannot be
    read."""
    if client.shared_state_url is None:
        return None
    from extproc.shared.store import SharedState, connect

    password = None
    if client.shared_state_password_file:
        from extproc.domain.errors import ConfigError

        try:
            with open(client.shared_state_password_file, encoding="utf-8") as handle:
                password = handle.read().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"--shared-state-password-file: cannot read "
                              f"{client.shared_state_password_file!r} ({exc.strerror})") from None
    redis = connect(client.shared_state_url, password=password,
                    timeout_s=client.shared_state_timeout_s)
    return SharedState(redis, name=client.shared_state_redacted or "",
                       prefix=client.shared_state_prefix,
                       timeout_s=client.shared_state_timeout_s)
