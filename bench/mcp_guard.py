#!/usr/bin/env python3
"""What guarding MCP costs (issue 16).

    python bench/mcp_guard.py [--messages 2000] [--calls 60] [--latency-ms 50] [--skip-latency]

1. **CPU per MCP message in the sidecar** (no gRPC, Envoy or network, as ``bench/hotpath.py``):
   ``StreamProcessor.handle`` is fed what Envoy sends for one ``tools/call`` round trip
   (request headers, the JSON-RPC request body, response headers, the JSON result body), each
   message parsed from its wire bytes, every answer serialized; the guardrail answers at once.
   Reported: CPU µs per round trip, interleaved in one run with the same text as a
   non-streamed Chat Completions round trip (a request and a JSON answer) for reference.
2. **Added latency of a ``tools/call`` round trip**: real Envoy in front of a real ``mcp`` SDK
   server (JSON answers, uvicorn), the same rendered ``envoy/envoy.yaml`` with and without the
   ext_proc filter, the sidecar as a process, the local ApplyGuardrail endpoint answering every
   call after ``--latency-ms``. Sequential calls on one session (httpx, HTTP/1.1); p50 and p95
   per configuration, and the difference. The arguments and result are checked (two guardrail
   calls, one before the tool server is contacted), so the floor of the added latency is twice
   the endpoint's latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import without_ext_proc
from hotpath import InstantGuardrail, Sink, _headers, run_sidecar

from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.domain.values import GuardrailRef
from extproc.settings.values import RoutePolicy, Settings

#: The checkout whose ``extproc`` is measured (the one the interpreter imports; PYTHONPATH picks
#: another, as for every benchmark here).
CODE = Path(sys.modules["extproc"].__file__ or ".").resolve().parents[1]


def code_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CODE), env.get("PYTHONPATH", "")) if p)
    return env


TEXT = "Find the lighthouse keeper's log for the winter of 1887 and summarise the storms."
RESULT = ("The keeper logged eleven storms that winter; the worst, on 14 January, took the "
          "lantern's upper panes and kept the light dark for two nights. ") * 4


def round_trip(kind: str) -> list[bytes]:
    """Serialized ProcessingRequests of one round trip: ``mcp`` (tools/call) or ``chat``."""
    if kind == "mcp":
        path = "/mcp"
        request = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                   "params": {"name": "search_logs", "arguments": {"query": TEXT, "year": 1887}}}
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": 7, "result": {
            "content": [{"type": "text", "text": RESULT}], "isError": False,
            "structuredContent": {"result": RESULT}}}
    else:
        path = "/v1/chat/completions"
        request = {"model": "m", "messages": [{"role": "user", "content": TEXT}]}
        answer = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                  "choices": [{"index": 0, "message": {"role": "assistant",
                                                       "content": RESULT * 2},
                               "finish_reason": "stop"}]}
    messages = [
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_headers([
            (":method", "POST"), (":path", path), (":authority", "tools"),
            ("content-type", "application/json"), ("x-request-id", "bench")]))),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps(request).encode(),
                                                      end_of_stream=True)),
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=_headers([
            (":status", "200"), ("content-type", "application/json")]))),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=json.dumps(answer).encode(),
                                                       end_of_stream=True)),
    ]
    return [m.SerializeToString() for m in messages]


async def cpu(kind: str, count: int) -> float:
    """CPU µs per round trip of ``kind`` (each one must make two guardrail calls: its request
    and its answer)."""
    calls = InstantGuardrail.calls
    settings = Settings(default_route=RoutePolicy(guardrail=GuardrailRef("benchguardrail", "1")))
    wire = round_trip(kind)
    sink = Sink()
    started = time.process_time()
    for number in range(count):
        await run_sidecar(settings, wire, sink, f"s{number}", settle=3)
    spent = time.process_time() - started
    if InstantGuardrail.calls - calls != 2 * count:
        raise RuntimeError(f"{kind}: {InstantGuardrail.calls - calls} guardrail calls for "
                           f"{count} round trips (2 each expected)")
    return spent / count * 1e6


def cpu_table(messages: int, rounds: int) -> None:
    figures: dict[str, list[float]] = {"mcp": [], "chat": []}
    for _ in range(rounds):
        for kind in figures:
            figures[kind].append(asyncio.run(cpu(kind, messages)))
    print("\nCPU per round trip in the sidecar (request + answer, both checked; "
          f"{messages} round trips x {rounds} interleaved rounds, median)")
    print(f"{'round trip':<36}{'µs':>10}")
    for kind, label in (("mcp", "MCP tools/call (JSON answer)"),
                        ("chat", "Chat Completions (JSON answer)")):
        print(f"{label:<36}{statistics.median(figures[kind]):>10.1f}")


# -- latency through Envoy --------------------------------------------------------------------


def start_mcp_server() -> tuple[Any, int]:
    import uvicorn
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("bench")

    @server.tool(description="Search the lighthouse logs")
    def search_logs(query: str, year: int) -> str:
        return RESULT

    app = server.streamable_http_app(json_response=True)
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    ready = threading.Event()
    original = runner.startup

    async def startup(sockets: Any = None) -> None:
        await original(sockets)
        ready.set()

    runner.startup = startup  # type: ignore[method-assign]
    threading.Thread(target=runner.run, daemon=True).start()
    if not ready.wait(30):
        raise RuntimeError("the MCP server did not start")
    return runner, runner.servers[0].sockets[0].getsockname()[1]


def session_times(url: str, calls: int) -> list[float]:
    import httpx

    headers = {"accept": "application/json, text/event-stream",
               "content-type": "application/json"}
    times: list[float] = []
    with httpx.Client(timeout=30) as http:
        init = http.post(url, headers=headers, json={
            "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"}}})
        headers["mcp-session-id"] = init.headers["mcp-session-id"]
        http.post(url, headers=headers,
                  json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        for number in range(calls + 3):
            body = {"jsonrpc": "2.0", "id": number + 1, "method": "tools/call", "params": {
                "name": "search_logs", "arguments": {"query": f"{TEXT} #{number}",
                                                     "year": 1887}}}
            started = time.perf_counter()
            response = http.post(url, headers=headers, json=body)
            elapsed = time.perf_counter() - started
            if response.status_code != 200 or "result" not in response.json():
                raise RuntimeError(f"call failed: {response.status_code} {response.text[:200]}")
            if number >= 3:  # warm-up: connections, first imports
                times.append(elapsed * 1000)
    return times


def latency_table(calls: int, latency_ms: float) -> None:
    from extproc.localbedrock import LocalBedrock, default_policy
    from testkit.stack import (
        EnvoyProcess,
        SidecarProcess,
        load_envoy_config,
        render_envoy_config,
        sidecar_env,
    )

    workdir = Path(tempfile.mkdtemp(prefix="bench-mcp-"))
    bedrock = LocalBedrock(default_policy(), latency_ms=latency_ms)
    bedrock.start()
    runner, port = start_mcp_server()
    processes: list[Any] = []
    try:
        sidecar = SidecarProcess(["--listen", "127.0.0.1:0", "--metrics-listen", "off",
                                  "--guardrail-id", "benchguardrail", "--guardrail-version", "1"],
                                 sidecar_env(bedrock.url, code_env()), workdir,
                                 cwd=CODE).start()
        processes.append(sidecar)
        guarded = render_envoy_config(load_envoy_config(), sidecar_port=sidecar.port,
                                      upstream_port=port)
        alone = render_envoy_config(load_envoy_config(), sidecar_port=sidecar.port,
                                    upstream_port=port)
        without_ext_proc(alone)
        (workdir / "a").mkdir()
        (workdir / "b").mkdir()
        envoy_alone = EnvoyProcess(alone, workdir / "a").start()
        processes.append(envoy_alone)
        envoy_guarded = EnvoyProcess(guarded, workdir / "b").start()
        processes.append(envoy_guarded)
        results: dict[str, list[float]] = {"alone": [], "guarded": []}
        for _ in range(2):  # interleaved halves
            results["alone"] += session_times(
                f"http://127.0.0.1:{envoy_alone.listener_port}/mcp", calls // 2)
            results["guarded"] += session_times(
                f"http://127.0.0.1:{envoy_guarded.listener_port}/mcp", calls // 2)
    finally:
        for process in reversed(processes):
            process.stop()
        runner.should_exit = True
        bedrock.stop()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    print(f"\ntools/call round trip through Envoy, ApplyGuardrail endpoint at {latency_ms:g} ms "
          f"({len(results['alone'])} sequential calls each, ms)")
    print(f"{'configuration':<34}{'p50':>9}{'p95':>9}")
    for name, label in (("alone", "Envoy alone (no ext_proc)"),
                        ("guarded", "Envoy + sidecar (pre_call)")):
        print(f"{label:<34}{pct(results[name], 0.5):>9.1f}{pct(results[name], 0.95):>9.1f}")
    added50 = pct(results["guarded"], 0.5) - pct(results["alone"], 0.5)
    added95 = pct(results["guarded"], 0.95) - pct(results["alone"], 0.95)
    print(f"{'added by the guardrail':<34}{added50:>9.1f}{added95:>9.1f}"
          f"   (floor: 2 x {latency_ms:g} ms, arguments then result)")


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="python bench/mcp_guard.py",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--messages", type=int, default=2000, help="round trips per CPU round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved CPU rounds (5)")
    parser.add_argument("--calls", type=int, default=60, help="tools/call round trips (60)")
    parser.add_argument("--latency-ms", type=float, default=50.0,
                        help="the local ApplyGuardrail endpoint's latency (50)")
    parser.add_argument("--skip-latency", action="store_true", help="CPU figures only")
    args = parser.parse_args(argv)
    print("command: python bench/mcp_guard.py "
          + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"code: {CODE}")
    cpu_table(args.messages, args.rounds)
    if not args.skip_latency:
        latency_table(args.calls, args.latency_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
