"""Shared state through the real stack (issue 18, item 1): sidecar processes started with the
same ``--shared-state`` (a real redis-server on a unix socket in a temporary directory), each
behind its own real Envoy so that a test decides which process serves which request; the
local ApplyGuardrail endpoint records every call.

* two processes share one budget: together they send no more than it allows;
* a 10-turn conversation whose turns alternate between the two processes checks each
  distinct message once;
* the store killed mid-run and restarted: every stream ends well-formed, and once it is back
  the processes use it again.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from extproc.shared.store import HEALTH_SERVICE
from testkit.redisserver import RedisServer
from tests.e2e.conftest import Stack, StackFactory
from tests.support import WAIT_S, chat_request, wait_until


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def keys(server: RedisServer, pattern: str) -> list[str]:
    client = redis.Redis(unix_socket_path=str(server.socket_path))
    try:
        return sorted(name.decode() for name in client.keys(pattern))
    finally:
        client.close()


def metrics(stack: Stack) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as answer:
        text = answer.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def shared_up(stack: Stack) -> float:
    return metrics(stack).get(("guardrail_extproc_shared_state_up", frozenset()), -1.0)


def fallbacks(stack: Stack, operation: str) -> float:
    return metrics(stack).get(("guardrail_extproc_shared_state_fallbacks_total",
                               frozenset({("operation", operation)})), -1.0)


def health(stack: Stack, service: str = HEALTH_SERVICE) -> str:
    """The sidecar's gRPC health status of ``service`` (the shared store's detail by default)."""
    with grpc.insecure_channel(f"127.0.0.1:{stack.sidecar.port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def pair(stacks: StackFactory, store: RedisServer, prefix: str, *args: str) -> list[Stack]:
    shared = ["--shared-state", store.unix_url, "--shared-state-prefix", prefix, *args]
    return [stacks(shared), stacks(shared)]


def test_two_processes_share_one_budget(stacks: StackFactory, store: RedisServer) -> None:
    rate = 4
    first, second = pair(stacks, store, "budget-test:", "--budget-rps", str(rate),
                         "--budget-max-wait", "0", "--output-check", "off")
    bedrock = first.bedrock
    try:
        before = bedrock.stats.calls
        prompts = [(first if i % 2 else second, f"question number {i} about budgets")
                   for i in range(16)]

        def ask(target: tuple[Stack, str]) -> int:
            stack, prompt = target
            with httpx.Client(timeout=30) as http:
                answer = http.post(f"{stack.url}/v1/chat/completions",
                                   content=chat_request(prompt, stream=False),
                                   headers={"content-type": "application/json"})
            return answer.status_code

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(ask, prompts))
        elapsed = time.monotonic() - started
        calls = bedrock.stats.calls - before
        # The shared bucket: one second's worth at first, then its rate, for both together
        # (each process alone would have started with a full bucket of its own).
        assert calls <= rate + rate * elapsed
        assert set(statuses) <= {200, 503} and statuses.count(200) == calls
        if rate + rate * elapsed < len(prompts):
            assert 503 in statuses  # refused by the budget, before the upstream
        assert keys(store, "budget-test:budget:*") == [
            "budget-test:budget:replicas", "budget-test:budget:requests"]
        client = redis.Redis(unix_socket_path=str(store.socket_path))
        try:
            assert client.zcard("budget-test:budget:replicas") == 2
        finally:
            client.close()
        for stack in (first, second):
            assert shared_up(stack) == 1.0 and fallbacks(stack, "budget") == 0.0
    finally:
        first.stop()
        second.stop()


def test_a_conversation_over_two_processes_pays_each_message_once(
        stacks: StackFactory, store: RedisServer) -> None:
    first, second = pair(stacks, store, "conversation-test:", "--output-check", "off")
    bedrock = first.bedrock
    try:
        system = "You are the harbour master's assistant, answering about tides and berths."
        users = [f"Question {n}: which berth is free for vessel number {n * 7 + 3}?"
                 for n in range(10)]
        answers = [f"Answer {n}: berth {n + 11} is free from {n + 6} o'clock until noon."
                   for n in range(10)]
        messages = [{"role": "system", "content": system}]
        bedrock.reset_stats()
        with httpx.Client(timeout=30) as http:
            for turn in range(10):
                if turn:
                    messages.append({"role": "assistant", "content": answers[turn - 1]})
                messages.append({"role": "user", "content": users[turn]})
                stack = (first, second)[turn % 2]
                reply = http.post(f"{stack.url}/v1/chat/completions", json={
                    "model": "demo", "stream": False, "messages": messages})
                assert reply.status_code == 200, reply.text
        checked = [text for call in bedrock.stats.recent if call.source == "INPUT"
                   for text in call.texts]
        distinct = [system, *users, *answers[:9]]
        paid = {message: sum(text.count(message) for text in checked) for message in distinct}
        assert paid == dict.fromkeys(distinct, 1)
        assert bedrock.stats.calls == 10  # one call per turn: its new texts only
        assert len(keys(store, "conversation-test:verdict:*")) == len(distinct)
    finally:
        first.stop()
        second.stop()


def post_long_stream(stack: Stack, n: int) -> tuple[int, bytes]:
    """A streamed answer of a few seconds ("long" picks the fake model's long answer); the body
    read to its end (httpx raises on a broken chunked encoding or reset)."""
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"{stack.url}/v1/chat/completions",
            content=chat_request(f"tell me the long story number {n}"),
            headers={"content-type": "application/json"}) as response:
        return response.status_code, b"".join(response.iter_raw())


def well_formed(result: tuple[int, bytes]) -> bool:
    status, body = result
    return (status == 200 and body.endswith(b"data: [DONE]\n\n")
            and b"guardrail_unavailable" not in body and b"harbour" in body)


def test_the_store_killed_and_restarted_mid_run(stacks: StackFactory, tmp_path: Path) -> None:
    store = RedisServer(tmp_path / "redis").start()
    stack = stacks(["--shared-state", store.unix_url, "--shared-state-prefix", "kill-test:",
                    "--budget-text-units", "100000", "--shared-state-timeout", "0.05"])
    llm = stack.llm
    try:
        with ThreadPoolExecutor(8) as pool:
            # Up: the shared path is used.
            results = list(pool.map(lambda n: post_long_stream(stack, n), range(4)))
            assert keys(store, "kill-test:budget:*") == [
                "kill-test:budget:replicas", "kill-test:budget:text_units"]
            # Killed while eight streams are under way.
            seen = len(llm.records)
            running = [pool.submit(post_long_stream, stack, n) for n in range(4, 12)]
            wait_until(lambda: len(llm.records) >= seen + 4, what="streams under way")
            store.kill()
            results += [future.result(timeout=WAIT_S) for future in running]
            # Down: streams go on, on the process's own budget and cache.
            results += list(pool.map(lambda n: post_long_stream(stack, n), range(12, 16)))
            assert shared_up(stack) == 0.0 and fallbacks(stack, "budget") > 0
            assert health(stack) == "NOT_SERVING" and health(stack, "") == "SERVING"
            # Back (empty, as a store that lost its data): the processes use it again.
            store.start()

            def shared_again() -> bool:
                results.append(post_long_stream(stack, 100 + len(results)))
                return shared_up(stack) == 1.0 and bool(keys(store, "kill-test:budget:*"))

            wait_until(shared_again, what="the shared path used again", interval=0.2)
            budget_fallbacks = fallbacks(stack, "budget")
            results += list(pool.map(lambda n: post_long_stream(stack, n), range(200, 204)))
            assert fallbacks(stack, "budget") == budget_fallbacks
            assert health(stack) == "SERVING"
            assert keys(store, "kill-test:verdict:*")
        assert len(results) >= 20
        assert [n for n, result in enumerate(results) if not well_formed(result)] == []
        log = stack.sidecar.log_path.read_text(encoding="utf-8", errors="replace")
        assert "shared state" in log and "available again" in log
        assert all(json.loads(line).get("level") != "ERROR"
                   for line in log.splitlines() if line.startswith("{"))
    finally:
        stack.stop()
        store.stop()
