"""Live configuration through real Envoy: the sidecar with two workers and a configuration file
that changes 20 times while 50 streams run. Every worker serves each new configuration (its
``config_info`` hash is the file's), every stream keeps the policy it started with to its end,
and a broken file is refused with its key named while the last good one keeps serving."""

from __future__ import annotations

import hashlib
import re
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.upstream import Script
from tests.e2e.conftest import SMALL_WINDOWS, Stack, StackFactory
from tests.e2e.test_chat_stream import events
from tests.e2e.test_hostile import Result, fetch
from tests.e2e.test_routes import access_log
from tests.support import BLOCK_FRAME, wait_until

P = "guardrail_extproc_"
CHANGES = 20
STREAMS = 50
BLOCKED = "Project Nightingale "  # an OUTPUT phrase of the demo policy
# About 2 s per stream (40 events, 50 ms apart): each runs across several changes; the blocked
# phrase comes late, when the file has changed again since the stream started.
WORDS = [f"word{i} " for i in range(30)] + [BLOCKED] + [f"tail{i} " for i in range(9)]


def config_text(change: int) -> str:
    """Change ``change``: odd ones are shadow (detect only), even ones enforce."""
    return f"# change {change}\nshadow: {'on' if change % 2 else 'off'}\n"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def worker_metrics(stack: Stack) -> list[str]:
    log = stack.sidecar.log_path.read_text(encoding="utf-8", errors="replace")
    return sorted(set(re.findall(r"metrics on (http://\S+/metrics)", log)))


def samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def serving(url: str) -> set[str]:
    return {dict(labels)["hash"] for (name, labels), value in samples(url).items()
            if name == P + "config_info" and value == 1}


def refused(url: str) -> float:
    return samples(url).get((P + "config_reloads_total", frozenset({("result", "refused")})),
                            0.0)


@pytest.fixture(scope="module")
def reloading(stacks: StackFactory, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Stack, Path]:
    path = tmp_path_factory.mktemp("reload") / "config.yaml"
    path.write_text(config_text(0))
    stack = stacks([*SMALL_WINDOWS, "--workers", "2", "--config", str(path),
                    "--config-poll-interval", "0.05"])
    wait_until(lambda: len(worker_metrics(stack)) == 2, what="both workers' metrics")
    return stack, path


def wait_served(stack: Stack, text: str) -> None:
    """Until every worker serves the configuration ``text``."""
    want = digest(text)
    for url in worker_metrics(stack):
        wait_until(lambda url=url: serving(url) == {want},  # type: ignore[misc]
                   what=f"{url} to serve configuration {want}")


def stream(stack: Stack, number: int, script_id: str) -> Result:
    return fetch(stack, None, "http1", timeout=60,
                 headers={"x-request-id": f"reload-{number}", "x-fake-script": script_id})


def script(stack: Stack) -> str:
    return stack.llm.register(Script(chunks=tuple(events(*WORDS)), delays_ms=50))


def test_fifty_streams_keep_their_policy_while_the_file_changes_twenty_times(
        reloading: tuple[Stack, Path]) -> None:
    stack, path = reloading
    whole = b"".join(events(*WORDS))
    started: list[tuple[int, int, Future[Result]]] = []  # (stream, change it started in, result)
    with ThreadPoolExecutor(max_workers=STREAMS) as pool:
        for change in range(1, CHANGES + 1):
            text = config_text(change)
            path.write_text(text)
            wait_served(stack, text)
            # Every worker serves this change now: streams started from here on get its policy,
            # and the next change waits until they reached the model (their policy is chosen at
            # their first message, before the prompt check that precedes the upstream call).
            scripts = []
            for _ in range(STREAMS * change // CHANGES - len(started)):
                number, script_id = len(started), script(stack)
                scripts.append(script_id)
                started.append((number, change, pool.submit(stream, stack, number, script_id)))
            for script_id in scripts:
                wait_until(lambda s=script_id: stack.llm.records_for_script(s),  # type: ignore[misc]
                           what="the stream to reach the model")
        results = [(number, change, future.result()) for number, change, future in started]
    assert len(results) == STREAMS
    modes = set()
    for number, change, result in results:
        assert result.status == 200 and result.clean_end, (number, result.error)
        entry = access_log(stack, f"reload-{number}")
        mode = entry["guardrail"]["mode"]
        modes.add(mode)
        if change % 2:  # shadow from its first message to its last
            assert mode == "shadow" and result.body == whole, number
        else:  # enforced to the end: the late phrase is cut
            assert mode == "sync", number
            assert result.body.endswith(BLOCK_FRAME) and BLOCKED.encode() not in result.body
            assert whole.startswith(result.body[: -len(BLOCK_FRAME)]), number
    assert modes == {"shadow", "sync"}


def test_a_broken_file_is_refused_naming_the_key_and_the_last_good_one_serves(
        reloading: tuple[Stack, Path]) -> None:
    stack, path = reloading
    good = config_text(2)  # enforcing
    path.write_text(good)
    wait_served(stack, good)
    before = {url: refused(url) for url in worker_metrics(stack)}
    path.write_text(good + "shadoww: on\n")
    for url in worker_metrics(stack):
        wait_until(lambda url=url: refused(url) > before[url],  # type: ignore[misc]
                   what=f"{url} to refuse the broken file")
        assert serving(url) == {digest(good)}
    log = stack.sidecar.log_path.read_text(encoding="utf-8", errors="replace")
    assert f"{path}: shadoww: unknown setting" in log
    assert f"configuration {digest(good)} keeps serving" in log
    result = stream(stack, 1000, script(stack))
    assert result.body.endswith(BLOCK_FRAME)  # the last good policy: enforced
