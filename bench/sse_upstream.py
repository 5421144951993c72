#!/usr/bin/env python3
"""A minimal, fast scripted SSE upstream for ``bench/perf.py`` (stdlib asyncio, no uvloop).

    python bench/sse_upstream.py [--listen 127.0.0.1:0]

Prints ``sse-upstream listening on HOST:PORT`` once bound, then serves until SIGTERM/SIGINT.

Every ``POST`` is answered with ``200 text/event-stream`` (HTTP/1.1, chunked, keep-alive): an
OpenAI chat-completion stream of exactly N events of about 180 bytes each (a role event,
content events of a few characters of clean text, a finish event, ``data: [DONE]``), **one
socket write per event** (one HTTP chunk each), so that Envoy forwards one body message per
event when the events are paced. The script is chosen per request by headers:

=======================  =====================================================================
``x-bench-events``       N, total events including role, finish and [DONE] (default 200)
``x-bench-interval-ms``  delay between events (default 20; 0: back to back)
``x-bench-first-ms``     delay before the first event (default 20)
=======================  =====================================================================

Event ``i`` (0-based) is written at ``t0 + first + i * interval`` where ``t0`` is when the
request was complete; the headers go out at ``t0``. The schedule is absolute (no drift), one
``loop.call_at`` per event. The scripted duration of a stream is ``first + (N - 1) * interval``.

``GET /_stats`` answers the counters as JSON (streams started/completed/reset, events and bytes
written). Nothing is recorded per request: the server must not be the bottleneck.

Compared with ``testkit.upstream.FakeLLM`` (asyncio streams, a record per request with
every write and its timestamp, ``await drain()`` per write), this uses a bare ``asyncio.Protocol``
and pre-encoded chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from testkit.upstream import CANNED_ANSWERS  # clean text, no policy finding

CHARS_PER_EVENT = 4
STREAM_ID = "chatcmpl-bench-0001"  # content events are ~180 bytes
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n")
TERMINATOR = b"0\r\n\r\n"
MAX_HEADER_BYTES = 64 * 1024


def _event(delta: str, finish: str | None = None) -> bytes:
    return (b'data: {"id":"' + STREAM_ID.encode() + b'","object":"chat.completion.chunk",'
            b'"created":1700000000,"model":"bench-model","choices"'
            b':[{"index":0,"delta":' + delta.encode() + b','
            b'"finish_reason":' + (json.dumps(finish).encode() if finish else b"null")
            + b"}]}\n\n")


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n" % len(payload) + payload + b"\r\n"


_SCRIPTS: dict[int, list[bytes]] = {}


def script(n: int) -> list[bytes]:
    """N pre-encoded HTTP chunks, one SSE event each (cached per N)."""
    cached = _SCRIPTS.get(n)
    if cached is not None:
        return cached
    n = max(n, 3)
    base = CANNED_ANSWERS["long"] + " "
    text = base * ((n * CHARS_PER_EVENT) // len(base) + 1)
    events = [_event('{"role":"assistant","content":""}')]
    for i in range(n - 3):
        piece = text[i * CHARS_PER_EVENT:(i + 1) * CHARS_PER_EVENT]
        events.append(_event('{"content":' + json.dumps(piece) + "}"))
    events.append(_event("{}", finish="stop"))
    events.append(b"data: [DONE]\n\n")
    chunks = [_chunked(e) for e in events]
    _SCRIPTS[n] = chunks
    return chunks


class Stats:
    def __init__(self) -> None:
        self.connections = 0
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_reset = 0  # the peer closed the connection mid-stream
        self.events_written = 0
        self.bytes_written = 0
        self.active = 0
        self.peak_active = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


STATS = Stats()


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.body_left = -1  # -1: reading headers
        self.chunked_body = False
        self.streaming = False
        self.handle: asyncio.TimerHandle | None = None
        self.closed = False
        self.method = self.path = ""
        self.headers: dict[str, str] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        STATS.connections += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.streaming:
            self.streaming = False
            STATS.streams_reset += 1
            STATS.active -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.streaming and self.buf:
            if self.body_left < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEADER_BYTES:
                        self.transport.close()  # type: ignore[union-attr]
                    return
                head = self.buf[:end].decode("latin-1")
                self.buf = self.buf[end + 4:]
                self._headers(head)
            if self.chunked_body:
                if not self._skip_chunked():
                    return
            else:
                if len(self.buf) < self.body_left:
                    return
                self.buf = self.buf[self.body_left:]
            self.body_left = -1
            self._respond()

    def _headers(self, head: str) -> None:
        lines = head.split("\r\n")
        self.method, self.path = lines[0].split(" ", 2)[:2]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.headers = headers
        self.chunked_body = "chunked" in headers.get("transfer-encoding", "").lower()
        self.body_left = int(headers.get("content-length") or 0)

    def _skip_chunked(self) -> bool:
        """Drop a chunked request body; True once it was read whole."""
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(self.buf[:end].split(b";", 1)[0] or b"0", 16)
            if size == 0:
                trailer_end = self.buf.find(b"\r\n\r\n", end)
                if self.buf[end:end + 4] == b"\r\n\r\n":
                    self.buf = self.buf[end + 4:]
                    return True
                if trailer_end < 0:
                    return False
                self.buf = self.buf[trailer_end + 4:]
                return True
            if len(self.buf) < end + 2 + size + 2:
                return False
            self.buf = self.buf[end + 2 + size + 2:]

    def _respond(self) -> None:
        transport = self.transport
        assert transport is not None
        if self.method == "GET" and self.path.startswith("/_stats"):
            body = json.dumps(STATS.as_dict()).encode()
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n" % len(body) + body)
            return
        h = self.headers
        n = int(h.get("x-bench-events", "200"))
        interval = float(h.get("x-bench-interval-ms", "20")) / 1000.0
        first = float(h.get("x-bench-first-ms", "20")) / 1000.0
        chunks = script(n)
        self.streaming = True
        STATS.streams_started += 1
        STATS.active += 1
        STATS.peak_active = max(STATS.peak_active, STATS.active)
        transport.write(HEAD)
        t0 = self.loop.time()
        if interval <= 0:
            self.handle = self.loop.call_at(t0 + first, self._burst, chunks)
        else:
            self.handle = self.loop.call_at(t0 + first, self._tick, chunks, 0, t0 + first,
                                            interval)

    def _burst(self, chunks: list[bytes]) -> None:
        self.handle = None
        write = self.transport.write  # type: ignore[union-attr]
        for chunk in chunks:  # one write per event; they may coalesce on the wire
            if self.closed:
                return
            write(chunk)
        STATS.events_written += len(chunks)
        STATS.bytes_written += sum(len(c) for c in chunks)
        self._done()

    def _tick(self, chunks: list[bytes], i: int, start: float, interval: float) -> None:
        if self.closed:
            return
        chunk = chunks[i]
        self.transport.write(chunk)  # type: ignore[union-attr]
        STATS.events_written += 1
        STATS.bytes_written += len(chunk)
        i += 1
        if i < len(chunks):
            self.handle = self.loop.call_at(start + i * interval, self._tick, chunks, i, start,
                                            interval)
        else:
            self.handle = None
            self._done()

    def _done(self) -> None:
        self.transport.write(TERMINATOR)  # type: ignore[union-attr]
        self.streaming = False
        STATS.streams_completed += 1
        STATS.active -= 1
        if self.buf:  # a pipelined request (Envoy does not pipeline; harmless)
            self.data_received(b"")


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()
    print(f"sse-upstream listening on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/sse_upstream.py")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default port 0)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    asyncio.run(serve(host or "127.0.0.1", int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
