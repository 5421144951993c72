"""Command line: ``guardrail-extproc`` / ``python -m extproc``.

Reads flags, environment and the configuration file into ``Settings`` (a bad value exits 2
with one clear line), prints the configuration (``--print-config``), configures logging, then
serves (``extproc.app``), or supervises ``--workers`` processes (``extproc.transport.workers``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from extproc import app
from extproc.domain.errors import ConfigError
from extproc.observe.logs import configure_logging
from extproc.settings.options import load_settings, render_settings
from extproc.transport.workers import supervise


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        settings = load_settings(args, os.environ)
    except ConfigError as exc:
        print(f"guardrail-extproc: configuration error: {exc}", file=sys.stderr)
        return 2
    if "--print-config" in args:
        print(render_settings(settings), end="")
        return 0
    # boto3/botocore at DEBUG would log request bodies (prompts and answers): capped at INFO.
    configure_logging(settings.runtime.log_level, settings.runtime.log_format, sys.stderr)
    # Until serving installs its reload handler, a SIGHUP must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if settings.server.workers > 1:
        return supervise(settings, args)
    try:
        with asyncio.Runner(loop_factory=app.loop_factory(settings.runtime.event_loop)) as runner:
            runner.run(app.serve(settings, args, os.environ))
    except ConfigError as exc:
        print(f"guardrail-extproc: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
