"""Command line entry point of the local ApplyGuardrail endpoint (console script ``local-bedrock``).

    python -m extproc.localbedrock --listen 127.0.0.1:8765 --policy FILE --latency-ms 0

Prints ``local-bedrock listening on http://HOST:PORT`` once the socket is bound and serving, then
runs until SIGTERM or SIGINT (exit status 0). Knobs can be changed at runtime with
``POST /_control`` (see :mod:`extproc.localbedrock.server`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from .policy import PolicyError, default_policy, default_policy_text, load_policy
from .server import DEFAULT_MAX_TEXT_UNITS_PER_CALL, ERROR_KINDS, ErrorInjection, LocalBedrock


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="local-bedrock",
        description="Local AWS Bedrock ApplyGuardrail-compatible endpoint (for demos and tests).",
    )
    parser.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 8765),
                        help="HOST:PORT to listen on (port 0 picks a free port; "
                        "default 127.0.0.1:8765)")
    parser.add_argument("--policy", metavar="FILE",
                        help="guardrail policy YAML (default: the packaged demo policy)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every call")
    parser.add_argument("--latency-jitter-ms", type=float, default=0.0,
                        help="extra random delay 0..N ms")
    parser.add_argument("--max-text-units-per-call", type=int,
                        default=DEFAULT_MAX_TEXT_UNITS_PER_CALL,
                        help="calls above this size get the 429 'Input text size' error "
                        "(0 disables)")
    parser.add_argument("--error", choices=list(ERROR_KINDS), help="inject this error kind")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--error-count", type=int, help="... for the next N calls only")
    group.add_argument("--error-rate", type=float, help="... for this fraction of calls (0..1)")
    parser.add_argument("--no-error-markers", action="store_true",
                        help="ignore __GUARDRAIL_ERROR_<KIND>__ markers in the text")
    parser.add_argument("--log-requests", action="store_true",
                        help="log each HTTP request to stderr")
    parser.add_argument("--print-default-policy", action="store_true",
                        help="print the packaged demo policy and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_default_policy:
        sys.stdout.write(default_policy_text())
        return 0
    try:
        policy = load_policy(args.policy) if args.policy else default_policy()
    except (OSError, PolicyError) as exc:
        print(f"local-bedrock: cannot load policy: {exc}", file=sys.stderr)
        return 2
    error = None
    if args.error:
        try:
            error = ErrorInjection(args.error, count=args.error_count, rate=args.error_rate)
        except ValueError as exc:
            print(f"local-bedrock: {exc}", file=sys.stderr)
            return 2
    host, port = args.listen
    server = LocalBedrock(
        policy,
        host=host,
        port=port,
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        error=error,
        max_text_units_per_call=args.max_text_units_per_call or None,
        error_markers=not args.no_error_markers,
        log_requests=args.log_requests,
    )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except OSError as exc:
        print(f"local-bedrock: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"local-bedrock listening on {server.url}", flush=True)
        while not done.wait(0.2):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
