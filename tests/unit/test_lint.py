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


def test_no_merge_conflict_markers() -> None:
    """Regression: a merge once committed README.md with its conflict markers."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    marked = []
    for name in files:
        path = REPO_ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".json", ".toml", ".txt", ".sh"} \
                or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(line.startswith(("<<<<<<< ", ">>>>>>> ")) for line in text.splitlines()):
            marked.append(name)
    assert not marked, f"conflict markers in {marked}"
