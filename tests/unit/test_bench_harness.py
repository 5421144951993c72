"""bench/harness.py: the pieces the benchmarks share, and that no benchmark edits sys.path."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pytest

from bench.harness import (
    Cleanup,
    Service,
    StartError,
    code_env,
    code_root,
    pct,
    table,
)

ROOT = Path(__file__).resolve().parents[2]


def test_cleanup_runs_newest_first_once_and_past_a_failure(
        capsys: pytest.CaptureFixture[str]) -> None:
    order: list[str] = []

    def stop(name: str, code: int) -> int:
        order.append(name)
        if name == "b":
            raise RuntimeError("boom")
        return code

    cleanup = Cleanup()
    cleanup.push("a", lambda: stop("a", 1))
    cleanup.push("b", lambda: stop("b", 2))
    cleanup.push("c", lambda: stop("c", 3))
    assert cleanup.run() == {"c": 3, "a": 1}
    assert order == ["c", "b", "a"]
    assert "warning: stopping b: RuntimeError('boom')" in capsys.readouterr().err
    assert cleanup.run() == {}


def test_table_left_aligns_the_first_column_and_right_aligns_the_others() -> None:
    text = table(["config", "ms"], [["envoy", 1.21], ["sync", None], ["bare", 12]])
    assert text.splitlines() == [
        "config   ms",
        "------  ---",
        "envoy   1.2",
        "sync      -",
        "bare     12",
    ]


def test_pct_is_the_nearest_rank() -> None:
    assert pct([], 0.5) is None
    assert pct([5.0, 1.0, 3.0, 2.0, 4.0], 0.9) == 5.0
    assert pct([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0


def test_code_env_puts_the_measured_code_first() -> None:
    env = code_env({"PYTHONPATH": "/elsewhere"}, Path("/measured"))
    assert env["PYTHONPATH"].split(":") == ["/measured", "/elsewhere"]
    assert code_env({}, Path("/measured"))["PYTHONPATH"] == "/measured"
    assert (code_root() / "extproc" / "__init__.py").is_file()


def test_service_reads_its_address_from_the_ready_line_and_stops(tmp_path: Path) -> None:
    script = ("import sys, time\n"
              "print('fake listening on http://127.0.0.1:4321', flush=True)\n"
              "time.sleep(60)\n")
    service = Service("fake", [sys.executable, "-c", script], tmp_path).start(timeout=20)
    try:
        assert (service.port, service.url) == (4321, "http://127.0.0.1:4321")
        assert service.alive()
    finally:
        code = service.stop()
    assert code == -signal.SIGTERM
    assert not service.alive()


def test_service_that_exits_before_ready_raises_with_its_log(tmp_path: Path) -> None:
    script = "import sys; print('bad flag --nope'); sys.exit(2)"
    with pytest.raises(StartError, match=r"(?s)fake exited with 2:.*bad flag --nope"):
        Service("fake", [sys.executable, "-c", script], tmp_path).start(timeout=20)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_no_benchmark_edits_sys_path(script: str) -> None:
    # They run as `.venv/bin/python bench/X.py`: bench/ is on sys.path already, extproc and
    # testkit come from the install or from PYTHONPATH (another checkout, to compare).
    source = (ROOT / "bench" / script).read_text(encoding="utf-8")
    assert not re.search(r"sys\.path\.(insert|append)|sys\.path\s*[+=]", source)
