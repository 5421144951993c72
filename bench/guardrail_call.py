"""CPU per ApplyGuardrail call: the boto3 client vs the lean one, in one run.

Each client (``--guardrail-client boto3`` and ``lean``) makes the same calls through the
sidecar's own ``BedrockGuardrailClient`` (the class ``build_client`` wraps), with its calls in
a child process (``--guardrail-calls process``, the default) and/or a thread pool, against
LocalBedrock running in a process of its own (its CPU is not counted). Measured per call:

* ``parent``: CPU of the calling process (``time.process_time``: every thread of it; the
  event loop, and in thread mode the call threads too);
* ``child``: CPU of the guardrail call process (``utime + stime`` of ``/proc/<pid>/stat``,
  every thread), process mode only;
* ``total``: the two together, what the issue's target (<= 500 us) is about;
* wall p50 / p99 of one call as the caller awaits it.

Rounds alternate between the clients (boto3, lean, boto3, lean, ...) so that a machine that
gets busier during the run slows both alike. ``--concurrency`` calls are in flight at once
(1: one after the other).

    python bench/guardrail_call.py                       # 2000 calls per client, process mode
    python bench/guardrail_call.py --calls-mode both --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import command_line, fmt, machine_facts, pct, print_facts, table

from extproc.domain.values import GuardrailRef, Source
from extproc.guardrail.bedrock import BedrockGuardrailClient
from extproc.settings.values import (
    ClientSettings,
    GuardrailCalls,
    GuardrailClientKind,
    RoutePolicy,
    RuntimeSettings,
    Settings,
)

GUARDRAIL = GuardrailRef("benchguardrail", "1")
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    calls: int = 0
    parent_s: float = 0.0
    child_s: float = 0.0
    walls: list[float] = field(default_factory=list)


def child_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime (fields 14, 15)


def start_local_bedrock() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "extproc.localbedrock", "--listen",
                             "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"(https?://\S+)", line)
    if found is None:
        proc.kill()
        raise RuntimeError(f"LocalBedrock did not start: {line!r}")
    return proc, found.group(1)


def isolated_aws_env(url: str) -> None:
    """Test credentials, no profile, files or instance metadata; boto3 at LocalBedrock."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                 "AWS_BEARER_TOKEN_BEDROCK", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        os.environ.pop(name, None)
    os.environ.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                      AWS_EC2_METADATA_DISABLED="true", AWS_REGION="us-east-1",
                      AWS_ACCESS_KEY_ID="benchkey", AWS_SECRET_ACCESS_KEY="benchsecret",
                      AWS_ENDPOINT_URL_BEDROCK_RUNTIME=url)


async def run_calls(client: BedrockGuardrailClient, n: int, concurrency: int,
                    texts: list[str], walls: list[float] | None) -> None:
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            started = time.perf_counter()
            await client.apply(GUARDRAIL, Source.OUTPUT if i % 2 else Source.INPUT, texts)
            if walls is not None:
                walls.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(client: BedrockGuardrailClient, n: int, concurrency: int, texts: list[str],
                  result: Result) -> None:
    pid = client.call_process_pid
    child0, parent0 = child_cpu_s(pid), time.process_time()
    await run_calls(client, n, concurrency, texts, result.walls)
    result.parent_s += time.process_time() - parent0
    result.child_s += child_cpu_s(pid) - child0
    result.calls += n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/guardrail_call.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per client")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds per client, alternating between the clients")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured calls per client")
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight at once")
    parser.add_argument("--calls-mode", choices=("process", "thread", "both"), default="process")
    parser.add_argument("--text-chars", type=int, default=300,
                        help="characters of the one text of each call (a streamed window)")
    parser.add_argument("--clients", default="boto3,lean",
                        help="comma-separated: boto3, lean (the order of each round)")
    args = parser.parse_args(argv)
    kinds = [GuardrailClientKind(name.strip()) for name in args.clients.split(",")]
    modes = ([GuardrailCalls.PROCESS, GuardrailCalls.THREAD] if args.calls_mode == "both"
             else [GuardrailCalls(args.calls_mode)])
    print_facts(command_line("bench/guardrail_call.py", argv), machine_facts(None), load=True)
    base = ("The lighthouse keeper wrote a long letter about the sea, the weather and the "
            "ships that passed. ")
    texts = [(base * (args.text_chars // len(base) + 1))[:args.text_chars]]
    bedrock, url = start_local_bedrock()
    isolated_aws_env(url)
    print(f"LocalBedrock (own process, pid {bedrock.pid}) at {url}; {args.calls} calls per "
          f"client in {args.rounds} alternating rounds, {args.warmup} warm-up calls, "
          f"concurrency {args.concurrency}, one text of {args.text_chars} chars per call")
    rows = []
    try:
        for mode in modes:
            results = {kind: Result() for kind in kinds}
            clients = {}
            for kind in kinds:
                settings = Settings(
                    default_route=RoutePolicy(guardrail=GUARDRAIL),
                    client=ClientSettings(client=kind, calls=mode, aws_region="us-east-1",
                                          threads=max(4, args.concurrency)),
                    runtime=RuntimeSettings(log_level="WARNING"))
                client = BedrockGuardrailClient(settings, max_attempts=1, attempt_timeout_s=10)
                if client.client_kind is not kind:
                    raise RuntimeError(f"asked for {kind.value}, got {client.client_kind.value}")
                clients[kind] = client
            try:
                for kind in kinds:
                    asyncio.run(run_calls(clients[kind], args.warmup, args.concurrency, texts,
                                          None))
                per_round = max(1, args.calls // args.rounds)
                for _ in range(args.rounds):
                    for kind in kinds:
                        asyncio.run(measure(clients[kind], per_round, args.concurrency, texts,
                                            results[kind]))
            finally:
                for client in clients.values():
                    client.close()
            for kind in kinds:
                r = results[kind]
                per = 1e6 / r.calls
                rows.append([f"{kind.value} ({mode.value})", r.calls, r.parent_s * per,
                             r.child_s * per if mode is GuardrailCalls.PROCESS else None,
                             (r.parent_s + r.child_s) * per,
                             (pct(r.walls, 0.5) or 0) * 1e6, (pct(r.walls, 0.99) or 0) * 1e6])
    finally:
        bedrock.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            bedrock.wait(5)
    print()
    print(table(["client (calls)", "calls", "parent us/call", "child us/call",
                 "CPU us/call", "wall p50 us", "wall p99 us"],
                [[row[0], row[1], *(fmt(v, 0) for v in row[2:])] for row in rows]))
    print("\nCPU us/call = parent + child CPU per call; target for the lean client: <= 500 us.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
