"""Where a stream's answers go: the ``Outbox`` (ordered, drained by one writer at a time), the
two body sinks (FULL_DUPLEX_STREAMED and STREAMED) and the SSE keep-alive timer.

Body mode, chosen from what Envoy reports in ``protocol_config``:

* ``FullDuplexSink`` (FULL_DUPLEX_STREAMED, Envoy >= 1.34): answers any time, and can end the
  body early so that Envoy resets the upstream (``shared/docs/ext_proc.md``).
* ``StreamedSink`` (a route configured STREAMED, the fallback for older Envoy/Istio): exactly
  one answer per chunk, in order, at once.

``Replies`` builds the stream's own answers (an error in the API's shape, a whole body).

Builds Envoy messages only through ``extproc.envoy``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

from extproc import envoy
from extproc.formats import StreamFormat
from extproc.sse import encode_comment
from extproc.stream.record import StreamRecord


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


class BodySink(Protocol):
    """Where released bytes go: the Envoy body mode's way of answering."""

    def release(self, data: bytes) -> None:
        """Bytes the client may have now (not the end of the body)."""

    def finish(self, data: bytes, metadata: Mapping[str, Any]) -> None:
        """The last bytes of the body; nothing is released after this."""

    def chunk_done(self, end_of_stream: bool) -> None:
        """Envoy's chunk was taken in (STREAMED answers each one)."""


class FullDuplexSink:
    """FULL_DUPLEX_STREAMED: released bytes go out at once as ``StreamedBodyResponse``s."""

    __slots__ = ("_outbox", "_namespace")

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


KEEPALIVE = encode_comment("keep-alive")


class KeepAlive:
    """An SSE comment (``: keep-alive``) after ``interval_s`` of silence while text is held:
    clients ignore comments, proxies between Envoy and the client see traffic. A comment is a
    complete SSE block, so it only ever goes out between released events."""

    __slots__ = ("_interval_s", "_sink", "_flush", "_holding", "_sent", "_clock", "_timer",
                 "_tasks", "_last_emit", "_frame")

    def __init__(self, interval_s: float, sink: BodySink,
                 flush: Callable[[], Coroutine[Any, Any, None]],
                 holding: Callable[[], bool], sent: Callable[[], None], *,
                 clock: Callable[[], float] = time.monotonic,
                 frame: bytes = KEEPALIVE) -> None:
        self._interval_s = interval_s
        self._frame = frame  # (``extproc.framing.Decoder.keepalive``)
        self._sink = sink
        self._flush = flush
        self._holding = holding  # whether anything is held back now
        self._sent = sent  # counts a keep-alive
        self._clock = clock
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_emit = clock()

    def emitted(self) -> None:
        """Bytes went out: silence starts now."""
        self._last_emit = self._clock()

    def arm(self) -> None:
        """Start the timer if it is off and something is held."""
        if self._interval_s <= 0 or self._timer is not None or not self._holding():
            return
        self._timer = asyncio.get_running_loop().call_later(self._interval_s, self._fire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Stop for good, and let go of the owner's callbacks: the owner holds this timer, so
        without that the two would wait for a garbage collection to be freed."""
        self.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._holding = _never
        self._sent = _nothing

    def _fire(self) -> None:
        self._timer = None
        if not self._holding():
            return
        idle = self._clock() - self._last_emit
        if idle >= self._interval_s * 0.99:
            self._sink.release(self._frame)
            self._last_emit = self._clock()
            self._sent()
            task = asyncio.get_running_loop().create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.arm()


class Replies:
    """The stream's own answers: an error in the API's shape, and a whole non-streamed body.

    An error is a local reply (``ImmediateResponse``) while the response headers have not gone
    out; with the body mode configured FULL_DUPLEX they have once the body streams
    (``body_started``), and the error body then replaces the answer's, behind the status
    already sent.
    """

    __slots__ = ("_outbox", "_fmt", "_record", "_namespace", "_full_duplex", "body_started")

    def __init__(self, outbox: Outbox, fmt: StreamFormat, record: StreamRecord, namespace: str,
                 *, full_duplex: bool) -> None:
        self._outbox = outbox
        self._fmt = fmt
        self._record = record
        self._namespace = namespace
        self._full_duplex = full_duplex
        self.body_started = False

    def error(self, kind: str, outcome: str) -> None:
        """Answer with the API's error body for ``kind`` (an ``ErrorKind``); the stream's
        outcome is ``outcome``."""
        status, body = self._fmt.error_body(kind)
        record = self._record
        record.outcome = outcome
        if record.chars_released is None:
            record.chars_released = 0
        metadata = record.to_metadata()
        if self._full_duplex and self.body_started:
            self._outbox.put(envoy.streamed_response_body(
                body, True, metadata_namespace=self._namespace, metadata=metadata))
            return
        self._outbox.put(envoy.immediate_response(
            status, body, details=f"{kind}_input" if outcome != "block" else kind,
            metadata_namespace=self._namespace, metadata=metadata))

    def whole_body(self, original: bytes, replacement: bytes | None) -> Any:
        """The answer to a whole non-streamed answer: unchanged (``replacement`` None) or
        replaced. With the body mode configured FULL_DUPLEX it came in chunks (a BUFFERED
        override is ignored) and goes back as one streamed answer."""
        ns, metadata = self._namespace, self._record.to_metadata()
        if self._full_duplex:
            return envoy.streamed_response_body(
                original if replacement is None else replacement, True,
                metadata_namespace=ns, metadata=metadata)
        if replacement is None:
            return envoy.continue_response_body(metadata_namespace=ns, metadata=metadata)
        return envoy.replace_response_body(replacement, metadata_namespace=ns, metadata=metadata)


def _never() -> bool:
    return False


def _nothing() -> None:
    pass
