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
  to FULL_DUPLEX_STREAMED and guard it with ``extproc.guard.OutputGuard``; any other answer
  whose prompt verdict is still pending -> FULL_DUPLEX too, held whole until the verdict;
* response body: fed to the guard; what it releases goes out through a body sink.

Two sinks, chosen from the body mode Envoy reports in ``protocol_config``:
``FullDuplexSink`` (FULL_DUPLEX_STREAMED, Envoy >= 1.34: answers any time, can end the body
early so that Envoy resets the upstream) and ``StreamedSink`` (a route configured STREAMED, the
fallback for older Envoy/Istio: one answer per chunk, in order, at once).

Every guardrail call goes through ``_apply``, which times it and reports the verdict or the
error to the metrics ``Recorder`` and adds its findings to the stream's metadata. Each block and
mask (and shadow would-be one) is written to the audit trail once, where it is acted on
(``_intervened``). The stream's outcome is counted when the RPC ends (``close``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import zlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Mapping
from typing import Any

from extproc import envoy
from extproc.observe.audit import AuditLog, finding_key, reported
from extproc.domain.values import InputCheck
from extproc.settings.values import RoutePolicy, Settings
from extproc.domain.errors import GuardrailError, GuardrailOverload, GuardrailServerError
from extproc.formats import ErrorKind, StreamFormat, find_format
from extproc.domain.client import GuardrailClient
from extproc.domain.values import Source
from extproc.guard import OutputGuard
from extproc.observe.metrics import DEFAULT_ROUTE, NO_FORMAT, NULL_RECORDER, Recorder, stream_outcome
from extproc.domain.verdict import GuardrailVerdict, Outcome

log = logging.getLogger(__name__)

HEADER_ACCEPT_ENCODING = "accept-encoding"
HEADER_CONTENT_TYPE = "content-type"
HEADER_CONTENT_LENGTH = "content-length"
HEADER_CONTENT_ENCODING = "content-encoding"
JSON_CONTENT_TYPE = "application/json"
HEADER_REQUEST_ID = "x-request-id"
SSE_CONTENT_TYPE = "text/event-stream"
#: Distinct findings kept in the metadata summary of one stream.
MAX_FINDING_KEYS = 16


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


class FullDuplexSink:
    """FULL_DUPLEX_STREAMED: released bytes go out at once as ``StreamedBodyResponse``s."""

    def __init__(self, outbox: Outbox, namespace: str) -> None:
        self._outbox = outbox
        self._namespace = namespace

    def release(self, data: bytes) -> None:
        if data:
            self._outbox.put(envoy.streamed_response_body(data, False))

    def finish(self, data: bytes, metadata: Mapping[str, Any]) -> None:
        self._outbox.put(envoy.streamed_response_body(
            data, True, metadata_namespace=self._namespace, metadata=metadata))

    def chunk_done(self, end_of_stream: bool) -> None:
        """FULL_DUPLEX answers are not paired with chunks."""


class StreamedSink:
    """STREAMED (Envoy < 1.34): exactly one answer per chunk, in order, at once.

    Released bytes ride on the next chunk's answer; a chunk with nothing to release is
    cleared. The final chunk's answer waits for the final check, with
    ``override_message_timeout`` so Envoy's timer does not fire meanwhile. After the end,
    every later chunk is cleared. The upstream keeps generating until it finishes.
    """

    def __init__(self, outbox: Outbox, namespace: str, message_timeout_s: float) -> None:
        self._outbox = outbox
        self._namespace = namespace
        self._timeout_s = message_timeout_s
        self._pending = bytearray()
        self._finished = False
        self._metadata: Mapping[str, Any] | None = None
        self._final_waiting = False

    def release(self, data: bytes) -> None:
        self._pending += data

    def finish(self, data: bytes, metadata: Mapping[str, Any]) -> None:
        self._pending += data
        self._finished = True
        self._metadata = metadata
        if self._final_waiting:
            self._answer()

    def chunk_done(self, end_of_stream: bool) -> None:
        if end_of_stream and not self._finished:
            self._final_waiting = True
            self._outbox.put(envoy.override_message_timeout(self._timeout_s))
            return
        self._answer()

    def _answer(self) -> None:
        metadata, self._metadata = self._metadata, None
        self._final_waiting = False
        self._outbox.put(envoy.streamed_mode_body(
            bytes(self._pending), metadata_namespace=self._namespace, metadata=metadata))
        self._pending.clear()


