"""Incremental, byte-preserving codec for the AWS binary event stream
(``application/vnd.amazon.eventstream``), the framing of Bedrock Runtime's ``ConverseStream``
and ``InvokeModelWithResponseStream`` answers.

Owns: cutting such a body, delivered in arbitrary chunks, into its messages exactly as
botocore's ``EventStreamBuffer`` reads them (``botocore/eventstream.py``, the source of truth):
a prelude (big-endian total length, headers length, CRC32 of those 8 bytes), the headers (name
length, UTF-8 name, type, value), the payload and a CRC32 of everything before it, with
botocore's bounds (headers at most 128 KiB, payload at most 24 MiB, so a message at most
``MAX_MESSAGE_LENGTH``). Each message is an :class:`EventFrame`, an
:class:`extproc.sse.SSEEvent` whose ``raw`` holds its exact wire bytes, so the ``raw`` of all
frames followed by :meth:`EventStreamDecoder.flush` reproduces the input.
It also encodes frames (:func:`encode_frame`, :func:`event_frame`, :func:`exception_frame`) as
AWS sends them, and names the exception events each streaming operation declares: botocore
reports an exception event its operation does not declare without its message.

The decoder is stricter than botocore where botocore is lenient by accident: a header running
past the headers section, which botocore reads short, is corruption (:class:`EventStreamError`),
as is anything botocore raises on (a bad CRC, a length out of bounds, an unknown header type,
invalid UTF-8 in a name or string, a duplicate header name).

Must not: do I/O, log, or know any model's JSON payloads. It sees every response body chunk,
so ``feed`` stays linear in the bytes fed, whatever the chunking.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.sse import SSEEvent

__all__ = [
    "CONTENT_TYPE",
    "EventFrame",
    "EventStreamError",
    "EventStreamDecoder",
    "encode_frame",
    "event_frame",
    "exception_frame",
    "CONVERSE_STREAM_EXCEPTIONS",
    "INVOKE_STREAM_EXCEPTIONS",
    "PRELUDE_LENGTH",
    "MAX_HEADERS_LENGTH",
    "MAX_PAYLOAD_LENGTH",
    "MAX_MESSAGE_LENGTH",
]

#: The content type of an event stream body.
CONTENT_TYPE = "application/vnd.amazon.eventstream"

#: The exception events ``ConverseStream``'s output stream declares (its service model, in
#: model order): botocore raises an exception event of one of these with its message, and
#: any other with an empty code and message.
CONVERSE_STREAM_EXCEPTIONS: tuple[str, ...] = (
    "internalServerException",
    "modelStreamErrorException",
    "validationException",
    "throttlingException",
    "serviceUnavailableException",
)

#: The exception events ``InvokeModelWithResponseStream``'s output stream declares.
INVOKE_STREAM_EXCEPTIONS: tuple[str, ...] = (
    "internalServerException",
    "modelStreamErrorException",
    "validationException",
    "throttlingException",
    "modelTimeoutException",
    "serviceUnavailableException",
)

# botocore's bounds (botocore.eventstream): a frame beyond them is corrupt.
PRELUDE_LENGTH = 12
MAX_HEADERS_LENGTH = 128 * 1024
MAX_PAYLOAD_LENGTH = 24 * 1024 * 1024
_CRC_LENGTH = 4
_MIN_MESSAGE_LENGTH = PRELUDE_LENGTH + _CRC_LENGTH
MAX_MESSAGE_LENGTH = _MIN_MESSAGE_LENGTH + MAX_HEADERS_LENGTH + MAX_PAYLOAD_LENGTH

_PRELUDE = struct.Struct("!III")
_LENGTHS = struct.Struct("!II")
_UINT32 = struct.Struct("!I")
_UINT16 = struct.Struct("!H")
_INT8 = struct.Struct("!b")
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_INT64 = struct.Struct("!q")

_TRUE, _FALSE, _BYTE, _SHORT, _INT, _LONG, _BYTES, _STRING, _TIMESTAMP, _UUID = range(10)
# Header types with a fixed-size value: its size and format.
_FIXED: dict[int, struct.Struct] = {
    _BYTE: _INT8, _SHORT: _INT16, _INT: _INT32, _LONG: _INT64, _TIMESTAMP: _INT64,
}

# The header naming a frame's ``event``, by ``:message-type``.
_NAME_HEADER = {"event": ":event-type", "exception": ":exception-type", "error": ":error-code"}

_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class EventFrame(SSEEvent):
    """One message of the stream. ``raw`` is its exact wire bytes, ``id`` stays None.

    ``message_type`` is the ``:message-type`` header (``event``, ``exception`` or ``error``;
    ``""`` when absent), ``event`` the ``:event-type`` header of an event, the
    ``:exception-type`` of an exception, the ``:error-code`` of an error (None when absent).
    ``data`` is the payload as UTF-8 (invalid bytes replaced), None when it is empty.
    ``headers`` holds every header in wire order, valued as botocore values them: ``bool``,
    ``int`` (byte, short, integer, long, and timestamp in milliseconds since the epoch),
    ``bytes`` (byte array, and the 16 bytes of a UUID) or ``str``.
    """

    message_type: str = ""
    headers: tuple[tuple[str, object], ...] = ()

    def header(self, name: str) -> object | None:
        """The value of header ``name``, None when the frame has none."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class EventStreamError(ValueError):
    """The stream is corrupt: a bad prelude or message CRC, lengths out of bounds or
    inconsistent, a malformed header or one of an unknown type."""


