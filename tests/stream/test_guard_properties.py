"""Property tests of the output guard, driven through ``StreamProcessor`` like Envoy would.

Every example is one OpenAI chat completion stream (a role chunk, content deltas cut from
random text with non-ASCII characters, a finish chunk and ``data: [DONE]``), cut into body
chunks at random byte offsets (also inside multi-byte UTF-8 characters and inside events),
fed to a ``StreamProcessor`` with the FULL_DUPLEX_STREAMED sink or the STREAMED sink. Between
chunks the event loop runs a random number of steps, so the guardrail's verdicts land at
random points of the stream. Window policies are random too.

Notation used by the docstrings: ``text`` is the concatenated model text of the stream (one
channel: choice 0's content). ``FakeGuardrail`` records every call; with one channel a call
has one text block. The windowed strategy cuts ``text`` into windows ``[s_i, e_i)``:
``s_i = max(0, e_{i-1} - overlap)`` (``e_{-1} = 0``) and ``e_{i-1} < e_i <= s_i + window +
overlap``; the new text of call ``i`` is ``[e_{i-1}, e_i)``. ``R`` is the model text the
client received (the content of the released events, concatenated).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from extproc._pb.envoy.service.ext_proc.v3.external_processor_pb2 import ProtocolConfiguration
from extproc.domain.values import GuardrailRef, InputCheck, Source, StreamMode
from extproc.domain.verdict import GuardrailVerdict, Outcome, classify
from extproc.domain.windows import Strategy, WindowPolicy, held_tail
from extproc.envoy import STREAMED
from extproc.formats import all_formats
from extproc.stream.masking import map_region
from extproc.stream.processor import StreamProcessor
from extproc.stream.sinks import Outbox
from tests.support import (
    BLOCK_FRAME,
    FakeGuardrail,
    bedrock_response,
    chat_request,
    chunk_event,
    request_body,
    request_headers,
    response_body,
    response_headers,
)
from tests.support import settings as make_settings

PROPERTY = settings(
    deadline=None,
    max_examples=300,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

WORD = "forbidden"
CHANNEL = ("content", 0)
DONE = b"data: [DONE]\n\n"
FINISH = chunk_event(None, "stop")
ROLE = b"data: " + json.dumps(
    {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "demo",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                  "finish_reason": None}]}).encode() + b"\n\n"

# No "f"/"F" (the blocked word can only be where a test puts it), no "@" (e-mails likewise),
# no braces (the mask placeholder). JSON-escaped characters and 2-, 3- and 4-byte UTF-8 ones.
ALPHABET = ("abcdeghijklmnopqrstuvwxyz ABCDEGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"\\/-_()"
            "\n\t é ü ß ñ € — 中文字 😀🙂")


def texts(longest: int) -> st.SearchStrategy[str]:
    """Text of a length drawn first (plain ``st.text`` stays very short)."""
    return st.integers(0, longest).flatmap(
        lambda n: st.text(alphabet=ALPHABET, min_size=n, max_size=n))


FILLER = texts(250)
EMAIL = re.compile(r"[a-z]+@example\.com")
MASK = "{EMAIL}"


def utf8_chunk_event(content: str) -> bytes:
    """``chunk_event`` with raw UTF-8 instead of ``\\u`` escapes (both occur in the wild)."""
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "demo",
           "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


# -- streams ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    text: str
    deltas: list[str]
    events: list[bytes]  # the original events, in order
    chunks: list[bytes]  # their bytes, cut anywhere
    settles: list[int]  # event-loop steps after each chunk
    eos_with_last: bool  # end_of_stream on the last data chunk, or on an empty one after it
    repeat_eos: bool  # a duplicate final chunk (envoy#46237; FULL_DUPLEX only)

    @property
    def raw(self) -> bytes:
        return b"".join(self.events)

    def boundaries(self) -> list[int]:
        """Offsets in ``text`` where content events end (0 included)."""
        out, position = [0], 0
        for delta in self.deltas:
            position += len(delta)
            out.append(position)
        return out


def single_chunk_stream(text: str) -> Stream:
    """``text`` as one delta, the whole stream as one chunk, end_of_stream on an empty one."""
    events = [ROLE, chunk_event(text), FINISH, DONE]
    return Stream(text, [text], events, [b"".join(events)], [0], eos_with_last=False,
                  repeat_eos=False)


def _cut(items: Sequence[Any], points: set[int]) -> list[Any]:
    bounds = [0, *sorted(p for p in points if 0 < p < len(items)), len(items)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@st.composite
def streams(draw: st.DrawFn, text: st.SearchStrategy[str] = FILLER) -> Stream:
    body = draw(text)
    deltas = _cut(body, draw(st.one_of(
        st.sets(st.integers(1, max(1, len(body) - 1)), max_size=40),
        st.integers(1, 12).map(lambda size: set(range(size, len(body), size))),
    )))
    escaped = draw(st.lists(st.booleans(), min_size=len(deltas), max_size=len(deltas)))
    events = [ROLE, *(chunk_event(d) if e else utf8_chunk_event(d)
                      for d, e in zip(deltas, escaped)), FINISH, DONE]
    raw = b"".join(events)
    cuts = draw(st.one_of(
        st.sets(st.integers(1, len(raw) - 1), max_size=40),
        st.integers(1, 64).map(lambda size: max(size, len(raw) // 300)).map(
            lambda size: set(range(size, len(raw), size))),  # at most ~300 chunks
    ))
    chunks = _cut(raw, cuts)
    pattern = draw(st.lists(st.sampled_from([0, 0, 1, 2, 3, 5, 8, 20]), min_size=1, max_size=40))
    settles = [pattern[i % len(pattern)] for i in range(len(chunks))]
    return Stream(body, deltas, events, chunks, settles, draw(st.booleans()), draw(st.booleans()))


@st.composite
def violating_text(draw: st.DrawFn) -> str:
    body = draw(FILLER)
    position = draw(st.integers(0, len(body)))
    return body[:position] + WORD + body[position:]


@st.composite
def policies(draw: st.DrawFn, *, strategy: Strategy = Strategy.WINDOWED, min_overlap: int = 0,
             fast: bool | None = None) -> WindowPolicy:
    window = draw(st.one_of(st.integers(20, 40), st.integers(20, 300)))
    return WindowPolicy(
        strategy=strategy,
        window_chars=window,
        overlap_chars=draw(st.integers(min_overlap, 60)),
        min_chars=draw(st.one_of(st.integers(1, min(10, window)), st.integers(1, window))),
        fast_first_window=draw(st.booleans()) if fast is None else fast,
        max_stream_text_units=draw(st.integers(1, 12)),
    )


PROMPTS = st.sampled_from(["off", "wait", "nowait"])


# -- the harness ------------------------------------------------------------------------------


class Run:
    """One stream through a ``StreamProcessor``; records every answer and, for each body answer
    written, how many bytes the client had by then, how many output checks had started and
    whether the text was over (Envoy's end_of_stream, or the finish event, had come)."""

    def __init__(self, guardrail: FakeGuardrail, *, streamed: bool, mode: StreamMode,
                 policy: WindowPolicy, prompt: str) -> None:
        self.guardrail = guardrail
        self.streamed = streamed
        self.policy = policy
        self.prompt = prompt
        self.sent: list[Any] = []
        self.snapshots: list[tuple[int, int, bool]] = []  # (client bytes, calls, text over)
        self.text_over = False
        self._client = 0

        async def write(message: Any) -> None:
            self.sent.append(message)
            if message.WhichOneof("response") == "response_body":
                self._client += len(self._answer(message)[0])
                self.snapshots.append((self._client, len(self.output_calls()), self.text_over))

        self.processor = StreamProcessor(
            make_settings(
                stream_mode=mode, window=policy, keepalive_s=0.0,
                input_check=InputCheck.OFF if prompt == "off" else InputCheck.PARALLEL,
                input_wait_s=0.0 if prompt == "nowait" else 0.5),
            guardrail, all_formats(), Outbox(write), "prop")

    # answers

    def body_messages(self) -> list[Any]:
        return [m for m in self.sent if m.WhichOneof("response") == "response_body"]

    def _answer(self, message: Any) -> tuple[bytes, bool]:
        """(bytes for the client, end_of_stream); STREAMED answers never end the body."""
        mutation = message.response_body.response.body_mutation
        kind = mutation.WhichOneof("mutation")
        if self.streamed:
            assert kind in ("body", "clear_body"), kind
            return (mutation.body if kind == "body" else b""), False
        assert kind == "streamed_response", kind
        return mutation.streamed_response.body, mutation.streamed_response.end_of_stream

    def body_answers(self) -> list[tuple[bytes, bool]]:
        return [self._answer(message) for message in self.body_messages()]

    def client_bytes(self) -> bytes:
        return b"".join(body for body, _ in self.body_answers())

    def output_calls(self) -> list[list[str]]:
        return [c.texts for c in self.guardrail.calls if c.source is Source.OUTPUT]

    # driving

    async def handle(self, request: Any) -> None:
        await self.processor.handle(request)

    async def play(self, stream: Stream) -> None:
        headers = request_headers()
        if self.streamed:
            headers.protocol_config.CopyFrom(ProtocolConfiguration(response_body_mode=STREAMED))
        await self.handle(headers)
        if self.prompt != "off":
            await self.handle(request_body(chat_request("hello")))
        await self.handle(response_headers())
        assert [m.WhichOneof("response") for m in self.sent][-1] == "response_headers"
        fed = 0
        last = len(stream.chunks) - 1
        # The finish event ends the text (``StreamCodec.text_ended``): from the chunk that
        # completes it on, the last check may release everything, as at the end of the body.
        text_end = (stream.raw.index(FINISH) + len(FINISH)) if FINISH in stream.events else -1
        fed_bytes = 0
        for index, chunk in enumerate(stream.chunks):
            eos = stream.eos_with_last and index == last
            fed_bytes += len(chunk)
            self.text_over = eos or 0 <= text_end <= fed_bytes
            await self.handle(response_body(chunk, end_of_stream=eos))
            fed += 1
            if self.streamed:
                self._check_streamed_answer(fed, eos)
            for _ in range(stream.settles[index]):
                await asyncio.sleep(0)
        if not stream.eos_with_last:
            self.text_over = True
            await self.handle(response_body(b"", end_of_stream=True))
            fed += 1
            if self.streamed:
                self._check_streamed_answer(fed, True)
        for _ in range(100 * (len(stream.text) + 20)):
            if self._done(fed):
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError("the stream never finished")
        for _ in range(30):  # anything that would still follow
            await asyncio.sleep(0)
        if stream.repeat_eos and not self.streamed:
            count = len(self.sent)
            await self.handle(response_body(DONE, end_of_stream=True))
            for _ in range(30):
                await asyncio.sleep(0)
            assert len(self.sent) == count, "an answer to a repeated final chunk"
        self.processor.close()
        self._check_answers(fed)

    def _check_streamed_answer(self, fed: int, eos: bool) -> None:
        """STREAMED: a chunk is answered at once, except the last one, which may wait for the
        final check behind an ``override_message_timeout``."""
        answered = len(self.body_messages())
        if not eos:
            assert answered == fed
        elif answered == fed - 1:
            assert self.sent[-1].HasField("override_message_timeout")
        else:
            assert answered == fed

    def _done(self, fed: int) -> bool:
        if self.streamed:
            return len(self.body_messages()) == fed
        return any(eos for _, eos in self.body_answers())

    def _check_answers(self, fed: int) -> None:
        kinds = [m.WhichOneof("response") for m in self.sent]
        start = kinds.index("response_headers") + 1
        if self.streamed:
            # One response_body answer per chunk, in order (the outbox is FIFO and each answer
            # was counted as its chunk was fed), plus timer overrides only.
            assert kinds[start:].count("response_body") == fed
            for message, kind in zip(self.sent[start:], kinds[start:]):
                if kind is None:
                    assert message.HasField("override_message_timeout")
                    assert message.ListFields()[0][0].name == "override_message_timeout"
                    assert len(message.ListFields()) == 1
                else:
                    assert kind == "response_body"
            assert kinds[-1] == "response_body"
        else:
            assert all(kind == "response_body" for kind in kinds[start:])
            flags = [eos for _, eos in self.body_answers()]
            assert flags.count(True) == 1 and flags[-1] is True, flags


def run_stream(guardrail: FakeGuardrail, stream: Stream, *, streamed: bool, mode: StreamMode,
               policy: WindowPolicy, prompt: str) -> Run:
    note(f"policy={policy} mode={mode.value} streamed={streamed} prompt={prompt}")
    note(f"text={stream.text!r} deltas={stream.deltas!r}")
    note(f"chunks={[len(c) for c in stream.chunks]} settles={stream.settles}")
    run = Run(guardrail, streamed=streamed, mode=mode, policy=policy, prompt=prompt)
    asyncio.run(run.play(stream))
    note(f"calls={run.output_calls()!r}")
    note(f"client={run.client_bytes()!r}")
    calls, length = len(run.output_calls()), len(stream.text)
    event(f"outcome: {run.processor.record.to_metadata().get('outcome')}")
    event(f"output calls: {calls if calls < 2 else '2-5' if calls <= 5 else '6+'}")
    event(f"text: {'<50' if length < 50 else '<150' if length < 150 else '150+'}")
    return run


# -- reading the client's bytes ---------------------------------------------------------------


def split_events(data: bytes) -> list[bytes]:
    """Whole SSE events (every event here ends with a blank line; JSON escapes newlines)."""
    parts = data.split(b"\n\n")
    assert parts[-1] == b"", f"released bytes end inside an event: {parts[-1]!r}"
    return [part + b"\n\n" for part in parts[:-1]]


def strip_frame(data: bytes) -> bytes:
    return data[:-len(BLOCK_FRAME)] if data.endswith(BLOCK_FRAME) else data


def content_of(data: bytes) -> str:
    text = ""
    for event in split_events(data):
        payload = event[len(b"data: "):-2]
        if payload.startswith(b"{"):
            for choice in json.loads(payload).get("choices", []):
                text += (choice.get("delta") or {}).get("content") or ""
    return text


def windows(texts: list[list[str]], text: str, policy: WindowPolicy) -> list[tuple[int, int]]:
    """The ``[s_i, e_i)`` of each windowed call, checked against ``text``: each starts
    ``overlap`` characters before the text checked so far, or where release stopped when that
    is earlier (the first window's held tail)."""
    spans: list[tuple[int, int]] = []
    end = 0
    for blocks in texts:
        assert len(blocks) == 1
        limit = released_limit(spans, policy, text, final=None)
        start = max(0, min(limit, end - policy.overlap_chars))
        assert start + len(blocks[0]) > end, "a window without new text"
        end = start + len(blocks[0])
        assert text[start:end] == blocks[0], (start, end, blocks[0])
        spans.append((start, end))
    return spans


def released_limit(spans: list[tuple[int, int]], policy: WindowPolicy, text: str, *,
                   final: int | None) -> int:
    """How far passing checks ``spans`` allow release in sync mode: ``e_i - overlap``, or
    ``e_0`` less its held tail (``held_tail``: the word it may end inside; at most
    ``overlap``) for the fast first window, or ``e_i`` for a check that reached ``final`` (the text's length, once upstream
    ended)."""
    limit = 0
    for index, (start, end) in enumerate(spans):
        if final is not None and end == final:
            limit = max(limit, end)
        elif index == 0 and policy.fast_first_window:
            limit = max(limit, end - min(held_tail(text[start:end]), policy.overlap_chars))
        else:
            limit = max(limit, end - policy.overlap_chars)
    return limit


def check_sync_release_history(run: Run, stream: Stream, *, masked: bool = False) -> None:
    """At every body answer, the client has whole original events (masked ones rewritten), and
    the original text of those is no longer than the release limit of the checks started by
    then (a verdict can only lower that): nothing goes out before a passing check covered it
    with ``overlap`` characters of context after it, the first window and the end excepted."""
    text = stream.text
    spans = windows(run.output_calls(), text, run.policy) if (
        run.policy.strategy is Strategy.WINDOWED) else None
    client_bytes = run.client_bytes()
    for size, calls, text_over in run.snapshots:
        events = split_events(strip_frame(client_bytes[:size]))
        assert len(events) <= len(stream.events)
        if not masked:
            assert events == stream.events[:len(events)]
        released = stream.boundaries()[max(0, min(len(events) - 1, len(stream.deltas)))]
        if spans is not None:
            limit = released_limit(spans[:calls], run.policy, text,
                                   final=len(text) if text_over else None)
            assert released <= limit, (released, calls, limit)


def call_bound(length: int, policy: WindowPolicy) -> int:
    """The most output calls a clean single-channel stream of ``length`` characters can cost.

    One call at a time; a call starts when ``min_chars`` new characters wait (or at the end,
    or, with the fast first window, for the first text) and covers at least
    ``min(pending, window_chars)`` of them. Since ``min_chars <= window_chars``, every call but
    the first (fast) and the last covers at least ``min_chars``: at most
    ``1 + ceil((length - 1) / min_chars)`` calls with the fast first window (the same as
    ``2 + floor((length - 2) / min_chars)``), ``ceil(length / min_chars)`` without. Both are
    reached when text arrives ``min_chars`` at a time (after one character, fast).
    """
    if length == 0:
        return 0
    if policy.fast_first_window:
        return 1 + math.ceil((length - 1) / policy.min_chars)
    return math.ceil(length / policy.min_chars)


# -- 1. clean streams -------------------------------------------------------------------------


@PROPERTY
@given(stream=streams(), policy=policies(), mode=st.sampled_from(list(StreamMode)),
       prompt=PROMPTS)
def test_clean_stream_is_byte_identical_full_duplex(stream: Stream, policy: WindowPolicy,
                                                    mode: StreamMode, prompt: str) -> None:
    """A stream without violations reaches the client byte for byte, in sync and async mode,
    and the body ends with exactly one end_of_stream answer, the last message of the stream."""
    run = run_stream(FakeGuardrail(), stream, streamed=False, mode=mode, policy=policy,
                     prompt=prompt)
    assert run.client_bytes() == stream.raw
    assert run.processor.record.to_metadata()["outcome"] == "pass"
    if mode is StreamMode.SYNC:
        check_sync_release_history(run, stream)


@PROPERTY
@given(stream=streams(), policy=policies(), mode=st.sampled_from(list(StreamMode)),
       prompt=PROMPTS)
def test_clean_stream_is_byte_identical_streamed(stream: Stream, policy: WindowPolicy,
                                                 mode: StreamMode, prompt: str) -> None:
    """STREAMED: every chunk gets exactly one answer, in order (the last one may wait behind
    timer overrides); the answers' bodies, cleared ones counting as nothing, are the input."""
    run = run_stream(FakeGuardrail(), stream, streamed=True, mode=mode, policy=policy,
                     prompt=prompt)
    assert run.client_bytes() == stream.raw
    assert run.processor.record.to_metadata()["outcome"] == "pass"
    if mode is StreamMode.SYNC:
        check_sync_release_history(run, stream)


# -- 2. sync mode with a violation ------------------------------------------------------------


def check_sync_violation(run: Run, stream: Stream) -> None:
    """The sync-mode promise for a stream with ``WORD`` at ``p`` (once, never elsewhere).

    Calls ``0..n-1`` pass, call ``n`` is the first whose window ``[s_n, e_n)`` contains the
    whole word, and blocks. Passing windows move the release limit to ``e_i - overlap``
    (``e_0`` for the fast first window; never ``e_i`` for reaching the end, since a later call
    exists), so when call ``n`` trips the limit is
    ``L* = max(0, e_0 if fast else e_0 - overlap, e_1 - overlap, ..., e_{n-1} - overlap)``.
    Events are released whole and in order, so the client receives exactly the original
    events whose text ends at or before ``L*`` (``R == text[:B]``, ``B`` the last content
    event boundary <= ``L*``; events without text next to them may go too), then
    ``BLOCK_FRAME`` once, ending the body. Consequences:

    * without the fast first window ``L* = s_n <= p``: nothing of the word, nor anything
      after the tripped window's start, is released;
    * with it, ``L* <= max(s_n, e_0)`` and ``L* <= e_{n-1}``: nothing of the tripped window's
      new text; ``R`` never contains the whole word, but can end with a part of it when the
      word straddles the first window's end (the first window passed without seeing it whole).

    Whether the word is seen whole at all depends on the overlap: a word of ``len(WORD)``
    characters is always inside some window iff ``overlap >= len(WORD) - 1``. With a smaller
    overlap a window boundary may cut it so that no window holds it; then the stream passes
    unchanged (the documented limit of windows), and the test checks that this is the reason.
    """
    text, policy = stream.text, run.policy
    position = text.index(WORD)
    calls = run.output_calls()
    spans = windows(calls, text, policy)
    check_sync_release_history(run, stream)
    if run.processor.record.to_metadata()["outcome"] == "pass":
        assert policy.overlap_chars < len(WORD) - 1
        assert run.client_bytes() == stream.raw
        assert not any(WORD in blocks[0] for blocks in calls)
        assert any(position < end < position + len(WORD) for _, end in spans)
        return
    assert run.processor.record.to_metadata()["outcome"] == "block"
    client = run.client_bytes()
    assert client.endswith(BLOCK_FRAME) and client.count(BLOCK_FRAME) == 1
    assert client.count(b"data: [DONE]") == 1
    if not run.streamed:
        assert run.body_answers()[-1] == (BLOCK_FRAME, True)
    prefix = client[:-len(BLOCK_FRAME)]
    released = split_events(prefix)
    assert released == stream.events[:len(released)]
    # The tripping call is the last one, and the first to see the word whole.
    assert WORD in calls[-1][0] and not any(WORD in blocks[0] for blocks in calls[:-1])
    tripped = len(spans) - 1
    start, end = spans[tripped]
    assert run.processor.record.to_metadata()["tripped_window"] == f"{CHANNEL}:{start}-{end}"
    new_from = spans[tripped - 1][1] if tripped else 0
    limit = released_limit(spans[:tripped], policy, text, final=None)
    r = content_of(prefix)
    boundary = max(b for b in stream.boundaries() if b <= limit)
    if run.prompt == "nowait":
        # The prompt verdict may still have held everything when the block came.
        assert r == text[:len(r)] and len(r) in stream.boundaries() and len(r) <= boundary
    else:
        assert r == text[:boundary]
    assert WORD not in r and len(r) <= new_from
    if policy.fast_first_window:
        assert len(r) <= max(start, spans[0][1] if tripped else 0)
        if len(r) > position:  # only a straddle of the first window's end
            assert len(r) <= spans[0][1] < position + len(WORD)
    else:
        assert len(r) <= start <= position
    assert run.processor.record.to_metadata()["chars_released"] == len(r)


@PROPERTY
@given(stream=streams(violating_text()), policy=policies(), prompt=PROMPTS)
def test_sync_violation_full_duplex(stream: Stream, policy: WindowPolicy, prompt: str) -> None:
    """See ``check_sync_violation``."""
    run = run_stream(FakeGuardrail(blocked=(WORD,)), stream, streamed=False,
                     mode=StreamMode.SYNC, policy=policy, prompt=prompt)
    check_sync_violation(run, stream)


@PROPERTY
@given(stream=streams(violating_text()), policy=policies(), prompt=PROMPTS)
def test_sync_violation_streamed(stream: Stream, policy: WindowPolicy, prompt: str) -> None:
    """See ``check_sync_violation``; the frame rides on the next chunk's answer and every
    later chunk is cleared."""
    run = run_stream(FakeGuardrail(blocked=(WORD,)), stream, streamed=True,
                     mode=StreamMode.SYNC, policy=policy, prompt=prompt)
    check_sync_violation(run, stream)


# -- 3. async mode with a violation -----------------------------------------------------------


def check_async_violation(run: Run, stream: Stream) -> None:
    """Async mode releases events as they complete, so a verdict can only end the stream at the
    next event boundary: the client gets whole original events, then either the rest of the
    stream (the body ended before a blocking verdict came back: async mode's documented risk;
    a call holding the word can then only be the last one, its verdict dropped) or
    ``BLOCK_FRAME`` once, as the very end. When the prompt verdict does not hold the answer,
    everything the tripped window saw had already been released. The frame can follow the
    upstream's own ``data: [DONE]`` (released before Envoy's end_of_stream came), where
    clients no longer read."""
    text = stream.text
    calls = run.output_calls()
    client = run.client_bytes()
    if run.processor.record.to_metadata()["outcome"] == "pass":
        assert client == stream.raw
        assert not any(WORD in blocks[0] for blocks in calls[:-1])
        return
    assert run.processor.record.to_metadata()["outcome"] == "block"
    assert client.endswith(BLOCK_FRAME) and client.count(BLOCK_FRAME) == 1
    if not run.streamed:
        assert run.body_answers()[-1] == (BLOCK_FRAME, True)
    prefix = client[:-len(BLOCK_FRAME)]
    released = split_events(prefix)
    assert released == stream.events[:len(released)]
    assert WORD in calls[-1][0] and not any(WORD in blocks[0] for blocks in calls[:-1])
    assert client.count(b"data: [DONE]") == 1 + (DONE in released)
    r = content_of(prefix)
    assert r == text[:len(r)]
    if run.policy.strategy is Strategy.WINDOWED and run.prompt != "nowait":
        _, end = windows(calls, text, run.policy)[-1]
        assert len(r) >= end


@PROPERTY
@given(stream=streams(violating_text()), policy=policies(), prompt=PROMPTS)
def test_async_violation_full_duplex(stream: Stream, policy: WindowPolicy, prompt: str) -> None:
    """See ``check_async_violation``."""
    run = run_stream(FakeGuardrail(blocked=(WORD,)), stream, streamed=False,
                     mode=StreamMode.ASYNC, policy=policy, prompt=prompt)
    check_async_violation(run, stream)


@PROPERTY
@given(stream=streams(violating_text()), policy=policies(), prompt=PROMPTS)
def test_async_violation_streamed(stream: Stream, policy: WindowPolicy, prompt: str) -> None:
    """See ``check_async_violation``."""
    run = run_stream(FakeGuardrail(blocked=(WORD,)), stream, streamed=True,
                     mode=StreamMode.ASYNC, policy=policy, prompt=prompt)
    check_async_violation(run, stream)


# -- 4. windows and their cost ----------------------------------------------------------------


@PROPERTY
@given(stream=streams(), policy=policies(), mode=st.sampled_from(list(StreamMode)),
       streamed=st.booleans())
def test_windowed_calls_tile_the_text_within_bounds(stream: Stream, policy: WindowPolicy,
                                                    mode: StreamMode, streamed: bool) -> None:
    """Windowed strategy, clean stream of ``L`` characters: the calls' windows tile the text
    (``s_i = max(0, e_{i-1} - overlap)``, see the module docstring), each block has at most
    ``window_chars + overlap_chars`` characters: ``window_chars`` new ones after a full
    overlap, more while the text checked so far is shorter than the overlap (the block is
    filled up to its size: ``e_i - e_{i-1} <= window + overlap - min(e_{i-1}, overlap)``).
    There are at most ``call_bound(L)`` calls and, in sync mode, at least
    ``ceil(L / (window_chars + overlap_chars))``, the last one reaching the end of the text
    (nothing is released unchecked). Async mode may end the body before the last text was
    checked."""
    run = run_stream(FakeGuardrail(), stream, streamed=streamed, mode=mode, policy=policy,
                     prompt="off")
    calls = run.output_calls()
    spans = windows(calls, stream.text, policy)
    length = len(stream.text)
    span = policy.window_chars + policy.overlap_chars
    assert all(len(block) <= span for blocks in calls for block in blocks)
    previous = 0
    for start, end in spans:
        assert 0 < end - previous <= span - min(previous, policy.overlap_chars)
        assert end - start <= span
        previous = end
    assert len(calls) <= call_bound(length, policy)
    if mode is StreamMode.SYNC:
        assert len(calls) >= math.ceil(length / span)
        assert previous == length
    assert run.client_bytes() == stream.raw


@PROPERTY
@given(stream=streams(), policy=policies(strategy=Strategy.CUMULATIVE),
       mode=st.sampled_from(list(StreamMode)), streamed=st.booleans())
def test_cumulative_calls_cover_everything_so_far(stream: Stream, policy: WindowPolicy,
                                                  mode: StreamMode, streamed: bool) -> None:
    """Cumulative strategy: every call's block is the whole text so far (``text[:e_i]``,
    growing), until ``max_stream_text_units`` would be exceeded. Each fake verdict costs 1 text
    unit per policy and each block here 1 (under 1,000 characters), so calls ``0..cap-1`` are
    cumulative and later ones windowed, continuing from the text checked so far. The number
    of calls has the same bound as windows (the same trigger)."""
    run = run_stream(FakeGuardrail(), stream, streamed=streamed, mode=mode, policy=policy,
                     prompt="off")
    calls = run.output_calls()
    cap = policy.max_stream_text_units
    previous = 0
    spans: list[tuple[int, int]] = []
    for blocks in calls[:cap]:
        (block,) = blocks
        assert len(block) > previous and stream.text[:len(block)] == block
        previous = len(block)
        spans.append((0, previous))
    end = previous
    for blocks in calls[cap:]:
        (block,) = blocks
        limit = released_limit(spans, policy, stream.text, final=None)
        start = max(0, min(limit, end - policy.overlap_chars))
        assert start + len(block) > end and stream.text[start:start + len(block)] == block
        assert len(block) <= policy.window_chars + policy.overlap_chars
        end = start + len(block)
        spans.append((start, end))
    assert run.processor.record.to_metadata().get("cumulative_cap_reached", False) == (len(calls) > cap)
    assert len(calls) <= call_bound(len(stream.text), policy)
    if mode is StreamMode.SYNC:
        assert end == len(stream.text)
        check_sync_release_history(run, stream)
    assert run.client_bytes() == stream.raw


# -- 5. masking -------------------------------------------------------------------------------


class EmailMaskingGuardrail(FakeGuardrail):
    """Masks like Bedrock's PII filter: every e-mail-like token of every block becomes
    ``{EMAIL}`` in that block's output (one output per block); a cut-off address is not
    recognised."""

    async def apply(self, guardrail: GuardrailRef, source: Source,
                    texts: Sequence[str]) -> GuardrailVerdict:
        verdict = await super().apply(guardrail, source, texts)
        if verdict.outcome is Outcome.PASS and any(EMAIL.search(t) for t in texts):
            return classify(bedrock_response("mask", [EMAIL.sub(MASK, t) for t in texts]))
        return verdict


@st.composite
def email_text(draw: st.DrawFn, longest: int, gap: int) -> str:
    """Filler and e-mail addresses of at most ``longest`` characters, a space either side of
    each and at least ``gap`` characters between two."""
    parts = [draw(texts(80))]
    room = longest - len("@example.com")
    for index in range(draw(st.integers(0, 4))):
        local = draw(st.one_of(  # the same address twice is common
            st.sampled_from(["a", "bob", "jane"]).map(lambda name: name[:room]),
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=room)))
        if index:
            parts.append(draw(st.one_of(st.integers(gap, gap + 3), st.integers(gap, gap + 80))
                              .flatmap(lambda n: st.text(alphabet=ALPHABET, min_size=n,
                                                         max_size=n))))
        parts.append(f" {local}@example.com ")
    parts.append(draw(texts(80)))
    return "".join(parts)


