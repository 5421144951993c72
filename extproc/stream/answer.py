"""A non-streamed answer: collected whole (Envoy's BUFFERED body, or the chunks of a body mode
configured FULL_DUPLEX), checked once, answered once.

Envoy holds the response headers until this answer, so a block is still a proper 4xx in the
API's error shape, and a mask rewrites the body. The prompt verdict is waited for first. The
decision is ``extproc.domain.decision``'s; builds Envoy messages only through
``extproc.stream.sinks.Replies``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Hashable
from typing import Final

from extproc.domain.decision import Action, decide_verdict
from extproc.domain.errors import GuardrailServerError
from extproc.domain.values import Gate, PoisonedTools, Source
from extproc.domain.verdict import GuardrailVerdict
from extproc.formats import ErrorKind, StreamFormat
from extproc.formats._common import load_json
from extproc.formats.mcp import McpFormat, tool_of
from extproc.sse import SSEDecoder
from extproc.stream.context import StreamContext, as_guardrail_error
from extproc.stream.sinks import Replies

log = logging.getLogger(__name__)


#: The channel of an answer that is text but neither JSON nor SSE.
TEXT_CHANNEL: Hashable = ("text",)
#: How an SSE body taken whole opens (a comment, or a field: a priming event opens with
#: ``id:`` or ``retry:``).
SSE_HEADS: Final = (b"data:", b"event:", b"id:", b"retry:", b":")
_LINES: Final = re.compile(rb"\r\n|\r|\n")
#: A line of an SSE body: blank, a comment, or a field SSE readers act on.
_SSE_LINE: Final = re.compile(rb"|:.*|(?:data|event|id|retry)(?::.*)?", re.DOTALL)


def answer_texts(fmt: StreamFormat, body: bytes) -> list[tuple[Hashable, str]] | None:
    """The text of a non-streamed answer as (channel, text) pairs, read the way a client may
    read it whatever its content-type says; None when it cannot be read.

    JSON: the format's answer texts. Not JSON but SSE (an SSE body labelled JSON: the openai
    SDK parses a streamed call's answer as SSE whatever its content-type): every event's text
    through the format's stream codec, joined per channel; such an answer cannot be rewritten
    (``rewrite_response`` does not know its channels), so a mask blocks it; it opens with any
    SSE field (``id:``, ``retry:``: an MCP server's priming event), and a line that is no SSE
    field makes the whole body one more text (SSE readers skip it, a text reader shows it).
    Otherwise UTF-8
    text (``text/plain``, no content-type): one text. Anything else cannot be read."""
    if load_json(body) is not None:
        return fmt.response_texts(body)
    head = body.lstrip()[:6]
    if head.startswith(SSE_HEADS):
        codec = fmt.stream_codec()
        decoder = SSEDecoder()
        joined: dict[Hashable, list[str]] = {}
        for event in (*decoder.feed(body), *decoder.feed(b"\n\n")):
            for channel, text in codec.extract(event):
                joined.setdefault(("sse", channel), []).append(text)
        found = [(channel, "".join(texts)) for channel, texts in joined.items()]
        if not all(_SSE_LINE.fullmatch(line) for line in _LINES.split(body)):
            # A line that is no SSE field: SSE readers skip it, a client reading the body as
            # text shows it. The whole body is checked as text too (a mask of it blocks).
            found.append((TEXT_CHANNEL, body.decode("utf-8", "replace")))
        return found
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return [(TEXT_CHANNEL, text)] if text.strip() else []


class WholeAnswer:
    """One non-streamed answer; see the module docstring."""

    __slots__ = ("_ctx", "_fmt", "_replies", "body", "task")

    def __init__(self, ctx: StreamContext, fmt: StreamFormat, replies: Replies) -> None:
        self._ctx = ctx
        self._fmt = fmt
        self._replies = replies
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None

    async def answer(self, body: bytes, prompt: asyncio.Task[None] | None) -> None:
        """Check ``body`` once the prompt's check (``prompt``) is done, and answer. Envoy waits
        for this answer: whatever goes wrong, it gets one."""
        try:
            await self._check(body, prompt)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("BUG while checking a non-streamed answer; failing closed")
            self._replies.error(ErrorKind.UNAVAILABLE, "unavailable")
        await self._ctx.outbox.flush()

    async def _check(self, body: bytes, prompt: asyncio.Task[None] | None) -> None:
        ctx, record, replies = self._ctx, self._ctx.record, self._replies
        if prompt is not None:
            await asyncio.wait((prompt,))
        gate = ctx.gate
        if gate is Gate.BLOCKED or gate is Gate.FAILED:
            kind = ErrorKind.VIOLATION if gate is Gate.BLOCKED else ErrorKind.UNAVAILABLE
            replies.error(kind, "input_block" if gate is Gate.BLOCKED else "unavailable")
            return
        pairs: list[tuple[Hashable, str]] = []
        if ctx.route.output_check:
            read = answer_texts(self._fmt, body)
            if read is None:
                # Neither JSON, nor SSE, nor text: what the guard cannot read, it cannot pass
                # as checked.
                unreadable = GuardrailServerError("an answer the guard cannot read")
                if ctx.no_verdict(unreadable) is Action.UNAVAILABLE:
                    log.warning("answer of %d bytes cannot be read; failure mode closed: 503",
                                len(body))
                    replies.error(ErrorKind.UNAVAILABLE, "unavailable")
                    return
                log.warning("answer of %d bytes cannot be read; failure mode open: passed "
                            "unchecked", len(body))
            else:
                pairs = ctx.unchecked_reasoning(read)
        replacement: bytes | None = None
        if pairs:
            try:
                verdict = await ctx.check(Source.OUTPUT, [text for _, text in pairs])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - GuardrailError, or a bug: answer anyway
                error = as_guardrail_error(exc, "the answer check")
                if ctx.no_verdict(error) is Action.UNAVAILABLE:
                    log.warning("answer check failed (%s); failure mode closed",
                                error.error_class)
                    replies.error(ErrorKind.UNAVAILABLE, "unavailable")
                    return
                log.warning("answer check failed (%s); failure mode open", error.error_class)
            else:
                record.count("checks")
                record.count("text_units", verdict.text_units)
                decision = decide_verdict(verdict.outcome, ctx.route, can_mask=True,
                                          can_soft_block=True)
                action = decision.action
                if action is Action.MASK:
                    masked: dict[Hashable, str] = {channel: text for (channel, _), text in zip(
                        pairs, verdict.outputs, strict=False)}
                    try:
                        if len(verdict.outputs) != len(pairs):
                            raise ValueError("masked outputs do not match the answer's texts")
                        replacement = self._fmt.rewrite_response(body, masked)
                    except ValueError as exc:
                        # Masked text that cannot be put back must not go out as the original.
                        log.warning("masked answer cannot be rewritten (%s); blocking", exc)
                        ctx.intervened(Source.OUTPUT, "block", verdict)
                        replies.error(ErrorKind.VIOLATION, "block")
                        return
                    record.masked = 1
                if decision.audit is not None:
                    ctx.intervened(Source.OUTPUT, decision.audit, verdict)
                if decision.would is not None:
                    record.count(f"would_{decision.would}")
                elif action is Action.SOFT_BLOCK:
                    record.outcome = "soft_block"
                    message = verdict.outputs[0] if verdict.outputs else ""
                    replacement = self._fmt.soft_block_response(body, message)
                elif action is Action.BLOCK:
                    tools = {tool_of(channel) for channel, _ in pairs} - {None}
                    if tools and isinstance(self._fmt, McpFormat):
                        replacement = await self._poisoned_tools(body, pairs, verdict)
                        if replacement is None:
                            return
                    else:
                        log.info("answer blocked by the guardrail")
                        replies.error(ErrorKind.VIOLATION, "block")
                        return
        if record.outcome is None:
            record.outcome = "pass"
        ctx.outbox.put(replies.whole_body(body, replacement))

    async def _poisoned_tools(self, body: bytes, pairs: list[tuple[Hashable, str]],
                              verdict: GuardrailVerdict) -> bytes | None:
        """An MCP ``tools/list`` answer the guardrail blocked (tool poisoning). ``refuse``: the
        client gets a JSON-RPC error for its request. ``remove``: each tool is checked alone
        (passes the verdict cache remembers are not paid again) and the answer goes out
        without the tools that block, masked where a tool's check masks; refused when the
        block came from text that is no tool's, or from no tool alone. Returns the answer's
        new body, or None when the error went out."""
        ctx, fmt, replies = self._ctx, self._fmt, self._replies
        assert isinstance(fmt, McpFormat)
        by_tool: dict[int, list[tuple[Hashable, str]]] = {}
        for channel, text in pairs:
            index = tool_of(channel)
            if index is None:
                by_tool.clear()  # text beside the tools blocked with them: refuse
                break
            by_tool.setdefault(index, []).append((channel, text))
        if ctx.route.mcp_poisoned_tools is PoisonedTools.REMOVE and by_tool:
            checks = await asyncio.gather(*(
                ctx.check(Source.OUTPUT, [text for _, text in items])
                for items in by_tool.values()), return_exceptions=True)
            removed: set[int] = set()
            masked: dict[Hashable, str] = {}
            failed = False
            for (index, items), result in zip(by_tool.items(), checks, strict=True):
                if isinstance(result, BaseException):
                    failed = True  # no verdict for a tool: the whole answer is refused
                    continue
                decision = decide_verdict(result.outcome, ctx.route, can_mask=True,
                                          can_soft_block=False)
                if decision.action is Action.BLOCK:
                    removed.add(index)
                    ctx.intervened(Source.OUTPUT, "block", result)
                elif decision.action is Action.MASK and len(result.outputs) == len(items):
                    masked.update({channel: text for (channel, _), text in zip(
                        items, result.outputs, strict=True)})
            if removed and not failed:
                try:
                    rewritten = fmt.rewrite_response(body, masked) if masked else body
                    answer = fmt.remove_tools(rewritten, removed)
                except ValueError as exc:
                    log.warning("poisoned tools cannot be removed (%s); refusing", exc)
                else:
                    log.info("%d poisoned MCP tools removed from a tools/list answer",
                             len(removed))
                    ctx.record.mcp_tools_removed = len(removed)
                    ctx.record.outcome = "pass"
                    ctx.mcp_poisoned_tools("removed", len(removed))
                    return answer
        log.info("MCP tools/list answer refused: a tool blocked by the guardrail")
        ctx.intervened(Source.OUTPUT, "block", verdict)
        ctx.mcp_poisoned_tools("refused", 1)
        replies.error(ErrorKind.VIOLATION, "block")
        return None