class EventStreamDecoder:
    """Incremental decoder for one event stream (``extproc.framing.Decoder``).

    Call :meth:`feed` per body chunk, passing ``end_of_stream=True`` with the last chunk (an
    empty one is fine), then :meth:`flush` for the bytes of an incomplete last frame. A
    prelude is checked as soon as its 12 bytes are in, so a corrupt length is reported at once
    rather than waited on.

    Once :meth:`feed` has raised :class:`EventStreamError` it raises again on every later call.
    The frames the failing call had read are not returned: their bytes, and every byte fed
    since, stay pending (:meth:`flush`), so frames returned plus ``flush()`` is still the input.
    """

    __slots__ = ("_buf", "_need", "_error")

    #: The framing has no bytes a client skips: no keep-alive.
    keepalive: bytes | None = None

    def __init__(self) -> None:
        self._buf = bytearray()  # the bytes fed not yet returned in a frame
        self._need = 0  # the first frame's total length once its prelude is checked, else 0
        self._error: EventStreamError | None = None

    @property
    def pending_size(self) -> int:
        """Bytes fed that are not yet part of a returned frame."""
        return len(self._buf)

    def feed(self, data: bytes, *, end_of_stream: bool = False) -> list[EventFrame]:
        """Consume one chunk; return the frames it completes, in stream order.

        An incomplete frame at the end of the stream is not an error: its bytes are pending
        (``flush``); ``end_of_stream`` changes nothing else.
        """
        buf = self._buf
        if self._error is not None:
            buf += data
            raise EventStreamError(*self._error.args)
        frames: list[EventFrame] = []
        if not buf:
            # Nothing pending: the usual chunk is one or a few whole frames, read straight
            # from it (a frame that is the whole chunk is its own ``raw``, no copy).
            if not data:
                return frames
            if type(data) is not bytes:
                data = bytes(data)
            try:
                end, self._need = _read(data, 0, frames)
            except EventStreamError as exc:
                buf += data
                self._fail(exc)
                raise
            buf += memoryview(data)[end:]
            return frames
        buf += data
        need = self._need
        if need and len(buf) < need:
            return frames  # the usual chunk of a big frame: nothing to read yet
        try:
            end, self._need = _read(buf, need, frames)
        except EventStreamError as exc:
            self._fail(exc)
            raise
        del buf[:end]  # cheap: CPython drops a bytearray's head by moving its start
        return frames

    def _fail(self, exc: EventStreamError) -> None:
        # The frames read by the failing call are not returned: their bytes stay in _buf.
        self._error = exc
        self._need = 0

    def flush(self) -> bytes:
        """The bytes of an incomplete last frame (after the last ``feed``), clearing them."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._need = 0
        return rest

    def last(self, leftover: bytes) -> EventFrame | None:
        """None: part of a frame is never read as an event (botocore drops it)."""
        return None


def _read(buf: bytes | bytearray, need: int, frames: list[EventFrame]) -> tuple[int, int]:
    """Append the whole frames at the start of ``buf`` to ``frames``. ``need`` is the total
    length of the first frame if its prelude was checked already, else 0. Returns where the
    first incomplete frame starts and its ``need``."""
    pos = 0
    size = len(buf)
    view = memoryview(buf)
    try:
        while True:
            if not need:
                if size - pos < PRELUDE_LENGTH:
                    return pos, 0
                need = _prelude(buf, pos)
            end = pos + need
            if end > size:
                return pos, need
            frames.append(_frame(buf, view, pos, end))
            pos = end
            need = 0
    finally:
        view.release()


def _prelude(buf: bytes | bytearray, pos: int) -> int:
    total, headers_length, crc = _PRELUDE.unpack_from(buf, pos)
    computed = zlib.crc32(buf[pos:pos + 8])
    if crc != computed:
        raise EventStreamError(
            f"prelude checksum mismatch: expected 0x{crc:08x}, calculated 0x{computed:08x}")
    if headers_length > MAX_HEADERS_LENGTH:
        raise EventStreamError(
            f"headers length of {headers_length} exceeds the maximum of {MAX_HEADERS_LENGTH}")
    if total < _MIN_MESSAGE_LENGTH + headers_length:
        raise EventStreamError(
            f"total length of {total} is below {_MIN_MESSAGE_LENGTH} + headers length "
            f"{headers_length}")
    payload_length = total - _MIN_MESSAGE_LENGTH - headers_length
    if payload_length > MAX_PAYLOAD_LENGTH:
        raise EventStreamError(
            f"payload length of {payload_length} exceeds the maximum of {MAX_PAYLOAD_LENGTH}")
    return int(total)


def _frame(buf: bytes | bytearray, view: memoryview, start: int, end: int) -> EventFrame:
    (headers_length,) = _UINT32.unpack_from(buf, start + 4)
    (prelude_crc,) = _UINT32.unpack_from(buf, start + 8)
    payload_end = end - _CRC_LENGTH
    (crc,) = _UINT32.unpack_from(buf, payload_end)
    computed = zlib.crc32(view[start + 8:payload_end], prelude_crc)
    if crc != computed:
        raise EventStreamError(
            f"message checksum mismatch: expected 0x{crc:08x}, calculated 0x{computed:08x}")
    headers_end = start + PRELUDE_LENGTH + headers_length
    section = bytes(view[start + PRELUDE_LENGTH:headers_end])
    known = _HEADER_CACHE.get(section)
    if known is None:
        known = _read_headers(section)
        if len(_HEADER_CACHE) >= _HEADER_CACHE_SIZE:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[section] = known
    headers, message_type, event = known
    if type(buf) is bytes and start == 0 and end == len(buf):
        raw = buf  # the chunk is this one frame: no copy
    else:
        raw = bytes(view[start:end])
    data = None
    if payload_end > headers_end:
        data = str(view[headers_end:payload_end], "utf-8", "replace")
    return EventFrame(raw, event=event, data=data, message_type=message_type, headers=headers)


#: Header sections already read -> (headers, message type, event name). A stream repeats a
#: handful of them (one per event type) in every frame: reading one is a dict lookup.
_HEADER_CACHE: dict[bytes, tuple[tuple[tuple[str, object], ...], str, str | None]] = {}
_HEADER_CACHE_SIZE = 256


def _read_headers(section: bytes) -> tuple[tuple[tuple[str, object], ...], str, str | None]:
    """A header section's headers, ``:message-type`` and event name (``EventFrame``)."""
    headers = _headers(section, 0, len(section))
    message_type = ""
    event = None
    for name, value in headers:
        if name == ":message-type" and type(value) is str:
            message_type = value
            break
    wanted = _NAME_HEADER.get(message_type, ":event-type")  # (botocore: not an error, an event)
    if wanted is not None:
        for name, value in headers:
            if name == wanted and type(value) is str:
                event = value
                break
    return headers, message_type, event


