"""The raw frames between the sidecar and its guardrail call process (lean client): a request
body and an answer body carried as they are, told apart from JSON frames by their first byte."""

from __future__ import annotations

import io

import pytest

from extproc.guardrail.lean import apply_body
from extproc.guardrail.wire import (
    HEADER,
    RAW_ANSWER,
    RAW_REQUEST,
    frame,
    json_payload,
    raw_answer_frame,
    raw_request_frame,
    read_payload,
    read_raw_answer,
    read_raw_request,
)


def payloads(data: bytes) -> list[bytes]:
    reader = io.BufferedReader(io.BytesIO(data))
    out = []
    while True:
        try:
            out.append(read_payload(reader))
        except ConnectionError:
            return out


def test_raw_request_and_answer_round_trip_between_json_frames() -> None:
    body = apply_body("INPUT", ["h\u00e9 \ud800"])  # (a lone surrogate: escaped, not an error)
    path = "/guardrail/arn%3Aaws%3Abedrock/version/DRAFT/apply"
    stream = (frame({"hello": {"client": "lean"}}) + raw_request_frame(7, path, body)
              + raw_answer_frame(2**40, b'{"action":"NONE"}') + frame({"stop": True}))
    hello, request, answer, stop = payloads(stream)
    assert json_payload(hello) == {"hello": {"client": "lean"}}
    assert request[:1] == RAW_REQUEST and answer[:1] == RAW_ANSWER
    assert read_raw_request(request) == (7, path, body)
    assert read_raw_answer(answer) == (2**40, b'{"action":"NONE"}')
    assert json_payload(stop) == {"stop": True}


def test_raw_frames_cut_short_are_value_errors() -> None:
    request = raw_request_frame(1, "/guardrail/a/version/1/apply", b"{}")[HEADER.size:]
    with pytest.raises(ValueError, match="cut short"):
        read_raw_request(request[:5])
    with pytest.raises(ValueError, match="cut short"):
        read_raw_request(request[:12])
    with pytest.raises(ValueError, match="cut short"):
        read_raw_answer(raw_answer_frame(1, b"")[HEADER.size:][:4])


def test_a_frame_cut_short_is_the_end_of_the_stream() -> None:
    whole = raw_answer_frame(3, b'{"action":"NONE"}')
    assert payloads(whole[:-1]) == []
    assert payloads(whole[:2]) == []
