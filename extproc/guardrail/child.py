"""The guardrail call process (``python -m extproc.guardrail.child``): runs the ApplyGuardrail
calls that ``extproc.guardrail.parent.CallProcess`` sends it, in a thread pool, through the
lean client (``--client lean``: raw requests signed and sent as they come, raw answers passed
back unparsed) or boto3's (``--client boto3``: JSON requests and answers).

It says hello (endpoint, region and the client it runs, or a fatal start-up error such as
missing credentials), maps AWS errors with ``extproc.guardrail.bedrock.map_boto_error`` (the
same mapping as in-process calls), ignores SIGINT/SIGTERM (the parent decides when the calls
stop) and exits on the parent's stop frame or when the socket closes. Frames:
``extproc.guardrail.wire``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from extproc.domain.errors import ConfigError, GuardrailError, GuardrailServerError
from extproc.guardrail.bedrock import apply_request, boto3_client, lean_client, map_boto_error
from extproc.guardrail.lean import LeanApplyGuardrail
from extproc.guardrail.wire import (
    RAW_REQUEST,
    decode_content,
    error_answer,
    frame,
    json_payload,
    raw_answer_frame,
    read_payload,
    read_raw_request,
)

if TYPE_CHECKING:  # boto3-stubs, a test dependency
    from mypy_boto3_bedrock_runtime.client import BedrockRuntimeClient

log = logging.getLogger(__name__)


def answer(client: BedrockRuntimeClient, request: dict[str, Any]) -> dict[str, Any]:
    """The answer frame for one request frame: the response, or the mapped error."""
    call_id = request.get("id")
    try:
        response = client.apply_guardrail(**apply_request(
            request["guardrail"], request["version"], request["source"],
            decode_content(request["texts"])))
    except Exception as exc:  # whatever it is, the parent must get an answer
        error: GuardrailError | None = map_boto_error(exc)
        if error is None:
            log.exception("unexpected error in an ApplyGuardrail call")
            error = GuardrailServerError(f"{type(exc).__name__}: {exc}")
        return error_answer(call_id, error)
    ok: dict[str, Any] = dict(response)
    ok.pop("ResponseMetadata", None)
    return {"id": call_id, "ok": ok}


def answer_raw(client: LeanApplyGuardrail, payload: bytes) -> bytes:
    """The answer frame for one raw request: the answer body as received, or the mapped
    error."""
    call_id, path, body = read_raw_request(payload)
    try:
        return raw_answer_frame(call_id, client.call(path, body))
    except GuardrailError as error:
        return frame(error_answer(call_id, error))
    except Exception as exc:  # whatever it is, the parent must get an answer
        log.exception("unexpected error in an ApplyGuardrail call")
        return frame(error_answer(call_id, GuardrailServerError(f"{type(exc).__name__}: {exc}")))


def child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extproc.guardrail.child")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--region")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--max-attempts", type=int, default=1)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="json")
    parser.add_argument("--client", choices=("lean", "boto3"), default="lean")
    args = parser.parse_args(argv)
    # The parent decides when the calls stop (it closes the socket); see the module docstring.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    from extproc.observe.logs import LogFormat, configure_logging

    configure_logging(args.log_level, LogFormat(args.log_format))
    lean: LeanApplyGuardrail | None = None
    client: BedrockRuntimeClient | None = None
    try:
        if args.client == "lean":
            lean = lean_client(args.region, threads=args.threads, timeout_s=args.timeout,
                               max_attempts=args.max_attempts)
        if lean is None:
            client = boto3_client(args.region, threads=args.threads, timeout_s=args.timeout,
                                  max_attempts=args.max_attempts)
    except ConfigError as exc:
        sock.sendall(frame({"fatal": str(exc)}))
        return 2
    if lean is not None:
        hello = {"endpoint_url": lean.endpoint_url, "region": lean.region, "client": "lean"}
    else:
        assert client is not None
        hello = {"endpoint_url": str(client.meta.endpoint_url),
                 "region": str(client.meta.region_name), "client": "boto3"}
    sock.sendall(frame({"hello": hello}))
    from extproc.observe import heap

    heap.settle()  # botocore's models: never walked by a collection again
    send_lock = threading.Lock()
    executor = ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="apply-guardrail")

    def send(data: bytes) -> None:
        with send_lock, contextlib.suppress(OSError):
            sock.sendall(data)

    def run(request: dict[str, Any]) -> None:
        if client is None:  # a bug of the parent's: answer it all the same
            send(frame(error_answer(request.get("id"), GuardrailServerError(
                "BUG: a JSON request to the lean call process"))))
            return
        send(frame(answer(client, request)))

    def run_raw(payload: bytes) -> None:
        if lean is None:
            call_id, _, _ = read_raw_request(payload)
            send(frame(error_answer(call_id, GuardrailServerError(
                "BUG: a raw request to the boto3 call process"))))
            return
        send(answer_raw(lean, payload))

    reader = sock.makefile("rb")
    try:
        while True:
            payload = read_payload(reader)
            if payload[:1] == RAW_REQUEST:
                executor.submit(run_raw, payload)
                continue
            request = json_payload(payload)
            if request.get("stop"):
                break
            executor.submit(run, request)
    except (ConnectionError, OSError, ValueError):
        pass  # the parent closed the socket (or died): stop
    executor.shutdown(wait=False, cancel_futures=True)
    os._exit(0)  # do not wait for calls in flight: nobody is left to read their answers


if __name__ == "__main__":
    sys.exit(child_main())
