"""The sidecar's runtime path imports no test double and no shipped side tool.

``testkit`` (fake LLM, process stacks, the monitored entry point), ``extproc.demo`` (the demo
launcher) and ``extproc.localbedrock`` (the offline ApplyGuardrail endpoint) ship in the same
wheel, but the sidecar must never load them: each runtime module is imported in a fresh
interpreter and its ``sys.modules`` read back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: What ``python -m extproc`` (and its worker and guardrail call processes) import.
RUNTIME_MODULES = ("extproc.app", "extproc.transport.server", "extproc.__main__",
                   "extproc.transport.workers", "extproc.guardrail.child")
#: Top-level names the runtime must not load, nor anything below them.
OFF_PATH = ("testkit", "extproc.demo", "extproc.localbedrock")


def loaded_modules(*modules: str) -> list[str]:
    """``sys.modules`` of a fresh interpreter (this checkout first on its path) after importing
    ``modules``."""
    code = ("import importlib, json, sys\n"
            f"for name in {list(modules)!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    names: list[str] = json.loads(done.stdout)
    return names


def off_path(names: list[str]) -> list[str]:
    return [name for name in names
            if any(name == top or name.startswith(top + ".") for top in OFF_PATH)]


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_runtime_module_loads_no_test_double_or_side_tool(module: str) -> None:
    names = loaded_modules(module)
    assert module in names
    assert off_path(names) == []


def test_the_check_sees_what_the_demo_launcher_loads() -> None:
    # The probe itself: the demo launcher does load the fakes and the local endpoint.
    names = off_path(loaded_modules("extproc.demo.__main__"))
    assert "testkit.upstream" in names
    assert "testkit.stack" in names
    assert "extproc.localbedrock" in names


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_tracing_off_imports_no_opentelemetry(module: str) -> None:
    # --otlp-endpoint unset: OpenTelemetry is never loaded (extproc.app imports
    # extproc.observe.otel only when tracing is on).
    assert [n for n in loaded_modules(module) if n.split(".")[0] == "opentelemetry"] == []
