"""One state machine per ext_proc stream (one HTTP request through Envoy).

``StreamProcessor`` receives Envoy's ``ProcessingRequest`` messages in order, decides, and puts
answers into an ``Outbox`` that a single writer drains in order. Guardrail calls run as
background tasks of the stream; the reader never waits on Bedrock (``ext_proc.md`` 11.11).

The phases, and what each one answers:

* request headers: not an LLM call -> continue and skip the response phase (no further
  messages); an LLM call -> drop ``accept-encoding`` (we must read the answer) and, when the
  prompt is checked, buffer the request body;
* request body (BUFFERED): continue at once, start the INPUT check beside the upstream call;
* response headers: a prompt already blocked -> local 400 JSON error (a 503 when the guardrail
  failed and the failure mode is closed); a ``200 text/event-stream`` answer -> switch the body
  to FULL_DUPLEX_STREAMED and guard it with ``OutputGuard``; any other answer whose prompt
  verdict is still pending -> FULL_DUPLEX too, held whole until the verdict;
* response body: fed to ``OutputGuard``, which releases only text covered by a passing check.

``OutputGuard`` is the sync-mode output guard. Events are released whole and in order, and only
once every character of model text up to them was covered by a passing ApplyGuardrail call
(and the prompt passed). At most one call is in flight; text arriving meanwhile is coalesced
into the next call, which covers the whole answer so far; the last call covers the whole
answer. A block ends the body with the format's terminal frame and ``end_of_stream``, after
which Envoy resets the upstream; nothing is ever sent after that.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Mapping
from typing import Any

from extproc import envoy
from extproc.config import FailureMode, InputCheck, Settings
from extproc.errors import GuardrailError
from extproc.formats import ErrorKind, StreamFormat, find_format
from extproc.guardrail import GuardrailClient, Source
from extproc.sse import SSEDecoder
from extproc.verdict import GuardrailVerdict, Outcome

log = logging.getLogger(__name__)

HEADER_ACCEPT_ENCODING = "accept-encoding"
HEADER_CONTENT_TYPE = "content-type"
HEADER_REQUEST_ID = "x-request-id"
SSE_CONTENT_TYPE = "text/event-stream"


class Outbox:
    """Ordered answers of one stream, drained by whichever coroutine flushes first."""

    __slots__ = ("_queue", "_write", "_draining")

    def __init__(self, write: Callable[[Any], Awaitable[None]]) -> None:
        self._queue: deque[Any] = deque()
        self._write = write
        self._draining = False

    def put(self, message: Any) -> None:
        self._queue.append(message)

    async def flush(self) -> None:
        """Write everything queued, in order; a concurrent flush leaves the work to the first."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                await self._write(self._queue.popleft())
        finally:
            self._draining = False


class Gate(enum.Enum):
    """The prompt verdict as the output side sees it."""

    OPEN = "open"  # passed, or not checked
    PENDING = "pending"
    BLOCKED = "blocked"
    FAILED = "failed"  # no verdict, failure mode closed