@st.composite
def masking_cases(draw: st.DrawFn, *, spaced: bool) -> tuple[WindowPolicy, Stream]:
    """Addresses no longer than the overlap; ``spaced``: no window can hold parts of two."""
    policy = draw(policies(min_overlap=len("a@example.com")))
    gap = policy.window_chars + policy.overlap_chars if spaced else 0
    stream = draw(streams(email_text(policy.overlap_chars, gap)))
    return policy, stream


def check_masking(run: Run, stream: Stream) -> None:
    """Sync mode, addresses of at most ``overlap`` characters (so each is inside the window
    whose release region holds its start): the client's events are the original ones, one for
    one, each valid JSON of the same shape with only ``delta.content`` changed, and their
    content concatenated is ``text`` with every address replaced by ``{EMAIL}`` (the whole
    placeholder in the event where the address starts, the rest of it dropped). No address
    reaches the client.

    No exception for the fast first window: it holds back the word it may end inside (its
    ``held_tail``), so an address straddling its end goes out with a later window, masked
    (``test_bug_fast_first_window_straddling_address_tail_is_released``).
    """
    text = stream.text
    client = run.client_bytes()
    out_events = split_events(client)
    assert len(out_events) == len(stream.events)
    for original, released in zip(stream.events, out_events):
        if original == DONE:
            assert released == DONE
            continue
        before = json.loads(original[len(b"data: "):-2])
        after = json.loads(released[len(b"data: "):-2])
        delta = before["choices"][0]["delta"]
        if "content" in delta and isinstance(delta["content"], str):
            delta["content"] = after["choices"][0]["delta"]["content"]
        assert after == before  # same keys, same values, only the content may differ
        if after["choices"][0]["delta"].get("content") == json.loads(
                original[len(b"data: "):-2])["choices"][0]["delta"].get("content"):
            assert released == original  # untouched events are not re-encoded
    content = content_of(client)
    assert content == EMAIL.sub(MASK, text)
    assert b"@" not in client
    if EMAIL.search(text):
        assert run.processor.record.to_metadata().get("masked", 0) >= 1
    check_sync_release_history(run, stream, masked=True)


