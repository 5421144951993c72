"""Incremental, byte-preserving Server-Sent Events decoder and a small encoder.

Owns: splitting a ``text/event-stream`` body, delivered in arbitrary chunks,
into events exactly as the WHATWG HTML "Server-sent events" section parses and
interprets it (CRLF/LF/CR line endings, a leading BOM ignored, per-line UTF-8
decoding with replacement characters, ``data``/``event``/``id``/``retry``
fields, comments, unknown fields ignored), while keeping every byte: each
:class:`SSEEvent` carries the exact wire bytes of its block, so the ``raw`` of
all events followed by :meth:`SSEDecoder.flush` reproduces the input.

Unlike an ``EventSource``, every block terminated by a blank line is returned,
including comment-only and blank-line-only blocks and blocks without ``data``
(``data is None``; the spec dispatches nothing for those): a caller that
forwards ``raw`` then passes the stream through unchanged.

Must not: do I/O, log, know about any LLM provider's JSON payloads, or impose
size limits (callers bound ``pending``). It sees every response body chunk, so
``feed`` stays linear in the bytes fed, whatever the chunking.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent", "encode_comment", "encode_event", "utf8"]

_EOL = re.compile(rb"\r\n?|\n")
_NEWLINES = re.compile(r"\r\n?|\n")
_SURROGATES = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_CR_BYTE = b"\r"
_LF = 0x0A
_SPACE = 0x20

_NO_CR = 0
_CR_AFTER_LINE = 1
_CR_AFTER_BLANK = 2


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One block of the stream, up to and including its terminating blank line.

    ``event``, ``data``, ``id`` and ``retry`` are ``None`` when the block had
    no (valid) such field. ``data`` joins the block's ``data`` lines with
    ``"\\n"``; a ``data:`` line with an empty value gives ``""``, which the spec
    dispatches as a message, while ``None`` means the spec dispatches nothing.
    ``event`` is the last ``event`` field's value as sent (possibly ``""``);
    :attr:`event_type` applies the spec's ``"message"`` default. ``id`` is the
    last ``id`` field without NUL in this block (``""`` resets the last event
    ID); ``retry`` the last all-ASCII-digit ``retry`` field. ``comments`` holds
    each comment line's text after the colon, one leading space removed.
    """

    raw: bytes
    event: str | None = None
    data: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: tuple[str, ...] = ()

    @property
    def is_message(self) -> bool:
        return self.data is not None

    @property
    def event_type(self) -> str:
        return self.event or "message"


