"""The sidecar's real entry point with a monitor beside it, for soak runs and hostile-input
tests: every ``GUARDRAIL_MONITOR_INTERVAL`` seconds (default 0.5) one JSON line goes to
``GUARDRAIL_MONITOR_FILE`` with the event loop's task count, threads, RSS and the server's
``active_streams``. Nothing in the product changes: this wraps two module globals of
``extproc.app`` before calling ``extproc.__main__.main``. Run as ``python -m extproc.demo.monitored ARGS``.
"""
# ruff: noqa

import asyncio, json, os, sys, threading, time
import extproc.app as _m
import extproc.__main__ as _main
_holder = []
_orig_start = _m.start_server
async def _start(*args, **kwargs):
    running = await _orig_start(*args, **kwargs)
    _holder.append(running)
    return running
_m.start_server = _start
_orig_serve = _m.serve
def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1
async def _serve(settings):
    path = os.environ["GUARDRAIL_MONITOR_FILE"]
    interval = float(os.environ.get("GUARDRAIL_MONITOR_INTERVAL", "0.5"))
    async def monitor():
        with open(path, "a", buffering=1) as out:
            while True:
                proc = _holder[0].processor if _holder else None
                out.write(json.dumps({
                    "t": time.time(), "tasks": len(asyncio.all_tasks()),
                    "threads": threading.active_count(), "rss_kb": _rss_kb(),
                    "active_streams": proc.active_streams if proc else None}) + "\n")
                await asyncio.sleep(interval)
    task = asyncio.get_running_loop().create_task(monitor())
    try:
        await _orig_serve(settings)
    finally:
        task.cancel()
_m.serve = _serve
if __name__ == "__main__":
    sys.exit(_main.main(sys.argv[1:]))
