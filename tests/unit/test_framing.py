"""The NDJSON framing (``extproc.framing.NDJSONDecoder``): lines as the ``ollama`` Python
client reads them (httpx ``iter_lines``), every byte kept, whatever the chunking."""

from __future__ import annotations

import httpx
from hypothesis import given
from hypothesis import strategies as st

from extproc.framing import NDJSONDecoder, sse_decoder
from extproc.sse import SSEDecoder

BODY = (b'{"message":{"content":"Hi"},"done":false}\n'
        b'{"message":{"content":" there"},"done":false}\r\n'
        b'\n'
        b'{"done":true}\r{"x":1}\n'
        b'{"tail":"no newline"}')


def decode(chunks: list[bytes]) -> tuple[list[tuple[bytes, str | None]], bytes]:
    decoder = NDJSONDecoder()
    events = []
    for number, chunk in enumerate(chunks):
        events += decoder.feed(chunk, end_of_stream=number == len(chunks) - 1)
    rest = decoder.flush()
    if rest:
        last = decoder.last(rest)
        assert last is not None and last.raw == rest
        events.append(last)
    return [(e.raw, e.data) for e in events], rest


def test_lines_are_read_as_the_python_client_reads_them() -> None:
    events, rest = decode([BODY])
    assert b"".join(raw for raw, _ in events) == BODY
    data = [d for _, d in events if d is not None]
    # httpx's iter_lines: LF, CR LF and a lone CR end a line; the unterminated tail counts.
    client = list(httpx.Response(200, content=BODY).iter_lines())
    assert data == [line for line in client if line]
    assert rest == b'{"tail":"no newline"}'


def test_blank_lines_are_events_without_data() -> None:
    events, _ = decode([b"\n\n{}\n"])
    assert events == [(b"\n", None), (b"\n", None), (b"{}\n", "{}")]


@given(st.lists(st.integers(min_value=0, max_value=len(BODY)), max_size=8))
def test_any_chunking_gives_the_same_lines_and_bytes(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(BODY)]
    chunks = [BODY[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    events, _ = decode(chunks)
    assert b"".join(raw for raw, _ in events) == BODY
    whole, _ = decode([BODY])
    assert [d for _, d in events if d] == [d for _, d in whole if d]


def test_a_crlf_cut_between_its_bytes_is_one_line_ending() -> None:
    events, _ = decode([b'{"a":1}\r', b'\n{"b":2}\n'])
    assert [d for _, d in events if d] == ['{"a":1}', '{"b":2}']
    assert b"".join(raw for raw, _ in events) == b'{"a":1}\r\n{"b":2}\n'


def test_invalid_utf8_is_replaced_not_dropped() -> None:
    events, _ = decode([b'{"a":"\xff"}\n'])
    assert events == [(b'{"a":"\xff"}\n', '{"a":"\ufffd"}')]


def test_ndjson_has_no_keepalive_and_sse_has_a_comment() -> None:
    assert NDJSONDecoder.keepalive is None
    decoder = sse_decoder("text/event-stream; charset=utf-8")
    assert isinstance(decoder, SSEDecoder) and decoder.keepalive == b": keep-alive\n\n"
    assert sse_decoder("application/x-ndjson") is None


def test_sse_reads_an_unterminated_last_event_like_line_readers() -> None:
    last = SSEDecoder().last(b'data: {"a": 1}')
    assert last is not None and last.raw == b'data: {"a": 1}' and last.data == '{"a": 1}'
    assert SSEDecoder().last(b": comment") is not None


def test_a_long_line_in_many_chunks_is_one_event() -> None:
    # (Pending bytes are no longer rescanned per chunk: a 4 MiB line in 1 KiB chunks took
    # seconds of event-loop time; the scan is now of each chunk once.)
    line = b'{"message":{"content":"' + b"x" * 100_000 + b'"}}'
    events, rest = decode([line[i:i + 1024] for i in range(0, len(line), 1024)] + [b"\n"])
    assert events == [(line + b"\n", line.decode())] and rest == b""