def _headers(buf: bytes | bytearray, pos: int, end: int) -> tuple[tuple[str, object], ...]:
    headers: list[tuple[str, object]] = []
    names: set[str] = set()
    try:
        while pos < end:
            name_end = pos + 1 + buf[pos]
            if name_end >= end:  # the type byte must follow the name
                raise EventStreamError("header runs past the headers section")
            name = str(buf[pos + 1:name_end], "utf-8")
            kind = buf[name_end]
            pos = name_end + 1
            value: object
            if kind == _STRING or kind == _BYTES:
                if pos + 2 > end:
                    raise EventStreamError("header runs past the headers section")
                (length,) = _UINT16.unpack_from(buf, pos)
                pos += 2
                if pos + length > end:
                    raise EventStreamError("header runs past the headers section")
                chunk = bytes(buf[pos:pos + length])
                value = str(chunk, "utf-8") if kind == _STRING else chunk
                pos += length
            elif kind == _TRUE:
                value = True
            elif kind == _FALSE:
                value = False
            elif kind == _UUID:
                if pos + 16 > end:
                    raise EventStreamError("header runs past the headers section")
                value = bytes(buf[pos:pos + 16])
                pos += 16
            elif (fixed := _FIXED.get(kind)) is not None:
                if pos + fixed.size > end:
                    raise EventStreamError("header runs past the headers section")
                (value,) = fixed.unpack_from(buf, pos)
                pos += fixed.size
            else:
                raise EventStreamError(f"unknown header type {kind} for header {name!r}")
            if name in names:
                raise EventStreamError(f"duplicate header {name!r}")
            names.add(name)
            headers.append((name, value))
    except UnicodeDecodeError as exc:
        raise EventStreamError(f"header is not valid UTF-8: {exc}") from None
    return tuple(headers)


