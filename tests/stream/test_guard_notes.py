"""The output guard's answers do not depend on the codecs' notes (``extproc.formats._common.Notes``,
which spare ``rewrite`` a second parse of each event).

Every format's recordings go through ``OutputGuard`` twice: with the real codec, and with every
note missed (``Unnoted``: ``extract`` only sees copies, so ``rewrite`` reads each event again, as
the codecs did before notes). Chunks are whole events (the decoder's whole-event path), the
whole recording at once, or 7-byte pieces; checks pass, mask (sync) or block, hard and soft,
after some events went out. Both runs must send the same bytes at the same points.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from extproc.domain.values import StreamMode
from extproc.domain.verdict import GuardrailVerdict, classify
from extproc.domain.windows import WindowPolicy
from extproc.eventstream import EventStreamDecoder
from extproc.formats import StreamCodec, StreamFormat, all_formats
from extproc.framing import Decoder
from extproc.observe.audit import AuditLog
from extproc.observe.metrics import NULL_RECORDER
from extproc.settings.values import StreamSettings
from extproc.stream.context import StreamContext
from extproc.stream.guard import OutputGuard
from extproc.stream.record import StreamRecord
from extproc.stream.sinks import Outbox
from tests.support import bedrock_response, settings
from tests.unit.test_formats_common import CONTENT_TYPES, FIXTURES_OF, Unnoted, fixture

# Small windows: the recordings' answers are 60 to 180 characters long.
POLICY = WindowPolicy(window_chars=24, overlap_chars=6, min_chars=12)


class UnnotedFormat:
    """A format whose stream codecs miss every note."""

    def __init__(self, fmt: StreamFormat) -> None:
        self._fmt = fmt
        self.name = fmt.name

    def stream_codec(self) -> StreamCodec:
        return Unnoted(self._fmt.stream_codec())

    def stream_decoder(self, content_type: str) -> Decoder | None:
        return self._fmt.stream_decoder(content_type)


class Sink:
    def __init__(self) -> None:
        self.out: list[tuple[str, bytes]] = []

    def release(self, data: bytes) -> None:
        self.out.append(("release", data))

    def finish(self, data: bytes, metadata: Mapping[str, Any]) -> None:
        self.out.append(("finish", data))

    def chunk_done(self, end_of_stream: bool) -> None:
        pass


class ScriptedGuardrail:
    """Answers each call with ``VERDICTS[verdict]`` (call number, texts), a loop turn later."""

    def __init__(self, verdict: str) -> None:
        self._verdict = verdict
        self.calls = 0

    async def apply(self, guardrail: Any, source: Any, texts: Sequence[str]) -> GuardrailVerdict:
        self.calls += 1
        await asyncio.sleep(0)
        return VERDICTS[self._verdict](self.calls, texts)

    def close(self) -> None:
        pass


def _mask(texts: Sequence[str]) -> GuardrailVerdict:
    if any("e" in t for t in texts):
        return classify(bedrock_response("mask", [t.replace("e", "{E}") for t in texts]))
    return classify(bedrock_response("pass"))


# call number, texts -> verdict
VERDICTS: dict[str, Callable[[int, Sequence[str]], GuardrailVerdict]] = {
    "pass": lambda call, texts: classify(bedrock_response("pass")),
    "mask": lambda call, texts: _mask(texts),
    "block-first": lambda call, texts: classify(bedrock_response("block")),
    "block-third": lambda call, texts: classify(
        bedrock_response("block" if call >= 3 else "pass")),
}


def shown(sent: bytes, name: str) -> bytes:
    """What the client reads of ``sent``: Bedrock InvokeModel's chunks hold base64 JSON."""
    if not name.endswith(".eventstream"):
        return sent
    out = b""
    for frame in EventStreamDecoder().feed(sent):
        payload = json.loads(frame.data or "{}")
        out += base64.b64decode(payload["bytes"]) if "bytes" in payload else frame.raw
    return out


def content_type(name: str) -> str:
    return CONTENT_TYPES[name.rsplit(".", 1)[-1]]


def chunkings(raw: bytes, decoder: Decoder) -> dict[str, list[bytes]]:
    events = [e.raw for e in decoder.feed(raw, end_of_stream=True)]
    assert b"".join(events) + decoder.flush() == raw
    return {"events": events, "whole": [raw],
            "7-bytes": [raw[i:i + 7] for i in range(0, len(raw), 7)]}


async def guarded(fmt: Any, chunks: list[bytes], mode: StreamMode, verdict: str,
                  soft: bool, kind: str) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    async def write(message: Any) -> None:
        pass

    sink = Sink()
    route = settings(stream_mode=mode, window=POLICY, soft_block=soft).default_route
    record = StreamRecord("testguardrail", "1")
    ctx = StreamContext(route, StreamSettings(max_held_bytes=0), 5.0, record, Outbox(write),
                        ScriptedGuardrail(verdict), NULL_RECORDER, AuditLog())
    guard = OutputGuard(ctx, fmt, sink, decoder=fmt.stream_decoder(kind), check_output=True)
    for number, chunk in enumerate(chunks):
        guard.on_chunk(chunk, False)
        for _ in range(number % 4):  # verdicts land at varying points
            await asyncio.sleep(0)
    guard.on_chunk(b"", True)
    for _ in range(100):
        await asyncio.sleep(0)
    guard.close()
    assert guard.finished
    return sink.out, record.to_metadata()


CASES = [(fmt, name) for fmt in all_formats() for name in FIXTURES_OF[fmt.name]]


@pytest.mark.parametrize(("fmt", "name"), CASES, ids=[n for _, n in CASES])
@pytest.mark.parametrize("mode", [StreamMode.SYNC, StreamMode.ASYNC], ids=lambda m: m.value)
@pytest.mark.parametrize("verdict", VERDICTS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
async def test_guard_sends_the_same_bytes_without_notes(fmt: StreamFormat, name: str,
                                                       mode: StreamMode, verdict: str,
                                                       soft: bool) -> None:
    raw = fixture(name)
    kind = content_type(name)
    decoder = fmt.stream_decoder(kind)
    assert decoder is not None
    for chunking, chunks in chunkings(raw, decoder).items():
        noted, stats = await guarded(fmt, chunks, mode, verdict, soft, kind)
        reread, reread_stats = await guarded(UnnotedFormat(fmt), chunks, mode, verdict, soft,
                                             kind)
        assert noted == reread, chunking
        assert stats == reread_stats
        sent = b"".join(data for _, data in noted)
        assert noted[-1][0] == "finish"
        if verdict == "pass" or (verdict == "mask" and mode is StreamMode.ASYNC):
            assert sent == raw  # async cannot apply masks
        elif verdict == "mask":
            assert stats.get("masked") and b"{E}" in shown(sent, name)
        else:
            assert stats["outcome"] == ("soft_block" if soft else "block")
            assert (b"Sorry." in shown(sent, name)) is soft  # the guardrail's message, as content
