#!/usr/bin/env python3
"""The reference for ``bench/perf.py``: a bare pass-through ext_proc processor.

    python bench/bare_processor.py [--listen 127.0.0.1:0]

``grpc.aio`` on the default asyncio event loop, one process, the project's generated protos
(``extproc._pb``). Prints ``bare-processor listening on HOST:PORT`` once serving; runs until
SIGTERM/SIGINT.

What it answers, and nothing else (no SSE parsing, no guardrail, no metadata):

* request headers: continue;
* response headers: continue; a ``text/event-stream`` answer also overrides the response body
  to FULL_DUPLEX_STREAMED (trailers SEND), exactly the override the sidecar uses, so Envoy's
  ``allowed_override_modes`` in the shipped ``envoy/envoy.yaml`` accepts it;
* every response body message: a ``StreamedBodyResponse`` carrying the same bytes and the same
  ``end_of_stream`` (forwarded unchanged, one answer per message, in order);
* request body / trailers (if Envoy ever sends them): continue.

It uses the same transport calls as the sidecar (``context.read()`` / ``context.write()`` in one
loop per RPC), so the difference measured against it is what the sidecar does per message, not
a different gRPC API.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("extproc") is None:  # PYTHONPATH may name a snapshot of the code
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from extproc._pb.envoy.extensions.filters.http.ext_proc.v3 import (  # noqa: E402
    processing_mode_pb2 as mode_pb,
)
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from extproc._pb.envoy.service.ext_proc.v3 import (  # noqa: E402
    external_processor_pb2_grpc as pb_grpc,
)

FULL_DUPLEX = mode_pb.ProcessingMode(
    response_body_mode=mode_pb.ProcessingMode.FULL_DUPLEX_STREAMED,
    response_trailer_mode=mode_pb.ProcessingMode.SEND,
)
CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
SSE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse(),
                                             mode_override=FULL_DUPLEX)
CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def is_sse(headers: Any) -> bool:
    for header in headers.headers:
        if header.key.lower() == "content-type":
            value = header.raw_value.decode("latin-1") if header.raw_value else header.value
            return value.lower().startswith("text/event-stream")
    return False


def forward(body: Any) -> Any:
    """The body message back, unchanged, as a FULL_DUPLEX_STREAMED answer."""
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
        body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
            body=body.body, end_of_stream=body.end_of_stream)))))


class BareProcessor(pb_grpc.ExternalProcessorServicer):
    async def Process(self, request_iterator: Any, context: Any) -> None:  # noqa: N802
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            kind = request.WhichOneof("request")
            if kind == "response_body":
                answer = forward(request.response_body)
            elif kind == "request_headers":
                answer = CONTINUE_REQUEST_HEADERS
            elif kind == "response_headers":
                answer = (SSE_RESPONSE_HEADERS if is_sse(request.response_headers.headers)
                          else CONTINUE_RESPONSE_HEADERS)
            elif kind == "request_body":
                answer = CONTINUE_REQUEST_BODY
            elif kind == "request_trailers":
                answer = CONTINUE_REQUEST_TRAILERS
            else:
                answer = CONTINUE_RESPONSE_TRAILERS
            try:
                await context.write(answer)
            except grpc.aio.AbortError:
                raise
            except grpc.aio.BaseError:
                return  # the RPC is over (Envoy cancelled it)


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
    pb_grpc.add_ExternalProcessorServicer_to_server(BareProcessor(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rpartition(":")[0]
    print(f"bare-processor listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/bare_processor.py")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default port 0)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
