"""The YAML configuration file: precedence, routes, and errors that name the file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from extproc.domain.errors import ConfigError
from extproc.domain.values import InputCheck, StreamMode
from extproc.settings.options import load_settings, render_settings
from extproc.settings.routes import RouteResolver

GOOD = """\
guardrail_id: abc123
stream_mode: async
window_chars: 600
failure_mode: closed,throttled=open
routes:
  openai:
    guardrail_id: prod
    guardrail_version: "3"
    input_check: parallel
  canary:
    shadow: true
    window_min_chars: 300
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "extproc.yaml"
    path.write_text(text)
    return str(path)


def error(tmp_path: Path, text: str, argv: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", write(tmp_path, text), *(argv or [])], {})
    return str(info.value)


def test_file_values_apply(tmp_path: Path) -> None:
    settings = load_settings(["--config", write(tmp_path, GOOD)], {})
    assert settings.guardrail.id == "abc123"
    assert settings.default_route.stream_mode is StreamMode.ASYNC
    assert settings.default_route.window.window_chars == 600
    assert settings.default_route.failure_mode.fails_open("throttled")
    assert not settings.default_route.failure_mode.fails_open("timeout")


def test_routes_start_from_the_process_defaults(tmp_path: Path) -> None:
    settings = load_settings(["--config", write(tmp_path, GOOD)], {})
    openai, canary = settings.routes["openai"], settings.routes["canary"]
    assert (openai.guardrail.id, openai.guardrail.version) == ("prod", "3")
    assert openai.input_check is InputCheck.PARALLEL
    assert openai.stream_mode is StreamMode.ASYNC  # inherited from the file's defaults
    assert canary.shadow and canary.window.min_chars == 300 and canary.guardrail.id == "abc123"


def test_flags_and_environment_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    settings = load_settings(["--config", path, "--stream-mode", "sync"],
                             {"EXTPROC_WINDOW_CHARS": "700"})
    assert settings.default_route.stream_mode is StreamMode.SYNC
    assert settings.default_route.window.window_chars == 700
    by_env = load_settings([], {"EXTPROC_CONFIG": path})
    assert by_env.guardrail.id == "abc123"


def test_print_config_round_trips(tmp_path: Path) -> None:
    settings = load_settings(["--config", write(tmp_path, GOOD)], {})
    again = load_settings(["--config", write(tmp_path, render_settings(settings))], {})
    assert again == settings


@pytest.mark.parametrize(("text", "fragments"), [
    ("guardrail_id: abc\nstream_mod: sync\n", ["extproc.yaml: stream_mod: unknown setting"]),
    ("guardrail_id: abc\nstream_mode: fast\n", ["extproc.yaml: stream_mode:", "'fast'"]),
    ("guardrail_id: abc\nroutes:\n  a:\n    shadow: maybe\n",
     ["extproc.yaml: routes.a.shadow:", "not a boolean"]),
    ("guardrail_id: abc\nroutes:\n  a:\n    listen: x\n", ["routes.a.listen: unknown setting"]),
    ("guardrail_id: abc\nroutes:\n  a: 3\n", ["routes.a: expected a mapping"]),
    ("guardrail_id: abc\nroutes:\n  a:\n    window_chars: 100\n    window_min_chars: 200\n",
     ["routes.a.window_min_chars", "must not exceed"]),
    ("guardrail_id: [1, 2]\n", ["extproc.yaml: guardrail_id: expected a single value"]),
    ("- a\n- b\n", ["expected a mapping of settings at the top level"]),
    ("guardrail_id: abc\n  bad: indent\n", ["not valid YAML (line"]),
    ("listen: nowhere\n", ["extproc.yaml: listen: expected HOST:PORT"]),
])
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    message = error(tmp_path, text)
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_settings(["--config", str(tmp_path / "nope.yaml")], {})


def test_cli_reports_the_key_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "guardrail_id: abc\nroutes:\n  a:\n    stream_mode: fast\n")
    result = subprocess.run([sys.executable, "-m", "extproc", "--config", path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "routes.a.stream_mode" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_prints_the_effective_configuration(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = subprocess.run([sys.executable, "-m", "extproc", "--config", path,
                             "--print-config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "guardrail_id: abc123" in result.stdout and "canary:" in result.stdout


def test_route_resolver_applies_named_routes_then_single_keys(tmp_path: Path) -> None:
    resolver = RouteResolver(load_settings(["--config", write(tmp_path, GOOD)], {}))
    policy = resolver.resolve([("x-guardrail-route", "canary"), ("x-guardrail-id", "zzz"),
                               ("x-guardrail-mode", "sync"), ("other", "ignored")])
    assert policy.shadow and policy.guardrail.id == "zzz"
    assert policy.stream_mode is StreamMode.SYNC
    assert resolver.invalid == 0


def test_route_resolver_ignores_bad_values_and_counts_them(tmp_path: Path) -> None:
    resolver = RouteResolver(load_settings(["--config", write(tmp_path, GOOD)], {}))
    policy = resolver.resolve([("x-guardrail-route", "nope"), ("x-guardrail-mode", "fast"),
                               ("x-guardrail-colour", "red"), ("x-guardrail-shadow", "on")])
    assert policy.shadow  # the good key still applies
    assert policy.stream_mode is StreamMode.ASYNC  # the bad one is ignored
    assert resolver.invalid == 3


def test_route_resolver_default_without_metadata(tmp_path: Path) -> None:
    settings = load_settings(["--config", write(tmp_path, GOOD)], {})
    assert RouteResolver(settings).resolve([]) == settings.default_route
