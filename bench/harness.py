"""What the benchmarks share: ``perf.py``, ``stream_modes.py`` and ``soak.py`` import it.

Owns where the measured code comes from, the server processes a run starts and stops
(``Service``, ``Cleanup``), the run itself (``run_with_cleanup``: the work directory, the
signals that interrupt it, the cleanup that always follows), the machine facts every report
opens with, result tables and percentiles, and the two helpers both Envoy stacks need
(``without_ext_proc``, ``guardrail_round_trip_ms``). It decides nothing about what is measured.

**The measured code** is the ``extproc`` package this interpreter imports: the checkout through
the editable install, or another checkout named by ``PYTHONPATH``::

    PYTHONPATH=/path/to/old/checkout .venv/bin/python bench/stream_modes.py --quick

Every process started here gets the same code (``code_env``: that checkout first on
``PYTHONPATH``; ``Service`` and the sidecars run in its directory, so ``python -m extproc``
cannot pick up another copy from the current directory). ``testkit`` (the fakes, the process
stacks) comes from wherever it is found, this checkout's when the other has none.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from testkit.stack import stop_process, tail

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent  # the checkout these scripts are in: bench/results/, git archive
RESULTS = BENCH / "results"
GUARDRAIL_ID = "demoguardrail"
GUARDRAIL_VERSION = "1"
#: The signals that interrupt a run (SIGINT too: a shell starting us in the background leaves
#: it ignored).
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Set once a run is being torn down: worker threads stop at their next step.
STOP = threading.Event()


class Interrupted(Exception):
    """Raised in the worker threads once the run is being torn down."""


class StartError(RuntimeError):
    """A process exited or did not get ready; the message ends with its log."""


# ------------------------------------------------------------------------------- the code


def code_root() -> Path:
    """The directory holding the ``extproc`` package this interpreter imports."""
    import extproc

    return Path(extproc.__file__).resolve().parents[1]


def code_env(base: Mapping[str, str] | None = None, code: Path | None = None) -> dict[str, str]:
    """``base`` (default: this environment) with ``code`` (default: ``code_root()``) first on
    ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    root = str(code or code_root())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def sidecar_help(code: Path | None = None) -> str:
    """``python -m extproc --help`` of the measured code (to adapt to flags it has or not)."""
    root = code or code_root()
    out = subprocess.run([sys.executable, "-m", "extproc", "--help"], capture_output=True,
                         text=True, env=code_env(code=root), cwd=str(root), timeout=60)
    return out.stdout + out.stderr


def sidecar_supports(flag: str, code: Path | None = None) -> bool:
    return flag in sidecar_help(code)


# ------------------------------------------------------------------------------- processes


class Cleanup:
    """Every stop callback, run once, newest first (processes before in-process servers)."""

    def __init__(self) -> None:
        self._callbacks: list[tuple[str, Callable[[], Any]]] = []
        self._lock = threading.Lock()

    def push(self, what: str, callback: Callable[[], Any]) -> None:
        with self._lock:
            self._callbacks.append((what, callback))

    def run(self) -> dict[str, Any]:
        """Run and forget every callback; what each returned (an exit code), by name."""
        results: dict[str, Any] = {}
        while True:
            with self._lock:
                if not self._callbacks:
                    return results
                what, callback = self._callbacks.pop()
            try:
                results[what] = callback()
            except BaseException as exc:  # keep stopping the others
                print(f"warning: stopping {what}: {exc!r}", file=sys.stderr)


class Service:
    """A server process that logs ``... listening on [http://]HOST:PORT`` once ready (the
    sidecar, LocalBedrock, the fake LLM, the bench upstream, the bare processor). Output goes to
    ``<workdir>/<name>.log``; it runs in the measured code's directory unless ``cwd`` says."""

    READY = re.compile(r"listening on (?:http://)?(\S+):(\d+)")

    def __init__(self, name: str, cmd: Sequence[str], workdir: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.env = None if env is None else dict(env)
        self.cwd = cwd or code_root()
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.url = ""

    def start(self, timeout: float = 30.0) -> Service:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=str(self.cwd))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = self.READY.search(tail(self.log_path, 200))
            if match:
                self.port = int(match.group(2))
                self.url = f"http://{match.group(1)}:{self.port}"
                return self
            if self.proc.poll() is not None:
                raise StartError(f"{self.name} exited with {self.proc.returncode}:\n"
                                 f"{tail(self.log_path)}")
            time.sleep(0.02)
        self.stop()
        raise StartError(f"{self.name} not ready after {timeout}s:\n{tail(self.log_path)}")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "BUG: the service was not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None: never started)."""
        proc = self.proc
        if proc is None:
            return None
        return stop_process(proc, timeout)


