"""``extproc.formats.strict``: exactly one JSON value in UTF-8 that every parser reads alike,
or ``BodyRejected`` naming why; and ``decode_body`` inflating every gzip member."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.formats.strict import MAX_DEPTH, MAX_NUMBER_CHARS, BodyRejected, parse_request
from extproc.stream.prompt import decode_body

REJECTED = {
    b'{"a":1} {"b":2}': "data after the JSON value",
    b'{"a":1}x': "data after the JSON value",
    b'{"a":1,"a":2}': "given twice",
    b'{"x":{"k":1,"k":1}}': "given twice",
    b'{"Messages":[]}': "case variant of 'messages'",
    b'[{"CONTENT":"x"}]': "case variant of 'content'",
    '{"me\u017f\u017fages":[]}'.encode(): "case variant of 'messages'",
    '{"\u212aey":1,"model":"\u212a"}'.encode(): "",  # (Kelvin sign: not a known key) accepted
    b"\xef\xbb\xbf{}": "byte order mark",
    b'{"a":"\xff"}': "invalid UTF-8 at byte 6",
    b'{"a":"\xc3"}': "invalid UTF-8",
    b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1): f"deeper than {MAX_DEPTH}",
    b'{"n":' + b"9" * (MAX_NUMBER_CHARS + 1) + b"}": "a number of",
    b'{"n":1e999}': "too large",
    b'{"n":-1e999}': "too large",
    b'{"n":NaN}': "NaN is not JSON",
    b'{"n":Infinity}': "Infinity is not JSON",
    b'{"a":': "not JSON",
    b"": "not JSON",
}


@pytest.mark.parametrize("body", list(REJECTED), ids=lambda b: repr(b[:30]))
def test_rejected(body: bytes) -> None:
    reason = REJECTED[body]
    if not reason:
        parse_request(body)
        return
    with pytest.raises(BodyRejected, match=reason):
        parse_request(body)


@pytest.mark.parametrize("body", [
    b'{"messages":[{"role":"user","content":"hi"}]}',
    b'  {"a": [1, 2.5, -3e10, true, false, null, "x"]}\n',
    b'{"s":"[[[[[[[[[[ {{{{ \\" ]]]"}',  # brackets in strings do not nest
    b"[" * MAX_DEPTH + b"]" * MAX_DEPTH,
    b'{"n":' + b"9" * MAX_NUMBER_CHARS + b"}",
    b'{"lone":"\\ud800"}',  # a lone surrogate escape: every parser reads it (Go as U+FFFD)
    b'{"metadata":{"note":1,"Note":2}}',  # case variants of keys we do not read
    '{"a":"caf\u00e9 \U0001f600"}'.encode(),
])
def test_accepted_bodies_read_as_json_reads_them(body: bytes) -> None:
    assert parse_request(body) == json.loads(body)


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() |
    st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children) | st.dictionaries(
        st.sampled_from(["a", "b", "x", "note"]), children), max_leaves=30))
def test_any_json_document_without_duplicates_reads_the_same(value: object) -> None:
    body = json.dumps(value).encode()
    assert parse_request(body) == json.loads(body)


def test_every_gzip_member_is_inflated() -> None:
    body = b'{"messages":[{"role":"user","content":"hello there"}]}'
    packed = b"".join(gzip.compress(body[i:i + 10]) for i in range(0, len(body), 10))
    assert decode_body(packed, "gzip", 0) == body
    assert decode_body(packed, "gzip", len(body)) == body
    assert decode_body(packed, "gzip", len(body) - 1) is None  # over the limit
    assert decode_body(packed + b"junk", "gzip", 0) is None  # not another member


def test_deflate_is_one_stream() -> None:
    assert decode_body(zlib.compress(b"abc"), "deflate", 0) == b"abc"
    assert decode_body(zlib.compress(b"abc") + zlib.compress(b"d"), "deflate", 0) is None
