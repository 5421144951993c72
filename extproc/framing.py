"""How a streamed answer's body is cut into events: one interface over every framing the
sidecar reads (``Decoder``), and the framings other than SSE's (``extproc.sse``) that are
line-based: NDJSON (Ollama).

An event is an :class:`extproc.sse.SSEEvent`: ``raw`` holds its exact wire bytes (the ``raw``
of all events followed by ``flush()`` reproduces the body), ``data`` its payload as text,
``event`` its name where the framing has one. A format says which framing a content type of
its answers has (``StreamFormat.stream_decoder``); the output guard holds and releases whole
events, so a terminal frame always lands on an event boundary.

Pure: no I/O, no logging, no size limits (the guard bounds what is held).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from extproc.sse import SSEDecoder, SSEEvent

__all__ = ["Decoder", "NDJSONDecoder", "sse_decoder"]


class Decoder(Protocol):
    """One streamed answer's framing, fed its body chunk by chunk (boundaries arbitrary)."""

    #: Bytes every client skips, sent between events while text is held so that proxies see
    #: traffic (an SSE comment), or None: the framing has no such bytes.
    keepalive: bytes | None

    @property
    def pending_size(self) -> int:
        """Bytes fed that are not yet part of a returned event."""
        ...

    def feed(self, data: bytes, *, end_of_stream: bool = False) -> Sequence[SSEEvent]:
        """Consume one chunk; the events it completes, in order."""
        ...

    def flush(self) -> bytes:
        """The bytes of an unterminated last event (after the last ``feed``)."""
        ...

    def last(self, leftover: bytes) -> SSEEvent | None:
        """``leftover`` (``flush()``'s bytes at the end of the body) as the event the clients
        that act on it read, ``raw`` being ``leftover``; None when no client reads it as one."""
        ...


def sse_decoder(content_type: str) -> Decoder | None:
    """An SSE decoder for a ``text/event-stream`` answer (``content_type`` lower case), else
    None: the formats whose streams are SSE say so with this."""
    return SSEDecoder() if content_type.startswith("text/event-stream") else None


# httpx's ``iter_lines`` (the ``ollama`` Python client) ends a line at LF, CR LF or a lone CR;
# Go's scanner and the JavaScript client at LF only. Cutting at every one of them reads each
# piece any of them parses: a CR inside a line the JavaScript client rejects as one bad line
# is read here as two.
_EOL = re.compile(rb"\r\n?|\n")


class NDJSONDecoder:
    """Newline-delimited JSON (``application/x-ndjson``): one event per line, ``data`` the
    line without its ending (UTF-8, invalid bytes replaced), ``raw`` with it. Blank lines are
    events without data (``data is None``), passed on as they came."""

    __slots__ = ("_buf", "_cr")

    keepalive: bytes | None = None  # a blank line is an error to the ollama clients

    def __init__(self) -> None:
        self._buf = bytearray()  # the bytes of an unfinished line (it holds no line ending)
        self._cr = False  # the last byte fed was a CR ending a line: an LF may follow

    @property
    def pending_size(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes, *, end_of_stream: bool = False) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if self._cr:
            self._cr = False
            if data.startswith(b"\n"):
                # The LF of a CR LF whose CR ended the last event: it belongs to nothing the
                # clients read; pass it on as a blank event of its own.
                events.append(SSEEvent(b"\n"))
                data = data[1:]
        # Only ``data`` is scanned: what is pending holds no line ending, so a long line fed
        # in many chunks costs its length once.
        start = 0
        for match in _EOL.finditer(data):
            end, nxt = match.span()
            if nxt == len(data) and data[end] == 0x0D and not end_of_stream:
                self._cr = True  # a CR LF may be cut between its bytes
            if self._buf:
                self._buf += data[start:end]
                line = bytes(self._buf)
                self._buf.clear()
                events.append(_line(line + data[end:nxt], line))
            else:
                events.append(_line(data[start:nxt], data[start:end]))
            start = nxt
        if start < len(data):
            self._buf += data[start:]
        return events

    def flush(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def last(self, leftover: bytes) -> SSEEvent | None:
        # Every client reads an unterminated last line.
        return _line(leftover, leftover)


def _line(raw: bytes, line: bytes) -> SSEEvent:
    if not line.strip():
        return SSEEvent(raw)
    return SSEEvent(raw, None, str(line, "utf-8", "replace"))
