"""ApplyGuardrail calls in a child process, so that boto3 never competes with the event loop:
the parent's side.

Why: one boto3 ``apply_guardrail`` call costs about 1 ms of Python CPU (request building, SigV4
signing, parsing; ``bench/README.md``); the lean client (``extproc.guardrail.lean``) a fraction
of it, still worth keeping off the event loop's GIL. Run in a thread pool of the sidecar's own
process, every call holds the GIL against the event loop that answers Envoy. Under load the
loop is one of 33 threads taking turns: at 100 concurrent streams the answer to a stream's
request headers took up to 400 ms (Envoy's ``rh`` latency) although the process had CPU to
spare. In a child process the calls have their own interpreter and GIL, and their CPU lands on
another core; the loop pays only for a small JSON frame each way.

The parent (``CallProcess``) starts ``python -m extproc.guardrail.child`` with one end of a
socketpair, and reads its hello (endpoint and region, or a fatal start-up error) before
serving, so a broken AWS setup still fails at start-up. The frames are
``extproc.guardrail.wire``'s.

The child runs the calls in a thread pool (``--guardrail-threads``), maps AWS errors onto
``extproc.domain.errors`` exactly as the in-process client does, ignores SIGINT/SIGTERM (the parent
decides when to stop, so a Ctrl-C in a terminal does not fail the checks of draining
streams) and exits on the parent's stop frame or when the socket closes, which also happens
when the parent dies. When the child dies, the calls waiting on it fail as ``server_error``
(the failure policy decides), and the next call starts a new child (at most one a second).
Timeouts are the parent's: a late answer is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from extproc.domain.client import Content
from extproc.domain.errors import ConfigError, GuardrailError, GuardrailServerError
from extproc.guardrail.wire import (
    HEADER,
    MAX_FRAME,
    RAW_ANSWER,
    encode_content,
    error_from,
    frame,
    raw_request_frame,
    read_frame_blocking,
    read_raw_answer,
)

log = logging.getLogger(__name__)

#: Seconds the parent waits for the child's hello (imports boto3, builds the client).
HELLO_TIMEOUT_S = 60.0
#: At most one new child per this many seconds; calls in between fail as server_error.
RESPAWN_INTERVAL_S = 1.0


class CallProcess:
    """The parent's side: one child process, calls multiplexed over one socket.

    Constructed (and the child started) synchronously, before the event loop serves; used from
    one event loop at a time (a different loop reconnects on its next call).
    """

    def __init__(self, *, region: str | None, threads: int, timeout_s: float,
                 max_attempts: int, log_level: str = "INFO", log_format: str = "json",
                 clock: Callable[[], float] = time.monotonic, client: str = "lean") -> None:
        self._argv = ["--threads", str(threads), "--timeout", repr(timeout_s),
                      "--max-attempts", str(max_attempts), "--log-level", log_level,
                      "--log-format", log_format, "--client", client]
        if region:
            self._argv += ["--region", region]
        self._clock = clock  # the restart interval's (injected by tests)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._conn: socket.socket | None = None  # the writer's socket (a dup of ``_sock``)
        self._reader_task: asyncio.Task[None] | None = None
        self._starting: asyncio.Future[None] | None = None
        self._next_spawn_at = 0.0  # monotonic time before which no new child is started
        self._closed = False
        self.restarts = 0
        hello = self._spawn()
        self.endpoint_url = str(hello.get("endpoint_url", ""))
        self.region = str(hello.get("region", ""))
        #: The client the child runs: "lean" (``call_raw``) or "boto3" (``call``); a proxy
        #: makes a child asked for lean run boto3.
        self.client = str(hello.get("client", "boto3"))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _spawn(self) -> dict[str, Any]:
        """Start a child and wait for its hello (blocking); raise ``ConfigError`` on a fatal
        start-up error, ``GuardrailServerError`` when it does not come up."""
        parent, child = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "extproc.guardrail.child", "--fd", str(child.fileno()),
                 *self._argv],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            parent.close()
            raise GuardrailServerError(f"cannot start the guardrail call process: {exc}") from exc
        finally:
            child.close()
        try:
            parent.settimeout(HELLO_TIMEOUT_S)
            hello = read_frame_blocking(parent)
        except (OSError, ValueError) as exc:
            parent.close()
            _reap(proc)
            raise GuardrailServerError(
                f"the guardrail call process did not start ({exc}; exit code {proc.poll()})"
            ) from None
        if "fatal" in hello:
            parent.close()
            _reap(proc)
            raise ConfigError(str(hello["fatal"]))
        parent.setblocking(False)
        self._sock, self._proc = parent, proc
        log.debug("guardrail call process %d started", proc.pid)
        return dict(hello.get("hello") or {})

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        if self._proc is not None and self._proc.poll() is not None:
            # It died while no connection was open (nobody read the end of file).
            log.error("guardrail call process %s ended (exit code %s)", self._proc.pid,
                      self._proc.returncode)
            self._drop_connection(GuardrailServerError("the guardrail call process exited"),
                                  child_gone=True)
        if self._sock is None:  # the child died: start another one off the loop
            wait = self._next_spawn_at - self._clock()
            if wait > 0:  # a child that keeps failing is not restarted for every call
                raise GuardrailServerError(
                    f"the guardrail call process failed; next start in {wait:.1f}s")
            self._next_spawn_at = self._clock() + RESPAWN_INTERVAL_S
            await loop.run_in_executor(None, self._spawn)
            self.restarts += 1
            log.warning("guardrail call process restarted (pid %s)", self.pid)
        assert self._sock is not None
        # A duplicate, so that closing this loop's transport leaves the socket for another.
        conn = self._sock.dup()
        reader, writer = await asyncio.open_connection(sock=conn)
        self._loop, self._writer, self._conn = loop, writer, conn
        self._reader_task = loop.create_task(self._read_answers(reader))

    async def _ensure(self) -> asyncio.StreamWriter:
        loop = asyncio.get_running_loop()
        if self._writer is not None and self._loop is not loop:
            self._drop_connection(GuardrailServerError("the event loop changed"))
        if self._writer is None or self._writer.is_closing():
            starting = self._starting
            if starting is None or starting.done() or starting.get_loop() is not loop:
                starting = self._starting = loop.create_task(self._connect())
            try:
                await asyncio.shield(starting)
            finally:
                if starting.done() and self._starting is starting:
                    self._starting = None
        if self._writer is None:  # the connection was lost again meanwhile
            raise GuardrailServerError("the guardrail call process is not connected")
        return self._writer

    async def call(self, guardrail_id: str, version: str, source: str,
                   texts: Sequence[Content]) -> dict[str, Any]:
        """One ApplyGuardrail call in the child (boto3); the response dict, or a
        ``GuardrailError``. Cancelling it (a timeout) forgets the call; the child's late answer
        is dropped."""
        result: dict[str, Any] = await self._call(lambda call_id: frame(
            {"id": call_id, "guardrail": guardrail_id, "version": version, "source": source,
             "texts": encode_content(texts)}))
        return result

    async def call_raw(self, path: str, body: bytes) -> bytes:
        """One ApplyGuardrail call in the child (lean): ``body`` sent to ``path`` as it is; the
        answer body as received (parsed by the caller, once), or a ``GuardrailError``."""
        result: bytes = await self._call(lambda call_id: raw_request_frame(call_id, path, body))
        return result

    async def _call(self, request: Callable[[int], bytes]) -> Any:
        if self._closed:
            raise GuardrailServerError("the guardrail client is closed")
        try:
            writer = await self._ensure()
        except GuardrailError:
            raise
        except (OSError, ConfigError) as exc:
            raise GuardrailServerError(f"guardrail call process unavailable: {exc}") from exc
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            writer.write(request(call_id))
            return await future
        finally:
            self._pending.pop(call_id, None)

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        error: GuardrailError
        try:
            while True:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                if size > MAX_FRAME:
                    raise ValueError(f"frame of {size} bytes")
                payload = await reader.readexactly(size)
                if payload[:1] == RAW_ANSWER:
                    call_id, body = read_raw_answer(payload)
                    future = self._pending.get(call_id)
                    if future is not None and not future.done():
                        future.set_result(body)
                    continue
                answer = json.loads(payload)
                future = self._pending.get(answer.get("id"))
                if future is None or future.done():
                    continue  # the caller gave up (timeout, cancelled stream)
                if "ok" in answer:
                    future.set_result(answer["ok"])
                else:
                    future.set_exception(error_from(str(answer.get("error")),
                                                    str(answer.get("message", ""))))
        except asyncio.CancelledError:
            if self._reader_task is _current_task():
                # The event loop is shutting down (asyncio.run cancels every task): close this
                # loop's connection while the loop can still do it; the child stays.
                self._drop_connection(GuardrailServerError("the event loop stopped"))
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            error = GuardrailServerError("the guardrail call process exited")
        except ValueError as exc:
            error = GuardrailServerError(f"bad answer from the guardrail call process: {exc}")
        if not self._closed:
            code = self._proc.poll() if self._proc is not None else None
            log.error("guardrail call process %s ended (exit code %s); %d call(s) failed, the "
                      "next call starts a new one", self.pid, code, len(self._pending))
        self._drop_connection(error, child_gone=True)

    def _drop_connection(self, error: GuardrailError, child_gone: bool = False) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        writer, self._writer = self._writer, None
        task, self._reader_task = self._reader_task, None
        # The connection may belong to an event loop that is closed by now.
        with contextlib.suppress(RuntimeError):
            if writer is not None:
                writer.close()
            if task is not None and task is not _current_task():
                task.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # now, even when the loop could not close its transport
        if child_gone:
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()
            proc, self._proc = self._proc, None
            if proc is not None:
                _reap(proc, wait_s=0)

    def close(self) -> None:
        """Close the socket (the child exits on end of file) and reap the child."""
        if self._closed:
            return
        self._closed = True
        self._drop_connection(GuardrailServerError("the guardrail client is closed"))
        sock, self._sock = self._sock, None
        if sock is not None:
            # Say so: an event loop may still hold a duplicate of the socket (uvloop closes its
            # transports on a later iteration), so the child would not see the end of file yet.
            with contextlib.suppress(OSError):
                sock.settimeout(1.0)
                sock.sendall(frame({"stop": True}))
            sock.close()
        proc, self._proc = self._proc, None
        if proc is not None:
            _reap(proc, wait_s=5.0)


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def _reap(proc: subprocess.Popen[bytes], wait_s: float = 2.0) -> None:
    """Wait a little for a child that should exit on its own, then kill it."""
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)
