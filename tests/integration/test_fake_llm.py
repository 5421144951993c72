"""Tests for the fake LLM upstream (testkit.upstream).

A raw socket client parses the chunked framing itself, so the tests can assert
HTTP chunk boundaries exactly; the official ``openai`` SDK checks that the
default model's streaming and non-streaming answers are realistic.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from testkit.upstream import (
    CANNED_ANSWERS,
    HEADER_DELAY_MS,
    HEADER_SCRIPT,
    HEADER_SCRIPT_INLINE,
    FakeLLM,
    RequestRecord,
    Script,
    answer_for,
    chat_chunk,
    inline_script_header,
    parse_inline_script,
    sse_data,
)
from tests.support import WAIT_S

ROOT = Path(__file__).resolve().parents[2]
#: A pause no test waits out: the server can only get past it by noticing that the peer left
#: or that it is stopping, so what it did (not how fast) tells the outcomes apart.
ENDLESS_MS = 10 * WAIT_S * 1000


# --------------------------------------------------------------------------
# A raw HTTP/1.1 client that keeps chunk boundaries
# --------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    chunks: list[bytes] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    sent_at: float = 0.0
    terminated: bool = False  # saw the zero-length last chunk

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


class RawConn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = bytearray()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buf += data

    def readline(self) -> bytes:
        while (idx := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:idx])
        del self.buf[: idx + 2]
        return line

    def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def send(
        self,
        method: str = "POST",
        path: str = "/v1/chat/completions",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> float:
        lines = [f"{method} {path} HTTP/1.1", "host: test"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"content-length: {len(body)}")
        sent_at = time.monotonic()
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return sent_at

    def read_head(self) -> RawResponse:
        status_line = self.readline().decode("latin-1")
        assert status_line.startswith("HTTP/1.1 "), status_line
        headers = []
        while line := self.readline():
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        return RawResponse(int(status_line.split()[1]), headers)

    def iter_chunks(self) -> Iterator[tuple[bytes, float]]:
        while True:
            size = int(self.readline().split(b";")[0], 16)
            if size == 0:
                while self.readline():  # trailers
                    pass
                return
            data = self.readexactly(size)
            assert self.readexactly(2) == b"\r\n"
            yield data, time.monotonic()

    def read_response(self) -> RawResponse:
        resp = self.read_head()
        if resp.header("transfer-encoding") == "chunked":
            for data, when in self.iter_chunks():
                resp.chunks.append(data)
                resp.chunk_times.append(when)
            resp.terminated = True
        else:
            resp.chunks.append(self.readexactly(int(resp.header("content-length") or 0)))
        return resp


def raw_request(port: int, *args: object, **kwargs: object) -> RawResponse:
    with RawConn(port) as conn:
        sent_at = conn.send(*args, **kwargs)  # type: ignore[arg-type]
        resp = conn.read_response()
        resp.sent_at = sent_at
        return resp


def chat_body(message: str, **extra: object) -> bytes:
    return json.dumps(
        {"model": "gpt-test", "messages": [{"role": "user", "content": message}], **extra}
    ).encode()


def wait_all_finished(fake: FakeLLM, script_id: str, count: int) -> list[RequestRecord]:
    def done(_: RequestRecord) -> bool:
        recs = fake.records_for_script(script_id)
        return len(recs) == count and all(r.finished for r in recs)

    fake.wait_for_record(done)
    return fake.records_for_script(script_id)


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeLLM(token_delay_ms=1) as server:
        yield server


@pytest.fixture
def sdk(fake: FakeLLM) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{fake.url}/v1", api_key="x", max_retries=0, timeout=10) as client:
        yield client


# --------------------------------------------------------------------------
# Scripts: exact chunk boundaries, delays, status, inline scripts
# --------------------------------------------------------------------------

TRICKY_CHUNKS = (
    b'data: {"choices":[{"delta":{"content":"Hel',  # SSE event split mid-line
    b'lo"}}]}\n\ndata: {"choices":[{"delta":{"content":"caf\xc3',  # UTF-8 'é' split
    b'\xa9 \xe2\x82',  # ... and '€' split across writes
    b'\xac"}}]}\n\n',
    b"data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",  # several events in one write
)


def test_scripted_chunks_arrive_with_exact_boundaries(fake: FakeLLM) -> None:
    script_id = fake.register(Script(chunks=TRICKY_CHUNKS, delays_ms=5))
    resp = raw_request(fake.bound_port, headers=[(HEADER_SCRIPT, script_id)], body=b"{}")

    assert resp.status == 200
    assert resp.header("content-type") == "text/event-stream"
    assert resp.header("transfer-encoding") == "chunked"
    assert resp.terminated
    assert resp.chunks == list(TRICKY_CHUNKS)

    record = fake.record_for_script(script_id)
    assert record.kind == "script"
    assert record.completed and not record.peer_closed
    assert record.chunks_written == len(TRICKY_CHUNKS)
    assert record.chunks == list(TRICKY_CHUNKS)
    assert record.bytes_written == sum(map(len, TRICKY_CHUNKS))
    assert record.closed_after_chunks is None


# The delays' lower bounds below are what the script told the server to wait: a busy machine
# can only make things later, so they cannot fail for it.


def test_script_delays_apply(fake: FakeLLM) -> None:
    delays = (0.0, 80.0, 60.0, 0.0, 50.0)  # last entry: before the end of the body
    script_id = fake.register(Script(chunks=(b"a", b"b", b"c", b"d"), delays_ms=delays))
    with RawConn(fake.bound_port) as conn:
        sent_at = conn.send(headers=[(HEADER_SCRIPT, script_id)])
        resp = conn.read_head()
        arrivals = list(conn.iter_chunks())
        ended_at = time.monotonic()
    assert [d for d, _ in arrivals] == [b"a", b"b", b"c", b"d"]
    cumulative = 0.0
    for (_, arrived), delay in zip(arrivals, delays, strict=False):
        cumulative += delay / 1000
        assert arrived - sent_at >= cumulative
    assert ended_at - sent_at >= sum(delays) / 1000
    assert resp.status == 200

    record = fake.record_for_script(script_id)
    gaps = [b - a for a, b in zip(record.write_times, record.write_times[1:], strict=False)]
    assert gaps[0] >= 0.080
    assert gaps[1] >= 0.060
    assert record.write_times[0] >= record.received_at


def test_scalar_delay_applies_before_every_chunk(fake: FakeLLM) -> None:
    script_id = fake.register(Script(chunks=(b"x", b"y", b"z"), delays_ms=40))
    resp = raw_request(fake.bound_port, headers=[(HEADER_SCRIPT, script_id)])
    assert resp.chunks == [b"x", b"y", b"z"]
    assert resp.chunk_times[0] - resp.sent_at >= 0.040
    assert resp.chunk_times[-1] - resp.sent_at >= 0.120
    record = fake.record_for_script(script_id)
    assert record.write_times[0] - record.received_at >= 0.040
    assert all(b - a >= 0.040 for a, b in zip(record.write_times, record.write_times[1:], strict=False))


def test_script_status_headers_any_method_and_path(fake: FakeLLM) -> None:
    body = b'{"error":{"message":"slow down"}}'
    script_id = fake.register(
        Script(
            chunks=(body,),
            status=429,
            headers=(("content-type", "application/json"), ("retry-after", "3")),
        )
    )
    resp = raw_request(fake.bound_port, "GET", "/anything/at/all?x=1", [(HEADER_SCRIPT, script_id)])
    assert resp.status == 429
    assert resp.header("retry-after") == "3"
    assert resp.header("content-type") == "application/json"
    assert resp.chunks == [body]
    record = fake.record_for_script(script_id)
    assert (record.method, record.path, record.status) == ("GET", "/anything/at/all?x=1", 429)


def test_script_can_be_reused(fake: FakeLLM) -> None:
    script_id = fake.register(Script(chunks=(b"one", b"two")))
    for _ in range(2):
        assert raw_request(fake.bound_port, headers=[(HEADER_SCRIPT, script_id)]).chunks == [
            b"one",
            b"two",
        ]
    wait_all_finished(fake, script_id, 2)
    assert all(r.completed for r in fake.records_for_script(script_id))


def test_inline_script_header(fake: FakeLLM) -> None:
    script = Script(chunks=TRICKY_CHUNKS, delays_ms=(1, 2, 3, 4, 5), status=201)
    value = inline_script_header(script)
    assert parse_inline_script(value) == script
    resp = raw_request(fake.bound_port, headers=[(HEADER_SCRIPT_INLINE, value)])
    assert resp.status == 201
    assert resp.chunks == list(TRICKY_CHUNKS)
    record = fake.record_for_script("inline")
    assert record.kind == "inline" and record.completed


def test_inline_script_documented_json_format(fake: FakeLLM) -> None:
    """Another process can build the header by hand from the documented format."""
    doc = {
        "chunks": [base64.b64encode(b"data: hi\n\n").decode(), base64.b64encode(b"data: [DONE]\n\n").decode()],
        "delay_ms": 30,
        "status": 200,
        "headers": [["content-type", "text/event-stream"], ["x-upstream", "fake"]],
    }
    value = base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")
    with httpx.Client(base_url=fake.url, timeout=10) as client:
        with client.stream("POST", "/v1/chat/completions", headers={HEADER_SCRIPT_INLINE: value}) as r:
            assert r.status_code == 200
            assert r.headers["x-upstream"] == "fake"
            body = b"".join(r.iter_raw())
    assert body == b"data: hi\n\ndata: [DONE]\n\n"
    record = fake.record_for_script("inline")
    assert record.write_times[0] - record.received_at >= 0.030


def test_bad_script_headers(fake: FakeLLM) -> None:
    resp = raw_request(fake.bound_port, headers=[(HEADER_SCRIPT, "nope")])
    assert resp.status == 404
    assert "unknown script id" in json.loads(resp.chunks[0])["error"]["message"]
    resp = raw_request(fake.bound_port, headers=[(HEADER_SCRIPT_INLINE, "!!notbase64!!")])
    assert resp.status == 400
    errors = fake.wait_for_record(lambda r: r.kind == "error" and r.script_id == "inline")
    assert errors.error


def test_script_validation() -> None:
    with pytest.raises(ValueError):
        Script(chunks=(b"a", b""))
    with pytest.raises(ValueError):
        Script(chunks=(b"a", b"b"), delays_ms=(1.0,))
    with pytest.raises(ValueError):
        Script(chunks=(b"a",), headers=(("content-length", "1"),))
    # lists and str chunks are normalised; the dataclass stays hashable
    script = Script(chunks=["é", b"b"], delays_ms=[1, 2, 3], headers=[("X-A", "1")])  # type: ignore[arg-type]
    assert script.chunks == ("é".encode(), b"b")
    assert script.delays_ms == (1.0, 2.0, 3.0)
    assert script.headers == (("x-a", "1"),)
    hash(script)


def test_trailing_false_aborts_after_last_chunk(fake: FakeLLM) -> None:
    script_id = fake.register(Script(chunks=(b"data: partial", b" event"), trailing=False))
    with RawConn(fake.bound_port) as conn:
        conn.send(headers=[(HEADER_SCRIPT, script_id)])
        conn.read_head()
        got = []
        with pytest.raises((EOFError, ConnectionError)):
            for data, _ in conn.iter_chunks():
                got.append(data)
    assert got == [b"data: partial", b" event"]
    record = fake.record_for_script(script_id)
    assert record.completed and record.chunks_written == 2


# --------------------------------------------------------------------------
# Peer going away mid-response
# --------------------------------------------------------------------------


def test_raw_client_disconnect_mid_stream_is_recorded(fake: FakeLLM) -> None:
    # The server pauses after the three chunks the client reads, so the client has left before
    # the rest could be written, however slow the machine. (Was: 30 ms before every chunk,
    # which a busy machine could let the server finish before the client left.)
    chunks = tuple(f"data: {i}\n\n".encode() for i in range(40))
    delays = (30.0,) * 3 + (ENDLESS_MS,) + (30.0,) * (len(chunks) - 4)
    script_id = fake.register(Script(chunks=chunks, delays_ms=delays))
    with RawConn(fake.bound_port) as conn:
        conn.send(headers=[(HEADER_SCRIPT, script_id)])
        conn.read_head()
        it = conn.iter_chunks()
        first = [next(it)[0] for _ in range(3)]
    assert first == list(chunks[:3])

    record = fake.record_for_script(script_id, timeout=WAIT_S)
    assert record.peer_closed
    assert not record.completed
    assert record.closed_after_chunks is not None
    assert 3 <= record.closed_after_chunks < len(chunks)
    written = record.chunks_written
    assert written == record.closed_after_chunks
    # The server must not keep writing: the record is finished (record_for_script waits for
    # that), which the server marks only once it has stopped writing the response. (Was: a
    # 0.2 s sleep before looking again.)
    assert record.finished
    assert fake.record_for_script(script_id).chunks_written == written


def test_httpx_client_disconnect_mid_stream_is_recorded(fake: FakeLLM) -> None:
    # A pause after the two events the client reads: it leaves mid-stream whatever the load.
    chunks = tuple(f"data: {i}\n\n".encode() for i in range(50))
    delays = (20.0,) * 2 + (ENDLESS_MS,) + (20.0,) * (len(chunks) - 3)
    script_id = fake.register(Script(chunks=chunks, delays_ms=delays))
    with httpx.Client(base_url=fake.url, timeout=10) as client:
        with client.stream("POST", "/v1/chat/completions", headers={HEADER_SCRIPT: script_id}) as r:
            received = b""
            for piece in r.iter_raw():
                received += piece
                if received.count(b"\n\n") >= 2:
                    break
    record = fake.record_for_script(script_id, timeout=WAIT_S)
    assert record.peer_closed
    assert record.closed_after_chunks is not None
    assert 2 <= record.closed_after_chunks < len(chunks)
    assert record.finished_at is not None and record.closed_at is not None


def test_disconnect_during_long_delay_is_noticed_before_it_ends(fake: FakeLLM) -> None:
    # The delay is ten times longer than the wait for the record: a finished record shows that
    # the disconnect ended the delay. (Was: ..._noticed_promptly, a 10 s delay and the time of
    # the notice compared with 5 s.)
    script_id = fake.register(Script(chunks=(b"first", b"never"), delays_ms=(0, ENDLESS_MS)))
    with RawConn(fake.bound_port) as conn:
        conn.send(headers=[(HEADER_SCRIPT, script_id)])
        conn.read_head()
        assert next(conn.iter_chunks())[0] == b"first"
    record = fake.record_for_script(script_id, timeout=WAIT_S)
    assert record.peer_closed and record.closed_after_chunks == 1
    assert record.closed_at is not None


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


def test_records_contain_request_headers_and_body(fake: FakeLLM) -> None:
    script_id = fake.register(Script(chunks=(b"ok",)))
    body = chat_body("hi")
    with httpx.Client(base_url=fake.url, timeout=10) as client:
        r = client.post(
            "/v1/chat/completions",
            content=body,
            headers={HEADER_SCRIPT: script_id, "X-Trace-Id": "abc123", "content-type": "application/json"},
        )
        assert r.content == b"ok"

        # a chunked request body is reassembled
        def gen() -> Iterator[bytes]:
            yield body[:10]
            yield body[10:]

        r2 = client.post("/v1/chat/completions", content=gen(), headers={"x-trace-id": "chunked"})
        assert r2.status_code == 200

    record = fake.record_for_script(script_id)
    assert ("x-trace-id", "abc123") in record.headers
    assert all(name == name.lower() for name, _ in record.headers)
    assert record.header("X-Trace-Id") == "abc123"
    assert record.body == body
    assert record.json()["messages"][0]["content"] == "hi"

    chunked = fake.wait_for_record(lambda r: r.header("x-trace-id") == "chunked" and r.finished)
    assert chunked.header("transfer-encoding") == "chunked"
    assert chunked.body == body
    assert chunked.kind == "model" and chunked.completed


def test_keep_alive_reuses_the_connection(fake: FakeLLM) -> None:
    script_id = fake.register(Script(chunks=(b"a", b"b")))
    with RawConn(fake.bound_port) as conn:
        for _ in range(3):
            conn.send(headers=[(HEADER_SCRIPT, script_id)])
            assert conn.read_response().chunks == [b"a", b"b"]
    wait_all_finished(fake, script_id, 3)
    assert len({r.connection_id for r in fake.records_for_script(script_id)}) == 1


def test_records_endpoint_and_wait_timeout(fake: FakeLLM) -> None:
    script_id = fake.register(Script(chunks=(b"x", b"y")))
    raw_request(fake.bound_port, headers=[(HEADER_SCRIPT, script_id), ("x-probe", "1")])
    fake.record_for_script(script_id)
    with httpx.Client(base_url=fake.url, timeout=10) as client:
        records = client.get("/_records").json()
        only = client.get("/_records", params={"script": script_id}).json()
    assert [r["script_id"] for r in only] == [script_id]
    (rec,) = [r for r in records if r["script_id"] == script_id]
    assert ["x-probe", "1"] in rec["headers"]
    assert rec["chunks_written"] == 2 and rec["completed"] and not rec["peer_closed"]
    assert [base64.b64decode(c) for c in rec["chunks_b64"]] == [b"x", b"y"]
    assert all(r["path"] != "/_records" for r in records)  # internal endpoints not recorded

    with pytest.raises(TimeoutError):
        fake.wait_for_record(lambda r: r.header("x-never") is not None, timeout=0.05)


# --------------------------------------------------------------------------
# Default model
# --------------------------------------------------------------------------


def test_answer_table() -> None:
    assert "Project Nightingale" in answer_for("tell me about the secret project")
    assert not answer_for("the project").startswith("Project Nightingale")
    assert "jane.doe@example.com" in answer_for("What is the support email?")
    assert "+1 206 555 0100" in answer_for("Give me the phone number")
    assert "ticket TKT-123456" in answer_for("open a ticket please")
    assert len(answer_for("write something long")) >= 2800
    assert answer_for("hello there") == "You said: hello there"


def test_default_stream_is_one_event_per_write(fake: FakeLLM) -> None:
    body = chat_body("email", stream=True, stream_options={"include_usage": True})
    resp = raw_request(fake.bound_port, body=body, headers=[(HEADER_DELAY_MS, "15")])
    assert resp.status == 200
    assert resp.header("content-type", ).startswith("text/event-stream")  # type: ignore[union-attr]
    events = []
    for chunk in resp.chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
        assert chunk.count(b"\n\n") == 1
        events.append(chunk[6:-2].decode())
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(o["object"] == "chat.completion.chunk" and o["model"] == "gpt-test" for o in objs)
    assert len({o["id"] for o in objs}) == 1
    content = "".join(o["choices"][0]["delta"].get("content", "") for o in objs if o["choices"])
    assert content == CANNED_ANSWERS["email"]
    assert objs[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["total_tokens"] > 0

    record = fake.wait_for_record(lambda r: r.kind == "model" and r.finished)
    assert record.chunks == resp.chunks
    gaps = [b - a for a, b in zip(record.write_times, record.write_times[1:], strict=False)]
    assert all(g >= 0.015 for g in gaps)


@pytest.mark.parametrize("keyword", ["project", "email", "phone", "ticket", "long"])
def test_sdk_streaming_canned_answers(sdk: openai.OpenAI, keyword: str) -> None:
    stream = sdk.chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "system", "content": "be helpful"},
            {"role": "user", "content": f"Tell me about the {keyword}"},
        ],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    roles = []
    finish = []
    usage = None
    with stream:
        for chunk in stream:
            assert chunk.model == "gpt-test"
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.role:
                    roles.append(choice.delta.role)
                text += choice.delta.content or ""
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
    assert text == CANNED_ANSWERS[keyword]
    assert roles == ["assistant"]
    assert finish == ["stop"]
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_sdk_streaming_echo_without_usage(sdk: openai.OpenAI) -> None:
    with sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Bonjour, ça va ? 👋"}], stream=True
    ) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "You said: Bonjour, ça va ? 👋"
    assert all(c.usage is None and c.choices for c in chunks)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the weather",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["location"],
        },
    },
}


def test_sdk_streaming_tool_call(sdk: openai.OpenAI) -> None:
    with sdk.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "What's the weather in Paris today?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        stream=True,
    ) as stream:
        chunks = list(stream)
    args = ""
    names = []
    ids = []
    finish = []
    for chunk in chunks:
        choice = chunk.choices[0]
        for call in choice.delta.tool_calls or []:
            assert call.index == 0
            if call.id:
                ids.append(call.id)
            if call.function and call.function.name:
                names.append(call.function.name)
            if call.function and call.function.arguments:
                args += call.function.arguments
        if choice.finish_reason:
            finish.append(choice.finish_reason)
    assert names == ["get_current_weather"]
    assert len(ids) == 1 and ids[0].startswith("call_")
    assert len([c for c in chunks if c.choices[0].delta.tool_calls]) > 2  # arguments in pieces
    assert json.loads(args) == {"location": "Paris", "unit": "celsius"}
    assert finish == ["tool_calls"]


def test_sdk_non_streaming(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "my ticket status?"}]
    )
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-test"
    assert completion.choices[0].message.content == CANNED_ANSWERS["ticket"]
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0

    tool = sdk.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "weather in New York?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    call = tool.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert tool.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments)["location"] == "New York"  # type: ignore[union-attr]


def test_default_model_errors(fake: FakeLLM) -> None:
    with httpx.Client(base_url=fake.url, timeout=10) as client:
        assert client.post("/v1/embeddings", json={}).status_code == 404
        assert client.post("/v1/chat/completions", content=b"not json").status_code == 400
        assert client.get("/v1/models").json()["data"][0]["id"] == "demo"


# --------------------------------------------------------------------------
# Helpers, lifecycle, CLI
# --------------------------------------------------------------------------


def test_chat_chunk_and_sse_data() -> None:
    assert chat_chunk("hi") == {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "demo",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}],
    }
    assert chat_chunk(role="assistant", content="")["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat_chunk(finish_reason="stop")["choices"][0]["delta"] == {}
    assert sse_data("[DONE]") == b"data: [DONE]\n\n"
    assert sse_data({"a": "é", "b": [1, 2]}) == 'data: {"a":"é","b":[1,2]}\n\n'.encode()


def test_stop_closes_inflight_streams() -> None:
    # The stream's delay outlasts every wait here: a stop that did not close the stream would
    # leave the client's read to time out (TimeoutError, not EOF) and the record unfinished.
    # (Was: the stop's duration compared with 10 s.)
    server = FakeLLM(token_delay_ms=1)
    port = server.start()
    script_id = server.register(Script(chunks=(b"a", b"b"), delays_ms=(0, ENDLESS_MS)))
    with RawConn(port) as conn:
        conn.send(headers=[(HEADER_SCRIPT, script_id)])
        conn.read_head()
        it = conn.iter_chunks()
        assert next(it)[0] == b"a"
        server.stop()
        with pytest.raises((EOFError, ConnectionError)):
            next(it)
    record = server.record_for_script(script_id, timeout=WAIT_S)
    assert record.finished and not record.completed
    server.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_start_twice_and_records_type() -> None:
    with FakeLLM() as server:
        with pytest.raises(RuntimeError):
            server.start()
        assert server.url.startswith("http://127.0.0.1:")
        assert isinstance(server.records, list)
    assert all(isinstance(r, RequestRecord) for r in server.records)


def test_cli_serves_and_exits_zero_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "testkit.upstream", "--listen", "127.0.0.1:0", "--token-delay-ms", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fake-llm listening on http://127.0.0.1:")
        url = line.split(" on ", 1)[1].strip()
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10) as client:
            with client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "phone?"}], stream=True
            ) as stream:
                text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == CANNED_ANSWERS["phone"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
