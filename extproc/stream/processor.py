"""One state machine per ext_proc stream (one HTTP request through Envoy).

``StreamProcessor`` receives Envoy's ``ProcessingRequest`` messages in order and puts answers
into an ``Outbox`` that a single writer drains in order. Guardrail calls run as background
tasks of the stream; the reader never waits on Bedrock (``ext_proc.md`` 11.11).

At the request headers it chooses, once, who answers the rest of the stream:

* ``PassThrough`` for traffic it does not guard (not an LLM call, a route with the guardrail
  off, or over ``--max-streams`` with the overload class failing open): every message is let
  through unchanged, and Envoy is asked to skip the response phase.
* ``GuardedStream`` for an LLM call, whose explicit ``Phase`` says what its response body is:

  ====================  =========================================================================
  phase                 the response body
  ====================  =========================================================================
  ``REQUEST``           not yet: the request headers were answered; the prompt may be collected
                        and checked (``extproc.stream.prompt``)
  ``ANSWER_WHOLE``      a non-streamed answer, collected whole and checked once
                        (``extproc.stream.answer``)
  ``ANSWER_STREAM``     a streamed answer through the output guard (``extproc.stream.guard``)
                        and a body sink (FULL_DUPLEX_STREAMED or STREAMED)
  ``ANSWER_OPEN``       an answer not guarded: passed on as the configured body mode requires
  ``ENDED``             the sidecar ended the body (configured FULL_DUPLEX); the rest is ignored
  ====================  =========================================================================

What happens at the response headers: a prompt already blocked -> the API's 400 (a 503 when the
guardrail failed and the failure mode is closed); a ``200 text/event-stream`` answer -> the body
switches to FULL_DUPLEX_STREAMED through the guard; a JSON answer -> BUFFERED, checked whole;
any other answer whose prompt verdict is still pending -> FULL_DUPLEX too, held whole until the
verdict. Decisions on verdicts and failures are ``extproc.domain.decision``'s; the stream's
facts are its ``StreamRecord``, counted when the RPC ends (``close``). With tracing on, a guarded
stream is a span from its request headers to ``close`` (``extproc.observe.tracing``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections.abc import Mapping
from typing import Any, Final

from extproc import envoy
from extproc.domain.cache import NO_CACHE, VerdictCache
from extproc.domain.client import GuardrailClient, ImageBlock
from extproc.domain.decision import Action
from extproc.domain.errors import GuardrailOverload, GuardrailServerError
from extproc.domain.values import Api, Gate, InputCheck, UncheckedImages, UnknownTraffic
from extproc.formats import ErrorKind, StreamFormat, find_format, strip_query
from extproc.formats.generic import GENERIC
from extproc.formats.mcp import STREAM, McpFormat
from extproc.formats.prompt_images import find_images, resolve
from extproc.formats.strict import BodyRejected, check_charset, parse_request
from extproc.formats.whole import PromptUnreadable
from extproc.images import ImageRefused, Reason
from extproc.observe.audit import AuditLog
from extproc.observe.metrics import (
    DEFAULT_ROUTE,
    NO_FORMAT,
    NULL_RECORDER,
    UNRECOGNISED,
    Recorder,
)
from extproc.observe.tracing import (
    AWS_BEDROCK_GUARDRAIL_ID,
    GUARDRAIL_CACHED_TEXTS,
    GUARDRAIL_CHECKS,
    GUARDRAIL_COST_USD,
    GUARDRAIL_FAILED_OPEN,
    GUARDRAIL_FORMAT,
    GUARDRAIL_MODE,
    GUARDRAIL_OUTCOME,
    GUARDRAIL_POLICIES,
    GUARDRAIL_REQUEST_ID,
    GUARDRAIL_ROUTE,
    GUARDRAIL_SHADOW,
    GUARDRAIL_TEXT_UNITS,
    GUARDRAIL_VERSION,
    AttributeValue,
    Span,
    Tracer,
)
from extproc.settings.values import RoutePolicy, Settings
from extproc.stream.answer import WholeAnswer
from extproc.stream.context import StreamContext
from extproc.stream.guard import OutputGuard
from extproc.stream.prompt import HEADER_CONTENT_ENCODING, PromptCheck, decode_body
from extproc.stream.record import StreamRecord
from extproc.stream.sinks import BodySink, FullDuplexSink, Outbox, Replies, StreamedSink

log = logging.getLogger(__name__)

HEADER_ACCEPT_ENCODING = "accept-encoding"
HEADER_CONTENT_TYPE = "content-type"
HEADER_CONTENT_LENGTH = "content-length"
HEADER_REQUEST_ID = "x-request-id"
#: What every image part holds (in its type, its key or its media type), in any letter case.
_IMAGE_WORD: Final = re.compile(rb"[iI][mM][aA][gG][eE]")

#: The client's error for a prompt image the guardrail cannot be given, by reason.
_IMAGE_ERRORS: Mapping[Reason, str] = {
    Reason.REFERENCE: ErrorKind.IMAGE_REFERENCE,
    Reason.FORMAT: ErrorKind.IMAGE_FORMAT,
    Reason.TOO_LARGE: ErrorKind.IMAGE_TOO_LARGE,
    Reason.UNREADABLE: ErrorKind.IMAGE_UNREADABLE,
}



def is_signed(headers: Mapping[str, str]) -> bool:
    """The client signed the request with AWS SigV4 (or SigV4a): an ``X-Amz-Date`` header
    (every header-signed request has one; the shipped Envoy configurations keep
    ``Authorization`` from the sidecar), an ``Authorization`` of ``AWS4-...``, or a presigned
    URL's ``X-Amz-Signature``. Its body must not change."""
    if "x-amz-date" in headers or headers.get("authorization", "")[:4].upper() == "AWS4":
        return True
    path = headers.get(":path", "")
    query = path.find("?")
    return query >= 0 and "x-amz-signature=" in path[query:].lower()