def descendants(pid: int) -> list[int]:
    """The living descendants of a process (the sidecar's guardrail call process, workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _own_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process plus its living descendants (None: the process is gone)."""
    own = _own_rss_kb(pid)
    if own is None:
        return None
    return own + sum(_own_rss_kb(child) or 0 for child in descendants(pid))


# ------------------------------------------------------------------------------- the run


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stopping_already(signum: int, frame: FrameType | None) -> None:
    print("still stopping processes (each is killed after 10 s at most)", file=sys.stderr)


def run_with_cleanup(prefix: str, keep_logs: bool, body: Callable[[Path, Cleanup], int]) -> int:
    """``body(work directory, cleanup)``'s exit code; 130 on Ctrl-C, SIGTERM, SIGHUP or
    ``Interrupted``; 1 on an error (traceback printed). Whatever happens, every callback pushed
    on the cleanup runs (a second signal does not cut it short) and the work directory is
    removed after exit code 0 unless ``keep_logs``, kept with its path printed otherwise."""
    for sig in SIGNALS:
        signal.signal(sig, raise_interrupt)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"work directory (logs): {root}", flush=True)
    cleanup = Cleanup()
    code = 1
    try:
        code = body(root, cleanup)
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted: stopping every process", file=sys.stderr)
        code = 130
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        STOP.set()
        for sig in SIGNALS:
            signal.signal(sig, stopping_already)
        cleanup.run()
        if code == 0 and not keep_logs:
            shutil.rmtree(root, ignore_errors=True)
        elif code != 0:
            print(f"logs kept in {root}", file=sys.stderr)
    return code


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command as typed (``argv`` given: as if typed with those arguments)."""
    return shlex.join(["python", *sys.argv]) if argv is None else shlex.join(
        ["python", script, *argv])


def machine_facts(envoy: str | None, code: Path | None = None) -> dict[str, Any]:
    """The machine, the tools and the measured code's revision, for the report and its JSON."""
    version = "(no envoy binary)"
    if envoy:
        out = subprocess.run([envoy, "--version"], capture_output=True, text=True, timeout=30)
        version = (out.stdout + out.stderr).strip().split("version:", 1)[-1].strip()
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    root = code or code_root()
    revision = "(not a git checkout)"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--", "extproc", "envoy"],
                capture_output=True, text=True, timeout=10).stdout.splitlines()
            revision = rev.stdout.strip() + (
                f" + {len(dirty)} uncommitted change(s) in extproc/, envoy/" if dirty
                else " (clean)")
    return {
        "code": f"{root} at {revision}",
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "envoy": version,
        "envoy_binary": envoy,
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def print_facts(command: str, facts: Mapping[str, Any], *, load: bool = False) -> None:
    """The three lines every report opens with: command, machine, code."""
    print(f"command: {command}")
    print(f"machine: nproc {facts['nproc']} ({facts['cpu']}), python {facts['python']}, "
          f"envoy {facts['envoy']}, {facts['platform']}"
          + (f", load {facts['loadavg_at_start']}" if load else ""))
    print(f"code: {facts['code']}")


# ------------------------------------------------------------------------------- results


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (p90 of 5 values, p99 of fewer than 100, is the largest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths)))

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


# ------------------------------------------------------------------------------- the stacks


def without_ext_proc(config: dict[str, Any]) -> None:
    """Remove the ext_proc filter (and the sidecar cluster): the "upstream alone" baseline."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                typed = network_filter["typed_config"]
                filters = typed.get("http_filters", [])
                typed["http_filters"] = [f for f in filters
                                         if f["name"] != "envoy.filters.http.ext_proc"]
    clusters = config["static_resources"]["clusters"]
    config["static_resources"]["clusters"] = [c for c in clusters
                                              if c["name"] != "guardrail_sidecar"]


def guardrail_round_trip_ms(bedrock_url: str, samples: int = 7) -> float:
    """Median wall time of one boto3 ApplyGuardrail call (OUTPUT, a short text) against the
    local endpoint at its current latency: what "one guardrail round trip" costs here."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "bedrock-runtime", endpoint_url=bedrock_url, region_name="us-east-1",
        aws_access_key_id="local", aws_secret_access_key="local",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}))
    times = []
    for i in range(samples + 1):
        started = time.perf_counter()
        client.apply_guardrail(guardrailIdentifier=GUARDRAIL_ID, guardrailVersion=GUARDRAIL_VERSION,
                               source="OUTPUT", content=[{"text": {"text": "Lighthouses."}}])
        if i:  # the first call opens the connection
            times.append((time.perf_counter() - started) * 1000.0)
    client.close()
    return float(statistics.median(times))