class SSEDecoder:
    """Incremental decoder for one event stream.

    Call :meth:`feed` per body chunk, passing ``end_of_stream=True`` with the
    last chunk (an empty one is fine), then :meth:`flush` for the bytes of the
    unterminated trailing block, which the spec discards and the caller must
    decide about (forward, drop or reject).

    A blank line ended by a CR that is the last byte fed so far cannot be
    dispatched yet: the next byte may be the LF of a CRLF, which belongs to the
    event's ``raw``. That event is returned by the next :meth:`feed`, or by the
    one with ``end_of_stream=True``; until then its bytes are in ``pending``.
    """

    __slots__ = (
        "_buf",
        "_pos",
        "_scan",
        "_cr",
        "_bom",
        "_data",
        "_event",
        "_id",
        "_retry",
        "_comments",
        "_last_id",
    )

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._scan = 0
        self._cr = _NO_CR
        self._bom = True
        self._data: list[str] | None = None
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._comments: list[str] | None = None
        self._last_id = ""

    #: A comment (``extproc.framing.Decoder.keepalive``): every client skips it.
    keepalive: bytes | None = b": keep-alive\n\n"

    def last(self, leftover: bytes) -> SSEEvent | None:
        """An unterminated last block (``flush``'s bytes) as an event. EventSource would not
        dispatch it, but line-based readers act on its data lines: it is read like an event,
        its ``raw`` being ``leftover``."""
        closing = SSEDecoder().feed(leftover + b"\n\n", end_of_stream=True)
        return SSEEvent(leftover, *_fields(closing[0])) if closing else None

    @property
    def pending_size(self) -> int:
        """``len(pending)``, without the copy."""
        return len(self._buf)

    @property
    def pending(self) -> bytes:
        """Bytes fed that are not yet part of a returned event."""
        return bytes(self._buf)

    @property
    def last_event_id(self) -> str:
        """The spec's last event ID string as of the latest returned event."""
        return self._last_id

    def feed(self, data: bytes, *, end_of_stream: bool = False) -> list[SSEEvent]:
        """Consume one chunk; return the events it completes, in stream order."""
        if type(data) is not bytes:
            data = bytes(data)
        events: list[SSEEvent] = []
        if not self._buf and not self._cr and not self._bom:
            # Nothing pending (so no field of an unfinished event either), the BOM settled: the
            # usual chunk is one or more whole events, each an optional ``event`` line and one
            # ``data`` line, and needs no per-line work. What follows them is fed as a chunk of
            # its own, which gives the same events (boundaries are arbitrary).
            start = (_whole_lf_events(data, events) if _CR_BYTE not in data
                     else _whole_crlf_events(data, events))
            if start == len(data):
                return events
            if start:
                data = data[start:]
        if self._buf:
            buf: bytes | bytearray = self._buf
            self._buf += data
        else:
            buf = data
        n = len(buf)
        pos = self._pos
        scan = self._scan
        blk = 0
        if self._cr:
            if pos < n:
                if buf[pos] == _LF:
                    pos += 1
                    if scan < pos:
                        scan = pos
                if self._cr == _CR_AFTER_BLANK:
                    events.append(self._dispatch(bytes(buf[:pos])))
                    blk = pos
                self._cr = _NO_CR
            elif end_of_stream and self._cr == _CR_AFTER_BLANK:
                events.append(self._dispatch(bytes(buf)))
                blk = pos
                self._cr = _NO_CR
        if self._bom and (n >= 3 or not _BOM.startswith(buf)):
            self._bom = False
            if buf.startswith(_BOM):
                pos = scan = 3
        if _CR_BYTE in data:
            search = _EOL.search
            while (m := search(buf, scan)) is not None:
                end, nxt = m.span()
                if nxt == n and not end_of_stream and buf[end] == _CR and nxt == end + 1:
                    if end == pos:
                        self._cr = _CR_AFTER_BLANK
                        pos = nxt
                        break
                    self._cr = _CR_AFTER_LINE
                if end == pos:
                    events.append(self._dispatch(bytes(buf[blk:nxt])))
                    blk = nxt
                else:
                    self._line(str(buf[pos:end], "utf-8", "replace"))
                pos = scan = nxt
        else:
            # The usual stream: LF line endings only. The bytes not scanned yet are ``data``
            # (a pending line holds no line ending), so every line ending is an LF: the same
            # loop with ``find`` instead of a regex search per line.
            find = buf.find
            while (end := find(b"\n", scan)) >= 0:
                nxt = end + 1
                if end == pos:
                    events.append(self._dispatch(bytes(buf[blk:nxt])))
                    blk = nxt
                else:
                    self._line(str(buf[pos:end], "utf-8", "replace"))
                pos = scan = nxt
        if buf is self._buf:
            if blk:
                del self._buf[:blk]
        elif blk < n:
            self._buf += buf[blk:]
        self._pos = pos - blk
        self._scan = n - blk
        return events

    def flush(self) -> bytes:
        """End of stream: return the unterminated trailing bytes (maybe ``b""``)
        and empty the buffer.

        Per spec nothing is dispatched for them; they may hold complete fields
        (even ``data``) that never saw their blank line. Feed the last chunk
        with ``end_of_stream=True`` first, or a block ended by a final lone CR
        is returned here rather than as an event.
        """
        rest = bytes(self._buf)
        self._buf = bytearray()
        self._pos = self._scan = 0
        self._cr = _NO_CR
        self._data = self._event = self._id = self._retry = self._comments = None
        return rest

    def _line(self, line: str) -> None:
        colon = line.find(":")
        if colon == 0:
            text = line[2:] if line[1:2] == " " else line[1:]
            if self._comments is None:
                self._comments = [text]
            else:
                self._comments.append(text)
            return
        if colon < 0:
            name, value = line, ""
        else:
            name = line[:colon]
            value = line[colon + 2 :] if line[colon + 1 : colon + 2] == " " else line[colon + 1 :]
        if name == "data":
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)

    def _dispatch(self, raw: bytes) -> SSEEvent:
        data = self._data
        comments = self._comments
        ident = self._id
        if ident is not None:
            self._last_id = ident
        event = SSEEvent(
            raw,
            self._event,
            None if data is None else "\n".join(data),
            ident,
            self._retry,
            () if comments is None else tuple(comments),
        )
        self._data = self._event = self._id = self._retry = self._comments = None
        return event