#: The MCP format of a route whose ``api`` is ``mcp`` (any path).
MCP_ROUTE = McpFormat(any_path=True)


class BodyMode(enum.Enum):
    """The response body mode configured on Envoy's filter (``protocol_config``)."""

    NONE = "none"  # switched per request with mode overrides (envoy/envoy.yaml)
    STREAMED = "streamed"  # the fallback for Envoy < 1.34: one answer per chunk
    # FULL_DUPLEX_STREAMED configured: Envoy ignores mode overrides, so every body streams
    # through here and each answer is a streamed one.
    FULL_DUPLEX = "full_duplex"

    @classmethod
    def of(cls, configured: int) -> BodyMode:
        if configured == envoy.STREAMED:
            return cls.STREAMED
        if configured == envoy.FULL_DUPLEX:
            return cls.FULL_DUPLEX
        return cls.NONE


class Phase(enum.Enum):
    """What a guarded stream's response body is (see the module docstring)."""

    REQUEST = "request"
    ANSWER_WHOLE = "answer_whole"
    ANSWER_STREAM = "answer_stream"
    ANSWER_OPEN = "answer_open"
    ENDED = "ended"


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


def pass_body(outbox: Outbox, body_mode: BodyMode, body: Any) -> None:
    """Let a response body chunk through unchanged, as the configured body mode requires."""
    if body_mode is BodyMode.STREAMED:
        # A STREAMED route whose answer we do not guard: one unchanged answer per chunk.
        outbox.put(envoy.streamed_mode_body(None, pass_through=True))
    elif body_mode is BodyMode.FULL_DUPLEX:
        # Configured FULL_DUPLEX: an answer we do not guard goes back as it came.
        outbox.put(envoy.streamed_response_body(body.body, body.end_of_stream))
    else:
        log.warning("response body without a guard; ignored")


class PassThrough:
    """A stream the sidecar does not guard: every message goes on unchanged."""

    __slots__ = ("_outbox", "_body_mode")

    def __init__(self, outbox: Outbox, body_mode: BodyMode) -> None:
        self._outbox = outbox
        self._body_mode = body_mode

    async def handle(self, kind: str, message: Any) -> None:
        outbox = self._outbox
        if kind == "response_body":
            pass_body(outbox, self._body_mode, message)
        elif kind == "request_body":
            outbox.put(envoy.continue_request_body())
        elif kind == "response_headers":
            outbox.put(envoy.headers_response(response_phase=True))
        elif kind == "response_trailers":
            outbox.put(envoy.continue_trailers(response_phase=True))
        elif kind == "request_trailers":
            outbox.put(envoy.continue_trailers(response_phase=False))

    @property
    def unfinished(self) -> bool:
        return False

    def close(self) -> None:
        """Nothing runs in the background."""


