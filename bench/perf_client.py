#!/usr/bin/env python3
"""The measuring client of ``bench/perf.py``: asyncio, raw sockets, HTTP/1.1 keep-alive.

    python bench/perf_client.py '<JSON settings>'      (started by perf.py, one or more processes)

``concurrency`` workers, each on its own keep-alive connection to Envoy, run streaming chat
completions one after the other: a fixed number per worker (``streams_per_worker``) or until
``duration_s`` has passed (no new stream starts after that; started ones finish). Workers start
spread over ``stagger_s`` from ``start_at`` (epoch seconds, so that several client processes
start together).

Per stream it records, from the raw bytes (no JSON parsing, no SSE library): status, time to
the response headers, time to first token (the first ``"content":"x`` with non-empty content,
i.e. the first content-bearing delta), total time to the chunked terminator, the longest silence
between body bytes after the first token (text held back shows here), events received
(``\\n\\n`` separators), ``[DONE]`` seen, an error frame seen, bytes, and which of its worker's
streams it was (1, 2, ...).

It also measures itself, so that perf.py can show it was not the bottleneck: CPU time over the
measurement (``getrusage``) and the event loop's lateness (a 10 ms timer, p50/p99/max): a busy
client would show up as lag, and lag would inflate the latencies it measures.

Prints one JSON document on stdout.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import socket
import sys
import time
from typing import Any

FIRST_CONTENT = re.compile(rb'"content":"[^"]')
DONE = b"data: [DONE]"
ERROR = b'{"error"'

HEAD, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILERS, LENGTH, UNTIL_CLOSE, IDLE = range(8)


class StreamFailed(Exception):
    pass


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.fut: asyncio.Future[None] | None = None
        self.state = IDLE
        self.buf = bytearray()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.state == UNTIL_CLOSE:
            self.terminated = True
            self._finish()
        elif self.fut is not None and not self.fut.done():
            self.fut.set_exception(StreamFailed("connection closed mid-response"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf
        buf += data
        while buf:
            state = self.state
            if state == CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[:end + 2]
                if size == 0:
                    self.state = TRAILERS
                else:
                    self.left = size
                    self.state = CHUNK_DATA
            elif state == CHUNK_DATA:
                take = min(self.left, len(buf))
                self._payload(bytes(buf[:take]), now)
                del buf[:take]
                self.left -= take
                if not self.left:
                    self.state = CHUNK_CRLF
            elif state == CHUNK_CRLF:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = CHUNK_SIZE
            elif state == TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[:end + 2]
                if end == 0:
                    self.terminated = True
                    self._finish()
            elif state == LENGTH:
                take = min(self.left, len(buf))
                self._payload(bytes(buf[:take]), now)
                del buf[:take]
                self.left -= take
                if not self.left:
                    self.terminated = True
                    self._finish()
            elif state == UNTIL_CLOSE:
                self._payload(bytes(buf), now)
                buf.clear()
            elif state == HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head(bytes(buf[:end]), now)
                del buf[:end + 4]
            else:  # IDLE: bytes nobody asked for
                buf.clear()

    # -- one request

    def request(self, raw: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.fut = asyncio.get_running_loop().create_future()
        self.state = HEAD
        self.buf.clear()
        self.started = time.perf_counter()
        self.status = 0
        self.t_headers: float | None = None
        self.t_first: float | None = None
        self.events = 0
        self.done = False
        self.error_frame = False
        self.terminated = False
        self.nbytes = 0
        self.t_last = 0.0
        self.max_gap = 0.0  # longest silence between body bytes after the first token
        self.last = b""
        self.keep_alive = True
        self.transport.write(raw)
        return self.fut

    def _head(self, head: bytes, now: float) -> None:
        self.t_headers = now
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        chunked = False
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"content-length":
                length = int(value.strip())
            elif name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
        if chunked:
            self.state = CHUNK_SIZE
        elif length is not None:
            self.left = length
            self.state = LENGTH
            if length == 0:
                self.terminated = True
                self._finish()
        else:
            self.keep_alive = False
            self.state = UNTIL_CLOSE

    def _payload(self, data: bytes, now: float) -> None:
        self.nbytes += len(data)
        if self.t_first is not None and now - self.t_last > self.max_gap:
            self.max_gap = now - self.t_last
        self.t_last = now
        window = self.last + data
        self.events += (self.last[-1:] + data).count(b"\n\n")
        if self.t_first is None and FIRST_CONTENT.search(window):
            self.t_first = now
        if not self.done and DONE in window:
            self.done = True
        if not self.error_frame and ERROR in window:
            self.error_frame = True
        self.last = window[-16:]

    def _finish(self) -> None:
        self.state = IDLE
        self.t_end = time.perf_counter()
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)


async def run(cfg: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, port = cfg["host"], int(cfg["port"])
    concurrency = int(cfg["concurrency"])
    per_worker = cfg.get("streams_per_worker")
    duration = cfg.get("duration_s")
    timeout = float(cfg.get("timeout_s", 120.0))
    stagger = float(cfg.get("stagger_s", 0.0))
    body = json.dumps({"model": "bench-model", "stream": True,
                       "messages": [{"role": "user",
                                     "content": cfg.get("prompt", "Tell me about lighthouses.")}]
                       }).encode()
    raw = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
           f"content-type: application/json\r\naccept: text/event-stream\r\n"
           f"x-bench-events: {int(cfg['events'])}\r\n"
           f"x-bench-interval-ms: {float(cfg['interval_ms'])}\r\n"
           f"x-bench-first-ms: {float(cfg['first_ms'])}\r\n"
           f"content-length: {len(body)}\r\n\r\n").encode() + body
    rng = random.Random(cfg.get("seed", 1))
    offsets = sorted(rng.uniform(0.0, stagger) for _ in range(concurrency))

    start_at = float(cfg.get("start_at", 0.0))
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = t0 + duration if duration else None
    records: list[list[Any]] = []
    lags: list[float] = []
    stop = asyncio.Event()

    async def lag_monitor() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append((time.perf_counter() - before - 0.01) * 1000.0)

    async def worker(offset: float) -> None:
        await asyncio.sleep(offset)
        conn: Conn | None = None
        count = 0
        while True:
            now = time.perf_counter()
            if per_worker is not None and count >= per_worker:
                break
            if deadline is not None and now >= deadline:
                break
            count += 1
            error = ""
            if conn is None or conn.closed:
                try:
                    _, conn = await loop.create_connection(Conn, host, port)
                except OSError as exc:
                    records.append([now - t0, 0, None, None, 0.0, 0, False, False, False, 0,
                                    f"connect: {exc}", 0.0, count])
                    conn = None
                    await asyncio.sleep(0.1)
                    continue
            fut = conn.request(raw)
            try:
                await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                error = "timeout"
            except StreamFailed as exc:
                error = str(exc)
            end = getattr(conn, "t_end", None) if not error else time.perf_counter()
            if end is None or end < conn.started:
                end = time.perf_counter()
            start = conn.started
            records.append([
                start - t0, conn.status,
                None if conn.t_headers is None else (conn.t_headers - start) * 1000.0,
                None if conn.t_first is None else (conn.t_first - start) * 1000.0,
                (end - start) * 1000.0, conn.events, conn.done, conn.error_frame,
                conn.terminated, conn.nbytes, error, conn.max_gap * 1000.0, count,
            ])
            if error or not conn.keep_alive:
                if conn.transport is not None:
                    conn.transport.close()
                conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    monitor = loop.create_task(lag_monitor())
    await asyncio.gather(*(worker(o) for o in offsets))
    t1 = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    await monitor
    lags.sort()

    def q(p: float) -> float | None:
        return lags[min(len(lags) - 1, int(p * len(lags)))] if lags else None

    return {
        "fields": ["t_start_s", "status", "headers_ms", "ttft_ms", "total_ms", "events", "done",
                   "error_frame", "terminated", "bytes", "error", "max_gap_ms"],
        "records": records,
        "wall_s": t1 - t0,
        "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        "loop_lag_ms": {"p50": q(0.5), "p99": q(0.99), "max": lags[-1] if lags else None,
                        "samples": len(lags)},
    }


def main() -> int:
    cfg = json.loads(sys.argv[1])
    result = asyncio.run(run(cfg))
    sys.stdout.write(json.dumps(result))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