class OutputGuard:
    """Sync-mode guard of one response body in FULL_DUPLEX_STREAMED."""

    def __init__(
        self,
        fmt: StreamFormat,
        *,
        parse_sse: bool,
        check_output: bool,
        apply: Callable[[list[str]], Awaitable[GuardrailVerdict]],
        gate: Callable[[], Gate],
        emit: Callable[[bytes, bool, Mapping[str, Any] | None], None],
        flush: Callable[[], Awaitable[None]],
        failure_mode: FailureMode,
        stats: dict[str, Any],
    ) -> None:
        self._fmt = fmt
        self._decoder = SSEDecoder() if parse_sse else None
        self._check_output = check_output
        self._apply = apply
        self._gate = gate
        self._emit = emit
        self._flush = flush
        self._failure_mode = failure_mode
        self.stats = stats
        self._channels: dict[Hashable, list[str]] = {}
        self._held: deque[tuple[bytes, int]] = deque()
        self._text_total = 0
        self._checked = 0
        self._released_chars = 0
        self._upstream_done = False
        self._chunks_seen = False
        self._pending_end: str | None = None
        self._in_flight: asyncio.Task[None] | None = None
        self.finished = False

    # -- input from Envoy -------------------------------------------------------------------

    def on_chunk(self, body: bytes, end_of_stream: bool) -> None:
        """One response body chunk from Envoy (chunk boundaries are arbitrary)."""
        if self.finished or self._upstream_done:
            return  # after our end, or a repeated final chunk (envoy#46237)
        self._chunks_seen = True
        if self._pending_end is not None:
            self.end(self._pending_end)
            return
        if self._decoder is None:
            if body:
                self._held.append((body, self._text_total))
        else:
            for event in self._decoder.feed(body, end_of_stream=end_of_stream):
                if self._check_output:
                    for channel, text in self._fmt.extract(event):
                        self._channels.setdefault(channel, []).append(text)
                        self._text_total += len(text)
                self._held.append((event.raw, self._text_total))
        if end_of_stream:
            self._upstream_done = True
            if self._decoder is not None:
                leftover = self._decoder.flush()
                if leftover:
                    # An unterminated last event: no client dispatches it; pass its bytes on.
                    self._held.append((leftover, self._text_total))
        self._advance()

    def on_gate_change(self) -> None:
        """The prompt verdict arrived."""
        gate = self._gate()
        if gate is Gate.BLOCKED:
            self.end(ErrorKind.VIOLATION)
        elif gate is Gate.FAILED:
            self.end(ErrorKind.UNAVAILABLE)
        else:
            self._advance()

    # -- decisions --------------------------------------------------------------------------

    def _advance(self) -> None:
        self._release()
        self._maybe_check()

    def _release(self) -> None:
        if self.finished or not self._chunks_seen:
            return
        if self._gate() is not Gate.OPEN:
            return
        out: list[bytes] = []
        held = self._held
        checked = self._checked
        while held and held[0][1] <= checked:
            raw, position = held.popleft()
            out.append(raw)
            self._released_chars = position
        end_of_stream = self._upstream_done and not held
        if out or end_of_stream:
            if end_of_stream:
                self.finished = True
                self.stats["outcome"] = self.stats.get("outcome") or "pass"
            self._emit(b"".join(out), end_of_stream, self._metadata() if end_of_stream else None)

    def _maybe_check(self) -> None:
        if self.finished or self._in_flight is not None or self._text_total == self._checked:
            return
        covered = self._text_total
        texts = ["".join(parts) for parts in self._channels.values()]
        self._in_flight = asyncio.get_running_loop().create_task(self._check(covered, texts))

    async def _check(self, covered: int, texts: list[str]) -> None:
        try:
            verdict = await self._apply(texts)
        except GuardrailError as exc:
            self._in_flight = None
            self.stats["errors"] = self.stats.get("errors", 0) + 1
            self.stats["error_class"] = exc.error_class
            if self._failure_mode is FailureMode.OPEN:
                log.warning("output check failed (%s); failure mode open: releasing unchecked "
                            "text", exc.error_class)
                self.stats["failed_open"] = True
                self._checked = covered
                self._advance()
            else:
                log.warning("output check failed (%s); failure mode closed: ending the stream",
                            exc.error_class)
                self.end(ErrorKind.UNAVAILABLE)
        else:
            self._in_flight = None
            self.stats["checks"] = self.stats.get("checks", 0) + 1
            self.stats["text_units"] = self.stats.get("text_units", 0) + verdict.text_units
            if verdict.outcome is Outcome.BLOCK:
                self.stats["tripped_at"] = covered
                self.end(ErrorKind.VIOLATION)
            else:
                if verdict.outcome is Outcome.MASK:
                    self.stats["masked"] = self.stats.get("masked", 0) + 1
                if verdict.detected_only:
                    self.stats["detected"] = self.stats.get("detected", 0) + len(
                        verdict.detected_only)
                self._checked = covered
                self._advance()
        await self._flush()

    def end(self, kind: str) -> None:
        """End the body with the format's terminal frame; nothing is sent after it."""
        if self.finished:
            return
        if not self._chunks_seen:
            # FULL_DUPLEX answers are only valid once Envoy has sent a body chunk.
            self._pending_end = kind
            return
        self.finished = True
        self._held.clear()
        self.stats["outcome"] = "block" if kind == ErrorKind.VIOLATION else "unavailable"
        task = self._in_flight
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._in_flight = None
        self._emit(self._fmt.terminal_frame(kind), True, self._metadata())

    def _metadata(self) -> dict[str, Any]:
        self.stats["chars_released"] = self._released_chars
        return self.stats

    def close(self) -> None:
        """The stream is over (or cancelled): stop the check in flight."""
        if self._in_flight is not None:
            self._in_flight.cancel()
            self._in_flight = None


