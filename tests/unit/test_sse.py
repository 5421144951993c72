from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.sse import SSEDecoder, SSEEvent, encode_comment, encode_event

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TRANSCRIPTS = sorted(FIXTURES.glob("*.sse"))
BOM = b"\xef\xbb\xbf"


def decode(chunks: list[bytes], *, end_of_stream: bool = True) -> tuple[list[SSEEvent], bytes]:
    dec = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += dec.feed(chunk)
    if end_of_stream:
        events += dec.feed(b"", end_of_stream=True)
    return events, dec.flush()


def fields(events: list[SSEEvent]) -> list[tuple[object, ...]]:
    return [(e.event, e.data, e.id, e.retry, e.comments) for e in events]


def reference(stream: bytes) -> tuple[list[SSEEvent], bytes]:
    """Whole-stream, non-incremental reading of the spec, as a test oracle."""
    events: list[SSEEvent] = []
    block_start = 0
    line_start = 3 if stream.startswith(BOM) else 0
    data: list[str] = []
    has_data = False
    event = ident = None
    retry = None
    comments: list[str] = []
    for m in re.finditer(rb"\r\n|\r|\n", stream):
        if m.start() < line_start:
            continue
        line = stream[line_start : m.start()].decode("utf-8", errors="replace")
        line_start = m.end()
        if line == "":
            events.append(
                SSEEvent(
                    stream[block_start : m.end()],
                    event,
                    "\n".join(data) if has_data else None,
                    ident,
                    retry,
                    tuple(comments),
                )
            )
            block_start = m.end()
            data, has_data, event, ident, retry, comments = [], False, None, None, None, []
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if colon and name == "":
            comments.append(value)
        elif name == "data":
            data.append(value)
            has_data = True
        elif name == "event":
            event = value
        elif name == "id" and "\x00" not in value:
            ident = value
        elif name == "retry" and re.fullmatch(r"[0-9]+", value, flags=re.ASCII):
            retry = int(value)
    return events, stream[block_start:]


def assert_preserves_bytes(stream: bytes, events: list[SSEEvent], leftover: bytes) -> None:
    assert b"".join(e.raw for e in events) + leftover == stream


# --------------------------------------------------------------------------- transcripts


def test_fixtures_present() -> None:
    names = {p.name for p in TRANSCRIPTS}
    assert {
        "openai_chat.sse",
        "openai_tool_calls.sse",
        "anthropic_messages.sse",
        "crlf.sse",
        "cr_only.sse",
        "comments_multiline.sse",
        "id_retry.sse",
    } <= names


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.name)
def test_transcript_whole_matches_reference(path: Path) -> None:
    stream = path.read_bytes()
    events, leftover = decode([stream])
    assert (events, leftover) == reference(stream)
    assert leftover == b""
    assert_preserves_bytes(stream, events, leftover)


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.name)
def test_transcript_every_two_chunk_split(path: Path) -> None:
    stream = path.read_bytes()
    expected = decode([stream])
    for i in range(len(stream) + 1):
        got = decode([stream[:i], stream[i:]])
        assert got == expected, f"split at {i}"


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.name)
def test_transcript_one_byte_chunks(path: Path) -> None:
    stream = path.read_bytes()
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    events, leftover = decode(chunks)
    assert (events, leftover) == decode([stream])
    assert_preserves_bytes(stream, events, leftover)


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=lambda p: p.name)
def test_transcript_pending_tracks_unreturned_bytes(path: Path) -> None:
    stream = path.read_bytes()
    dec = SSEDecoder()
    returned = b""
    for i in range(0, len(stream), 7):
        returned += b"".join(e.raw for e in dec.feed(stream[i : i + 7]))
        assert returned + dec.pending == stream[: i + 7]


def _messages(name: str) -> list[SSEEvent]:
    events, leftover = decode([(FIXTURES / name).read_bytes()])
    assert leftover == b""
    return [e for e in events if e.is_message]


