"""extproc.eventstream: the AWS binary event stream codec, held to botocore's own reader
(``botocore.eventstream.EventStreamBuffer``, and boto3's ``bedrock-runtime`` client for what a
Bedrock caller sees) and to frames built here byte by byte, independently of the encoder."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.eventstream
import botocore.exceptions
import botocore.parsers
import pytest
from botocore.awsrequest import AWSResponse
from botocore.eventstream import EventStream, EventStreamBuffer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mypy_boto3_bedrock_runtime import BedrockRuntimeClient

from extproc import eventstream
from extproc.eventstream import (
    CONVERSE_STREAM_EXCEPTIONS,
    INVOKE_STREAM_EXCEPTIONS,
    EventFrame,
    EventStreamDecoder,
    EventStreamError,
    encode_frame,
    event_frame,
    exception_frame,
)
from extproc.sse import SSEEvent

# --------------------------------------------------------------------------- helpers

# botocore's own test vector (tests/unit/test_eventstream.py there): no headers, no payload.
EMPTY_MESSAGE = b"\x00\x00\x00\x10\x00\x00\x00\x00\x05\xc2\x48\xeb\x7d\x98\xc8\xff"


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


def ref_header(name: bytes, kind: int, value: bytes) -> bytes:
    """One header on the wire: name length, name, type byte, encoded value."""
    return bytes([len(name)]) + name + bytes([kind]) + value


def ref_frame(headers: bytes, payload: bytes, *, total: int | None = None,
              headers_length: int | None = None) -> bytes:
    """A frame built by hand from already-encoded header bytes, CRCs by zlib (lengths may be
    overridden, still with valid CRCs, to build inconsistent frames)."""
    total = 16 + len(headers) + len(payload) if total is None else total
    headers_length = len(headers) if headers_length is None else headers_length
    lengths = u32(total) + u32(headers_length)
    prelude = lengths + u32(zlib.crc32(lengths))
    body = prelude + headers + payload
    return body + u32(zlib.crc32(body))


def botocore_messages(stream: bytes) -> list[tuple[list[tuple[str, object]], bytes]]:
    buffer = EventStreamBuffer()
    buffer.add_data(stream)
    messages: list[Any] = list(buffer)
    return [(list(m.headers.items()), m.payload) for m in messages]


def payload_of(wire: bytes) -> bytes:
    (headers_length,) = struct.unpack_from("!I", wire, 4)
    return wire[12 + headers_length:-4]


def decode(chunks: list[bytes], *, end_of_stream: bool = True) -> tuple[list[EventFrame], bytes]:
    dec = EventStreamDecoder()
    frames: list[EventFrame] = []
    for chunk in chunks:
        frames += dec.feed(chunk)
    if end_of_stream:
        frames += dec.feed(b"", end_of_stream=True)
    return frames, dec.flush()


def view(frame: EventFrame) -> tuple[object, ...]:
    return (frame.raw, frame.message_type, frame.event, frame.data, frame.id, frame.headers)


def string(value: str) -> bytes:
    encoded = value.encode()
    return struct.pack("!H", len(encoded)) + encoded


def event_headers(name: str) -> list[tuple[str, object]]:
    return [(":event-type", name), (":content-type", "application/json"),
            (":message-type", "event")]


# --------------------------------------------------------------------------- encoding

def test_empty_message_vector() -> None:
    assert encode_frame([], b"") == EMPTY_MESSAGE
    assert zlib.crc32(EMPTY_MESSAGE[:8]) == 0x05C248EB
    frames, rest = decode([EMPTY_MESSAGE])
    assert rest == b""
    assert [view(f) for f in frames] == [(EMPTY_MESSAGE, "", None, None, None, ())]


def test_event_frame_reads_in_botocore_as_built_by_hand() -> None:
    payload = b'{"contentBlockIndex":0,"delta":{"text":"Hi"}}'
    wire = event_frame("contentBlockDelta", payload)
    by_hand = ref_frame(
        ref_header(b":event-type", 7, string("contentBlockDelta"))
        + ref_header(b":content-type", 7, string("application/json"))
        + ref_header(b":message-type", 7, string("event")),
        payload,
    )
    assert wire == by_hand
    assert botocore_messages(wire) == [(event_headers("contentBlockDelta"), payload)]
    (frame,) = EventStreamDecoder().feed(wire)
    assert view(frame) == (wire, "event", "contentBlockDelta", payload.decode(), None,
                           tuple(event_headers("contentBlockDelta")))


def test_exception_frame_reads_in_botocore() -> None:
    wire = exception_frame("validationException", 'Violated "guardrail" policy: é')
    payload = '{"message":"Violated \\"guardrail\\" policy: é"}'.encode()
    headers = [(":exception-type", "validationException"),
               (":content-type", "application/json"), (":message-type", "exception")]
    assert botocore_messages(wire) == [(headers, payload)]
    (frame,) = EventStreamDecoder().feed(wire)
    assert view(frame) == (wire, "exception", "validationException", payload.decode(), None,
                           tuple(headers))
    assert json.loads(frame.data or "") == {"message": 'Violated "guardrail" policy: é'}


def test_exception_frame_lone_surrogate_becomes_replacement_character() -> None:
    (frame,) = EventStreamDecoder().feed(exception_frame("validationException", "a\ud800b"))
    assert frame.data == '{"message":"a\ufffdb"}'


def test_encode_frame_every_value_type_reads_in_botocore() -> None:
    headers: list[tuple[str, str | bytes | bool | int]] = [
        ("str", "héllo"), ("empty-str", ""), ("bytes", b"\x00\xff\x10"), ("empty-bytes", b""),
        ("true", True), ("false", False), ("int", 7), ("int-min", -(2**31)),
        ("int-max", 2**31 - 1), ("n" * 255, "long name"),
    ]
    payload = b"\x00\x01binary\xff"
    wire = encode_frame(headers, payload)
    by_hand = ref_frame(
        ref_header(b"str", 7, string("héllo")) + ref_header(b"empty-str", 7, b"\x00\x00")
        + ref_header(b"bytes", 6, b"\x00\x03\x00\xff\x10") + ref_header(b"empty-bytes", 6, b"\0\0")
        + ref_header(b"true", 0, b"") + ref_header(b"false", 1, b"")
        + ref_header(b"int", 4, b"\x00\x00\x00\x07")
        + ref_header(b"int-min", 4, b"\x80\x00\x00\x00")
        + ref_header(b"int-max", 4, b"\x7f\xff\xff\xff")
        + ref_header(b"n" * 255, 7, string("long name")),
        payload,
    )
    assert wire == by_hand
    assert botocore_messages(wire) == [(list(headers), payload)]
    (frame,) = EventStreamDecoder().feed(wire)
    assert frame.headers == tuple(headers)
    assert [type(v) for _, v in frame.headers] == [type(v) for _, v in headers]
    assert frame.data == payload.decode("utf-8", "replace")
    assert frame.message_type == "" and frame.event is None


@pytest.mark.parametrize(
    ("headers", "payload"),
    [
        ([("i", 2**31)], b""),
        ([("i", -(2**31) - 1)], b""),
        ([("", "x")], b""),
        ([("n" * 256, "x")], b""),
        ([("é" * 128, "x")], b""),  # 256 UTF-8 bytes
        ([("a", "x"), ("a", "y")], b""),
        ([("s", "x" * 65536)], b""),
        ([("b", b"x" * 65536)], b""),
        ([("s", "\ud800")], b""),
        ([(f"h{i}", "x" * 65000) for i in range(3)], b""),  # headers beyond 128 KiB
        ([], b"x" * (24 * 1024 * 1024 + 1)),
    ],
)
def test_encode_frame_rejects_what_botocore_would_not_read(
        headers: list[tuple[str, str | bytes | bool | int]], payload: bytes) -> None:
    with pytest.raises(ValueError):
        encode_frame(headers, payload)


def test_bounds_are_botocores() -> None:
    theirs: Any = botocore.eventstream  # the stubs leave the private bounds out
    assert eventstream.PRELUDE_LENGTH == theirs._PRELUDE_LENGTH
    assert eventstream.MAX_HEADERS_LENGTH == theirs._MAX_HEADERS_LENGTH
    assert eventstream.MAX_PAYLOAD_LENGTH == theirs._MAX_PAYLOAD_LENGTH
    assert eventstream.MAX_MESSAGE_LENGTH == 16 + 128 * 1024 + 24 * 1024 * 1024


# --------------------------------------------------------------------------- decoding

def test_hand_written_frame_with_every_header_type() -> None:
    uuid = bytes(range(16))
    headers = (
        ref_header(b"t", 0, b"") + ref_header(b"f", 1, b"")
        + ref_header(b"byte", 2, b"\xfe") + ref_header(b"short", 3, b"\x80\x00")
        + ref_header(b"int", 4, b"\xff\xff\xff\xff")
        + ref_header(b"long", 5, b"\x7f\xff\xff\xff\xff\xff\xff\xff")
        + ref_header(b"bytes", 6, b"\x00\x02ab") + ref_header(b"str", 7, string("日本"))
        + ref_header(b"ts", 8, struct.pack("!q", 1_700_000_000_123))
        + ref_header(b"uuid", 9, uuid)
        + ref_header(b":message-type", 7, string("error"))
        + ref_header(b":error-code", 7, string("ThrottlingError"))
    )
    wire = ref_frame(headers, b"\xff\xfeok")
    expected = [("t", True), ("f", False), ("byte", -2), ("short", -32768), ("int", -1),
                ("long", 2**63 - 1), ("bytes", b"ab"), ("str", "日本"),
                ("ts", 1_700_000_000_123), ("uuid", uuid), (":message-type", "error"),
                (":error-code", "ThrottlingError")]
    assert botocore_messages(wire) == [(expected, b"\xff\xfeok")]
    (frame,) = EventStreamDecoder().feed(wire)
    assert view(frame) == (wire, "error", "ThrottlingError", "\ufffd\ufffdok", None,
                           tuple(expected))
    assert frame.header("short") == -32768 and frame.header("absent") is None


def test_event_frame_is_a_frozen_slotted_sse_event() -> None:
    (frame,) = EventStreamDecoder().feed(event_frame("chunk", b"{}"))
    assert isinstance(frame, SSEEvent)
    assert frame.id is None and frame.retry is None and frame.comments == ()
    assert frame.is_message and frame.event_type == "chunk"
    assert not hasattr(frame, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        frame.message_type = "x"  # type: ignore[misc]


def test_message_type_names_the_event_header() -> None:
    cases = [
        (encode_frame([(":message-type", "event"), (":event-type", "a")], b""), "event", "a"),
        (encode_frame([(":message-type", "event")], b""), "event", None),
        (encode_frame([(":message-type", "exception"), (":event-type", "a")], b""),
         "exception", None),
        (encode_frame([(":exception-type", "x"), (":message-type", "exception")], b""),
         "exception", "x"),
        (encode_frame([(":message-type", "error"), (":error-code", "E"),
                       (":error-message", "m")], b""), "error", "E"),
        # botocore reads any frame that is not an exception or error as an event named by
        # :event-type: so does the decoder
        (encode_frame([(":event-type", "a")], b""), "", "a"),
        (encode_frame([(":message-type", b"event"), (":event-type", "a")], b""), "", "a"),
        (encode_frame([(":message-type", "other"), (":event-type", "a")], b""), "other", "a"),
    ]
    frames, rest = decode([wire for wire, _, _ in cases])
    assert rest == b""
    assert [(f.message_type, f.event, f.data) for f in frames] == [
        (message_type, event, None) for _, message_type, event in cases]


def test_several_frames_in_one_chunk_and_a_frame_across_chunks() -> None:
    a, b, c = event_frame("a", b"1"), event_frame("b", b""), exception_frame("x", "m")
    dec = EventStreamDecoder()
    first = dec.feed(a + b + c[:5])
    assert [f.raw for f in first] == [a, b]
    assert dec.pending_size == 5
    assert dec.feed(c[5:20]) == []
    assert dec.pending_size == 20
    (last,) = dec.feed(c[20:] + a[:12])
    assert last.raw == c and last.event == "x"
    assert dec.pending_size == 12
    (again,) = dec.feed(a[12:], end_of_stream=True)
    assert again.raw == a and again.data == "1"
    assert b"".join(f.raw for f in first) + c + a == a + b + c + a
    assert dec.flush() == b"" and dec.pending_size == 0


def test_accepts_any_buffer_type() -> None:
    wire = event_frame("a", b"1")
    (frame,) = EventStreamDecoder().feed(bytearray(wire))  # type: ignore[arg-type]
    assert frame.raw == wire and type(frame.raw) is bytes
    (frame,) = EventStreamDecoder().feed(memoryview(wire))  # type: ignore[arg-type]
    assert frame.raw == wire and type(frame.raw) is bytes


def test_incomplete_last_frame_is_no_event() -> None:
    wire = event_frame("contentBlockDelta", b'{"delta":{"text":"Hi"}}')
    dec = EventStreamDecoder()
    assert EventStreamDecoder.keepalive is None and dec.keepalive is None
    assert dec.feed(wire[:-1]) == []
    assert dec.feed(b"", end_of_stream=True) == []
    assert dec.pending_size == len(wire) - 1
    leftover = dec.flush()
    assert leftover == wire[:-1]
    assert dec.pending_size == 0 and dec.flush() == b""
    assert dec.last(leftover) is None
    # Shorter than a prelude too.
    dec = EventStreamDecoder()
    assert dec.feed(wire[:7], end_of_stream=True) == []
    assert dec.flush() == wire[:7]


def test_pending_after_flush_starts_a_new_frame() -> None:
    wire = event_frame("a", b"1")
    dec = EventStreamDecoder()
    dec.feed(wire[:20])
    assert dec.flush() == wire[:20]
    assert [f.raw for f in dec.feed(wire)] == [wire]


# --------------------------------------------------------------------------- corruption

def corrupt_cases() -> list[tuple[str, bytes]]:
    good = event_frame("a", b'{"x":1}')
    bad_prelude = bytearray(good)
    bad_prelude[11] ^= 1
    bad_message = bytearray(good)
    bad_message[-1] ^= 0x80
    bad_payload = bytearray(good)
    bad_payload[-6] ^= 0x20
    return [
        ("prelude crc", bytes(bad_prelude)),
        ("message crc", bytes(bad_message)),
        ("payload byte", bytes(bad_payload)),
        ("total below minimum", ref_frame(b"", b"", total=15)),
        ("total below headers", ref_frame(b"\x01a\x00", b"", total=18, headers_length=3)),
        ("headers too long", ref_frame(b"", b"", total=16 + 128 * 1024 + 1,
                                       headers_length=128 * 1024 + 1)),
        ("payload too long", ref_frame(b"", b"", total=16 + 24 * 1024 * 1024 + 1)),
        ("unknown header type", ref_frame(ref_header(b"a", 10, b""), b"")),
        ("header type 255", ref_frame(ref_header(b"a", 255, b""), b"")),
        ("name past section", ref_frame(b"\x05ab", b"")),
        ("no type byte", ref_frame(b"\x01a", b"")),
        ("string past section", ref_frame(ref_header(b"a", 7, b"\x00\x09abc"), b"p")),
        ("string length cut", ref_frame(ref_header(b"a", 7, b"\x00"), b"")),
        ("int cut", ref_frame(ref_header(b"a", 4, b"\x00\x00"), b"")),
        ("uuid cut", ref_frame(ref_header(b"a", 9, b"\x00" * 15), b"")),
        ("name not utf-8", ref_frame(ref_header(b"\xff", 0, b""), b"")),
        ("string not utf-8", ref_frame(ref_header(b"a", 7, b"\x00\x01\xc3"), b"")),
        ("duplicate header", ref_frame(ref_header(b"a", 0, b"") + ref_header(b"a", 1, b""),
                                       b"")),
    ]


@pytest.mark.parametrize(("why", "wire"), corrupt_cases(), ids=[c[0] for c in corrupt_cases()])
def test_corrupt_frame_raises_and_keeps_raising(why: str, wire: bytes) -> None:
    good = event_frame("ok", b"{}")
    for chunks in ([good + wire], [good, wire], [good[:3], good[3:] + wire[:12], wire[12:]]):
        dec = EventStreamDecoder()
        returned: list[EventFrame] = []
        fed = b""
        with pytest.raises(EventStreamError):
            for chunk in chunks:
                fed += chunk
                returned += dec.feed(chunk)
            dec.feed(b"", end_of_stream=True)
        # The frames of the failing call are not returned: their bytes stay pending.
        assert [f.raw for f in returned] in ([], [good])
        assert dec.pending_size == len(fed) - sum(len(f.raw) for f in returned)
        with pytest.raises(EventStreamError):
            dec.feed(b"more")
        with pytest.raises(EventStreamError):
            dec.feed(b"", end_of_stream=True)
        assert b"".join(f.raw for f in returned) + dec.flush() == fed + b"more"
        with pytest.raises(EventStreamError):  # flushing does not clear the error
            dec.feed(good)


def test_out_of_bounds_prelude_fails_without_waiting_for_the_frame() -> None:
    prelude = ref_frame(b"", b"", total=16 + 24 * 1024 * 1024 + 1)[:12]
    dec = EventStreamDecoder()
    assert dec.feed(prelude[:11]) == []
    with pytest.raises(EventStreamError, match="payload length"):
        dec.feed(prelude[11:])
    # botocore rejects it from the prelude alone as well.
    buffer = EventStreamBuffer()
    buffer.add_data(prelude)
    with pytest.raises(botocore.eventstream.InvalidPayloadLength):
        next(buffer)


def test_botocore_rejects_what_the_decoder_rejects_but_two_headers_it_reads_short() -> None:
    lenient = {"string past section": [([("a", "abc")], b"p")],
               "uuid cut": [([("a", b"\x00" * 15)], b"")]}
    for why, wire in corrupt_cases():
        if why in lenient:
            assert botocore_messages(wire) == lenient[why]
            continue
        with pytest.raises((botocore.eventstream.ParserError, KeyError, UnicodeDecodeError,
                            struct.error)):
            botocore_messages(wire)


# --------------------------------------------------------------------------- properties

_NAME = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8).filter(
    lambda s: len(s.encode()) <= 255)


@st.composite
def header_values(draw: st.DrawFn) -> tuple[int, bytes, object]:
    """A header value of any type: (type, wire bytes, the value botocore reads)."""
    kind = draw(st.integers(0, 9))
    if kind in (0, 1):
        return kind, b"", kind == 0
    if kind in (2, 3, 4, 5, 8):
        fmt = {2: "!b", 3: "!h", 4: "!i", 5: "!q", 8: "!q"}[kind]
        bits = struct.calcsize(fmt) * 8
        n = draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
        return kind, struct.pack(fmt, n), n
    if kind == 6:
        blob = draw(st.binary(max_size=12))
        return kind, struct.pack("!H", len(blob)) + blob, blob
    if kind == 7:
        text = draw(st.text(st.characters(codec="utf-8"), max_size=8))
        return kind, string(text), text
    uuid = draw(st.binary(min_size=16, max_size=16))
    return kind, uuid, uuid


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, tuple[object, ...]]:
    """A frame, by hand or by the encoders, and the view of it the decoder must give."""
    choice = draw(st.integers(0, 2))
    payload = draw(st.binary(max_size=40) | st.text(max_size=20).map(str.encode))
    if choice == 0:
        name = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=10))
        wire = event_frame(name, payload)
        headers: tuple[tuple[str, object], ...] = tuple(event_headers(name))
        kind, event = "event", name
    elif choice == 1:
        name = draw(st.sampled_from(CONVERSE_STREAM_EXCEPTIONS))
        message = draw(st.text(st.characters(codec="utf-8"), max_size=20))
        wire = exception_frame(name, message)
        payload = json.dumps({"message": message}, separators=(",", ":"),
                             ensure_ascii=False).encode()
        headers = ((":exception-type", name), (":content-type", "application/json"),
                   (":message-type", "exception"))
        kind, event = "exception", name
    else:
        pairs = draw(st.lists(st.tuples(_NAME, header_values()), max_size=5,
                              unique_by=lambda pair: pair[0]))
        wire = ref_frame(b"".join(ref_header(n.encode(), k, v) for n, (k, v, _) in pairs),
                         payload)
        headers = tuple((n, value) for n, (_, _, value) in pairs)
        kind, event = "", None
    data = payload.decode("utf-8", "replace") if payload else None
    return wire, (wire, kind, event, data, None, headers)


def cut(draw: st.DrawFn, stream: bytes, most: int = 10) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=most)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


@st.composite
def chunked_streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[object, ...]], list[bytes]]:
    drawn = draw(st.lists(frames(), min_size=1, max_size=5))
    stream = b"".join(wire for wire, _ in drawn)
    return stream, [expected for _, expected in drawn], cut(draw, stream)


_PROPERTY = settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(chunked_streams(), st.integers(0, 40))
def test_property_any_chunking_reads_the_same_frames(
        case: tuple[bytes, list[tuple[object, ...]], list[bytes]], tail: int) -> None:
    stream, expected, chunks = case
    got, rest = decode(chunks)
    assert [view(f) for f in got] == expected
    assert rest == b""
    assert b"".join(f.raw for f in got) == stream
    whole, _ = decode([stream])
    assert [view(f) for f in whole] == expected
    assert botocore_messages(stream) == [(list(f.headers), payload_of(f.raw)) for f in got]
    # A partial last frame stays pending, whatever the chunking.
    partial = stream + stream[:tail]
    got, rest = decode(cut_fixed(partial, chunks))
    assert b"".join(f.raw for f in got) + rest == partial
    assert [view(f) for f in got][: len(expected)] == expected


def cut_fixed(stream: bytes, chunks: list[bytes]) -> list[bytes]:
    return [*chunks, stream[sum(len(c) for c in chunks):]]


def test_every_split_offset_of_three_frames() -> None:
    wires = [event_frame("messageStart", b'{"role":"assistant"}'),
             encode_frame([("a", 1), ("b", b"\x00"), ("c", True)], "日本".encode()),
             exception_frame("validationException", "Violated guardrail policy")]
    stream = b"".join(wires)
    expected = [view(f) for f in decode([stream])[0]]
    assert [e[0] for e in expected] == wires
    for i in range(len(stream) + 1):
        got, rest = decode([stream[:i], stream[i:]])
        assert [view(f) for f in got] == expected, i
        assert rest == b""
    one_by_one, rest = decode([stream[i:i + 1] for i in range(len(stream))])
    assert [view(f) for f in one_by_one] == expected and rest == b""


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[bytes, int, list[bytes], list[bytes]]:
    wires = [w for w, _ in draw(st.lists(frames(), min_size=1, max_size=3))]
    stream = bytearray(b"".join(wires))
    at = draw(st.integers(0, len(stream) - 1))
    stream[at] ^= draw(st.integers(1, 255))
    return bytes(stream), at, wires, cut(draw, bytes(stream), 6)


@_PROPERTY
@given(corrupted())
def test_property_a_corrupt_byte_always_raises_and_never_reads_wrong(
        case: tuple[bytes, int, list[bytes], list[bytes]]) -> None:
    stream, at, wires, chunks = case
    dec = EventStreamDecoder()
    returned: list[EventFrame] = []
    fed = b""
    with pytest.raises(EventStreamError):
        for chunk in chunks:
            fed += chunk
            returned += dec.feed(chunk)
        dec.feed(b"", end_of_stream=True)
    # Every frame read is one of the originals, whole, before the corrupt byte.
    assert [f.raw for f in returned] == wires[: len(returned)]
    assert sum(len(f.raw) for f in returned) <= at < len(fed)
    assert b"".join(f.raw for f in returned) + dec.flush() == fed
    assert stream.startswith(fed)
    with pytest.raises(EventStreamError):
        dec.feed(b"")


@st.composite
def garbage(draw: st.DrawFn) -> list[bytes]:
    """Random bytes; or a prelude with valid CRC and random lengths, then random bytes; or
    random header bytes inside valid CRCs (the header parser on its own)."""
    choice = draw(st.integers(0, 2))
    if choice == 0:
        stream = draw(st.binary(max_size=120))
    elif choice == 1:
        total, headers_length = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
        if draw(st.booleans()):
            total, headers_length = draw(st.integers(0, 80)), draw(st.integers(0, 60))
        stream = ref_frame(b"", b"", total=total, headers_length=headers_length)[:12]
        stream += draw(st.binary(max_size=100))
    else:
        headers = draw(st.binary(max_size=60))
        stream = ref_frame(headers, draw(st.binary(max_size=10)))
    return cut(draw, stream, 5)


@_PROPERTY
@given(garbage())
def test_property_garbage_raises_or_waits(chunks: list[bytes]) -> None:
    dec = EventStreamDecoder()
    returned: list[EventFrame] = []
    fed = b""
    try:
        for chunk in chunks:
            fed += chunk
            returned += dec.feed(chunk)
        returned += dec.feed(b"", end_of_stream=True)
    except EventStreamError:
        with pytest.raises(EventStreamError):
            dec.feed(b"")
    # Valid CRCs around random headers may make a frame: then botocore reads it the same.
    for frame in returned:
        headers, _payload = botocore_messages(frame.raw)[0]
        assert list(frame.headers) == headers
    assert b"".join(f.raw for f in returned) + dec.flush() == fed


# --------------------------------------------------------------------------- boto3

@pytest.fixture(scope="module")
def client() -> BedrockRuntimeClient:
    return boto3.client("bedrock-runtime", region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="y")


class RawStream:
    """What botocore's EventStream reads: urllib3's response ``stream()`` and ``close()``."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def stream(self) -> Iterator[bytes]:
        yield from self.chunks

    def close(self) -> None:
        pass


