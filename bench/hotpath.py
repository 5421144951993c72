#!/usr/bin/env python3
"""The sidecar's per-message Python cost, without gRPC, Envoy or the network.

    python bench/hotpath.py [--streams 200] [--events 200] [--modes body,sync,async,bare]
                            [--formats chat,bedrock,ollama,gemini] [--profile MODE]

Feeds ``StreamProcessor.handle`` exactly what Envoy sends for one streamed chat completion
(request headers, response headers, then one body message per SSE event of
``bench/sse_upstream.py``'s script, the last one empty with end_of_stream), each message parsed
from its wire bytes as grpc.aio would, and serializes every answer as grpc.aio would. The
guardrail answers at once (``NONE``). It reports CPU µs per body message (``time.process_time``
over all streams, interleaved so every mode sees the same machine) for:

* ``bare``: what ``bench/bare_processor.py`` does per message (parse, forward, serialize): the
  floor that protobuf itself sets;
* ``body``: the sidecar with ``--input-check off --shadow on`` (the guardrail-off body path);
* ``sync``, ``async``: the output guard in those modes, windowed defaults.

``--formats`` runs the same answer text (the same pieces, one per body message) in other
providers' framings, interleaved with the Chat stream in one run, and reports each one's cost
and its ratio to Chat's: ``bedrock`` (ConverseStream's binary AWS event stream), ``ollama``
(NDJSON lines of ``/api/chat``), ``gemini`` (``:streamGenerateContent?alt=sse``), their bytes
built by ``testkit/providers.py`` as the fake upstream sends them.

This is the part of the cost that is ours; ``bench/perf.py`` measures the whole thing (gRPC,
the event loop, Envoy) under load. ``--profile MODE`` prints a cProfile of that mode instead.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bare_processor import forward
from sse_upstream import script

from extproc._pb.envoy.config.core.v3 import base_pb2
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.domain.values import (
    GuardrailRef,
    InputCheck,
    Source,
    StreamMode,
)
from extproc.domain.verdict import GuardrailVerdict, classify
from extproc.formats import all_formats
from extproc.settings.values import RoutePolicy, Settings
from extproc.stream.processor import StreamProcessor
from extproc.stream.sinks import Outbox
from testkit import providers

PASS = {"action": "NONE", "outputs": [], "assessments": [],
        "usage": {"topicPolicyUnits": 1, "contentPolicyUnits": 1, "wordPolicyUnits": 1,
                  "sensitiveInformationPolicyUnits": 1, "sensitiveInformationPolicyFreeUnits": 0,
                  "contextualGroundingPolicyUnits": 0}}


class InstantGuardrail:
    """Every text passes, answered on the next loop iteration."""

    calls = 0

    async def apply(self, guardrail: GuardrailRef, source: Source,
                    texts: Sequence[str]) -> GuardrailVerdict:
        InstantGuardrail.calls += 1
        return classify(PASS)

    def close(self) -> None:
        pass


def _headers(pairs: Sequence[tuple[str, str]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])


def _pieces(events: int) -> list[str]:
    """The text pieces of the Chat script's content events."""
    pieces = []
    for chunk in script(events):
        payload = chunk.split(b"\r\n", 1)[1][:-2]
        if payload.startswith(b"data: {"):
            content = json.loads(payload[6:])["choices"][0]["delta"].get("content")
            if content:
                pieces.append(content)
    return pieces


def _bodies(events: int, fmt: str) -> tuple[str, str, list[bytes]]:
    """(path, content type, body messages) of one streamed answer in ``fmt``'s framing."""
    if fmt == "chat":
        # script() gives HTTP/1.1 chunks; Envoy sends their payloads (one SSE event each).
        return ("/v1/chat/completions", "text/event-stream",
                [chunk.split(b"\r\n", 1)[1][:-2] for chunk in script(events)])
    pieces = _pieces(events)
    answer = "".join(pieces)
    if fmt == "bedrock":
        return ("/model/anthropic.claude-3-5-haiku-20241022-v1:0/converse-stream",
                "application/vnd.amazon.eventstream",
                providers.converse_stream(pieces, prompt_tokens=9, output_tokens=len(pieces),
                                          latency_ms=420))
    if fmt == "ollama":
        return ("/api/chat", "application/x-ndjson",
                providers.ollama_stream("chat", "llama3.2", "hi", answer, pieces,
                                        prompt_tokens=9, started_ns=0, delay_ns=20_000_000))
    if fmt == "gemini":
        return ("/v1beta/models/gemini-2.5-flash:streamGenerateContent", "text/event-stream",
                providers.gemini_sse(pieces, answer, model="gemini-2.5-flash",
                                     response_id="bench", prompt_tokens=9))
    raise ValueError(f"unknown format {fmt!r}")


def wire_messages(events: int, fmt: str = "chat") -> tuple[list[bytes], int]:
    """Serialized ProcessingRequests of one stream, and how many are body messages."""
    path, content_type, payloads = _bodies(events, fmt)
    request = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_headers([
        (":method", "POST"), (":path", path), (":authority", "llm"),
        ("content-type", "application/json"), ("x-request-id", "bench")])))
    response = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=_headers([
        (":status", "200"), ("content-type", content_type)])))
    bodies = [pb.ProcessingRequest(response_body=pb.HttpBody(body=payload))
              for payload in payloads]
    bodies.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True)))
    messages = [request, response, *bodies]
    return [m.SerializeToString() for m in messages], len(bodies)


MODES: dict[str, dict[str, Any]] = {
    "body": {"input_check": InputCheck.OFF, "shadow": True},
    "sync": {"input_check": InputCheck.OFF, "stream_mode": StreamMode.SYNC},
    "async": {"input_check": InputCheck.OFF, "stream_mode": StreamMode.ASYNC},
}