@PROPERTY
@given(case=masking_cases(spaced=True), prompt=PROMPTS, streamed=st.booleans())
def test_sync_masking(case: tuple[WindowPolicy, Stream], prompt: str, streamed: bool) -> None:
    """See ``check_masking``; at most one address (or part of one) per window."""
    policy, stream = case
    run = run_stream(EmailMaskingGuardrail(blocked=()), stream, streamed=streamed,
                     mode=StreamMode.SYNC, policy=policy, prompt=prompt)
    check_masking(run, stream)


@PROPERTY
@given(case=masking_cases(spaced=False), prompt=PROMPTS, streamed=st.booleans())
@example(case=(WindowPolicy(window_chars=20, overlap_chars=13, min_chars=1,
                            fast_first_window=False),
               single_chunk_stream(" a@example.com  a@example.com  a@example.com ")),
         prompt="off", streamed=False)
def test_sync_masking_addresses_anywhere(case: tuple[WindowPolicy, Stream], prompt: str,
                                         streamed: bool) -> None:
    """See ``check_masking``; addresses anywhere, also several in one window."""
    policy, stream = case
    run = run_stream(EmailMaskingGuardrail(blocked=()), stream, streamed=streamed,
                     mode=StreamMode.SYNC, policy=policy, prompt=prompt)
    check_masking(run, stream)