def stream_shape(client: BedrockRuntimeClient, operation: str) -> Any:
    return client.meta.service_model.operation_model(operation).get_event_stream_output()


def declared_exceptions(client: BedrockRuntimeClient, operation: str) -> tuple[str, ...]:
    shape = stream_shape(client, operation)
    return tuple(name for name, member in shape.members.items()
                 if member.metadata.get("exception"))


def test_exception_lists_match_the_service_model(client: BedrockRuntimeClient) -> None:
    assert declared_exceptions(client, "ConverseStream") == CONVERSE_STREAM_EXCEPTIONS
    assert declared_exceptions(client, "InvokeModelWithResponseStream") \
        == INVOKE_STREAM_EXCEPTIONS
    assert "validationException" in CONVERSE_STREAM_EXCEPTIONS
    assert "validationException" in INVOKE_STREAM_EXCEPTIONS


GUARDED_STREAM = (
    event_frame("messageStart", b'{"role":"assistant"}')
    + event_frame("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"text":"Hi"}}')
    + exception_frame("validationException", "Violated guardrail policy")
)


def converse_events(client: BedrockRuntimeClient, stream: bytes,
                    chunks: int = 1) -> EventStream[dict[str, Any]]:
    shape = stream_shape(client, "ConverseStream")
    size = -(-len(stream) // chunks)
    raw = RawStream([stream[i:i + size] for i in range(0, len(stream), size)])
    return EventStream(raw, shape, botocore.parsers.EventStreamJSONParser(), "ConverseStream")


@pytest.mark.parametrize("chunks", [1, 7, len(GUARDED_STREAM)])
def test_boto3_reads_our_frames_as_bedrocks(client: BedrockRuntimeClient, chunks: int) -> None:
    events = iter(converse_events(client, GUARDED_STREAM, chunks))
    assert next(events) == {"messageStart": {"role": "assistant"}}
    assert next(events) == {"contentBlockDelta": {"contentBlockIndex": 0,
                                                   "delta": {"text": "Hi"}}}
    with pytest.raises(botocore.exceptions.EventStreamError) as raised:
        next(events)
    assert "Violated guardrail policy" in str(raised.value)
    assert raised.value.response["Error"] == {"Code": "validationException",
                                              "Message": "Violated guardrail policy"}


def test_boto3_client_call_reads_our_frames() -> None:
    """The whole client path (signing, response parsing, the ``stream`` member), the HTTP
    exchange replaced by a ``before-send`` hook answering with our bytes."""
    local = boto3.client("bedrock-runtime", region_name="us-east-1",
                         aws_access_key_id="x", aws_secret_access_key="y")

    def send(request: Any, **_: object) -> Any:
        headers: Any = {"content-type": eventstream.CONTENT_TYPE}
        return AWSResponse(request.url, 200, headers,
                           RawStream([GUARDED_STREAM[:5], GUARDED_STREAM[5:]]))

    local.meta.events.register("before-send.bedrock-runtime.ConverseStream", send)
    answer = local.converse_stream(modelId="m",
                                   messages=[{"role": "user", "content": [{"text": "x"}]}])
    seen = []
    with pytest.raises(botocore.exceptions.EventStreamError, match="Violated guardrail policy"):
        for event in answer["stream"]:
            seen.append(event)
    assert seen == [{"messageStart": {"role": "assistant"}},
                    {"contentBlockDelta": {"contentBlockIndex": 0, "delta": {"text": "Hi"}}}]


def test_boto3_invoke_stream_reads_our_frames(client: BedrockRuntimeClient) -> None:
    shape = stream_shape(client, "InvokeModelWithResponseStream")
    stream = (event_frame("chunk", b'{"bytes":"eyJ4IjoxfQ=="}')
              + exception_frame("modelTimeoutException", "too slow"))
    events: Iterator[dict[str, Any]] = iter(EventStream(RawStream([stream]), shape,
                              botocore.parsers.EventStreamJSONParser(),
                              "InvokeModelWithResponseStream"))
    assert next(events) == {"chunk": {"bytes": b'{"x":1}'}}
    with pytest.raises(botocore.exceptions.EventStreamError, match="too slow"):
        next(events)


def test_undeclared_exception_type_loses_its_message(client: BedrockRuntimeClient) -> None:
    """botocore looks the ``:exception-type`` up among the output stream's members; one it
    does not declare falls back to the ``:error-code`` and ``:error-message`` headers, which an
    exception frame has not: code and message are both empty, the payload is never read."""
    assert "guardrailInterventionException" not in CONVERSE_STREAM_EXCEPTIONS
    stream = (event_frame("messageStart", b'{"role":"assistant"}')
              + exception_frame("guardrailInterventionException", "Violated guardrail policy"))
    events = iter(converse_events(client, stream))
    assert next(events) == {"messageStart": {"role": "assistant"}}
    with pytest.raises(botocore.exceptions.EventStreamError) as raised:
        next(events)
    assert raised.value.response["Error"] == {"Code": "", "Message": ""}
    assert str(raised.value) == "An error occurred () when calling the ConverseStream operation: "
    assert "Violated guardrail policy" not in str(raised.value)


def test_error_frame_and_undeclared_event_in_boto3(client: BedrockRuntimeClient) -> None:
    """An ``error`` message is reported from its headers; an event type the operation does not
    declare is skipped silently."""
    stream = (event_frame("somethingNew", b'{"a":1}')
              + event_frame("messageStop", b'{"stopReason":"end_turn"}')
              + encode_frame([(":message-type", "error"), (":error-code", "InternalFailure"),
                              (":error-message", "boom")], b""))
    frames, _ = decode([stream])
    assert [(f.message_type, f.event) for f in frames] == [
        ("event", "somethingNew"), ("event", "messageStop"), ("error", "InternalFailure")]
    events = iter(converse_events(client, stream))
    assert next(events) == {"messageStop": {"stopReason": "end_turn"}}
    with pytest.raises(botocore.exceptions.EventStreamError) as raised:
        next(events)
    assert raised.value.response["Error"] == {"Code": "InternalFailure", "Message": "boom"}
