"""Live configuration: the configuration file is read again when it changes, and on SIGHUP.

A reload parses and validates exactly as start-up does (``load_settings`` with the process's own
flags and environment, which still win over the file). A file that does not load is refused:
the error names the file and the key, and the configuration already loaded keeps serving. A
good one is swapped in at once (``apply``); streams already running keep the policy they
started with, new ones get the new one.

What a reload changes: the route policies (the default route, named routes, route selectors)
and the per-stream limits. The listener, the guardrail client and the process runtime are
built once at start-up: a change to ``server``, ``client`` or ``runtime`` settings is logged as
needing a restart and not applied, while the rest of the file is.

Change detection (``FileStamp``) follows how Kubernetes updates a mounted ConfigMap: it swaps
the ``..data`` symlink, so the file's resolved path changes, not its mtime. The stamp is the
resolved path, inode, size and modification time. A configuration is named by the SHA-256 of
its file (the first 12 hex digits, ``config_info{hash}``). Nothing here runs at import time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from extproc.domain.errors import ConfigError
from extproc.settings.options import CONFIG_ENV, load_settings
from extproc.settings.values import Settings

log = logging.getLogger(__name__)

#: Settings built once at start-up: a reload does not change them.
RESTART_SECTIONS: Final = ("server", "client", "runtime")
#: ``Reloader.reload`` results (the ``result`` label of ``config_reloads_total``).
RESULTS: Final = ("applied", "unchanged", "refused")


def file_digest(path: str) -> str:
    """The first 12 hex digits of the file's SHA-256 (``sha256sum`` shows the same), or
    ``unreadable``."""
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()[:12]
    except OSError:
        return "unreadable"


def config_path(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The configuration file named by ``--config FILE`` / ``--config=FILE`` or
    ``EXTPROC_CONFIG``, if any."""
    args = list(argv)
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return environ.get(CONFIG_ENV) or None


class FileStamp:
    """Whether a file changed since it was last looked at (see the module docstring)."""

    __slots__ = ("_path", "_seen")

    def __init__(self, path: str) -> None:
        self._path = path
        self._seen = self._stamp()

    def _stamp(self) -> tuple[str, int, int, int] | None:
        try:
            real = os.path.realpath(self._path)
            info = os.stat(real)
        except OSError:
            return None
        return real, info.st_ino, info.st_size, info.st_mtime_ns

    def changed(self) -> bool:
        """True once per change (a file that disappears is no change: it is kept as it was)."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        return True


class Reloader:
    """Loads the configuration file ``path`` again and hands a valid configuration to
    ``apply``; ``report`` gets the result (one of ``RESULTS``) and the digest of the file
    serving afterwards (``hash``: the same for every worker and replica that loaded it)."""

    def __init__(self, path: str, argv: Sequence[str], environ: Mapping[str, str],
                 settings: Settings, apply: Callable[[Settings], None],
                 report: Callable[[str, str], None] = lambda result, digest: None) -> None:
        self._path = path
        self._argv = list(argv)
        self._environ = dict(environ)
        self.settings = settings
        self.hash = file_digest(path)
        self._apply = apply
        self._report = report

    def _load(self) -> tuple[Settings, str]:
        """The settings and the digest of the very file they came from (read again when the
        file changed while it was read)."""
        digest = file_digest(self._path)
        loaded = load_settings(self._argv, self._environ)
        for _ in range(2):
            after = file_digest(self._path)
            if after == digest:
                break
            digest, loaded = after, load_settings(self._argv, self._environ)
        return loaded, digest

    def reload(self, why: str) -> str:
        """Load, validate and apply the configuration (``why``: what asked, for the log);
        returns the result."""
        try:
            loaded, digest = self._load()
        except ConfigError as exc:
            log.error("configuration reload (%s) refused, configuration %s keeps serving: %s",
                      why, self.hash, exc)
            self._report("refused", self.hash)
            return "refused"
        current = self.settings
        kept = [name for name in RESTART_SECTIONS
                if getattr(loaded, name) != getattr(current, name)]
        if kept:
            log.warning("configuration reload (%s): %s settings changed and take effect after a "
                        "restart; the rest applies now", why, ", ".join(kept))
            loaded = dataclasses.replace(
                loaded, **{name: getattr(current, name) for name in kept})
        previous, self.hash = self.hash, digest
        if loaded == current:
            log.info("configuration reload (%s): no setting changed (configuration %s)", why,
                     self.hash)
            self._report("unchanged", self.hash)
            return "unchanged"
        self._apply(loaded)
        self.settings = loaded
        log.info("configuration reloaded (%s): configuration %s replaces %s", why, self.hash,
                 previous)
        self._report("applied", self.hash)
        return "applied"
