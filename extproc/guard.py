"""The output guard of one streamed answer: which bytes may go to the client, and when.

Fed the response body chunk by chunk, it parses SSE events, takes the model text out of each
(per channel: each choice's content, each tool call's arguments), checks that text with the
guardrail in windows (``extproc.policy``), and hands released bytes to a ``BodySink``. The sink
knows the Envoy body mode (FULL_DUPLEX_STREAMED or STREAMED). Bytes are only ever released as
whole SSE events, in order, so a terminal frame always lands on an event boundary.

Modes:

* ``sync``: an event is released only once every character of its text was covered by a
  passing check with ``overlap`` characters of context after it (or the text ended: the end of
  the body, or an earlier event that says so, such as a ``finish_reason``). Text is held until
  then. The first window of a stream is released in full so the first token costs
  one round trip. An ``ANONYMIZED`` verdict rewrites the held events with the guardrail's masked
  text before release (``extproc.masking``).
* ``async``: events are released as they complete; checks run beside the stream; a block ends
  the stream at the next event boundary. Masking cannot be applied (the text is already out);
  such verdicts are counted as ``mask_unapplied``.

At most one call is in flight; text arriving meanwhile waits for the next window. A block, or
a guardrail failure with the failure mode closed, ends the body with the format's terminal frame.
Nothing is released after that.

Must not build Envoy messages (the sink does) or call AWS directly (``apply`` is injected).
Each block and mask it acts on (and, in shadow mode, each it would have acted on) is reported
once through ``on_intervention`` (the stream's audit trail).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from extproc.domain.failure import FailurePolicy
from extproc.domain.errors import GuardrailError, GuardrailOverload, GuardrailServerError
from extproc.formats import ErrorKind, StreamFormat
from extproc.masking import map_region
from extproc.domain.values import StreamMode
from extproc.domain.windows import Block, Strategy, WindowPolicy, estimated_units, should_check
from extproc.sse import SSEDecoder, SSEEvent, encode_comment
from extproc.domain.verdict import GuardrailVerdict, Outcome

log = logging.getLogger(__name__)


class BodySink(Protocol):
    """Where released bytes go: the Envoy body mode's way of answering."""

    def release(self, data: bytes) -> None:
        """Bytes the client may have now (not the end of the body)."""

    def finish(self, data: bytes, metadata: Mapping[str, Any]) -> None:
        """The last bytes of the body; nothing is released after this."""


#: ``(outcome, verdict, characters released so far, window)``: a block or mask acted on (or,
#: in shadow mode, one that would have been); see ``extproc.audit`` for the outcomes.
Intervention = Callable[[str, GuardrailVerdict, int, str], None]


@dataclass(slots=True)
class _Delta:
    channel: int
    start: int
    text: str
    # The text to release for it, piece by piece (masking may change it); None until mapped: a
    # list per held event would be one more object for every garbage collection to walk.
    mapped: list[str] | None = None
    mapped_to: int = -1  # original position up to which ``mapped`` is filled; -1: not mapped


@dataclass(slots=True)
class _Held:
    raw: bytes
    event: SSEEvent | None
    chars: int  # characters of model text in it (0: an event without text)
    # Sync only, where ``mapped`` text must be tracked: that text's place in its channels.
    deltas: Sequence[_Delta]


class _Channel:
    """One stream of model text (a choice's content, a tool call's arguments)."""

    __slots__ = ("key", "length", "checked", "limit", "mask_from", "_base", "_buf", "_tail",
                 "keep_all", "last")

    def __init__(self, key: Hashable, keep_all: bool) -> None:
        self.key = key
        self.length = 0
        self.checked = 0  # text covered by passing checks
        self.limit = 0  # events whose text ends at or before this may be released
        self.mask_from = 0  # where the next masked region starts (after a carried span)
        self.keep_all = keep_all
        # The last passing check of this channel: (block, original text, text to release).
        self.last: tuple[Block, str, str] | None = None
        self._base = 0
        self._buf = ""
        self._tail: list[str] = []

    def append(self, text: str) -> int:
        start = self.length
        self._tail.append(text)
        self.length += len(text)
        return start

    def slice(self, start: int, end: int) -> str:
        if self._tail:
            self._buf += "".join(self._tail)
            self._tail.clear()
        return self._buf[start - self._base:end - self._base]

    def trim(self, keep_from: int) -> None:
        """Forget text before ``keep_from`` (windows never look back further)."""
        if self.keep_all or keep_from <= self._base:
            return
        if self._tail:
            self._buf += "".join(self._tail)
            self._tail.clear()
        self._buf = self._buf[keep_from - self._base:]
        self._base = keep_from