def encode_frame(headers: Sequence[tuple[str, str | bytes | bool | int]], payload: bytes) -> bytes:
    """Wire bytes of one message: ``str`` values as strings (type 7), ``bytes`` as byte arrays
    (6), ``bool`` as true/false (0/1), ``int`` as 32-bit integers (4).

    Raises ValueError for what botocore would not read: a name empty, of more than 255 UTF-8
    bytes or repeated, a string or byte array of more than 65535 bytes, an ``int`` outside
    int32, a text that is not valid UTF-8 (lone surrogates), headers or payload beyond
    botocore's bounds."""
    parts: list[bytes] = []
    seen: set[str] = set()
    for name, value in headers:
        encoded_name = name.encode()
        if not 0 < len(encoded_name) <= 255:
            raise ValueError(f"header name {name!r} must be 1 to 255 UTF-8 bytes")
        if name in seen:
            raise ValueError(f"duplicate header {name!r}")
        seen.add(name)
        parts.append(bytes((len(encoded_name),)))
        parts.append(encoded_name)
        if isinstance(value, bool):
            parts.append(bytes((_TRUE if value else _FALSE,)))
        elif isinstance(value, int):
            if not -(2**31) <= value < 2**31:
                raise ValueError(f"header {name!r}: {value} is out of the int32 range")
            parts.append(bytes((_INT,)))
            parts.append(_INT32.pack(value))
        else:
            kind = _STRING if isinstance(value, str) else _BYTES
            blob = value.encode() if isinstance(value, str) else bytes(value)
            if len(blob) > 0xFFFF:
                raise ValueError(f"header {name!r}: value of {len(blob)} bytes exceeds 65535")
            parts.append(bytes((kind,)))
            parts.append(_UINT16.pack(len(blob)))
            parts.append(blob)
    encoded_headers = b"".join(parts)
    if len(encoded_headers) > MAX_HEADERS_LENGTH:
        raise ValueError(
            f"headers of {len(encoded_headers)} bytes exceed the maximum of {MAX_HEADERS_LENGTH}")
    if len(payload) > MAX_PAYLOAD_LENGTH:
        raise ValueError(
            f"payload of {len(payload)} bytes exceeds the maximum of {MAX_PAYLOAD_LENGTH}")
    total = _MIN_MESSAGE_LENGTH + len(encoded_headers) + len(payload)
    lengths = _LENGTHS.pack(total, len(encoded_headers))
    prelude_crc = zlib.crc32(lengths)
    head = lengths + _UINT32.pack(prelude_crc)
    crc = zlib.crc32(payload, zlib.crc32(encoded_headers, zlib.crc32(head)))
    return b"".join((head, encoded_headers, payload, _UINT32.pack(crc)))


def event_frame(event_type: str, payload: bytes) -> bytes:
    """Wire bytes of an event, its headers in the order AWS sends them."""
    return encode_frame(
        ((":event-type", event_type), (":content-type", "application/json"),
         (":message-type", "event")),
        payload,
    )


def exception_frame(exception_type: str, message: str) -> bytes:
    """Wire bytes of an exception, its headers in the order AWS sends them, its payload
    ``{"message": message}`` (lone surrogates in ``message`` become U+FFFD). botocore reports
    only an exception type the operation declares with its message
    (:data:`CONVERSE_STREAM_EXCEPTIONS`, :data:`INVOKE_STREAM_EXCEPTIONS`)."""
    text = json.dumps({"message": message}, separators=(",", ":"), ensure_ascii=False)
    try:
        payload = text.encode()
    except UnicodeEncodeError:
        payload = _SURROGATES.sub("\ufffd", text).encode()
    return encode_frame(
        ((":exception-type", exception_type), (":content-type", "application/json"),
         (":message-type", "exception")),
        payload,
    )