# -- regressions ------------------------------------------------------------------------------


def test_bug_masked_window_misaligned_by_repeated_text() -> None:
    """Bug in ``masking.map_region``: the masked window is aligned with the original by
    difflib's longest-match heuristic. When the window's unmasked tail (a cut-off address, held
    back as overlap) repeats text that lies inside an earlier, masked address, the tail is
    aligned there: it is released early, and the address it belongs to is later dropped instead
    of masked. The client gets ``' {EMAIL}  {EMAIL}  bob@exa '``: part of an address that the
    guardrail would have masked, and one placeholder too few (found with
    ``test_sync_masking_addresses_anywhere``; shrunk and made readable)."""
    text = " bob@example.com  bob@example.com  bob@example.com "
    policy = WindowPolicy(window_chars=27, overlap_chars=15, min_chars=1,
                          fast_first_window=False)
    run = Run(EmailMaskingGuardrail(blocked=()), streamed=False, mode=StreamMode.SYNC,
              policy=policy, prompt="off")
    asyncio.run(run.play(single_chunk_stream(text)))
    # The first window, [0, 42), ends inside the third address; it releases [0, 27).
    assert run.output_calls()[0] == [text[:42]]
    assert content_of(run.client_bytes()) == " {EMAIL}  {EMAIL}  {EMAIL} "
    # The root cause: region [0, 27) of that window is " " + address + "  " + the start of
    # the second address, whose placeholder it carries; the next region starts at 33.
    assert map_region(text[:42], " {EMAIL}  {EMAIL}  bob@exa", 0, [], 27) == (
        [" {EMAIL}  {EMAIL}"], 33)