def test_openai_chat_content() -> None:
    msgs = _messages("openai_chat.sse")
    assert msgs[-1].data == "[DONE]"
    chunks = [json.loads(m.data) for m in msgs[:-1] if m.data]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == (
        "Bonjour ! Voici un résumé de votre voyage au 日本 : Tōkyō, Kyōto et Ōsaka. Bon séjour 🙂"
    )
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert all(m.event is None and m.event_type == "message" for m in msgs)


def test_openai_tool_call_arguments() -> None:
    msgs = _messages("openai_tool_calls.sse")
    assert msgs[-1].data == "[DONE]"
    chunks = [json.loads(m.data) for m in msgs[:-1] if m.data]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    args = "".join(
        call["function"]["arguments"] for d in deltas for call in d.get("tool_calls", [])
    )
    assert json.loads(args) == {"location": "Zürich, Schweiz", "unit": "celsius", "note": "東京 🌧"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_messages_stream() -> None:
    msgs = _messages("anthropic_messages.sse")
    types = [m.event_type for m in msgs]
    assert types[:3] == ["message_start", "content_block_start", "ping"]
    assert types[-2:] == ["message_delta", "message_stop"]
    assert all(json.loads(m.data)["type"] == m.event for m in msgs)
    deltas = [json.loads(m.data)["delta"] for m in msgs if m.event == "content_block_delta"]
    text = "".join(d["text"] for d in deltas if d["type"] == "text_delta")
    assert text == "Je vais vérifier la météo à Zürich (チューリッヒ) pour vous 🙂."
    partial = "".join(d["partial_json"] for d in deltas if d["type"] == "input_json_delta")
    assert json.loads(partial) == {"location": "Zürich, CH", "unit": "celsius"}


@pytest.mark.parametrize(
    ("name", "eol"), [("crlf.sse", b"\r\n"), ("cr_only.sse", b"\r")], ids=["crlf", "cr"]
)
def test_line_endings_parse_like_lf(name: str, eol: bytes) -> None:
    stream = (FIXTURES / name).read_bytes()
    rest = stream.replace(eol, b"")
    assert b"\r" not in rest and b"\n" not in rest
    events, _ = decode([stream])
    lf_events, _ = decode([stream.replace(eol, b"\n")])
    assert fields(events) == fields(lf_events)
    assert [e.raw.replace(eol, b"\n") for e in events] == [e.raw for e in lf_events]


def test_crlf_fixture_values() -> None:
    events, _ = decode([(FIXTURES / "crlf.sse").read_bytes()])
    msgs = [e for e in events if e.is_message]
    assert [m.id for m in msgs] == ["1", "2", "3", "4", "5"]
    assert json.loads(msgs[1].data or "")["text"] == "Grüße"
    assert msgs[3].data == "first line\nsecond line"
    assert events[1].retry == 2500 and not events[1].is_message
    assert all(e.raw.endswith(b"\r\n\r\n") for e in events)


def test_cr_only_fixture_needs_end_of_stream_for_last_event() -> None:
    stream = (FIXTURES / "cr_only.sse").read_bytes()
    assert stream.endswith(b"\r\r")
    dec = SSEDecoder()
    events = dec.feed(stream)
    assert dec.pending == b"event: done\rdata: [DONE]\r\r"
    last = dec.feed(b"", end_of_stream=True)
    assert [(e.event, e.data) for e in last] == [("done", "[DONE]")]
    assert dec.flush() == b""
    msgs = [e for e in events if e.is_message]
    assert [m.data for m in msgs] == ["Ça", " va", "¿bien?\n日本語", ""]


def test_comments_fixture_values() -> None:
    events, _ = decode([(FIXTURES / "comments_multiline.sse").read_bytes()])
    assert fields(events) == [
        (None, None, None, None, ("this is a comment block sent first to defeat proxy buffering" + " " * 64,)),
        (None, None, None, None, ("",)),
        (None, None, None, None, ("keep-alive",)),
        (None, '{\n  "role": "assistant",\n  "content": "multi-line JSON payload ✓"\n}', None, None, ()),
        (None, "comment inside an event", None, None, ("keep-alive", "another one")),
        (None, "\n", None, None, ()),
        (None, "no-space\n two spaces keeps one", None, None, ()),
        (None, None, None, None, ()),
        ("heartbeat", None, None, None, ()),
        (None, None, None, None, ()),
        (None, None, None, None, ()),
        (None, None, None, None, ("keep-alive",)),
        (None, "[DONE]", None, None, ()),
    ]
    assert json.loads(events[3].data or "")["content"] == "multi-line JSON payload ✓"


def test_id_retry_fixture_values() -> None:
    dec = SSEDecoder()
    events = dec.feed((FIXTURES / "id_retry.sse").read_bytes())
    assert [(e.id, e.retry, e.is_message) for e in events] == [
        (None, 3000, False),
        ("1", None, True),
        (None, None, True),
        ("2", None, True),
        (None, None, True),
        ("", None, True),
        ("évènement-5", 0, True),
        ("", 750, True),
        ("7", None, False),
        ("8", None, True),
    ]
    assert dec.last_event_id == "8"
    assert events[-1].event == "update"


# --------------------------------------------------------------------------- targeted spec cases


def test_cr_at_chunk_end_followed_by_lf_is_one_line_ending() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"\ndata: b\r") == []
    events = dec.feed(b"\n\r\n")
    assert [(e.data, e.raw) for e in events] == [("a\nb", b"data: a\r\ndata: b\r\n\r\n")]
    assert dec.flush() == b""