def _whole_lf_events(data: bytes, events: list[SSEEvent]) -> int:
    """``SSEDecoder.feed``'s fast path for LF line endings: the whole events at the start of
    ``data`` (an optional ``event`` line, one ``data`` line) appended to ``events``; returns
    where the rest begins."""
    n = len(data)
    start = 0
    while True:
        line = start
        name = None
        if data.startswith(b"event:", line):
            end = data.find(b"\n", line)
            if end < 0:
                break
            value = line + 7 if data[line + 6] == _SPACE else line + 6
            name = str(data[value:end], "utf-8", "replace")
            line = end + 1
        if not data.startswith(b"data:", line):
            break
        end = data.find(b"\n", line)
        nxt = end + 2
        if end < 0 or nxt > n or data[end + 1] != _LF:
            break
        value = line + 6 if data[line + 5] == _SPACE else line + 5
        events.append(SSEEvent(data[start:nxt], name, str(data[value:end], "utf-8", "replace")))
        start = nxt
    return start


def _whole_crlf_events(data: bytes, events: list[SSEEvent]) -> int:
    """The same for CR LF line endings (Google's streams): whole events of one ``data`` line
    each, the line holding no other CR or LF."""
    n = len(data)
    start = 0
    while data.startswith(b"data:", start):
        end = data.find(b"\r", start)
        nxt = end + 4
        if (end < 0 or nxt > n or data[end:nxt] != b"\r\n\r\n"
                or data.find(b"\n", start, end) >= 0):
            break
        value = start + 6 if data[start + 5] == _SPACE else start + 5
        events.append(SSEEvent(data[start:nxt], None, str(data[value:end], "utf-8", "replace")))
        start = nxt
    return start


def _fields(event: SSEEvent) -> tuple[str | None, str | None, str | None, int | None,
                                      tuple[str, ...]]:
    return event.event, event.data, event.id, event.retry, event.comments


def encode_event(data: str, event: str | None = None) -> bytes:
    """Wire bytes of one message event: optional ``event:`` line, one ``data:``
    line per line of ``data`` (CRLF, CR and LF all split), then a blank line.

    Lone surrogates become U+FFFD, as the decoder would read them."""
    if event is not None and ("\n" in event or "\r" in event):
        raise ValueError("SSE event name must not contain CR or LF")
    head = f"event: {event}\n" if event is not None else ""
    body = "".join(f"data: {line}\n" if line else "data:\n" for line in _NEWLINES.split(data))
    return utf8(f"{head}{body}\n")


def encode_comment(text: str) -> bytes:
    """Wire bytes of a comment-only block (one ``:`` line per line of ``text``,
    then a blank line), e.g. a keep-alive; receivers dispatch nothing for it."""
    body = "".join(f": {line}\n" if line else ":\n" for line in _NEWLINES.split(text))
    return utf8(f"{body}\n")


def utf8(text: str) -> bytes:
    """``text`` as UTF-8, lone surrogates (a ``\\ud83d`` escape of the JSON read) as U+FFFD,
    as a reader of the bytes would see them."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text).encode()