def test_bug_fast_first_window_straddling_address_tail_is_released() -> None:
    """Was: an address straddling the end ``e_0`` of the fast first window went out in part
    with that window (then a documented exception): ``jane@exa``, and the next windows, which
    could no longer mask what was out, let ``mple.com`` follow, so the client got the whole
    address (found with ``test_sync_masking``; issue 14, class 9). Now the first window holds
    back the word it may end inside (``held_tail``): it releases up to the space before
    ``jane@exa``, and the next window sees the address whole and masks it."""
    text = "0" * 31 + " jane@example.com " + "0" * 45
    policy = WindowPolicy(window_chars=20, overlap_chars=20, min_chars=1,
                          fast_first_window=True)
    run = Run(EmailMaskingGuardrail(blocked=()), streamed=False, mode=StreamMode.SYNC,
              policy=policy, prompt="off")
    asyncio.run(run.play(single_chunk_stream(text)))
    assert run.output_calls()[0] == [text[:40]]
    # The first window released "0" * 31 + " "; the second one sees the address whole.
    assert run.output_calls()[1] == [text[20:60]]
    assert "jane@example.com" in run.output_calls()[1][0]
    content = content_of(run.client_bytes())
    assert "jane@" not in content
    assert content == "0" * 31 + " {EMAIL} " + "0" * 45
