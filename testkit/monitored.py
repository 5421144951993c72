"""The sidecar's real entry point with a monitor beside it, for soak runs and hostile-input
tests: ``python -m testkit.monitored ARGS`` takes the sidecar's own arguments.

Every ``GUARDRAIL_MONITOR_INTERVAL`` seconds (default 0.5) one JSON line goes to
``GUARDRAIL_MONITOR_FILE`` with the event loop's task count, threads, RSS and the server's
``active_streams``. Nothing in the product changes: run as the main module, this wraps two
module globals of ``extproc.app`` (``start_server``, to keep the running server, and ``serve``,
to run the monitor task beside it) before calling ``extproc.__main__.main``. Importing it does
nothing. With ``--workers`` above 1 nothing is monitored: the workers are plain
``python -m extproc`` processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from extproc import app
from extproc.__main__ import main as sidecar_main
from extproc.settings.values import Settings
from extproc.transport.server import RunningServer, start_server

MONITOR_FILE = "GUARDRAIL_MONITOR_FILE"
MONITOR_INTERVAL = "GUARDRAIL_MONITOR_INTERVAL"


def rss_kb() -> int:
    """This process's VmRSS in KiB (-1 where /proc has none)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def sample(running: RunningServer | None) -> dict[str, Any]:
    """One monitor line."""
    return {"t": time.time(), "tasks": len(asyncio.all_tasks()),
            "threads": threading.active_count(), "rss_kb": rss_kb(),
            "active_streams": running.processor.active_streams if running else None}


def install() -> None:
    """Wrap ``extproc.app.start_server`` (to keep the running server) and ``extproc.app.serve``
    (to run the monitor task beside it). The environment is read when ``serve`` starts."""
    started: list[RunningServer] = []
    serve = app.serve

    async def start_and_keep(*args: Any, **kwargs: Any) -> RunningServer:
        running = await start_server(*args, **kwargs)
        started.append(running)
        return running

    async def monitor(path: str, interval: float) -> None:
        # A line per sample to a local file: the blocking write is the monitor's own cost.
        with open(path, "a", buffering=1, encoding="utf-8") as out:  # noqa: ASYNC230
            while True:
                out.write(json.dumps(sample(started[0] if started else None)) + "\n")
                await asyncio.sleep(interval)

    async def serve_monitored(settings: Settings, argv: Sequence[str] = (),
                              environ: Mapping[str, str] | None = None) -> None:
        path = os.environ[MONITOR_FILE]
        interval = float(os.environ.get(MONITOR_INTERVAL, "0.5"))
        task = asyncio.get_running_loop().create_task(monitor(path, interval))
        try:
            await serve(settings, argv, environ)
        finally:
            task.cancel()

    # Monkeypatching on purpose: the product has no hook for this, and needs none. setattr for
    # start_server because extproc.app imports it rather than exporting it.
    setattr(app, "start_server", start_and_keep)  # noqa: B010
    app.serve = serve_monitored


def main(argv: list[str]) -> int:
    """Install the monitor, then run the sidecar's own entry point with ``argv``."""
    install()
    return sidecar_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