def test_blank_line_cr_at_chunk_end_waits_for_next_byte() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: x\r\r") == []
    assert dec.pending == b"data: x\r\r"
    assert [(e.data, e.raw) for e in dec.feed(b"\n")] == [("x", b"data: x\r\r\n")]
    assert dec.pending == b""


def test_blank_line_cr_then_other_byte_dispatches_without_it() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: x\r\r") == []
    events = dec.feed(b"data: y\n\n")
    assert [(e.data, e.raw) for e in events] == [("x", b"data: x\r\r"), ("y", b"data: y\n\n")]


def test_blank_line_cr_at_end_of_stream() -> None:
    dec = SSEDecoder()
    events = dec.feed(b"data: x\r\r", end_of_stream=True)
    assert [(e.data, e.raw) for e in events] == [("x", b"data: x\r\r")]
    dec = SSEDecoder()
    assert dec.feed(b"data: x\r\r") == []
    assert [e.raw for e in dec.feed(b"", end_of_stream=True)] == [b"data: x\r\r"]
    assert dec.flush() == b""


def test_flush_returns_unterminated_tail() -> None:
    dec = SSEDecoder()
    events = dec.feed(b"data: done\n\ndata: partial\nevent: x\ndata: half")
    assert [e.data for e in events] == ["done"]
    assert dec.feed(b"", end_of_stream=True) == []
    assert dec.pending == b"data: partial\nevent: x\ndata: half"
    assert dec.flush() == b"data: partial\nevent: x\ndata: half"
    assert dec.pending == b""
    assert dec.flush() == b""


def test_bom_at_stream_start_is_ignored() -> None:
    stream = BOM + b"data: x\n\n"
    for i in range(len(stream) + 1):
        events, leftover = decode([stream[:i], stream[i:]])
        assert [(e.data, e.raw) for e in events] == [("x", stream)]
        assert leftover == b""


def test_bom_then_blank_line_is_a_blank_block() -> None:
    events, _ = decode([BOM + b"\ndata: x\n\n"])
    assert [(e.data, e.raw) for e in events] == [(None, BOM + b"\n"), ("x", b"data: x\n\n")]


def test_bom_only_at_stream_start() -> None:
    events, _ = decode([b"data: a\n\n" + BOM + b"data: b\n\n"])
    assert [e.data for e in events] == ["a", None]
    events, _ = decode([BOM + BOM + b"data: b\n\n"])
    assert [e.data for e in events] == [None]


def test_bom_prefix_that_is_not_a_bom() -> None:
    events, leftover = decode([b"\xef\xbb", b"\n\ndata: x\n\n"])
    assert [(e.data, e.raw) for e in events] == [(None, b"\xef\xbb\n\n"), ("x", b"data: x\n\n")]
    assert fields(events[:1]) == [(None, None, None, None, ())]
    assert leftover == b""


