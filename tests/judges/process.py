"""A judge as a real process on 127.0.0.1 port 0 (the port read back from its stdout), and its
records read over HTTP. Node's ``express`` (pinned in ``tests/judges/node/package.json``) is
installed with npm into ``tests/judges/node`` on first use; ``node_modules`` and the lockfile
npm writes beside it are git-ignored."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.node import NodeUnavailable, node_ready
from tests.support import wait_until

JUDGES_DIR = Path(__file__).resolve().parent
NODE_DIR = JUDGES_DIR / "node"
REPO_ROOT = JUDGES_DIR.parents[1]
#: The judges' protocol (``tests/judges/__init__.py``): the request's name in the records, and
#: the answer text to send.
CASE_HEADER = "x-judge-case"
ANSWER_HEADER = "x-judge-answer"
LISTENING = re.compile(r"judge listening on ([0-9.]+):(\d+)")


class JudgeUnavailable(RuntimeError):
    """A judge cannot be started on this machine; the message says what to install."""


def node_command() -> list[str]:
    """``node judge.js``, after installing ``express`` with npm when it is missing."""
    try:
        node = node_ready(NODE_DIR)
    except NodeUnavailable as exc:
        raise JudgeUnavailable(f"the Node + Express judge: {exc}") from None
    return [node, str(NODE_DIR / "judge.js"), "--port", "0"]


def fastapi_command() -> list[str]:
    return [sys.executable, "-m", "tests.judges.fastapi_judge", "--port", "0"]


class JudgeProcess:
    """One judge server; ``records(case)`` is what it recorded for requests of that case."""

    def __init__(self, name: str, command: list[str], workdir: Path) -> None:
        self.name = name
        self.command = command
        self.log_path = workdir / f"judge-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 60.0) -> JudgeProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=REPO_ROOT)
        proc = self.proc

        def listening() -> int | None:
            match = LISTENING.search(self.log_path.read_text(encoding="utf-8", errors="replace"))
            if match:
                return int(match[2])
            if proc.poll() is not None:
                raise RuntimeError(f"the {self.name} judge exited with {proc.returncode}:\n"
                                   f"{self.logs()}")
            return None

        self.port = wait_until(listening, timeout, f"the {self.name} judge to listen")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def records(self, case: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"case": case})
        with urllib.request.urlopen(f"{self.url}/_records?{query}", timeout=10) as answer:
            records: list[dict[str, Any]] = json.load(answer)
        return records

    def logs(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-8000:]
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