class GuardedStream:
    """An LLM call: the prompt, then the answer, each checked as its route says."""

    def __init__(self, ctx: StreamContext, settings: Settings, fmt: StreamFormat,
                 body_mode: BodyMode,
                 configured_response_body: envoy.ProcessingMode.BodySendMode,
                 recorder: Recorder, *, request_buffered: bool = True) -> None:
        self._ctx = ctx
        # The request body comes whole, in one message (BUFFERED): with HTTP/2 request trailers
        # after it, that message says end_of_stream false, and it is still the whole body.
        self._request_buffered = request_buffered
        self._configured_response_body = configured_response_body
        self._settings = settings
        self._fmt = fmt
        self._body_mode = body_mode
        self._recorder = recorder
        self._replies = Replies(ctx.outbox, fmt, ctx.record, settings.streams.metadata_namespace,
                                full_duplex=body_mode is BodyMode.FULL_DUPLEX)
        self.phase = Phase.REQUEST
        self._content_encoding = "identity"
        self._content_type = ""
        self._signed = False  # the client signed the request (AWS SigV4)
        self._mirrored = False  # MCP arguments again in Mcp-Param-* headers (2026-07-28)
        self._request_body = bytearray()
        self._request_done = False
        self._prompt: PromptCheck | None = None
        self._prompt_task: asyncio.Task[None] | None = None
        self._whole: WholeAnswer | None = None
        self._guard: OutputGuard | None = None
        self._sink: BodySink | None = None

    # -- dispatch ---------------------------------------------------------------------------

    async def handle(self, kind: str, message: Any) -> None:
        if kind == "response_body":
            self._replies.body_started = True
            self._on_response_body(message)
        elif kind == "request_body":
            self._on_request_body(message)
        elif kind == "response_headers":
            await self._on_response_headers(message)
        elif kind == "response_trailers":
            self._ctx.outbox.put(envoy.continue_trailers(response_phase=True))
        elif kind == "request_trailers":
            self._ctx.outbox.put(envoy.continue_trailers(response_phase=False))

    @property
    def unfinished(self) -> bool:
        """The RPC would end while the answer is still being guarded."""
        guard, whole = self._guard, self._whole
        return (guard is not None and not guard.finished) or (
            whole is not None and whole.task is not None and not whole.task.done())

    def close(self) -> None:
        """Cancel every background task of this stream."""
        whole_task = self._whole.task if self._whole is not None else None
        for task in (self._prompt_task, whole_task):
            if task is not None and not task.done():
                task.cancel()
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.close()
            self._recorder.untrack_held(guard)

    # -- request ----------------------------------------------------------------------------

    def start(self, headers: dict[str, str], end_of_stream: bool) -> None:
        """The request headers' answer (the stream was admitted)."""
        ctx, route, limits = self._ctx, self._ctx.route, self._settings.streams
        if self._body_mode is BodyMode.STREAMED:
            ctx.record.body_mode = "streamed"
        check_prompt = route.input_check is not InputCheck.OFF and not end_of_stream
        self._content_encoding = headers.get(
            HEADER_CONTENT_ENCODING, "identity").strip().lower()
        self._content_type = headers.get(HEADER_CONTENT_TYPE, "")
        self._signed = is_signed(headers)
        self._mirrored = isinstance(self._fmt, McpFormat) and any(
            name.startswith("mcp-param-") for name in headers)
        length = headers.get(HEADER_CONTENT_LENGTH, "")
        limit = limits.max_request_bytes
        if check_prompt and limit and length.isdigit() and int(length) > limit:
            # Answer before Envoy buffers it: a body over Envoy's buffer limit would otherwise
            # stall the request (read-disabled) instead of failing.
            log.info("prompt of %s bytes is over --max-request-bytes (%d): 413", length, limit)
            self._replies.error(ErrorKind.TOO_LARGE, "too_large")
            return
        mode = (envoy.mode_with_request_buffering(self._configured_response_body)
                if check_prompt else None)
        ctx.outbox.put(envoy.headers_response(
            response_phase=False, remove_headers=(HEADER_ACCEPT_ENCODING,), mode=mode))

    def reply_unrecognised(self) -> None:
        """The request headers' answer when no format recognises the request and its route
        refuses unknown traffic: 403, before anything goes upstream."""
        self._replies.error(ErrorKind.UNRECOGNISED, "unrecognised")

    def reply_unavailable(self) -> None:
        """The request headers' answer when the stream cannot be guarded (failure mode
        closed): the API's 503."""
        self._replies.error(ErrorKind.UNAVAILABLE, "unavailable")

    def _on_request_body(self, message: Any) -> None:
        ctx, route, outbox = self._ctx, self._ctx.route, self._ctx.outbox
        if self._prompt_task is not None or self._request_done \
                or route.input_check is InputCheck.OFF:
            outbox.put(envoy.continue_request_body())
            return
        self._request_body += message.body
        if not message.end_of_stream and not self._request_buffered:
            # Not BUFFERED (a configured request body mode we cannot change): answered as it
            # comes.
            outbox.put(envoy.continue_request_body())
            return
        self._request_done = True
        body = bytes(self._request_body)
        self._request_body = bytearray()
        limit = self._settings.streams.max_request_bytes
        if limit and len(body) > limit:
            # No content-length to answer from at the headers (a chunked request).
            log.info("prompt of %d bytes is over --max-request-bytes (%d): 413", len(body), limit)
            self._replies.error(ErrorKind.TOO_LARGE, "too_large")
            return
        decoded = decode_body(body, self._content_encoding, limit)
        if decoded is None:
            # A prompt we cannot read must not go upstream unchecked.
            log.info("request body with content-encoding %r cannot be read: 415",
                     self._content_encoding)
            self._replies.error(ErrorKind.UNREADABLE, "unreadable")
            return
        try:
            check_charset(self._content_type)
            request = parse_request(decoded)
        except BodyRejected as exc:
            # What our parser reads differently from the upstream's must not go upstream.
            log.info("request body refused: %s: 400", exc.reason)
            self._replies.error(ErrorKind.INVALID, "invalid")
            return
        try:
            texts = self._fmt.prompt_texts(decoded, route.prompt_scope.value)
        except PromptUnreadable as exc:
            # Token ids or embeddings: the model would read what the guardrail cannot (or, MCP,
            # not one JSON-RPC message).
            log.info("request refused: %s: 400", exc)
            self._label_mcp()
            self._replies.error(ErrorKind.INVALID, "invalid")
            return
        self._label_mcp()
        images = self._prompt_images(request, decoded, limit)
        if images is None:
            return  # refused: the API's 400 is sent
        if not texts and not images:
            outbox.put(envoy.continue_request_body())
            return
        pre_call = route.input_check is InputCheck.PRE_CALL and not route.shadow
        if pre_call:
            # The answer waits for the verdict: keep Envoy's message timer from firing first.
            outbox.put(envoy.override_message_timeout(ctx.call_timeout_s + 1))
        else:
            outbox.put(envoy.continue_request_body())
        self._prompt = PromptCheck(ctx, self._fmt, texts, decoded if pre_call else None,
                                   decoded is not body, self._signed, images,
                                   mirrored=self._mirrored,
                                   max_images=self._settings.streams.max_prompt_images)
        self._prompt_task = asyncio.get_running_loop().create_task(self._check_prompt())

    def _label_mcp(self) -> None:
        """An MCP request read: its method and tool go to the record (metrics, access log,
        audit)."""
        fmt = self._fmt
        if isinstance(fmt, McpFormat):
            record = self._ctx.record
            record.mcp_method = fmt.method_label()
            tool = fmt.request.tool
            record.mcp_tool = tool[:64] if tool is not None else None

    def _prompt_images(self, request: object, body: bytes,
                       limit: int) -> list[ImageBlock] | None:
        """The prompt's images as image blocks (``extproc.formats.prompt_images``); None when
        one cannot be checked and the route rejects such images (the API's 400 is sent). With
        ``unchecked_images pass`` (or in shadow mode) such an image is logged, counted and
        left out of the check. Their decoded bytes count against ``--max-request-bytes``
        (``--max-prompt-images`` is applied by ``PromptCheck``, to the images not known)."""
        if b"\\u" not in body and _IMAGE_WORD.search(body) is None:
            # Every image part's type, key or media type holds "image" in some letter case
            # (media types are case-insensitive: "IMAGE/PNG"); spelt with escapes, the body
            # holds "\u".
            return []
        parts = find_images(request)
        if not parts:
            return []
        ctx, route = self._ctx, self._ctx.route
        blocks: list[ImageBlock] = []
        total = 0
        for part in parts:
            try:
                image = resolve(part)
                total += len(image.data)
                if limit and total > limit:
                    raise ImageRefused(Reason.TOO_LARGE, "images over --max-request-bytes")
            except ImageRefused as exc:
                reason = exc.reason.value
                if route.unchecked_images is UncheckedImages.REJECT and not route.shadow:
                    ctx.images_unchecked(reason, 1, rejected=True)
                    log.info("prompt image cannot be checked (%s): 400", reason)
                    self._replies.error(_IMAGE_ERRORS[exc.reason], "image_refused")
                    return None
                ctx.images_unchecked(reason, 1, rejected=False)
                log.info("prompt image cannot be checked (%s): passed unchecked (%s)", reason,
                         "shadow" if route.shadow else "unchecked_images pass")
                continue
            blocks.append(ImageBlock(image.format, image.data))
        return blocks

    async def _check_prompt(self) -> None:
        prompt = self._prompt
        assert prompt is not None, "BUG: a prompt check without a prompt"
        await prompt.run()
        if prompt.held is not None:
            gate = self._ctx.gate
            answer = None
            if gate is Gate.OPEN:
                answer = prompt.held_answer(self._ctx.route.prompt_scope.value)
                if answer is None:  # a mask that cannot be put into the body: a block
                    gate = self._ctx.gate = Gate.BLOCKED
            if answer is not None:
                self._ctx.outbox.put(answer)
            else:
                self._reply_gate(gate)
        elif self._guard is not None:
            self._guard.on_gate_change()
        await self._ctx.outbox.flush()

    def _reply_gate(self, gate: Gate) -> None:
        """A blocked prompt (or one whose check failed closed) gets the API's error."""
        refused = self._prompt.refusal if self._prompt is not None else None
        if gate is Gate.BLOCKED and refused is not None:
            self._replies.error(refused, "image_refused")
            return
        kind = ErrorKind.VIOLATION if gate is Gate.BLOCKED else ErrorKind.UNAVAILABLE
        self._replies.error(kind, "input_block" if gate is Gate.BLOCKED else "unavailable")

    # -- response ---------------------------------------------------------------------------

    async def _on_response_headers(self, message: Any) -> None:
        ctx, route, limits = self._ctx, self._ctx.route, self._settings.streams
        task = self._prompt_task
        if task is not None and not task.done() and limits.input_wait_s > 0:
            # Envoy holds the response headers for this answer (message_timeout applies), so
            # wait only briefly for a prompt verdict that can still become a proper 4xx.
            await asyncio.wait((task,), timeout=limits.input_wait_s)
        gate = ctx.gate
        if gate is Gate.BLOCKED or gate is Gate.FAILED:
            self._reply_gate(gate)
            return
        headers = envoy.header_map(message.headers)
        content_type = headers.get(HEADER_CONTENT_TYPE, "").lower()
        # Any 2xx answer is the model's (201 and 203 too: the SDKs read them like a 200).
        status = headers.get(":status", "")
        ok = len(status) == 3 and status.startswith("2")
        # A stream in a framing the format reads (SSE; NDJSON, AWS event streams for the
        # providers that stream so) is guarded event by event.
        decoder = self._fmt.stream_decoder(content_type) if ok else None
        is_sse = decoder is not None
        # Everything else with a body is taken whole and read as a client may read it (JSON,
        # SSE mislabelled, plain text; ``answer.answer_texts``), never passed unread. MCP: at
        # any status (the SDK client surfaces a JSON-RPC error from a non-2xx body, the
        # TypeScript one any body's text, and agents hand that error to the model).
        is_json = (ok or isinstance(self._fmt, McpFormat)) and not is_sse
        has_body = not message.end_of_stream
        pending = gate is Gate.PENDING
        encoding = headers.get(HEADER_CONTENT_ENCODING, "identity").strip().lower()
        self.phase = Phase.ANSWER_OPEN
        if has_body and (is_sse or is_json) and encoding not in ("", "identity") and (
                route.output_check or pending):
            # The upstream compressed the answer although accept-encoding was removed: the
            # guard cannot read it, so it cannot release it as checked.
            error = GuardrailServerError(f"answer in content-encoding {encoding!r}")
            if ctx.no_verdict(error) is Action.RELEASE_UNCHECKED:
                log.warning("answer in content-encoding %r cannot be checked; failure mode "
                            "open: passed unchecked", encoding)
                ctx.outbox.put(envoy.headers_response(response_phase=True))
            else:
                log.warning("answer in content-encoding %r cannot be checked; failure mode "
                            "closed: 503", encoding)
                self._replies.error(ErrorKind.UNAVAILABLE, "unavailable")
            return
        if has_body and is_json and (route.output_check or pending):
            # A non-streamed answer: take it whole; the client's headers wait for our answer,
            # so a block can still be a proper 4xx.
            self.phase = Phase.ANSWER_WHOLE
            self._whole = WholeAnswer(ctx, self._fmt, self._replies)
            self._recorder.body_mode("buffered")
            ctx.outbox.put(envoy.headers_response(
                response_phase=True, remove_headers=(HEADER_CONTENT_LENGTH,),
                mode=envoy.MODE_BUFFER_RESPONSE))
            return
        check_output = route.output_check and is_sse
        if has_body and (check_output or pending):
            self.phase = Phase.ANSWER_STREAM
            streamed = self._body_mode is BodyMode.STREAMED
            sink: BodySink
            if streamed:
                sink = StreamedSink(ctx.outbox, limits.metadata_namespace,
                                    limits.streamed_message_timeout_s)
                self._recorder.body_mode("streamed")
            else:
                sink = FullDuplexSink(ctx.outbox, limits.metadata_namespace)
                self._recorder.body_mode("full_duplex_streamed")
            self._sink = sink
            self._guard = OutputGuard(ctx, self._fmt, sink, decoder=decoder,
                                      check_output=check_output,
                                      keepalive_s=0.0 if streamed else limits.keepalive_s)
            self._recorder.track_held(self._guard)
            mode = None if streamed else envoy.MODE_FULL_DUPLEX_RESPONSE
            # The guard may rewrite the body (a terminal frame, masked text): an upstream's
            # content-length would then be wrong, and a keep-alive client would wait for bytes
            # that never come (issue 14, class 8). Without it, Envoy frames the body itself.
            ctx.outbox.put(envoy.headers_response(
                response_phase=True, remove_headers=(HEADER_CONTENT_LENGTH,), mode=mode))
            return
        ctx.outbox.put(envoy.headers_response(response_phase=True))

    def _on_response_body(self, body: Any) -> None:
        phase = self.phase
        if phase is Phase.ANSWER_STREAM:
            guard, sink = self._guard, self._sink
            assert guard is not None and sink is not None, "BUG: a stream without its guard"
            guard.on_chunk(body.body, body.end_of_stream)
            sink.chunk_done(body.end_of_stream)
        elif phase is Phase.ANSWER_WHOLE:
            self._collect(body)
        elif phase is Phase.ENDED:
            return  # (configured FULL_DUPLEX: after our end of the body, Envoy sends no more)
        else:
            pass_body(self._ctx.outbox, self._body_mode, body)

    def _collect(self, body: Any) -> None:
        whole = self._whole
        assert whole is not None, "BUG: a whole answer without its collector"
        whole.body += body.body
        limit = self._settings.streams.max_held_bytes
        full_duplex = self._body_mode is BodyMode.FULL_DUPLEX
        if full_duplex and limit and len(whole.body) > limit:
            # Configured FULL_DUPLEX: the chunks come to us, and ``--max-held-bytes`` bounds them.
            self._whole_overflow(body.end_of_stream, f"more than {limit} bytes")
            return
        if not full_duplex and not body.end_of_stream:
            # BUFFERED_PARTIAL sends a part only of an answer over Envoy's buffer limit; the
            # rest would pass unseen.
            self._whole_overflow(False, "over Envoy's buffer limit")
            return
        if body.end_of_stream and whole.task is None:
            if not full_duplex:  # (FULL_DUPLEX has no timer)
                # The answer waits for checks: keep Envoy's message timer from firing first.
                self._ctx.outbox.put(envoy.override_message_timeout(
                    2 * self._ctx.call_timeout_s + 1))
            whole.task = asyncio.get_running_loop().create_task(
                whole.answer(bytes(whole.body), self._prompt_task))

    def _whole_overflow(self, end_of_stream: bool, why: str) -> None:
        """A non-streamed answer too large to hold (``why``); the ``overload`` failure class
        decides between the API's error (a 503, or with the body mode configured FULL_DUPLEX
        the error body behind the 200) and passing it unchecked."""
        ctx = self._ctx
        whole = self._whole
        assert whole is not None
        error = GuardrailOverload(f"a non-streamed answer {why}")
        held = bytes(whole.body)
        whole.body = bytearray()
        if ctx.no_verdict(error) is Action.RELEASE_UNCHECKED:
            log.warning("%s; failure mode open: passed unchecked", error)
            if ctx.record.outcome is None:
                ctx.record.outcome = "pass"
            self.phase = Phase.ANSWER_OPEN
            if self._body_mode is BodyMode.FULL_DUPLEX:
                ctx.outbox.put(envoy.streamed_response_body(held, end_of_stream))
            else:
                ctx.outbox.put(envoy.continue_response_body(
                    metadata_namespace=self._settings.streams.metadata_namespace,
                    metadata=ctx.record.to_metadata()))
        else:
            log.warning("%s; failure mode closed: the error body", error)
            self._replies.error(ErrorKind.UNAVAILABLE, "unavailable")
            self.phase = Phase.ENDED


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
        verdict_cache: VerdictCache = NO_CACHE,
        tracer: Tracer | None = None,
        trace_carrier: Mapping[str, str] | None = None,
    ) -> None:
        self._settings = settings
        # Tracing on: the RPC's gRPC metadata, where Envoy puts its ext_proc call's trace
        # context (the request headers are the other place a parent may be).
        self._tracer = tracer
        self._trace_carrier = trace_carrier
        self._span: Span | None = None
        self._verdict_cache = verdict_cache
        self._guardrail = guardrail
        self._formats = formats
        self._outbox = outbox
        self.stream_id = stream_id
        self._route = route if route is not None else settings.default_route
        self._route_name = route_name
        self._recorder = recorder
        self._audit = audit if audit is not None else AuditLog()
        self._admission = admission if admission is not None else Admission()
        self._admitted = False
        self._counted = False
        self._fmt: StreamFormat | None = None
        self._body_mode = BodyMode.NONE
        self._configured_response_body = envoy.ProcessingMode.NONE
        self._configured_request_body = envoy.ProcessingMode.NONE
        self._stream: PassThrough | GuardedStream | None = None
        guardrail_ref = self._route.guardrail
        self.record = StreamRecord(guardrail_ref.id, guardrail_ref.version, route=route_name,
                                   stream=stream_id)

    @property
    def phase(self) -> Phase | None:
        """The guarded stream's phase (None before the request headers or when not guarded)."""
        stream = self._stream
        return stream.phase if isinstance(stream, GuardedStream) else None

    async def handle(self, request: Any) -> None:
        """One message from Envoy; answers go to the outbox, which is flushed before return."""
        kind = request.WhichOneof("request")
        stream = self._stream
        if stream is not None:
            await stream.handle(kind, getattr(request, kind))
        elif kind == "request_headers":
            if request.HasField("protocol_config"):
                config = request.protocol_config
                self._configured_response_body = config.response_body_mode
                self._configured_request_body = config.request_body_mode
                self._body_mode = BodyMode.of(config.response_body_mode)
                if self._body_mode is BodyMode.FULL_DUPLEX:
                    _warn_configured_full_duplex(config.request_body_mode)
            self._stream = self._open(request.request_headers)
        else:
            log.warning("%s before the request headers; let through", kind)
            await PassThrough(self._outbox, self._body_mode).handle(kind, getattr(request, kind))
        await self._outbox.flush()

    def _open(self, message: Any) -> PassThrough | GuardedStream:
        """Choose, once, who answers this stream, and answer the request headers."""
        headers = envoy.header_map(message.headers)
        method, path = headers.get(":method", ""), headers.get(":path", "")
        route = self._route
        fmt = find_format(method, path, self._formats)
        if route.api is Api.MCP:
            fmt = MCP_ROUTE if MCP_ROUTE.matches(method.upper(), "") else None
        if isinstance(fmt, McpFormat):
            fmt = fmt.for_stream()  # it remembers this stream's request
        guarding = route.enabled and (route.output_check or route.input_check is not InputCheck.OFF)
        unrecognised = guarding and fmt is None
        if unrecognised and route.unknown_traffic is not UnknownTraffic.PASS:
            fmt = GENERIC  # read by rule; ``reject`` is answered below, once there is a stream
        self._counted = True
        self._recorder.stream_started(
            self._route_name, fmt.name if fmt is not None and guarding
            else UNRECOGNISED if unrecognised else NO_FORMAT)
        passing = PassThrough(self._outbox, self._body_mode)
        if unrecognised and fmt is None:
            # ``--unknown-traffic pass``: the operator's explicit opt-out, logged and counted.
            log.info("request no format recognises (%s %s) passes unchecked: unknown traffic "
                     "'pass'", method, strip_query(path)[:200])
        if fmt is None or not guarding:
            self._outbox.put(
                envoy.headers_response(response_phase=False, mode=envoy.MODE_SKIP_RESPONSE))
            return passing
        record = self.record
        request_id = headers.get(HEADER_REQUEST_ID)
        if request_id:
            record.request_id = request_id
        record.format = fmt.name
        if isinstance(fmt, McpFormat):
            record.mcp_method = STREAM if method.upper() == "GET" else None
        if self._tracer is not None:
            self._span = self._start_span(self._tracer, headers, fmt.name)
        ctx = StreamContext(route, self._settings.streams, self._settings.client.timeout_s,
                            record, self._outbox, self._guardrail, self._recorder, self._audit,
                            self._verdict_cache, self._tracer, self._span)
        # Our request-headers answer asks for a BUFFERED request body; with the body mode
        # configured FULL_DUPLEX, Envoy ignores that and uses the configured request body mode.
        buffered = (self._body_mode is not BodyMode.FULL_DUPLEX
                    or self._configured_request_body == envoy.ProcessingMode.BUFFERED)
        stream = GuardedStream(ctx, self._settings, fmt, self._body_mode,
                               self._configured_response_body, self._recorder,
                               request_buffered=buffered)
        self._admitted = self._admission.enter()
        if not self._admitted:
            limit = self._admission.limit
            error = GuardrailOverload(f"more than {limit} streams guarded")
            if ctx.no_verdict(error) is Action.RELEASE_UNCHECKED:
                log.warning("%d streams guarded already; failure mode open: this one passes "
                            "unchecked", limit)
                self._outbox.put(
                    envoy.headers_response(response_phase=False, mode=envoy.MODE_SKIP_RESPONSE))
                return passing
            log.warning("%d streams guarded already; failure mode closed: 503", limit)
            self._fmt = fmt
            stream.reply_unavailable()
            return stream
        self._fmt = fmt
        if unrecognised and route.unknown_traffic is UnknownTraffic.REJECT:
            log.info("request no format recognises (%s %s) refused: unknown traffic 'reject'",
                     method, strip_query(path)[:200])
            stream.reply_unrecognised()
            return stream
        stream.start(headers, message.end_of_stream)
        return stream

    def _start_span(self, tracer: Tracer, headers: Mapping[str, str], fmt: str) -> Span:
        """The guarded stream's span, parented on the trace context Envoy sent."""
        route, record = self._route, self.record
        carriers = (headers,) if self._trace_carrier is None else (self._trace_carrier, headers)
        attributes: dict[str, AttributeValue] = {
            AWS_BEDROCK_GUARDRAIL_ID: route.guardrail.id,
            GUARDRAIL_VERSION: route.guardrail.version, GUARDRAIL_ROUTE: self._route_name,
            GUARDRAIL_FORMAT: fmt, GUARDRAIL_MODE: route.stream_mode.value,
            GUARDRAIL_SHADOW: route.shadow,
        }
        if record.request_id:
            attributes[GUARDRAIL_REQUEST_ID] = record.request_id
        return tracer.stream_span(carriers, attributes)

    def _end_span(self, span: Span, unfinished: bool) -> None:
        record = self.record
        attributes: dict[str, AttributeValue] = {
            GUARDRAIL_OUTCOME: record.outcome_label(guarded=True, unfinished=unfinished),
            GUARDRAIL_CHECKS: record.checks or 0, GUARDRAIL_TEXT_UNITS: record.text_units or 0}
        if record.cost_usd:
            attributes[GUARDRAIL_COST_USD] = record.cost_usd
        if record.finding_keys:
            attributes[GUARDRAIL_POLICIES] = list(record.finding_keys)
        if record.failed_open:
            attributes[GUARDRAIL_FAILED_OPEN] = True
        if record.cached_texts:
            attributes[GUARDRAIL_CACHED_TEXTS] = record.cached_texts
        span.update(attributes)
        if record.error_class:
            span.failed(record.error_class)
        span.end()

    def close(self) -> None:
        """The RPC ended: cancel every background task of this stream, count its outcome."""
        if self._admitted:
            self._admitted = False
            self._admission.leave()
        stream = self._stream
        unfinished = stream is not None and stream.unfinished
        if stream is not None:
            # The guard holds this stream's context: dropped here, reference counting frees the
            # finished stream (its RPC, task and text) at once, rather than a full garbage
            # collection, which ``--gc-full-every`` makes rare.
            stream.close()
        span, self._span = self._span, None
        if span is not None:
            self._end_span(span, unfinished)
        if self._counted:
            self._counted = False
            fmt = self._fmt
            outcome = self.record.outcome_label(guarded=fmt is not None, unfinished=unfinished)
            self._recorder.stream_finished(
                self._route_name, fmt.name if fmt is not None else NO_FORMAT, outcome)
            if isinstance(fmt, McpFormat):
                self._recorder.mcp_message(self._route_name,
                                           self.record.mcp_method or "other", outcome)
            if outcome == "block" or outcome == "soft_block":
                self._recorder.released_before_block(self.record.chars_released or 0)