def test_field_without_colon() -> None:
    events, _ = decode([b"data\n\nevent\ndata\n\n"])
    assert [(e.event, e.data, e.event_type) for e in events] == [
        (None, "", "message"),
        ("", "", "message"),
    ]


def test_data_value_space_handling() -> None:
    events, _ = decode([b"data:x\n\ndata:  two\n\ndata: \n\ndata:\n\ndata: a:b: c\n\n"])
    assert [e.data for e in events] == ["x", " two", "", "", "a:b: c"]


def test_multiple_data_lines_join_with_lf() -> None:
    events, _ = decode([b"data: a\ndata:\ndata: b\n\n"])
    assert events[0].data == "a\n\nb"


def test_id_with_nul_ignored() -> None:
    dec = SSEDecoder()
    events = dec.feed(b"id: ok\ndata: 1\n\nid: a\x00b\ndata: 2\n\n")
    assert [e.id for e in events] == ["ok", None]
    assert dec.last_event_id == "ok"


def test_empty_id_resets_last_event_id() -> None:
    dec = SSEDecoder()
    dec.feed(b"id: 5\ndata: 1\n\n")
    assert dec.last_event_id == "5"
    assert [e.id for e in dec.feed(b"id\ndata: 2\n\n")] == [""]
    assert dec.last_event_id == ""


@pytest.mark.parametrize(
    "value", [b"", b" 5", b"5 ", b"+5", b"-5", b"1.5", b"1e3", b"5_0", b"\xd9\xa3", b"\xc2\xb2", b"ten"]
)
def test_retry_non_digits_ignored(value: bytes) -> None:
    events, _ = decode([b"retry: " + value + b"\ndata: x\n\n"])
    assert events[0].retry is None


def test_retry_digits() -> None:
    events, _ = decode([b"retry: 0\n\nretry:007\n\nretry: 5\nretry: x\n\n"])
    assert [e.retry for e in events] == [0, 7, 5]


def test_event_without_data() -> None:
    events, _ = decode([b"event: update\n\n"])
    assert events[0].event == "update"
    assert events[0].data is None
    assert not events[0].is_message


def test_comment_handling() -> None:
    events, _ = decode([b":x\n:  y\n: \n:\ndata: d\n\n"])
    assert events[0].comments == ("x", " y", "", "")
    assert events[0].data == "d"


def test_unknown_fields_and_space_before_colon_ignored() -> None:
    events, _ = decode([b"foo: bar\ndata : x\nDATA: y\n\n"])
    assert fields(events) == [(None, None, None, None, ())]


def test_multibyte_split_across_chunks() -> None:
    stream = "data: é日本🙂\n\n".encode()
    for i in range(len(stream) + 1):
        events, _ = decode([stream[:i], stream[i:]])
        assert events[0].data == "é日本🙂"


def test_invalid_utf8_is_replaced() -> None:
    events, _ = decode([b"data: a\xffb\xe6\x97\n\xe6\n", b"event: \xed\xa0\x80\n\n"])
    assert events[0].data == "a\ufffdb\ufffd"
    assert events[0].event == "\ufffd\ufffd\ufffd"


def test_accepts_bytes_like_chunks() -> None:
    dec = SSEDecoder()
    events = dec.feed(bytearray(b"data: a\n\ndata: b"))  # type: ignore[arg-type]
    events += dec.feed(memoryview(b"\n\n"))  # type: ignore[arg-type]
    assert [(e.data, type(e.raw)) for e in events] == [("a", bytes), ("b", bytes)]


def test_event_is_frozen_and_slotted() -> None:
    event = SSEEvent(b"\n")
    with pytest.raises(AttributeError):
        event.data = "x"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")
    assert event == SSEEvent(raw=b"\n", event=None, data=None, id=None, retry=None, comments=())


# --------------------------------------------------------------------------- whole-event chunks
# ``feed`` reads a chunk that starts with whole events of one optional ``event`` line and one
# ``data`` line (nothing pending, LF line endings: the usual chunk) without its per-line loop,
# and hands whatever follows to that loop. The oracles: the spec reference, and the decoder fed
# one byte at a time (which never has a whole event in a chunk).