class Sink:
    def __init__(self) -> None:
        self.bytes = 0

    async def write(self, message: Any) -> None:
        self.bytes += len(message.SerializeToString())


async def run_sidecar(settings: Settings, wire: list[bytes], sink: Sink, stream_id: str, *,
                      settle: int = 1) -> None:
    """One stream through the processor; ``settle`` loop turns after each message (the next
    stream's message with --interleave; a check task and its answer, where each message waits
    for one, as in bench/mcp_guard.py)."""
    processor = StreamProcessor(settings, InstantGuardrail(), all_formats(),
                                Outbox(sink.write), stream_id)
    parse = pb.ProcessingRequest.FromString
    try:
        for data in wire:
            await processor.handle(parse(data))
            for _ in range(settle):
                await asyncio.sleep(0)
        for _ in range(3):  # let a check in flight finish and its release go out
            await asyncio.sleep(0)
    finally:
        processor.close()


async def run_bare(wire: list[bytes], sink: Sink) -> None:
    parse = pb.ProcessingRequest.FromString
    for data in wire:
        request = parse(data)
        if request.WhichOneof("request") == "response_body":
            await sink.write(forward(request.response_body))
        else:
            await sink.write(pb.ProcessingResponse(request_headers=pb.HeadersResponse()))
        await asyncio.sleep(0)  # the next stream's message (--interleave)


async def measure(mode: str, streams: int, wire: list[bytes],
                  interleave: int = 1) -> tuple[float, int]:
    """CPU seconds for ``streams`` streams of ``mode`` and bytes out; ``interleave`` streams at
    a time take turns message by message (as under load: many streams' state in the caches)."""
    sink = Sink()
    settings = None if mode == "bare" else Settings(default_route=RoutePolicy(
        guardrail=GuardrailRef("benchguardrail", "1"), **MODES[mode]))
    started = time.process_time()
    for first in range(0, streams, interleave):
        batch = range(first, min(streams, first + interleave))
        if settings is None:
            await asyncio.gather(*(run_bare(wire, sink) for _ in batch))
        else:
            await asyncio.gather(*(run_sidecar(settings, wire, sink, f"s{i}") for i in batch))
    return time.process_time() - started, sink.bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/hotpath.py", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--streams", type=int, default=200, help="streams per round (200)")
    parser.add_argument("--events", type=int, default=200, help="SSE events per stream (200)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--modes", default="bare,body,sync,async")
    parser.add_argument("--interleave", type=int, default=1,
                        help="streams that take turns message by message (1: one at a time)")
    parser.add_argument("--profile", metavar="MODE", help="cProfile one mode instead")
    parser.add_argument("--formats", default="chat", help="answer framings: chat, bedrock, "
                        "ollama, gemini (chat: the reference)")
    parser.add_argument("--json", metavar="PATH", help="write the figures here too")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if formats != ["chat"]:
        return compare_formats(args, formats)
    wire, body_msgs = wire_messages(args.events)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes + ([args.profile] if args.profile else []):
        if mode != "bare" and mode not in MODES:
            parser.error(f"unknown mode {mode!r}")

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(measure(args.profile, args.streams, wire, args.interleave))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return 0

    print(f"command: python {' '.join(sys.argv)}")
    print(f"python {sys.version.split()[0]}; {args.streams} streams x {body_msgs} body messages"
          f" per round, {args.interleave} at a time, {args.rounds} rounds (median of rounds)")
    asyncio.run(measure("body", 20, wire))  # warm-up: imports, caches
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            seconds, _ = asyncio.run(measure(mode, args.streams, wire, args.interleave))
            samples[mode].append(seconds / (args.streams * body_msgs) * 1e6)
    results = {m: statistics.median(v) for m, v in samples.items()}
    print(f"{'mode':<6} {'µs/msg':>7} {'min':>7} {'max':>7}")
    for mode in modes:
        print(f"{mode:<6} {results[mode]:7.1f} {min(samples[mode]):7.1f} "
              f"{max(samples[mode]):7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_message_us": results, "samples": samples},
                                              indent=2))
    return 0


def compare_formats(args: argparse.Namespace, formats: list[str]) -> int:
    """Each mode's µs per body message for each format, and the ratio to Chat's."""
    if "chat" not in formats:
        formats.insert(0, "chat")
    wires = {fmt: wire_messages(args.events, fmt) for fmt in formats}
    modes = [m.strip() for m in args.modes.split(",") if m.strip() and m.strip() != "bare"]
    print(f"command: python {' '.join(sys.argv)}")
    print(f"python {sys.version.split()[0]}; {args.streams} streams per round, {args.rounds} "
          "rounds (median), body messages per stream: "
          + ", ".join(f"{fmt} {count}" for fmt, (_, count) in wires.items()))
    asyncio.run(measure("body", 20, wires["chat"][0]))  # warm-up: imports, caches
    samples = {(mode, fmt): [] for mode in modes for fmt in formats}  # type: ignore[var-annotated]
    for _ in range(args.rounds):
        for mode in modes:
            for fmt in formats:
                wire, count = wires[fmt]
                seconds, _ = asyncio.run(measure(mode, args.streams, wire, args.interleave))
                samples[(mode, fmt)].append(seconds / (args.streams * count) * 1e6)
    print(f"{'mode':<6} {'format':<8} {'µs/msg':>7} {'x chat':>7}")
    results = {}
    for mode in modes:
        reference = statistics.median(samples[(mode, "chat")])
        for fmt in formats:
            value = statistics.median(samples[(mode, fmt)])
            results[f"{mode}/{fmt}"] = value
            print(f"{mode:<6} {fmt:<8} {value:7.1f} {value / reference:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_message_us": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