_warned_full_duplex = False


def _warn_configured_full_duplex(request_body_mode: int) -> None:
    """Once per process: what a response body mode configured as FULL_DUPLEX_STREAMED costs."""
    global _warned_full_duplex
    if _warned_full_duplex:
        return
    _warned_full_duplex = True
    prompt = ("prompts are checked (request_body_mode BUFFERED)"
              if request_body_mode == envoy.ProcessingMode.BUFFERED else
              "prompts are NOT checked: set request_body_mode BUFFERED, or use envoy/envoy.yaml")
    log.warning("Envoy's response_body_mode is configured as FULL_DUPLEX_STREAMED, so it ignores "
                "mode overrides: every response body streams through the sidecar (answers it "
                "does not guard are passed back chunk by chunk; a blocked JSON answer keeps its "
                "200 status and gets the error body); %s. envoy/envoy.yaml's processing_mode "
                "(NONE, switched per request) avoids both", prompt)


def decode_body(body: bytes, encoding: str, limit: int) -> bytes | None:
    """The request body without its content-encoding (gzip, deflate), at most ``limit`` bytes
    (0: no limit) once inflated; None when it cannot be read (unknown encoding, corrupt data,
    a decompression bomb)."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or zlib header, detected
    try:
        out = inflater.decompress(body, limit or 0)
    except zlib.error:
        if encoding != "deflate":
            return None
        try:  # "deflate" is sometimes sent raw, without the zlib header
            inflater = zlib.decompressobj(wbits=-15)
            out = inflater.decompress(body, limit or 0)
        except zlib.error:
            return None
    if inflater.unconsumed_tail or not inflater.eof:
        return None
    return out


class Admission:
    """How many streams this process guards at once (``--max-streams``; 0: no limit)."""

    __slots__ = ("limit", "active")

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.active = 0

    def enter(self) -> bool:
        if self.limit and self.active >= self.limit:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1


class StreamProcessor:
    """Decides every answer of one ext_proc stream; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        guardrail: GuardrailClient,
        formats: tuple[StreamFormat, ...],
        outbox: Outbox,
        stream_id: str,
        route: RoutePolicy | None = None,
        *,
        route_name: str = DEFAULT_ROUTE,
        recorder: Recorder = NULL_RECORDER,
        audit: AuditLog | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._admission = admission if admission is not None else Admission()
        self._admitted = False
        self._settings = settings
        self._route = route if route is not None else settings.default_route
        self._route_name = route_name
        self._recorder = recorder
        self._audit = audit if audit is not None else AuditLog()
        self._counted = False
        self._findings: dict[str, None] = {}
        self._guardrail = guardrail
        self._formats = formats
        self._outbox = outbox
        self.stream_id = stream_id
        self._fmt: StreamFormat | None = None
        self._request_body = bytearray()
        self._input_task: asyncio.Task[None] | None = None
        self._input_gate = Gate.OPEN
        self._guard: OutputGuard | None = None
        self._sink: FullDuplexSink | StreamedSink | None = None
        self._configured_response_body = envoy.ProcessingMode.NONE
        self._streamed = False
        # The response body mode is *configured* FULL_DUPLEX_STREAMED: Envoy ignores mode
        # overrides, so every body streams through here and each answer is a streamed one.
        self._full_duplex = False
        self._body_started = False
        self._body_done = False  # we ended the body (configured FULL_DUPLEX); ignore the rest
        self._request_done = False
        self._request_decoded = False
        self._content_encoding = "identity"
        self._json_answer = False
        self._json_task: asyncio.Task[None] | None = None
        self._response_body = bytearray()
        self.stats: dict[str, Any] = {
            "guardrail_id": self._route.guardrail.id,
            "guardrail_version": self._route.guardrail.version,
        }

    # -- dispatch ---------------------------------------------------------------------------

    async def handle(self, request: Any) -> None:
        """One message from Envoy; answers go to the outbox, which is flushed before return."""
        kind = request.WhichOneof("request")
        if kind == "response_body":
            self._body_started = True
            self._on_response_body(request.response_body)
        elif kind == "request_headers":
            if request.HasField("protocol_config"):
                config = request.protocol_config
                self._configured_response_body = config.response_body_mode
                self._streamed = self._configured_response_body == envoy.STREAMED
                self._full_duplex = self._configured_response_body == envoy.FULL_DUPLEX
                if self._full_duplex:
                    _warn_configured_full_duplex(config.request_body_mode)
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
        """The RPC ended: cancel every background task of this stream, count its outcome."""
        if self._admitted:
            self._admitted = False
            self._admission.leave()
        unfinished = (self._guard is not None and not self._guard.finished) or (
            self._json_task is not None and not self._json_task.done())
        for task in (self._input_task, self._json_task):
            if task is not None and not task.done():
                task.cancel()
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.close()
            self._recorder.untrack_held(guard)
            # The guard holds this processor's bound methods: without the cycle, reference
            # counting frees the finished stream (its RPC, task and text) at once, rather than a
            # full garbage collection, which ``--gc-full-every`` makes rare.
        if self._counted:
            self._counted = False
            outcome = stream_outcome(self.stats, guarded=self._fmt is not None,
                                     unfinished=unfinished)
            fmt = self._fmt.name if self._fmt is not None else NO_FORMAT
            self._recorder.stream_finished(self._route_name, fmt, outcome)
            if outcome == "block" or outcome == "soft_block":
                self._recorder.released_before_block(self.stats.get("chars_released", 0))

    # -- request ----------------------------------------------------------------------------

    def _on_request_headers(self, message: Any) -> None:
        headers = envoy.header_map(message.headers)
        method = headers.get(":method", "")
        path = headers.get(":path", "")
        fmt = find_format(method, path, self._formats)
        route = self._route
        guarding = route.enabled and (route.output_check or route.input_check is not InputCheck.OFF)
        self._counted = True
        self._recorder.stream_started(
            self._route_name, fmt.name if fmt is not None and guarding else NO_FORMAT)
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
        self._admitted = self._admission.enter()
        if not self._admitted:
            error = GuardrailOverload(f"more than {self._admission.limit} streams guarded")
            self.stats["error_class"] = error.error_class
            if route.failure_mode.fails_open(error) or route.shadow:
                log.warning("%d streams guarded already; failure mode open: this one passes "
                            "unchecked", self._admission.limit)
                self.stats["failed_open"] = True
                self._fmt = None
                self._outbox.put(envoy.headers_response(
                    response_phase=False, mode=envoy.MODE_SKIP_RESPONSE))
            else:
                log.warning("%d streams guarded already; failure mode closed: 503",
                            self._admission.limit)
                self._reply_error(ErrorKind.UNAVAILABLE, "unavailable")
            return
        if self._streamed:
            self.stats["body_mode"] = "streamed"
        check_prompt = route.input_check is not InputCheck.OFF and not message.end_of_stream
        self._content_encoding = headers.get(HEADER_CONTENT_ENCODING, "identity").strip().lower()
        length = headers.get(HEADER_CONTENT_LENGTH, "")
        limit = self._settings.streams.max_request_bytes
        if check_prompt and limit and length.isdigit() and int(length) > limit:
            # Answer before Envoy buffers it: a body over Envoy's buffer limit would otherwise
            # stall the request (read-disabled) instead of failing.
            log.info("prompt of %s bytes is over --max-request-bytes (%d): 413", length, limit)
            self._reply_error(ErrorKind.TOO_LARGE, "too_large")
            return
        mode = (envoy.mode_with_request_buffering(self._configured_response_body)
                if check_prompt else None)
        self._outbox.put(
            envoy.headers_response(
                response_phase=False, remove_headers=(HEADER_ACCEPT_ENCODING,), mode=mode
            )
        )

    def _on_request_body(self, message: Any) -> None:
        route = self._route
        pre_call = route.input_check is InputCheck.PRE_CALL and not route.shadow
        if (self._fmt is None or self._input_task is not None or self._request_done
                or route.input_check is InputCheck.OFF):
            self._outbox.put(envoy.continue_request_body())
            return
        self._request_body += message.body
        if not message.end_of_stream:
            # BUFFERED sends one message; anything else is answered as it comes.
            self._outbox.put(envoy.continue_request_body())
            return
        self._request_done = True
        body = bytes(self._request_body)
        self._request_body = bytearray()
        limit = self._settings.streams.max_request_bytes
        if limit and len(body) > limit:
            # No content-length to answer from at the headers (a chunked request).
            log.info("prompt of %d bytes is over --max-request-bytes (%d): 413", len(body), limit)
            self._reply_error(ErrorKind.TOO_LARGE, "too_large")
            return
        decoded = decode_body(body, self._content_encoding, limit)
        if decoded is None:
            # A prompt we cannot read must not go upstream unchecked.
            log.info("request body with content-encoding %r cannot be read: 415",
                     self._content_encoding)
            self._reply_error(ErrorKind.UNREADABLE, "unreadable")
            return
        self._request_decoded = decoded is not body
        body = decoded
        texts = self._fmt.prompt_texts(body, route.prompt_scope.value)
        if not texts:
            self._outbox.put(envoy.continue_request_body())
            return
        self._input_gate = Gate.PENDING
        if pre_call:
            # The answer waits for the verdict: keep Envoy's message timer from firing first.
            self._outbox.put(envoy.override_message_timeout(self._settings.client.timeout_s + 1))
        else:
            self._outbox.put(envoy.continue_request_body())
        self._input_task = asyncio.get_running_loop().create_task(
            self._check_input(texts, body if pre_call else None))

    async def _check_input(self, texts: list[str], held_body: bytes | None) -> None:
        """The prompt check. ``held_body``: pre_call, the request waits for this answer."""
        route = self._route
        verdict: GuardrailVerdict | None = None
        try:
            verdict = await self._apply(Source.INPUT, texts)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - GuardrailError, or a bug: never hang the request
            if not isinstance(exc, GuardrailError):
                log.exception("BUG in the prompt check")
                exc = GuardrailServerError(f"internal: {type(exc).__name__}")
            self.stats["input"] = f"error:{exc.error_class}"
            self.stats["error_class"] = exc.error_class
            if route.failure_mode.fails_open(exc) or route.shadow:
                log.warning("prompt check failed (%s); failure mode open", exc.error_class)
                self.stats["failed_open"] = True
                self._input_gate = Gate.OPEN
            else:
                log.warning("prompt check failed (%s); failure mode closed", exc.error_class)
                self._input_gate = Gate.FAILED
        else:
            self.stats["input"] = verdict.outcome.value
            self.stats["text_units"] = self.stats.get("text_units", 0) + verdict.text_units
            if verdict.outcome is Outcome.BLOCK and route.shadow:
                self.stats["would_block_input"] = True
                self._intervened(Source.INPUT, "shadow_would_block", verdict)
                log.info("shadow: the prompt would have been blocked")
                self._input_gate = Gate.OPEN
            elif verdict.outcome is Outcome.BLOCK:
                self._intervened(Source.INPUT, "block", verdict)
                log.info("prompt blocked by the guardrail")
                self._input_gate = Gate.BLOCKED
            else:
                if verdict.outcome is Outcome.MASK:
                    # pre_call rewrites the held prompt; in parallel it has gone upstream.
                    outcome = ("shadow_would_mask" if route.shadow
                               else "mask" if held_body is not None else "mask_unapplied")
                    self._intervened(Source.INPUT, outcome, verdict)
                self._input_gate = Gate.OPEN
        if held_body is not None:
            self._answer_held_request(held_body, texts, verdict)
        elif self._guard is not None:
            self._guard.on_gate_change()
        await self._outbox.flush()

    def _answer_held_request(self, body: bytes, texts: list[str],
                             verdict: GuardrailVerdict | None) -> None:
        """pre_call: the request body answer, once the prompt verdict is known."""
        fmt = self._fmt
        assert fmt is not None, "BUG: a held request without a format"
        gate = self._input_gate
        if gate is Gate.BLOCKED or gate is Gate.FAILED:
            kind = ErrorKind.VIOLATION if gate is Gate.BLOCKED else ErrorKind.UNAVAILABLE
            self._reply_error(kind, "input_block" if gate is Gate.BLOCKED else "unavailable")
            return
        if verdict is not None and verdict.outcome is Outcome.MASK \
                and len(verdict.outputs) == len(texts):
            rewritten = fmt.rewrite_prompt(body, self._route.prompt_scope.value,
                                           list(verdict.outputs))
            if rewritten is not None:
                self.stats["input_masked"] = True
                self._outbox.put(envoy.replace_request_body(
                    rewritten, remove_headers=(HEADER_CONTENT_ENCODING,)
                    if self._request_decoded else ()))
                return
            log.warning("masked prompt could not be rewritten; sent unchanged")
        self._outbox.put(envoy.continue_request_body())

    def _reply_error(self, kind: str, outcome: str) -> None:
        """A local error reply (only while the response headers have not gone out; with the
        body mode configured FULL_DUPLEX they have once the body streams: the error body then
        replaces the answer's, behind the status already sent)."""
        fmt = self._fmt
        assert fmt is not None, "BUG: an error reply without a format"
        status, body = fmt.error_body(kind)
        self.stats["outcome"] = outcome
        self.stats.setdefault("chars_released", 0)
        if self._full_duplex and self._body_started:
            self._outbox.put(envoy.streamed_response_body(
                body, True, metadata_namespace=self._settings.streams.metadata_namespace,
                metadata=self.stats))
            return
        self._outbox.put(envoy.immediate_response(
            status, body, details=f"{kind}_input" if outcome != "block" else kind,
            metadata_namespace=self._settings.streams.metadata_namespace, metadata=self.stats))

    # -- response ---------------------------------------------------------------------------

    async def _on_response_headers(self, message: Any) -> None:
        fmt = self._fmt
        if fmt is None:
            self._outbox.put(envoy.headers_response(response_phase=True))
            return
        task = self._input_task
        if task is not None and not task.done() and self._settings.streams.input_wait_s > 0:
            # Envoy holds the response headers for this answer (message_timeout applies), so
            # wait only briefly for a prompt verdict that can still become a proper 4xx.
            await asyncio.wait((task,), timeout=self._settings.streams.input_wait_s)
        gate = self._input_gate
        settings = self._settings
        ns = settings.streams.metadata_namespace
        if gate is Gate.BLOCKED or gate is Gate.FAILED:
            kind = ErrorKind.VIOLATION if gate is Gate.BLOCKED else ErrorKind.UNAVAILABLE
            self._reply_error(kind, "input_block" if gate is Gate.BLOCKED else "unavailable")
            return
        headers = envoy.header_map(message.headers)
        content_type = headers.get(HEADER_CONTENT_TYPE, "").lower()
        ok = headers.get(":status") == "200"
        is_sse = ok and content_type.startswith(SSE_CONTENT_TYPE)
        is_json = ok and content_type.startswith(JSON_CONTENT_TYPE)
        has_body = not message.end_of_stream
        route = self._route
        encoding = headers.get(HEADER_CONTENT_ENCODING, "identity").strip().lower()
        if has_body and (is_sse or is_json) and encoding not in ("", "identity") and (
                route.output_check or gate is Gate.PENDING):
            # The upstream compressed the answer although accept-encoding was removed: the
            # guard cannot read it, so it cannot release it as checked.
            error = GuardrailServerError(f"answer in content-encoding {encoding!r}")
            self.stats["error_class"] = error.error_class
            if route.failure_mode.fails_open(error) or route.shadow:
                log.warning("answer in content-encoding %r cannot be checked; failure mode "
                            "open: passed unchecked", encoding)
                self.stats["failed_open"] = True
                self._outbox.put(envoy.headers_response(response_phase=True))
            else:
                log.warning("answer in content-encoding %r cannot be checked; failure mode "
                            "closed: 503", encoding)
                self._reply_error(ErrorKind.UNAVAILABLE, "unavailable")
            return
        if has_body and is_json and (route.output_check or gate is Gate.PENDING):
            # A non-streamed answer: take it whole; the client's headers wait for our answer,
            # so a block can still be a proper 4xx.
            self._json_answer = True
            self._recorder.body_mode("buffered")
            self._outbox.put(envoy.headers_response(
                response_phase=True, remove_headers=(HEADER_CONTENT_LENGTH,),
                mode=envoy.MODE_BUFFER_RESPONSE))
            return
        check_output = route.output_check and is_sse
        if has_body and (check_output or gate is Gate.PENDING):
            sink: FullDuplexSink | StreamedSink
            if self._streamed:
                sink = StreamedSink(self._outbox, ns, settings.streams.streamed_message_timeout_s)
                self._recorder.body_mode("streamed")
            else:
                sink = FullDuplexSink(self._outbox, ns)
                self._recorder.body_mode("full_duplex_streamed")
            self._sink = sink
            self._guard = OutputGuard(
                fmt,
                parse_sse=is_sse,
                check_output=check_output,
                mode=route.stream_mode,
                policy=route.window,
                apply=self._apply_output,
                # Read per body chunk: ``_value_``, as ``.value`` is a Python-level property.
                gate=lambda: self._input_gate._value_,
                sink=sink,
                flush=self._outbox.flush,
                failure_mode=route.failure_mode,
                stats=self.stats,
                keepalive_s=settings.streams.keepalive_s if not self._streamed else 0.0,
                shadow=route.shadow,
                soft_block=route.soft_block,
                on_intervention=self._output_intervened,
                max_held_bytes=settings.streams.max_held_bytes,
            )
            self._recorder.track_held(self._guard)
            mode = None if self._streamed else envoy.MODE_FULL_DUPLEX_RESPONSE
            self._outbox.put(envoy.headers_response(response_phase=True, mode=mode))
            return
        self._outbox.put(envoy.headers_response(response_phase=True))

    async def _answer_json(self, body: bytes) -> None:
        """Envoy waits for this answer: whatever goes wrong, it gets one."""
        try:
            await self._check_json_answer(body)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug must not leave Envoy waiting
            log.exception("BUG while checking a non-streamed answer; failing closed")
            self._reply_error(ErrorKind.UNAVAILABLE, "unavailable")
            await self._outbox.flush()

    async def _check_json_answer(self, body: bytes) -> None:
        """A whole non-streamed answer (BUFFERED): prompt verdict, then the answer's check."""
        fmt, route = self._fmt, self._route
        assert fmt is not None, "BUG: a JSON answer without a format"
        ns = self._settings.streams.metadata_namespace
        if self._input_task is not None:
            await asyncio.wait((self._input_task,))
        gate = self._input_gate
        if gate is Gate.BLOCKED or gate is Gate.FAILED:
            kind = ErrorKind.VIOLATION if gate is Gate.BLOCKED else ErrorKind.UNAVAILABLE
            self._reply_error(kind, "input_block" if gate is Gate.BLOCKED else "unavailable")
            await self._outbox.flush()
            return
        pairs = fmt.response_texts(body) if route.output_check else []
        reply = self._whole_body_reply(body, None)
        if pairs:
            try:
                verdict = await self._apply_output([text for _, text in pairs])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - GuardrailError, or a bug: answer anyway
                if not isinstance(exc, GuardrailError):
                    log.exception("BUG in the answer check")
                    exc = GuardrailServerError(f"internal: {type(exc).__name__}")
                self.stats["error_class"] = exc.error_class
                if route.failure_mode.fails_open(exc) or route.shadow:
                    self.stats["failed_open"] = True
                    log.warning("answer check failed (%s); failure mode open", exc.error_class)
                else:
                    log.warning("answer check failed (%s); failure mode closed",
                                exc.error_class)
                    self._reply_error(ErrorKind.UNAVAILABLE, "unavailable")
                    await self._outbox.flush()
                    return
            else:
                self.stats["checks"] = self.stats.get("checks", 0) + 1
                self.stats["text_units"] = self.stats.get("text_units", 0) + verdict.text_units
                if route.shadow and verdict.outcome is not Outcome.PASS:
                    self.stats[f"would_{verdict.outcome.value}"] = True
                    self._intervened(Source.OUTPUT, f"shadow_would_{verdict.outcome.value}",
                                     verdict)
                elif verdict.outcome is Outcome.BLOCK and route.soft_block:
                    self._intervened(Source.OUTPUT, "soft_block", verdict)
                    self.stats["outcome"] = "soft_block"
                    message = verdict.outputs[0] if verdict.outputs else ""
                    reply = self._whole_body_reply(body, fmt.soft_block_response(body, message))
                elif verdict.outcome is Outcome.BLOCK:
                    self._intervened(Source.OUTPUT, "block", verdict)
                    log.info("answer blocked by the guardrail")
                    self._reply_error(ErrorKind.VIOLATION, "block")
                    await self._outbox.flush()
                    return
                elif verdict.outcome is Outcome.MASK:
                    masked = {channel: text for (channel, _), text in zip(
                        pairs, verdict.outputs, strict=False)}
                    try:
                        if len(verdict.outputs) != len(pairs):
                            raise ValueError("masked outputs do not match the answer's texts")
                        rewritten = fmt.rewrite_response(body, masked)
                    except ValueError as exc:
                        # Masked text that cannot be put back must not go out as the original.
                        log.warning("masked answer cannot be rewritten (%s); blocking", exc)
                        self._intervened(Source.OUTPUT, "block", verdict)
                        self._reply_error(ErrorKind.VIOLATION, "block")
                        await self._outbox.flush()
                        return
                    self._intervened(Source.OUTPUT, "mask", verdict)
                    self.stats["masked"] = 1
                    reply = self._whole_body_reply(body, rewritten)
        self.stats.setdefault("outcome", "pass")
        self._outbox.put(reply)
        await self._outbox.flush()

    def _whole_body_reply(self, original: bytes, replacement: bytes | None) -> Any:
        """The answer to a whole non-streamed answer: unchanged (``replacement`` None) or
        replaced. With the body mode configured FULL_DUPLEX it came in chunks (our BUFFERED
        override is ignored) and goes back as one streamed answer."""
        ns = self._settings.streams.metadata_namespace
        if self._full_duplex:
            return envoy.streamed_response_body(
                original if replacement is None else replacement, True,
                metadata_namespace=ns, metadata=self.stats)
        if replacement is None:
            return envoy.continue_response_body(metadata_namespace=ns, metadata=self.stats)
        return envoy.replace_response_body(replacement, metadata_namespace=ns,
                                           metadata=self.stats)

    def _on_response_body(self, body: Any) -> None:
        if self._body_done:
            return  # (configured FULL_DUPLEX: after our end of the body, Envoy sends no more)
        if self._json_answer:
            self._response_body += body.body
            limit = self._settings.streams.max_held_bytes
            if self._full_duplex and limit and len(self._response_body) > limit:
                # Envoy keeps a BUFFERED body within its own limit; these chunks come to us.
                self._json_overflow(body.end_of_stream)
                return
            if body.end_of_stream and self._json_task is None:
                if not self._full_duplex:  # (FULL_DUPLEX has no timer)
                    # The answer waits for checks: keep Envoy's message timer from firing first.
                    self._outbox.put(envoy.override_message_timeout(
                        2 * self._settings.client.timeout_s + 1))
                self._json_task = asyncio.get_running_loop().create_task(
                    self._answer_json(bytes(self._response_body)))
            return
        guard, sink = self._guard, self._sink
        if guard is None or sink is None:
            if self._streamed:
                # A STREAMED route whose answer we do not guard: one unchanged answer per chunk.
                self._outbox.put(envoy.streamed_mode_body(None, pass_through=True))
            elif self._full_duplex:
                # Configured FULL_DUPLEX: an answer we do not guard goes back as it came.
                self._outbox.put(envoy.streamed_response_body(body.body, body.end_of_stream))
            else:
                log.warning("response body without a guard; ignored")
            return
        guard.on_chunk(body.body, body.end_of_stream)
        sink.chunk_done(body.end_of_stream)

    def _json_overflow(self, end_of_stream: bool) -> None:
        """Configured FULL_DUPLEX: a non-streamed answer over ``--max-held-bytes``; the
        ``overload`` failure class decides between the error body and passing it unchecked."""
        error = GuardrailOverload(f"a non-streamed answer of more than "
                                  f"{self._settings.streams.max_held_bytes} bytes")
        self.stats["error_class"] = error.error_class
        self._json_answer = False
        held, self._response_body = bytes(self._response_body), bytearray()
        if self._route.failure_mode.fails_open(error) or self._route.shadow:
            log.warning("%s; failure mode open: passed unchecked", error)
            self.stats["failed_open"] = True
            self.stats.setdefault("outcome", "pass")
            self._outbox.put(envoy.streamed_response_body(held, end_of_stream))
        else:
            log.warning("%s; failure mode closed: the error body", error)
            self._reply_error(ErrorKind.UNAVAILABLE, "unavailable")
            self._body_done = True

    def _apply_output(self, texts: list[str]) -> Coroutine[Any, Any, GuardrailVerdict]:
        return self._apply(Source.OUTPUT, texts)

    # -- telemetry --------------------------------------------------------------------------

    async def _apply(self, source: Source, texts: list[str]) -> GuardrailVerdict:
        """One guardrail call, timed and reported to the recorder; its findings go into the
        metadata summary."""
        started = time.monotonic()
        try:
            verdict = await self._guardrail.apply(self._route.guardrail, source, texts)
        except Exception as exc:
            # The stream treats anything but a GuardrailError as a server error (a bug).
            error_class = exc.error_class if isinstance(exc, GuardrailError) else "server_error"
            route = self._route
            fails_open = route.shadow or route.failure_mode.fails_open(error_class)
            self._recorder.guardrail_error(source.value, error_class,
                                           "open" if fails_open else "closed",
                                           time.monotonic() - started)
            raise
        self._recorder.verdict(source.value, verdict, time.monotonic() - started)
        if verdict.findings and len(self._findings) < MAX_FINDING_KEYS:
            before = len(self._findings)
            for finding in verdict.findings:
                if reported(finding) and len(self._findings) < MAX_FINDING_KEYS:
                    self._findings.setdefault(finding_key(finding))
            if len(self._findings) > before:
                self.stats["findings"] = ",".join(self._findings)
        return verdict

    def _output_intervened(self, outcome: str, verdict: GuardrailVerdict, chars_released: int,
                           window: str) -> None:
        self._intervened(Source.OUTPUT, outcome, verdict, chars_released, window)

    def _intervened(self, source: Source, outcome: str, verdict: GuardrailVerdict,
                    chars_released: int = 0, window: str | None = None) -> None:
        """One audit record for a block or mask acted on (or, shadow, one that would be)."""
        guardrail = self._route.guardrail
        self._audit.record(
            outcome=outcome, source=source.value.lower(), verdict=verdict,
            guardrail_id=guardrail.id, guardrail_version=guardrail.version,
            route=self._route_name, fmt=self._fmt.name if self._fmt is not None else NO_FORMAT,
            stream=self.stream_id, request_id=self.stats.get("request_id"),
            chars_released=chars_released, tripped_window=window)