FAST_BLOCKS = [
    b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n',
    b"data:no-space\n\n",
    b"data:\n\n",
    b"data: \n\n",
    b"data:  two spaces\n\n",
    b"data: [DONE]\n\n",
    b"data: not json\n\n",
    b"data: a\x00b\n\n",
    "data: 日本 🙂\n\n".encode(),
    b"data: \xff\xfe bad utf-8\n\n",
    b"event: content_block_delta\ndata: {}\n\n",
    b"event:no-space\ndata:x\n\n",
    b"event:\ndata: empty name\n\n",
    b"event: \xe6\x97\ndata: cut name\n\n",
]
OTHER_BLOCKS = [
    b"\n",
    b": keep-alive\n\n",
    b"data: line 1\ndata: line 2\n\n",
    b"id: 7\ndata: with id\n\n",
    b"data: then id\nid: 8\n\n",
    b"data: then event\nevent: late\n\n",
    b"event: no data\n\n",
    b"event: e\nevent: f\ndata: two names\n\n",
    b"retry: 10\ndata: r\n\n",
    b"data : space before colon\n\n",
    b"datax: not data\n\n",
    b"eventdata: not event\n\n",
    b"data: crlf\r\n\r\n",
    b"event: e\r\ndata: crlf named\r\n\r\n",
    b"data: cr\r\r",
    b"data: lf then cr\n\r",
]
#: The fast path's CR LF shape (Google's streams): one ``data`` line per event.
CRLF_BLOCKS = [block.replace(b"\n", b"\r\n") for block in FAST_BLOCKS
               if not block.startswith(b"event")] + [
    b"data: lone\rCR inside\r\n\r\n", b"data: LF\ninside\r\n\r\n",
    b"data: CR LF then LF\r\n\n", b"data: three\r\n\r\n\r\n"]
TAILS = [b"", b"data: partial", b"data: no blank line\n", b"event: e\n", b"event: e\ndata: d\n",
         b"data", b"event:", b"\r", BOM[:1]]


def per_byte(stream: bytes, *, end_of_stream: bool = True) -> tuple[list[SSEEvent], bytes]:
    return decode([stream[i:i + 1] for i in range(len(stream))], end_of_stream=end_of_stream)