class StreamProcessor:
    """Decides every answer of one ext_proc stream; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        guardrail: GuardrailClient,
        formats: tuple[StreamFormat, ...],
        outbox: Outbox,
        stream_id: str,
    ) -> None:
        self._settings = settings
        self._guardrail = guardrail
        self._formats = formats
        self._outbox = outbox
        self.stream_id = stream_id
        self._fmt: StreamFormat | None = None
        self._request_body = bytearray()
        self._input_task: asyncio.Task[None] | None = None
        self._input_gate = Gate.OPEN
        self._guard: OutputGuard | None = None
        self._response_started = False
        self.stats: dict[str, Any] = {
            "guardrail_id": settings.guardrail.id,
            "guardrail_version": settings.guardrail.version,
        }

    # -- dispatch ---------------------------------------------------------------------------

    async def handle(self, request: Any) -> None:
        """One message from Envoy; answers go to the outbox, which is flushed before return."""
        kind = request.WhichOneof("request")
        if kind == "response_body":
            body = request.response_body
            if self._guard is not None:
                self._guard.on_chunk(body.body, body.end_of_stream)
            else:
                log.warning("stream %s: response body without a guard; ignored", self.stream_id)
        elif kind == "request_headers":
            self._on_request_headers(request.request_headers)
        elif kind == "request_body":
            self._on_request_body(request.request_body)
        elif kind == "response_headers":
            await self._on_response_headers(request.response_headers)
        elif kind == "response_trailers":
            self._outbox.put(envoy.continue_trailers(response_phase=True))
        elif kind == "request_trailers":
            self._outbox.put(envoy.continue_trailers(response_phase=False))
        await self._outbox.flush()

    def close(self) -> None:
        """The RPC ended: cancel every background task of this stream."""
        if self._input_task is not None and not self._input_task.done():
            self._input_task.cancel()
        if self._guard is not None:
            self._guard.close()

    # -- request ----------------------------------------------------------------------------

    def _on_request_headers(self, message: Any) -> None:
        headers = envoy.header_map(message.headers)
        method = headers.get(":method", "")
        path = headers.get(":path", "")
        fmt = find_format(method, path, self._formats)
        settings = self._settings
        guarding = settings.output_check or settings.input_check is not InputCheck.OFF
        if fmt is None or not guarding:
            self._outbox.put(
                envoy.headers_response(response_phase=False, mode=envoy.MODE_SKIP_RESPONSE)
            )
            return
        self._fmt = fmt
        request_id = headers.get(HEADER_REQUEST_ID)
        if request_id:
            self.stats["request_id"] = request_id
        self.stats["format"] = fmt.name
        check_prompt = settings.input_check is InputCheck.PARALLEL and not message.end_of_stream
        self._outbox.put(
            envoy.headers_response(
                response_phase=False,
                remove_headers=(HEADER_ACCEPT_ENCODING,),
                mode=envoy.MODE_BUFFER_REQUEST if check_prompt else None,
            )
        )

    def _on_request_body(self, message: Any) -> None:
        self._outbox.put(envoy.continue_request_body())
        if self._fmt is None or self._input_task is not None:
            return
        self._request_body += message.body
        if not message.end_of_stream:
            return
        texts = self._fmt.prompt_texts(bytes(self._request_body))
        self._request_body = bytearray()
        if not texts:
            return
        self._input_gate = Gate.PENDING
        self._input_task = asyncio.get_running_loop().create_task(self._check_input(texts))

    async def _check_input(self, texts: list[str]) -> None:
        try:
            verdict = await self._guardrail.apply(self._settings.guardrail, Source.INPUT, texts)
        except GuardrailError as exc:
            self.stats["input"] = f"error:{exc.error_class}"
            if self._settings.failure_mode is FailureMode.OPEN:
                log.warning("stream %s: prompt check failed (%s); failure mode open",
                            self.stream_id, exc.error_class)
                self._input_gate = Gate.OPEN
            else:
                log.warning("stream %s: prompt check failed (%s); failure mode closed",
                            self.stream_id, exc.error_class)
                self._input_gate = Gate.FAILED
        else:
            self.stats["input"] = verdict.outcome.value
            self.stats["text_units"] = self.stats.get("text_units", 0) + verdict.text_units
            if verdict.outcome is Outcome.BLOCK:
                log.info("stream %s: prompt blocked by the guardrail", self.stream_id)
                self._input_gate = Gate.BLOCKED
            else:
                self._input_gate = Gate.OPEN
        if self._guard is not None:
            self._guard.on_gate_change()
            await self._outbox.flush()

    # -- response ---------------------------------------------------------------------------

    async def _on_response_headers(self, message: Any) -> None:
        self._response_started = True
        fmt = self._fmt
        if fmt is None:
            self._outbox.put(envoy.headers_response(response_phase=True))
            return
        task = self._input_task
        if task is not None and not task.done() and self._settings.input_wait_s > 0:
            # Envoy holds the response headers for this answer (message_timeout applies), so
            # wait only briefly for a prompt verdict that can still become a proper 4xx.
            await asyncio.wait((task,), timeout=self._settings.input_wait_s)
        gate = self._input_gate
        ns = self._settings.metadata_namespace
        if gate is Gate.BLOCKED or gate is Gate.FAILED:
            kind = ErrorKind.VIOLATION if gate is Gate.BLOCKED else ErrorKind.UNAVAILABLE
            status, body = fmt.error_body(kind)
            self.stats["outcome"] = "input_block" if gate is Gate.BLOCKED else "unavailable"
            self._outbox.put(
                envoy.immediate_response(status, body, details=f"{kind}_input",
                                         metadata_namespace=ns, metadata=self.stats)
            )
            return
        headers = envoy.header_map(message.headers)
        content_type = headers.get(HEADER_CONTENT_TYPE, "").lower()
        is_sse = headers.get(":status") == "200" and content_type.startswith(SSE_CONTENT_TYPE)
        has_body = not message.end_of_stream
        check_output = self._settings.output_check and is_sse
        if has_body and (check_output or gate is Gate.PENDING):
            self._guard = OutputGuard(
                fmt,
                parse_sse=is_sse,
                check_output=check_output,
                apply=self._apply_output,
                gate=lambda: self._input_gate,
                emit=self._emit_body,
                flush=self._outbox.flush,
                failure_mode=self._settings.failure_mode,
                stats=self.stats,
            )
            self._outbox.put(
                envoy.headers_response(response_phase=True, mode=envoy.MODE_FULL_DUPLEX_RESPONSE)
            )
            return
        self._outbox.put(envoy.headers_response(response_phase=True))

    def _apply_output(self, texts: list[str]) -> Coroutine[Any, Any, GuardrailVerdict]:
        return self._guardrail.apply(self._settings.guardrail, Source.OUTPUT, texts)

    def _emit_body(self, body: bytes, end_of_stream: bool,
                   metadata: Mapping[str, Any] | None) -> None:
        if end_of_stream and self.stats.get("outcome") in ("block", "unavailable"):
            log.info("stream %s: answer ended by the guardrail (%s) after %s released "
                     "characters", self.stream_id, self.stats.get("outcome"),
                     self.stats.get("chars_released", 0))
        self._outbox.put(
            envoy.streamed_response_body(
                body, end_of_stream,
                metadata_namespace=self._settings.metadata_namespace, metadata=metadata,
            )
        )
