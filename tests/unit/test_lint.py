"""Types and lint as tests: ``mypy`` (strict, over the ``extproc`` package) and ``ruff check``
(the whole repository), both configured in pyproject.toml, so that ``./dev test`` and with it
CI fail on either. mypy keeps its cache in .mypy_cache and ruff in .ruff_cache (git-ignored):
a run after the first only re-checks what changed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 110  # below pytest-timeout's 120 s, so that a hang still shows the tool's output


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S, check=False)


def _passes(result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        command = " ".join(result.args[2:])
        pytest.fail(f"{command} exited {result.returncode}:\n{result.stdout}{result.stderr}",
                    pytrace=False)


def test_mypy_strict_passes() -> None:
    _passes(_run("mypy"))


def test_ruff_check_passes() -> None:
    _passes(_run("ruff", "check", "--no-fix"))