@st.composite
def whole_event_chunks(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """Blocks, mostly of the fast shape, then maybe a partial tail; cut between blocks (so
    chunks start with whole events) and sometimes inside them."""
    blocks = draw(st.lists(st.one_of(st.sampled_from(FAST_BLOCKS), st.sampled_from(FAST_BLOCKS),
                                     st.sampled_from(OTHER_BLOCKS),
                                     st.sampled_from(CRLF_BLOCKS)), max_size=12))
    blocks.append(draw(st.sampled_from(TAILS)))
    stream = b"".join(blocks)
    ends = [sum(len(b) for b in blocks[:i]) for i in range(1, len(blocks))]
    cuts = draw(st.lists(st.sampled_from(ends), max_size=6)) if ends else []
    cuts += draw(st.lists(st.integers(0, len(stream)), max_size=2))
    bounds = [0, *sorted(cuts), len(stream)]
    return stream, [stream[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(whole_event_chunks())
def test_property_whole_event_chunks_read_like_the_line_loop(
        case: tuple[bytes, list[bytes]]) -> None:
    stream, chunks = case
    for eos in (True, False):
        got = decode(chunks, end_of_stream=eos)
        assert got == per_byte(stream, end_of_stream=eos)
        assert_preserves_bytes(stream, *got)
    assert decode(chunks) == reference(stream)
    whole, single = SSEDecoder(), SSEDecoder()
    fed = returned = b""
    for chunk in chunks:
        fed += chunk
        returned += b"".join(e.raw for e in whole.feed(chunk))
        assert returned + whole.pending == fed
    for i in range(len(stream)):
        single.feed(stream[i:i + 1])
    assert whole.last_event_id == single.last_event_id


@pytest.mark.parametrize("block", FAST_BLOCKS + OTHER_BLOCKS + CRLF_BLOCKS)
@pytest.mark.parametrize("count", [1, 3])
def test_whole_events_split_at_every_position(block: bytes, count: int) -> None:
    stream = block * count + FAST_BLOCKS[0]
    expected = per_byte(stream)
    assert decode([stream]) == expected == reference(stream)
    for i in range(len(stream) + 1):
        assert decode([stream[:i], stream[i:]]) == expected, f"split at {i}"


@pytest.mark.parametrize(("eol", "blocks", "others"), [
    (b"\n", FAST_BLOCKS, [b": comment\n\n", b"data: a\ndata: b\n\n", b"data: crlf\r\n\r\n"]),
    (b"\r\n", CRLF_BLOCKS[:-4],
     [*CRLF_BLOCKS[-4:], b": comment\r\n\r\n", b"event: e\r\ndata: d\r\n\r\n"]),
], ids=["LF", "CR LF"])
def test_whole_event_chunks_take_the_fast_path(monkeypatch: pytest.MonkeyPatch, eol: bytes,
                                               blocks: list[bytes], others: list[bytes]) -> None:
    # The property tests above are only worth something if the fast path runs: whole events of
    # the usual shape never reach the per-line parser; anything else still does.
    expected = [(e.event, e.data) for e in per_byte(b"".join(blocks))[0]]
    dec = SSEDecoder()
    dec.feed(b"data: first chunk settles the BOM check" + eol + eol)

    def per_line(*args: object) -> None:
        raise AssertionError("per-line path")

    monkeypatch.setattr(SSEDecoder, "_line", per_line)
    monkeypatch.setattr(SSEDecoder, "_dispatch", per_line)
    events = dec.feed(b"".join(blocks))
    assert [e.raw for e in events] == blocks
    assert [(e.event, e.data) for e in events] == expected
    assert all(e.id is None and e.retry is None and e.comments == () for e in events)
    for other in others:
        with pytest.raises(AssertionError, match="per-line path"):
            dec.feed(b"data: x" + eol + eol + other)
        dec.flush()


def test_whole_events_then_a_partial_one() -> None:
    dec = SSEDecoder()
    dec.feed(b"data: settle the BOM check\n\n")
    events = dec.feed(b"data: a\n\nevent: e\ndata: b\n\ndata: c")
    assert [(e.event, e.data) for e in events] == [(None, "a"), ("e", "b")]
    assert dec.pending == b"data: c"
    events = dec.feed(b"\n\ndata: d\n\n")
    assert [(e.raw, e.data) for e in events] == [(b"data: c\n\n", "c"), (b"data: d\n\n", "d")]
    assert dec.pending == b""


def test_whole_events_keep_the_last_event_id() -> None:
    dec = SSEDecoder()
    dec.feed(b"id: 42\ndata: x\n\n")
    events = dec.feed(b"data: y\n\nevent: e\ndata: z\n\n")
    assert [e.id for e in events] == [None, None]
    assert dec.last_event_id == "42"


# --------------------------------------------------------------------------- encoder


def test_encode_event() -> None:
    assert encode_event("hello") == b"data: hello\n\n"
    assert encode_event("a\nb", "delta") == b"event: delta\ndata: a\ndata: b\n\n"
    assert encode_event("") == b"data:\n\n"
    assert encode_event("x\r\ny\rz") == b"data: x\ndata: y\ndata: z\n\n"
    with pytest.raises(ValueError):
        encode_event("x", "bad\nname")


def test_encode_comment() -> None:
    assert encode_comment("keep-alive") == b": keep-alive\n\n"
    assert encode_comment("") == b":\n\n"
    assert encode_comment("a\nb") == b": a\n: b\n\n"
    events, _ = decode([encode_comment("a\nb")])
    assert fields(events) == [(None, None, None, None, ("a", "b"))]


@given(
    data=st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    event=st.none()
    | st.text(alphabet=st.characters(exclude_characters="\r\n", codec="utf-8"), max_size=10),
)
def test_encode_event_round_trips(data: str, event: str | None) -> None:
    events, leftover = decode([encode_event(data, event)])
    assert leftover == b""
    assert len(events) == 1
    assert events[0].data == re.sub(r"\r\n|\r", "\n", data)
    assert events[0].event == event


def test_encode_lone_surrogate_becomes_replacement_character() -> None:
    assert encode_event("a\ud800b") == "data: a\ufffdb\n\n".encode()
    assert encode_comment("\udfff\udc80") == ": \ufffd\ufffd\n\n".encode()


# --------------------------------------------------------------------------- properties

_EOLS = st.sampled_from([b"\n", b"\r", b"\r\n"])
_NAMES = st.sampled_from(["data", "event", "id", "retry", "", "dat", "data ", "DATA", "\ufeffdata"])
_SEPS = st.sampled_from(["", ":", ": ", ":  "])
_VALUES = st.one_of(
    st.text(alphabet=st.characters(exclude_characters="\r\n", codec="utf-8"), max_size=8),
    st.sampled_from(["", " ", "123", "0", "1x", "a\x00b", "日本🙂", "[DONE]"]),
)
_LINES = st.builds(lambda n, s, v: (n + s + v).encode(), _NAMES, _SEPS, _VALUES)
_SEGMENTS = st.one_of(
    st.builds(lambda line, eol: line + eol, _LINES, _EOLS),
    _EOLS,
    st.binary(max_size=6),
    st.sampled_from([BOM, b"\xe6\x97", b"\xa5", b"\r", b"\n"]),
)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    prefix = draw(st.sampled_from([b"", BOM, BOM[:2]]))
    return prefix + b"".join(draw(st.lists(_SEGMENTS, max_size=25)))


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = draw(streams())
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    return stream, [stream[a:b] for a, b in zip(bounds, bounds[1:])]


_PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(chunked())
def test_property_bytes_preserved(case: tuple[bytes, list[bytes]]) -> None:
    stream, chunks = case
    for eos in (True, False):
        events, leftover = decode(chunks, end_of_stream=eos)
        assert_preserves_bytes(stream, events, leftover)


@_PROPERTY
@given(chunked())
def test_property_chunking_independent(case: tuple[bytes, list[bytes]]) -> None:
    stream, chunks = case
    for eos in (True, False):
        assert decode(chunks, end_of_stream=eos) == decode([stream], end_of_stream=eos)


@_PROPERTY
@given(chunked())
def test_property_matches_reference(case: tuple[bytes, list[bytes]]) -> None:
    stream, chunks = case
    assert decode(chunks) == reference(stream)


@_PROPERTY
@given(chunked())
def test_property_pending_is_unreturned_suffix(case: tuple[bytes, list[bytes]]) -> None:
    _stream, chunks = case
    dec = SSEDecoder()
    returned = b""
    fed = b""
    for chunk in chunks:
        fed += chunk
        returned += b"".join(e.raw for e in dec.feed(chunk))
        assert returned + dec.pending == fed


# --------------------------------------------------------------------------- scaling


@pytest.mark.timeout(30)
def test_one_byte_feeding_of_a_long_line_is_linear() -> None:
    payload = ("x" * 99 + "é") * 2000
    stream = f"data: {payload}\n\n".encode()
    assert len(stream) > 200_000
    dec = SSEDecoder()
    events: list[SSEEvent] = []
    for i in range(len(stream)):
        events += dec.feed(stream[i : i + 1])
    assert [(e.data, e.raw) for e in events] == [(payload, stream)]
    assert dec.flush() == b""


@pytest.mark.timeout(30)
def test_one_byte_feeding_of_many_events() -> None:
    stream = b"".join(encode_event(f"chunk {i} 🙂", "delta") for i in range(8_000))
    assert len(stream) > 200_000
    dec = SSEDecoder()
    events: list[SSEEvent] = []
    for i in range(len(stream)):
        events += dec.feed(stream[i : i + 1])
    assert [e.data for e in events] == [f"chunk {i} 🙂" for i in range(8_000)]
    assert b"".join(e.raw for e in events) == stream
    assert dec.flush() == b""
