"""The output guard of one streamed answer: which bytes may go to the client, and when.

Fed the response body chunk by chunk, it parses SSE events, takes the model text out of each
(per channel: each choice's content, each tool call's arguments; ``extproc.stream.channels``),
checks that text with the guardrail in windows (``extproc.domain.windows``), and hands released
bytes to a body sink (``extproc.stream.sinks``). Bytes are only ever released as whole SSE
events, in order, so a terminal frame always lands on an event boundary.

Modes:

* ``sync``: an event is released only once every character of its text was covered by a
  passing check with ``overlap`` characters of context after it (or the text ended: the end of
  the body, or an earlier event that says so, such as a ``finish_reason``). Text is held until
  then. The first window of a stream is released at once, but for the word it may end
  inside (``extproc.domain.windows.held_tail``), so the first token costs one round trip
  after the first word boundary. An ``ANONYMIZED`` verdict rewrites the held events with the
  guardrail's masked text before release (``extproc.stream.masking``).
* ``async``: events are released as they complete; checks run beside the stream; a block ends
  the stream at the next event boundary. Masking cannot be applied (the text is already out);
  such verdicts are counted as ``mask_unapplied``.

At most one call is in flight; text arriving meanwhile waits for the next window. What a
verdict or a failed call does is decided by ``extproc.domain.decision``; a block, or no verdict
with the failure mode closed, ends the body with the format's terminal frame. Nothing is
released after that.

Must not build Envoy messages (the sink does) or call AWS directly (``StreamContext.check``).
Each block and mask it acts on (and, in shadow mode, each it would have acted on) is reported
once through ``StreamContext.intervened`` (the stream's audit trail).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Hashable

from extproc.domain.decision import Action, decide_verdict
from extproc.domain.errors import GuardrailError, GuardrailOverload, GuardrailServerError
from extproc.domain.values import Gate, Source, StreamMode
from extproc.domain.verdict import GuardrailVerdict, Outcome
from extproc.domain.windows import Block, Strategy, estimated_units, held_tail, should_check
from extproc.formats import ErrorKind, StreamFormat
from extproc.framing import Decoder
from extproc.sse import SSEEvent
from extproc.stream.channels import Channels, Delta, Held
from extproc.stream.context import StreamContext
from extproc.stream.masking import map_channel
from extproc.stream.sinks import BodySink, KeepAlive

log = logging.getLogger(__name__)


class OutputGuard:
    """Guards one streamed answer; see the module docstring."""

    def __init__(self, ctx: StreamContext, fmt: StreamFormat, sink: BodySink, *,
                 decoder: Decoder | None, check_output: bool, keepalive_s: float = 0.0) -> None:
        route = ctx.route
        self._ctx = ctx
        self._record = ctx.record
        self._max_held_bytes = ctx.limits.max_held_bytes
        self._bytes_in = 0  # body bytes fed
        self._bytes_out = 0  # raw bytes of the events released
        self._passthrough = False
        self._shadow = route.shadow
        # Detect-only: everything goes out as it comes; verdicts are only counted.
        self._mode = StreamMode.ASYNC if route.shadow else route.stream_mode
        self._fmt = fmt
        self._codec = fmt.stream_codec()
        self._decoder = decoder
        self._check_output = check_output
        self._reasoning = route.reasoning_check
        self._policy = route.window
        self._strategy = route.window.strategy
        self._sink = sink
        self._channels = Channels(keep_all=self._strategy is Strategy.CUMULATIVE)
        self._held: deque[Held] = deque()
        self._released_chars = 0
        self._upstream_done = False
        self._chunks_seen = False
        self._pending_end: str | None = None
        self._pending_message: str | None = None
        self._first_check_done = False
        self._in_flight: asyncio.Task[None] | None = None
        frame = decoder.keepalive if decoder is not None else None
        self._keepalive = KeepAlive(keepalive_s if frame else 0.0, sink, ctx.outbox.flush,
                                    self._holding, self._keepalive_sent,
                                    frame=frame or b"")
        self.finished = False
        record = self._record
        if record.mode is None:
            record.mode = "shadow" if self._shadow else self._mode.value
        if record.strategy is None:
            record.strategy = self._strategy.value

    # -- input ------------------------------------------------------------------------------

    def on_chunk(self, body: bytes, end_of_stream: bool) -> None:
        """One response body chunk (boundaries are arbitrary)."""
        if self.finished or self._upstream_done:
            return  # after our end, or a repeated final chunk (envoy#46237)
        self._chunks_seen = True
        if self._pending_end is not None:
            self.end(self._pending_end, self._pending_message)
            return
        if self._passthrough:
            self._upstream_done = end_of_stream
            self._forward(body)
            return
        self._bytes_in += len(body)
        decoder = self._decoder
        if decoder is None:
            if body:
                self._held.append(Held(body, None, 0, ()))
        else:
            hold = self._hold
            try:
                events = decoder.feed(body, end_of_stream=end_of_stream)
            except ValueError as exc:  # a corrupt frame (AWS event streams check CRCs)
                self._unreadable(str(exc), end_of_stream)
                return
            for event in events:
                hold(event.raw, event)
        if end_of_stream:
            self._upstream_done = True
            if decoder is not None:
                leftover = decoder.flush()
                if leftover:
                    # An unterminated last event: checked as the clients that act on it read
                    # it (``Decoder.last``), its bytes passed on unchanged.
                    self._hold(leftover, decoder.last(leftover))
        if self._max_held_bytes and self._over_limit():
            return
        self._advance()

    def _over_limit(self) -> bool:
        """``--max-held-bytes``: a stream may not hold more; the failure policy decides
        between ending it (closed) and letting the rest through unchecked (open)."""
        # Every byte fed is either held (events keep their raw bytes) or pending in the decoder.
        if self._bytes_in - self._bytes_out <= self._max_held_bytes:
            return False
        error = GuardrailOverload(f"more than {self._max_held_bytes} bytes held")
        self._record.count("errors")
        if not self._shadow and self._ctx.gate is not Gate.OPEN:
            # Before the prompt's verdict nothing of the answer may go out, whatever the
            # failure mode: the prompt may yet be blocked.
            log.warning("stream held more than %d bytes before the prompt's verdict: ending it",
                        self._max_held_bytes)
            self.end(ErrorKind.UNAVAILABLE)
        elif self._ctx.no_verdict(error) is Action.RELEASE_UNCHECKED:
            log.warning("stream held more than %d bytes; failure mode open: passing the rest "
                        "through unchecked", self._max_held_bytes)
            self._passthrough = True
            task, self._in_flight = self._in_flight, None
            if task is not None:
                task.cancel()
            raw = b"".join([self._render_unchecked(item) for item in self._held])
            self._held.clear()
            if self._decoder is not None:
                raw += self._decoder.flush()
            self._forward(raw)
        else:
            log.warning("stream held more than %d bytes; failure mode closed: ending it",
                        self._max_held_bytes)
            self.end(ErrorKind.UNAVAILABLE)
        return True

    def _unreadable(self, reason: str, end_of_stream: bool) -> None:
        """The framing cannot be read any further (a corrupt frame): the stream ends with the
        unavailable frame after the events already released."""
        # Closed whatever --failure-mode says: it is the upstream's fault, not the guardrail's,
        # and a client's parser may read what ours rejects (botocore reads some frames whose
        # header lengths we refuse).
        self._record.error_class = "server_error"
        self._record.count("errors")
        log.warning("answer stream unreadable (%s): ending it", reason)
        self.end(ErrorKind.UNAVAILABLE)

    def _forward(self, data: bytes) -> None:
        """Pass-through after an overload in failure mode open."""
        if self._upstream_done:
            self.finished = True
            self._record.outcome = self._record.outcome or "pass"
            self._keepalive.cancel()
            self._sink.finish(data, self._metadata())
        elif data:
            self._sink.release(data)

    def _hold(self, raw: bytes, event: SSEEvent | None) -> None:
        """Queue an event for release; its text goes to its channels."""
        found = self._codec.extract(event) if event is not None and self._check_output else ()
        if found and not self._reasoning:
            found = self._ctx.unchecked_reasoning(found)
        if not found:
            self._held.append(Held(raw, event, 0, ()))
            return
        deltas: list[Delta] = []
        sync = self._mode is StreamMode.SYNC
        add = self._channels.add
        chars = 0
        for key, text in found:
            index, start = add(key, text)
            chars += len(text)
            if sync:
                deltas.append(Delta(index, start, text))
        self._held.append(Held(raw, event, chars, deltas))

    def on_gate_change(self) -> None:
        """The prompt verdict arrived."""
        gate = self._ctx.gate
        if gate is Gate.BLOCKED:
            self.end(ErrorKind.VIOLATION)
        elif gate is Gate.FAILED:
            self.end(ErrorKind.UNAVAILABLE)
        else:
            self._advance()

    # -- release ----------------------------------------------------------------------------

    def _text_done(self) -> bool:
        """No more model text is expected: the body ended, or its events said the text did
        (``StreamCodec.text_ended``; a later text delta, a misbehaving upstream, clears it)."""
        return self._upstream_done or self._codec.text_ended

    def _advance(self) -> None:
        if self._in_flight is None and self._mode is StreamMode.SYNC and self._text_done():
            self._finish_tails()
        self._release()
        self._maybe_check()
        self._keepalive.arm()

    def _holding(self) -> bool:
        """Text is held back from the client now (the keep-alive timer runs)."""
        return not self.finished and self._chunks_seen and bool(self._held)

    def _keepalive_sent(self) -> None:
        self._record.count("keepalives")

    def _finish_tails(self) -> None:
        """At the end of the text, a held tail whose last check already saw everything after
        it is released on that check's verdict, without another call."""
        for index, channel in enumerate(self._channels.all):
            if channel.limit < channel.length == channel.checked and channel.last is not None:
                block, original, text = channel.last
                self._map(index, block, original, text, channel.length)
                channel.limit = channel.length

    def _releasable(self, item: Held) -> bool:
        if self._mode is StreamMode.ASYNC:
            return True
        channels = self._channels.all
        for delta in item.deltas:
            channel = channels[delta.channel]
            end = delta.start + len(delta.text)
            if end > channel.limit or delta.mapped_to < end:
                return False
        return True

    def _render(self, item: Held) -> bytes:
        """The bytes of an event released in sync mode. The codec sees every released event, in
        order (its closing frames follow what the client received); masked text replaces the
        original."""
        if item.event is None:
            return item.raw
        changed: dict[Hashable, str] = {}
        channels = self._channels.all
        for delta in item.deltas:
            text = "".join(delta.mapped) if delta.mapped is not None else ""
            if text != delta.text:
                changed[channels[delta.channel].key] = text
        return self._codec.rewrite(item.event, changed)

    def _render_unchecked(self, item: Held) -> bytes:
        """The bytes of a held event passed on unchecked (``_over_limit``, failure mode open):
        the masks already decided still apply (``mapped`` text, and the rest of an entity
        carried past the release limit is dropped); only text no verdict covered goes out as
        it came."""
        if item.event is None or not item.deltas:
            return item.raw
        changed: dict[Hashable, str] = {}
        channels = self._channels.all
        for delta in item.deltas:
            channel = channels[delta.channel]
            end = delta.start + len(delta.text)
            done = max(delta.mapped_to, delta.start)
            head = "".join(delta.mapped) if delta.mapped is not None else ""
            rest = max(done, channel.mask_from)
            text = head + (delta.text[rest - delta.start:] if rest < end else "")
            if text != delta.text:
                changed[channel.key] = text
        return self._codec.rewrite(item.event, changed)

    def _release(self) -> None:
        if self.finished or not self._chunks_seen or (
                not self._shadow and self._ctx.gate is not Gate.OPEN):
            return
        held = self._held
        out: list[bytes] = []
        if self._mode is StreamMode.ASYNC:
            # Events go out as they come, except a trailing run of events without text (the
            # finish chunk, [DONE], message_stop): they wait until every character was checked,
            # so that a late block still ends the stream before the client's terminator.
            count = len(held)
            if not self._all_checked():
                while count and not held[count - 1].chars:
                    count -= 1
            rewrite = self._codec.rewrite  # as in ``_render``; async never applies masks
            size = chars = 0
            for _ in range(count):
                item = held.popleft()
                out.append(item.raw if item.event is None else rewrite(item.event, {}))
                size += len(item.raw)
                chars += item.chars
            self._bytes_out += size
            self._released_chars += chars
        else:
            count = 0
            for item in held:
                if not self._releasable(item):
                    break
                count += 1
            if count == len(held) and not self._upstream_done and self._codec.text_ended \
                    and self._codec.holds_trailing_events:
                # The text ended before the body: the events after it (finish, usage, [DONE])
                # wait for the end of the body, as in async mode. A client that stops reading
                # at [DONE] would otherwise hang up before the body's last message, and the
                # stream's metadata with it, reached Envoy (``holds_trailing_events``).
                while count and not held[count - 1].chars:
                    count -= 1
            for _ in range(count):
                item = held.popleft()
                out.append(self._render(item))
                self._bytes_out += len(item.raw)
                self._released_chars += item.chars
        # The end of the body waits for the last verdict in async mode too (a stream whose last
        # event holds text, as Gemini's do, would otherwise end before a block could).
        end_of_stream = self._upstream_done and not held and (
            self._mode is StreamMode.SYNC or self._shadow or self._all_checked())
        if end_of_stream:
            self.finished = True
            self._record.outcome = self._record.outcome or "pass"
            self._keepalive.cancel()
            self._sink.finish(b"".join(out), self._metadata())
        elif out:
            self._keepalive.emitted()
            self._sink.release(b"".join(out))

    def _all_checked(self) -> bool:
        return (self._upstream_done and self._in_flight is None
                and self._channels.all_checked())

    # -- checks -----------------------------------------------------------------------------

    def _maybe_check(self) -> None:
        if self.finished or self._in_flight is not None or not self._channels.all:
            return
        done = self._text_done()
        if not should_check(pending_chars=self._channels.pending(),
                            first_check_done=self._first_check_done,
                            upstream_done=done, policy=self._policy,
                            first_releasable=self._first_check_done or done
                            or self._channels.first_releasable(self._policy.overlap_chars)):
            return
        blocks = self._plan()
        if not blocks:
            return
        texts = self._channels.texts(blocks)
        self._in_flight = asyncio.get_running_loop().create_task(self._check(blocks, texts))

    def _plan(self) -> list[Block]:
        if self._strategy is Strategy.CUMULATIVE:
            blocks = self._channels.plan_cumulative()
            cap = self._policy.max_stream_text_units
            if (self._record.max_policy_text_units or 0) + estimated_units(blocks) <= cap:
                return blocks
            self._strategy = Strategy.WINDOWED
            self._record.strategy = "windowed"
            self._record.cumulative_cap_reached = True
            log.info("cumulative checks reached %d text units: windows from now on", cap)
        return self._channels.plan_windows(self._policy)

    async def _check(self, blocks: list[Block], texts: list[str]) -> None:
        try:
            verdict = await self._ctx.check(Source.OUTPUT, texts)
            if verdict.outcome is Outcome.MASK and len(verdict.outputs) != len(blocks):
                raise GuardrailServerError(
                    f"masked answer with {len(verdict.outputs)} outputs for {len(blocks)} blocks")
        except GuardrailError as exc:
            self._in_flight = None
            self._on_error(exc, blocks, texts)
        except Exception:
            log.exception("BUG in the output check; ending the stream")
            self._in_flight = None
            self.end(ErrorKind.UNAVAILABLE)
        else:
            self._in_flight = None
            try:
                self._on_verdict(verdict, blocks, texts)
            except Exception:  # a codec's rewrite, on input it cannot write back
                log.exception("BUG acting on the output verdict; ending the stream")
                self.end(ErrorKind.UNAVAILABLE)
        await self._ctx.outbox.flush()

    def _on_verdict(self, verdict: GuardrailVerdict, blocks: list[Block],
                    texts: list[str]) -> None:
        record = self._record
        record.count("checks")
        record.count("text_units", verdict.text_units)
        per_policy = max(verdict.usage.values(), default=0) if verdict.usage else 0
        record.count("max_policy_text_units", per_policy)
        if verdict.detected_only:
            record.count("detected", len(verdict.detected_only))
        decision = decide_verdict(verdict.outcome, self._ctx.route,
                                  can_mask=self._mode is StreamMode.SYNC,
                                  can_soft_block=self._decoder is not None)
        action = decision.action
        would = decision.would
        if would == "block":
            if not record.would_block:
                # Enforced, this block would have ended the stream: report it, not the
                # later windows that see the same text again.
                window = self._window(blocks)
                record.tripped_window = window
                self._intervened(decision.audit, verdict, window)
                log.info("shadow: the answer would have been blocked")
            record.count("would_block")
        elif would == "mask":
            record.count("would_mask")
            self._intervened(decision.audit, verdict, self._window(blocks))
        elif action is Action.BLOCK or action is Action.SOFT_BLOCK:
            window = self._window(blocks)
            record.tripped_window = window
            self._intervened(decision.audit, verdict, window)
            self.end(ErrorKind.VIOLATION, verdict.outputs[0] if verdict.outputs else None)
            return
        elif action is Action.MASK or action is Action.MASK_UNAPPLIED:
            record.count("masked")
            if action is Action.MASK_UNAPPLIED:
                record.count("mask_unapplied")
            self._intervened(decision.audit, verdict, self._window(blocks))
            if action is Action.MASK:
                self._accept(blocks, texts, list(verdict.outputs))
                return
        self._accept(blocks, texts, None)

    def _window(self, blocks: list[Block]) -> str:
        first = blocks[0]
        return f"{self._channels.all[first.channel_index].key}:{first.start}-{first.end}"

    def _intervened(self, outcome: str | None, verdict: GuardrailVerdict, window: str) -> None:
        assert outcome is not None, "BUG: an intervention without an audit outcome"
        self._ctx.intervened(Source.OUTPUT, outcome, verdict, self._released_chars, window)

    def _on_error(self, exc: GuardrailError, blocks: list[Block], texts: list[str]) -> None:
        self._record.count("errors")
        if self._ctx.no_verdict(exc) is Action.RELEASE_UNCHECKED:
            log.warning("output check failed (%s); failure mode open: releasing unchecked "
                        "text", exc.error_class)
            self._accept(blocks, texts, None)
        else:
            log.warning("output check failed (%s); failure mode closed: ending the stream",
                        exc.error_class)
            self.end(ErrorKind.UNAVAILABLE)

    def _accept(self, blocks: list[Block], texts: list[str], masked: list[str] | None) -> None:
        """The blocks passed (or were masked): move each channel's release limit."""
        first = not self._first_check_done
        self._first_check_done = True
        overlap = self._policy.overlap_chars
        fast = first and self._policy.fast_first_window
        sync = self._mode is StreamMode.SYNC
        channels = self._channels.all
        for index, block in enumerate(blocks):
            channel = channels[block.channel_index]
            final = block.end == channel.length and self._text_done()
            channel.checked = max(channel.checked, block.end)
            if final:
                limit = block.end
            elif fast:  # the first window, but for the word it may end inside (at most
                # ``overlap``, as every later window holds back)
                limit = max(channel.limit,
                            block.end - min(held_tail(texts[index]), overlap))
            else:
                limit = max(channel.limit, block.end - overlap)
            masked_text = masked[index] if masked is not None else texts[index]
            channel.last = (block, texts[index], masked_text)
            if sync and (limit > channel.limit or masked is not None):
                self._map(block.channel_index, block, texts[index], masked_text, limit)
            channel.limit = max(channel.limit, limit)
            channel.trim(min(channel.limit, max(0, channel.checked - overlap)))
        self._advance()

    def _map(self, index: int, block: Block, original: str, masked: str, limit: int) -> None:
        """Give each held delta of channel ``index`` in [its limit, ``limit``) its text."""
        if map_channel(self._channels.all[index], index, self._held, block, original, masked,
                       limit):
            self._record.count("mask_carried")

    # -- the end ----------------------------------------------------------------------------

    def end(self, kind: str, message: str | None = None) -> None:
        """End the body with the format's terminal frame (or, soft block, the guardrail's
        message as normal content); nothing is sent after it."""
        if self.finished:
            return
        if not self._chunks_seen:
            # FULL_DUPLEX answers are only valid once Envoy has sent a body chunk.
            self._pending_end = kind
            self._pending_message = message
            return
        self.finished = True
        self._held.clear()
        self._keepalive.cancel()
        soft = (self._ctx.route.soft_block and kind == ErrorKind.VIOLATION
                and self._decoder is not None)
        self._record.outcome = ("soft_block" if soft else
                                "block" if kind == ErrorKind.VIOLATION else "unavailable")
        task = self._in_flight
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._in_flight = None
        log.info("answer ended by the guardrail (%s) after %d released characters",
                 self._record.outcome, self._released_chars)
        frame = (self._codec.soft_block_frame(message or "") if soft
                 else self._codec.terminal_frame(kind))
        self._sink.finish(frame, self._metadata())

    def _metadata(self) -> dict[str, object]:
        self._record.chars_released = self._released_chars
        return self._record.to_metadata()

    @property
    def held_bytes(self) -> int:
        """Bytes held back from the client now (read from the metrics thread)."""
        return 0 if self.finished else self._bytes_in - self._bytes_out

    def close(self) -> None:
        """The stream is over (or cancelled): stop the check in flight and the timer."""
        self._keepalive.close()
        if self._in_flight is not None:
            self._in_flight.cancel()
            self._in_flight = None