class OutputGuard:
    """Guards one streamed answer; see the module docstring."""

    def __init__(
        self,
        fmt: StreamFormat,
        *,
        parse_sse: bool,
        check_output: bool,
        mode: StreamMode,
        policy: WindowPolicy,
        apply: Callable[[list[str]], Awaitable[GuardrailVerdict]],
        gate: Callable[[], str],
        sink: BodySink,
        flush: Callable[[], Awaitable[None]],
        failure_mode: FailurePolicy,
        stats: dict[str, Any],
        keepalive_s: float = 0.0,
        shadow: bool = False,
        soft_block: bool = False,
        on_intervention: Intervention | None = None,
        max_held_bytes: int = 0,
    ) -> None:
        self._max_held_bytes = max_held_bytes
        self._bytes_in = 0  # body bytes fed
        self._bytes_out = 0  # raw bytes of the events released
        self._passthrough = False
        self._shadow = shadow
        self._on_intervention = on_intervention
        self._soft_block = soft_block
        if shadow:
            # Detect-only: everything goes out as it comes; verdicts are only counted.
            mode = StreamMode.ASYNC
        self._fmt = fmt
        self._codec = fmt.stream_codec()
        self._decoder = SSEDecoder() if parse_sse else None
        self._check_output = check_output
        self._mode = mode
        self._policy = policy
        self._strategy = policy.strategy
        self._apply = apply
        self._gate = gate
        self._sink = sink
        self._flush = flush
        self._failure_mode = failure_mode
        self.stats = stats
        self._keepalive_s = keepalive_s
        self._channels: list[_Channel] = []
        self._channel_index: dict[Hashable, int] = {}
        self._held: deque[_Held] = deque()
        self._released_chars = 0
        self._upstream_done = False
        self._chunks_seen = False
        self._pending_end: str | None = None
        self._pending_message: str | None = None
        self._first_check_done = False
        self._in_flight: asyncio.Task[None] | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_emit = time.monotonic()
        self.finished = False
        stats.setdefault("mode", "shadow" if shadow else mode.value)
        stats.setdefault("strategy", policy.strategy.value)

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
                self._held.append(_Held(body, None, 0, ()))
        else:
            hold = self._hold
            for event in decoder.feed(body, end_of_stream=end_of_stream):
                hold(event.raw, event)
        if end_of_stream:
            self._upstream_done = True
            if decoder is not None:
                leftover = decoder.flush()
                if leftover:
                    # An unterminated last event. EventSource would not dispatch it, but
                    # line-based readers act on its data lines: check it like an event and pass
                    # its bytes on unchanged.
                    closing = SSEDecoder().feed(leftover + b"\n\n", end_of_stream=True)
                    event = dataclasses.replace(closing[0], raw=leftover) if closing else None
                    self._hold(leftover, event)
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
        self._count("errors")
        self.stats["error_class"] = error.error_class
        if self._failure_mode.fails_open(error) or self._shadow:
            log.warning("stream held more than %d bytes; failure mode open: passing the rest "
                        "through unchecked", self._max_held_bytes)
            self.stats["failed_open"] = True
            self._passthrough = True
            task, self._in_flight = self._in_flight, None
            if task is not None:
                task.cancel()
            raw = b"".join(item.raw for item in self._held)
            self._held.clear()
            if self._decoder is not None:
                raw += self._decoder.flush()
            self._forward(raw)
        else:
            log.warning("stream held more than %d bytes; failure mode closed: ending it",
                        self._max_held_bytes)
            self.end(ErrorKind.UNAVAILABLE)
        return True

    def _forward(self, data: bytes) -> None:
        """Pass-through after an overload in failure mode open."""
        if self._upstream_done:
            self.finished = True
            self.stats["outcome"] = self.stats.get("outcome") or "pass"
            self._cancel_keepalive()
            self._sink.finish(data, self._metadata())
        elif data:
            self._sink.release(data)

    def _hold(self, raw: bytes, event: SSEEvent | None) -> None:
        """Queue an event for release; its text goes to its channels."""
        found = self._codec.extract(event) if event is not None and self._check_output else ()
        if not found:
            self._held.append(_Held(raw, event, 0, ()))
            return
        deltas: list[_Delta] = []
        sync = self._mode is StreamMode.SYNC
        chars = 0
        for key, text in found:
            index = self._channel_index.get(key)
            if index is None:
                index = len(self._channels)
                self._channel_index[key] = index
                self._channels.append(
                    _Channel(key, keep_all=self._strategy is Strategy.CUMULATIVE))
            start = self._channels[index].append(text)
            chars += len(text)
            if sync:
                deltas.append(_Delta(index, start, text))
        self._held.append(_Held(raw, event, chars, deltas))

    def on_gate_change(self) -> None:
        """The prompt verdict arrived."""
        gate = self._gate()
        if gate == "blocked":
            self.end(ErrorKind.VIOLATION)
        elif gate == "failed":
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
        self._arm_keepalive()

    def _finish_tails(self) -> None:
        """At the end of the text, a held tail whose last check already saw everything after
        it is released on that check's verdict, without another call."""
        for channel in self._channels:
            if channel.limit < channel.length == channel.checked and channel.last is not None:
                block, original, text = channel.last
                self._map(channel, block, original, text, channel.length)
                channel.limit = channel.length

    def _releasable(self, item: _Held) -> bool:
        if self._mode is StreamMode.ASYNC:
            return True
        channels = self._channels
        for delta in item.deltas:
            channel = channels[delta.channel]
            end = delta.start + len(delta.text)
            if end > channel.limit or delta.mapped_to < end:
                return False
        return True

    def _render(self, item: _Held) -> bytes:
        """The bytes of an event released in sync mode. The codec sees every released event, in
        order (its closing frames follow what the client received); masked text replaces the
        original."""
        if item.event is None:
            return item.raw
        changed: dict[Hashable, str] = {}
        for delta in item.deltas:
            text = "".join(delta.mapped) if delta.mapped is not None else ""
            if text != delta.text:
                changed[self._channels[delta.channel].key] = text
        return self._codec.rewrite(item.event, changed)

    def _release(self) -> None:
        if self.finished or not self._chunks_seen or (
                not self._shadow and self._gate() != "open"):
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
            if count == len(held) and not self._upstream_done and self._codec.text_ended:
                # The text ended before the body: the events after it (finish, usage, [DONE])
                # wait for the end of the body, as in async mode. A client that stops reading
                # at [DONE] would otherwise hang up before the body's last message, and the
                # stream's metadata with it, reached Envoy.
                while count and not held[count - 1].chars:
                    count -= 1
            for _ in range(count):
                item = held.popleft()
                out.append(self._render(item))
                self._bytes_out += len(item.raw)
                self._released_chars += item.chars
        end_of_stream = self._upstream_done and not held
        if end_of_stream:
            self.finished = True
            self.stats["outcome"] = self.stats.get("outcome") or "pass"
            self._cancel_keepalive()
            self._sink.finish(b"".join(out), self._metadata())
        elif out:
            self._last_emit = time.monotonic()
            self._sink.release(b"".join(out))

    def _all_checked(self) -> bool:
        return (self._upstream_done and self._in_flight is None
                and all(c.checked >= c.length for c in self._channels))

    # -- checks -----------------------------------------------------------------------------

    def _pending_chars(self) -> int:
        pending = 0
        for channel in self._channels:  # (once per chunk: a loop is cheaper than sum())
            pending += channel.length - channel.checked
        return pending


    def _maybe_check(self) -> None:
        if self.finished or self._in_flight is not None or not self._channels:
            return
        pending = self._pending_chars()
        if not should_check(pending_chars=pending, first_check_done=self._first_check_done,
                            upstream_done=self._text_done(), policy=self._policy):
            return
        blocks = self._plan()
        if not blocks:
            return
        texts = [self._channels[b.channel_index].slice(b.start, b.end) for b in blocks]
        self._in_flight = asyncio.get_running_loop().create_task(self._check(blocks, texts))

    def _plan(self) -> list[Block]:
        policy = self._policy
        if self._strategy is Strategy.CUMULATIVE:
            blocks = [Block(i, 0, c.checked, c.length) for i, c in enumerate(self._channels)
                      if c.length > c.checked]
            cap = policy.max_stream_text_units
            if self.stats.get("max_policy_text_units", 0) + estimated_units(blocks) <= cap:
                return blocks
            self._strategy = Strategy.WINDOWED
            self.stats["strategy"] = "windowed"
            self.stats["cumulative_cap_reached"] = True
            log.info("cumulative checks reached %d text units: windows from now on", cap)
        blocks = []
        span = policy.window_chars + policy.overlap_chars
        for index, channel in enumerate(self._channels):
            if channel.length <= channel.checked:
                continue
            start = max(0, min(channel.limit, channel.checked - policy.overlap_chars))
            end = min(channel.length, max(start + span, channel.checked + 1))
            blocks.append(Block(index, start, channel.checked, end))
        return blocks

    async def _check(self, blocks: list[Block], texts: list[str]) -> None:
        try:
            verdict = await self._apply(texts)
            if verdict.outcome is Outcome.MASK and len(verdict.outputs) != len(blocks):
                raise GuardrailServerError(
                    f"masked answer with {len(verdict.outputs)} outputs for {len(blocks)} blocks")
        except GuardrailError as exc:
            self._in_flight = None
            self._on_error(exc, blocks, texts)
        except Exception:  # noqa: BLE001 - a bug must not leave a FULL_DUPLEX body hanging
            log.exception("BUG in the output check; ending the stream")
            self._in_flight = None
            self.end(ErrorKind.UNAVAILABLE)
        else:
            self._in_flight = None
            self._on_verdict(verdict, blocks, texts)
        await self._flush()

    def _count(self, key: str, amount: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + amount

    def _on_verdict(self, verdict: GuardrailVerdict, blocks: list[Block],
                    texts: list[str]) -> None:
        self._count("checks")
        self._count("text_units", verdict.text_units)
        per_policy = max(verdict.usage.values(), default=0) if verdict.usage else 0
        self._count("max_policy_text_units", per_policy)
        if verdict.detected_only:
            self._count("detected", len(verdict.detected_only))
        if verdict.outcome is Outcome.BLOCK:
            window = self._window(blocks)
            if self._shadow:
                if not self.stats.get("would_block"):
                    # Enforced, this block would have ended the stream: report it, not the
                    # later windows that see the same text again.
                    self.stats["tripped_window"] = window
                    self._intervened("shadow_would_block", verdict, window)
                    log.info("shadow: the answer would have been blocked")
                self._count("would_block")
                self._accept(blocks, texts, None)
                return
            self.stats["tripped_window"] = window
            soft = self._soft_block and self._decoder is not None
            self._intervened("soft_block" if soft else "block", verdict, window)
            self.end(ErrorKind.VIOLATION, verdict.outputs[0] if verdict.outputs else None)
            return
        masked: list[str] | None = None
        if verdict.outcome is Outcome.MASK and self._shadow:
            self._count("would_mask")
            self._intervened("shadow_would_mask", verdict, self._window(blocks))
        elif verdict.outcome is Outcome.MASK:
            self._count("masked")
            if self._mode is StreamMode.ASYNC:
                self._count("mask_unapplied")
                self._intervened("mask_unapplied", verdict, self._window(blocks))
            else:
                masked = list(verdict.outputs)
                self._intervened("mask", verdict, self._window(blocks))
        self._accept(blocks, texts, masked)

    def _window(self, blocks: list[Block]) -> str:
        first = blocks[0]
        return f"{self._channels[first.channel_index].key}:{first.start}-{first.end}"

    def _intervened(self, outcome: str, verdict: GuardrailVerdict, window: str) -> None:
        if self._on_intervention is not None:
            self._on_intervention(outcome, verdict, self._released_chars, window)

    def _on_error(self, exc: GuardrailError, blocks: list[Block], texts: list[str]) -> None:
        self._count("errors")
        self.stats["error_class"] = exc.error_class
        if self._failure_mode.fails_open(exc) or self._shadow:
            log.warning("output check failed (%s); failure mode open: releasing unchecked "
                        "text", exc.error_class)
            self.stats["failed_open"] = True
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
        for index, block in enumerate(blocks):
            channel = self._channels[block.channel_index]
            final = block.end == channel.length and self._text_done()
            channel.checked = max(channel.checked, block.end)
            limit = block.end if (final or fast) else max(channel.limit, block.end - overlap)
            masked_text = masked[index] if masked is not None else texts[index]
            channel.last = (block, texts[index], masked_text)
            if self._mode is StreamMode.SYNC and (limit > channel.limit or masked is not None):
                self._map(channel, block, texts[index], masked_text, limit)
            channel.limit = max(channel.limit, limit)
            channel.trim(min(channel.limit, max(0, channel.checked - overlap)))
        self._advance()

    def _map(self, channel: _Channel, block: Block, original: str, masked: str,
             limit: int) -> None:
        """Give each held delta of ``channel`` in [previous limit, ``limit``) its text."""
        start = max(channel.limit, channel.mask_from)
        index = self._channel_index[channel.key]
        deltas = [d for item in self._held for d in item.deltas
                  if d.channel == index
                  and d.start + len(d.text) > channel.limit and d.start < limit]
        base = block.start
        cuts = sorted({d.start - base for d in deltas if start < d.start < limit}
                      | {d.start + len(d.text) - base for d in deltas
                         if start < d.start + len(d.text) < limit})
        region_start, region_end = start - base, max(limit, start) - base
        if region_end > region_start or masked != original:
            pieces, carry = map_region(original, masked, region_start,
                                       cuts if region_end > region_start else [], region_end)
            if region_end > region_start:
                bounds = [region_start, *cuts]
                # Pieces and deltas are both in text order: one pass over each.
                cursor = 0
                for piece, low in zip(pieces, bounds, strict=True):
                    position = base + low
                    while cursor < len(deltas) and (
                            deltas[cursor].start + len(deltas[cursor].text) <= position):
                        cursor += 1
                    if cursor < len(deltas) and deltas[cursor].start <= position:
                        delta = deltas[cursor]
                        if delta.mapped is None:
                            delta.mapped = [piece]
                        else:
                            delta.mapped.append(piece)
            if base + carry > channel.mask_from:
                channel.mask_from = base + carry
                if base + carry > limit:
                    # An entity runs past what is released now: the rest of it is dropped.
                    self._count("mask_carried")
        for delta in deltas:
            delta.mapped_to = max(delta.mapped_to, min(limit, delta.start + len(delta.text)))

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
        self._cancel_keepalive()
        soft = self._soft_block and kind == ErrorKind.VIOLATION and self._decoder is not None
        self.stats["outcome"] = ("soft_block" if soft else
                                 "block" if kind == ErrorKind.VIOLATION else "unavailable")
        task = self._in_flight
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._in_flight = None
        log.info("answer ended by the guardrail (%s) after %d released characters",
                 self.stats["outcome"], self._released_chars)
        frame = (self._codec.soft_block_frame(message or "") if soft
                 else self._codec.terminal_frame(kind))
        self._sink.finish(frame, self._metadata())

    def _metadata(self) -> dict[str, Any]:
        self.stats["chars_released"] = self._released_chars
        return self.stats

    @property
    def held_bytes(self) -> int:
        """Bytes held back from the client now. Read from the metrics thread: ``tuple`` copies
        the deque in one C call, so the loop may change it meanwhile."""
        return 0 if self.finished else self._bytes_in - self._bytes_out

    def close(self) -> None:
        """The stream is over (or cancelled): stop the check in flight and the timer."""
        self._cancel_keepalive()
        for task in list(self._tasks):
            task.cancel()
        if self._in_flight is not None:
            self._in_flight.cancel()
            self._in_flight = None

    # -- keep-alives ------------------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        if (self._keepalive_s <= 0 or self._keepalive is not None or self.finished
                or not self._chunks_seen or not self._held):
            return
        loop = asyncio.get_running_loop()
        self._keepalive = loop.call_later(self._keepalive_s, self._on_keepalive)

    def _cancel_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def _on_keepalive(self) -> None:
        self._keepalive = None
        if self.finished or not self._held:
            return
        idle = time.monotonic() - self._last_emit
        if idle >= self._keepalive_s * 0.99:
            # A comment is a complete SSE block: clients ignore it, proxies see traffic.
            self._sink.release(encode_comment("keep-alive"))
            self._last_emit = time.monotonic()
            self._count("keepalives")
            task = asyncio.get_running_loop().create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._arm_keepalive()
