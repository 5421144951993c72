"""``extproc.settings.reload``: a configuration file read again is validated first, applied to
new streams, refused whole (naming the file and key) when bad; changes that need a restart are
not applied; a Kubernetes ConfigMap's symlink swap counts as a change."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from extproc.domain.values import StreamMode
from extproc.observe.metrics import PrometheusRecorder
from extproc.settings.options import load_settings
from extproc.settings.reload import FileStamp, Reloader, config_path, file_digest
from extproc.settings.values import Settings

P = "guardrail_extproc_"

GOOD = """\
guardrail_id: gr1
stream_mode: sync
routes:
  canary:
    shadow: true
"""


class Applied:
    def __init__(self) -> None:
        self.settings: list[Settings] = []
        self.reports: list[tuple[str, str]] = []

    def apply(self, settings: Settings) -> None:
        self.settings.append(settings)

    def report(self, result: str, digest: str) -> None:
        self.reports.append((result, digest))


def start(tmp_path: Path, text: str = GOOD, argv: tuple[str, ...] = ()
          ) -> tuple[Path, Reloader, Applied]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    args = ["--config", str(path), *argv]
    applied = Applied()
    reloader = Reloader(str(path), args, {}, load_settings(args, {}), applied.apply,
                        applied.report)
    return path, reloader, applied


def test_a_changed_file_is_applied(tmp_path: Path) -> None:
    path, reloader, applied = start(tmp_path)
    before = reloader.hash
    path.write_text(GOOD.replace("stream_mode: sync", "stream_mode: async")
                    + "  openai:\n    guardrail_id: gr2\n")
    assert reloader.reload("test") == "applied"
    (new,) = applied.settings
    assert new.default_route.stream_mode is StreamMode.ASYNC
    assert new.routes["openai"].guardrail.id == "gr2"
    assert reloader.settings is new and reloader.hash == file_digest(str(path)) != before
    assert applied.reports == [("applied", reloader.hash)]


def test_the_same_file_changes_nothing(tmp_path: Path) -> None:
    path, reloader, applied = start(tmp_path)
    assert reloader.reload("test") == "unchanged"
    assert applied.settings == [] and applied.reports == [("unchanged", reloader.hash)]
    path.write_text(GOOD + "# a comment\n")  # another file, the same settings
    assert reloader.reload("test") == "unchanged"
    assert reloader.hash == file_digest(str(path)) != applied.reports[0][1]


def test_the_digest_is_the_files_sha256(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"shadow: true\n")
    assert file_digest(str(path)) == hashlib.sha256(b"shadow: true\n").hexdigest()[:12]
    assert file_digest(str(tmp_path / "missing.yaml")) == "unreadable"


@pytest.mark.parametrize(("text", "named"), [
    (GOOD.replace("stream_mode: sync", "stream_mode: sideways"), "stream_mode"),
    (GOOD + "  broken:\n    shadoww: true\n", "routes.broken.shadoww"),
    ("guardrail_id: [unclosed\n", "not valid YAML"),
])
def test_a_bad_file_is_refused_with_its_key_and_the_old_configuration_serves(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, named: str) -> None:
    path, reloader, applied = start(tmp_path)
    serving, digest = reloader.settings, reloader.hash
    path.write_text(text)
    with caplog.at_level(logging.ERROR, logger="extproc.settings.reload"):
        assert reloader.reload("test") == "refused"
    assert applied.settings == [] and reloader.settings is serving
    assert applied.reports == [("refused", digest)]
    (record,) = caplog.records
    assert str(path) in record.getMessage() and named in record.getMessage()
    assert digest in record.getMessage()  # which configuration keeps serving


def test_restart_settings_are_not_applied_the_rest_is(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, reloader, applied = start(tmp_path)
    path.write_text(GOOD.replace("stream_mode: sync", "stream_mode: async")
                    + "guardrail_timeout: 9\nlisten: 127.0.0.1:7777\n")
    with caplog.at_level(logging.WARNING, logger="extproc.settings.reload"):
        assert reloader.reload("test") == "applied"
    (new,) = applied.settings
    assert new.default_route.stream_mode is StreamMode.ASYNC
    assert new.client.timeout_s == 5.0 and new.server.listen_port == 50051
    assert "server, client settings changed and take effect after a restart" in caplog.text


def test_flags_still_win_over_the_reloaded_file(tmp_path: Path) -> None:
    path, reloader, _ = start(tmp_path, argv=("--stream-mode", "sync"))
    path.write_text(GOOD.replace("stream_mode: sync", "stream_mode: async"))
    assert reloader.reload("test") == "unchanged"


def test_a_configmap_symlink_swap_is_a_change(tmp_path: Path) -> None:
    # kubelet writes a new timestamped directory, then renames the ``..data`` symlink to it.
    first, second = tmp_path / "..2026_12_05_1", tmp_path / "..2026_12_05_2"
    first.mkdir()
    second.mkdir()
    (first / "config.yaml").write_text(GOOD)
    (second / "config.yaml").write_text(GOOD)
    os.symlink(first.name, tmp_path / "..data")
    os.symlink("..data/config.yaml", tmp_path / "config.yaml")
    stamp = FileStamp(str(tmp_path / "config.yaml"))
    assert not stamp.changed()
    os.symlink(second.name, tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert stamp.changed()
    assert not stamp.changed()  # once per change


def test_a_rewritten_file_is_a_change_and_a_vanished_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD)
    stamp = FileStamp(str(path))
    path.write_text(GOOD + "# more\n")
    assert stamp.changed()
    path.unlink()
    assert not stamp.changed()


@pytest.mark.parametrize(("argv", "env", "path"), [
    (["--config", "a.yaml"], {}, "a.yaml"),
    (["--config=b.yaml", "--shadow", "on"], {}, "b.yaml"),
    ([], {"EXTPROC_CONFIG": "c.yaml"}, "c.yaml"),
    (["--config", "a.yaml"], {"EXTPROC_CONFIG": "c.yaml"}, "a.yaml"),
    ([], {}, None),
])
def test_config_path(argv: list[str], env: dict[str, str], path: str | None) -> None:
    assert config_path(argv, env) == path


def test_metrics_show_the_serving_configuration_and_count_reloads() -> None:
    recorder = PrometheusRecorder()
    registry = recorder.registry
    recorder.config_loaded("aaa")
    recorder.config_reloaded("refused", "aaa")
    recorder.config_reloaded("applied", "bbb")
    assert registry.get_sample_value(P + "config_info", {"hash": "bbb"}) == 1
    assert registry.get_sample_value(P + "config_info", {"hash": "aaa"}) is None
    assert registry.get_sample_value(P + "config_reloads_total", {"result": "refused"}) == 1
    assert registry.get_sample_value(P + "config_reloads_total", {"result": "applied"}) == 1
    assert registry.get_sample_value(P + "config_reloads_total", {"result": "unchanged"}) == 0
