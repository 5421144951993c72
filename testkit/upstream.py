"""Fake LLM upstream: a tiny, scriptable HTTP/1.1 server for demos and tests.

This module owns the *upstream side* of the demo and of the end-to-end tests:
a stdlib-only (asyncio streams) HTTP/1.1 server that sits behind Envoy and
plays the part of an OpenAI-compatible Chat Completions endpoint.

It offers two ways of answering a request:

* **Scripts** (``Script``): the response body is written with HTTP/1.1
  chunked transfer encoding, exactly one HTTP chunk per scripted write, with a
  scripted delay before each write and ``await writer.drain()`` after it.  This
  reproduces real chunk boundaries (an SSE event split mid-line, a multi-byte
  UTF-8 character split across writes, several events in one write ...).
  A request selects a script with the ``x-fake-script: <id>`` header (id from
  ``FakeLLM.register``) or carries it inline with
  ``x-fake-script-inline: <base64url JSON>`` (see ``inline_script_header``).

* **The default model** (no script header): ``POST .../chat/completions``
  answers from a small canned table keyed on the last user message (or echoes
  it), either as a realistic OpenAI SSE stream or as a ``chat.completion``
  JSON object; ``tools`` + "weather" produce a streamed tool call.

  It speaks the provider-native APIs the sidecar guards too, with the same
  canned answer (``answer_for`` of the last user text), streamed in the same
  word-sized pieces and pacing: Ollama ``/api/chat`` and ``/api/generate``
  (NDJSON unless ``"stream": false``), Gemini and Vertex AI
  ``.../models/{m}:streamGenerateContent`` (``alt=sse`` events or a JSON
  array) and ``:generateContent``, and Bedrock Runtime
  ``/model/{id}/converse``, ``/converse-stream``, ``/invoke`` and
  ``/invoke-with-response-stream`` (Anthropic Messages bodies; AWS event
  streams).  ``testkit.providers`` builds those bodies byte for byte as each
  provider writes them; ``FakeLLM._model_plan`` dispatches on the path.

Every request is recorded as a ``RequestRecord`` (headers, body, what was
written and when, whether the peer went away mid-response); tests wait on
records with ``FakeLLM.wait_for_record`` and other processes read them from
``GET /_records``.

Nothing is created at import time: servers exist only inside ``FakeLLM``
instances (``start()`` runs one in a daemon thread with its own event loop)
or under the CLI (``python -m testkit.upstream --listen HOST:PORT``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import http
import itertools
import json
import logging
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from testkit import providers

__all__ = [
    "CANNED_ANSWERS",
    "DEFAULT_SSE_CONTENT_TYPE",
    "HEADER_DELAY_MS",
    "HEADER_SCRIPT",
    "HEADER_SCRIPT_INLINE",
    "FakeLLM",
    "RequestRecord",
    "Script",
    "answer_for",
    "chat_chunk",
    "inline_script_header",
    "main",
    "parse_inline_script",
    "sse_data",
]

log = logging.getLogger(__name__)

#: Request header selecting a registered script by id.
HEADER_SCRIPT = "x-fake-script"
#: Request header carrying a whole script (base64url of JSON).
HEADER_SCRIPT_INLINE = "x-fake-script-inline"
#: Request header overriding the default model's per-write delay (ms).
HEADER_DELAY_MS = "x-fake-delay-ms"

#: Content type of the default model's streams (what api.openai.com sends).
DEFAULT_SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"

_MAX_LINE = 1 << 20  # request line / header line (an inline script can be long)
_MAX_HEADERS = 256
_MAX_BODY = 64 << 20
_READ_SIZE = 1 << 16

# --------------------------------------------------------------------------
# Helpers for building SSE payloads
# --------------------------------------------------------------------------


def _compact_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sse_data(obj: dict[str, Any] | str) -> bytes:
    """One SSE event: ``data: <compact JSON or the string>\\n\\n`` as UTF-8."""
    payload = obj if isinstance(obj, str) else _compact_json(obj)
    return f"data: {payload}\n\n".encode()


def chat_chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish_reason: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    id: str = "chatcmpl-test",  # noqa: A002 - mirrors the OpenAI field name
    model: str = "demo",
    created: int = 0,
) -> dict[str, Any]:
    """An OpenAI ``chat.completion.chunk`` object with a single choice.

    ``delta`` only carries the keys that were given (``role``, ``content``,
    ``tool_calls``), so ``chat_chunk(finish_reason="stop")`` has ``delta: {}``.
    """
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
    }


# --------------------------------------------------------------------------
# Scripts
# --------------------------------------------------------------------------


def _check_header_text(text: str, what: str) -> None:
    if "\r" in text or "\n" in text:
        raise ValueError(f"{what} must not contain CR/LF: {text!r}")
    try:
        text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} must be latin-1 encodable: {text!r}") from exc


@dataclass(frozen=True)
class Script:
    """A scripted response.

    ``chunks``: the body writes; each becomes exactly one HTTP/1.1 chunk
    (``str`` items are UTF-8 encoded, empty chunks are rejected because a
    zero-length chunk would end the body).

    ``delays_ms``: a number is the delay before *every* chunk write; a tuple
    gives the delay before each chunk (``len(chunks)`` entries) optionally
    followed by one more entry: the delay before the end of the body.

    ``status`` / ``headers``: the response status and headers (the server adds
    ``transfer-encoding: chunked`` itself; ``content-length`` and
    ``transfer-encoding`` are not allowed here).

    ``trailing``: when true the body ends with the terminating zero-length
    chunk; when false the server aborts the connection after the last write
    instead (an upstream that dies mid-stream).

    ``fixed_length``: send ``content-length`` (the sum of the chunks) instead of
    chunked framing; the chunks are still separate writes, with their delays.
    """

    chunks: tuple[bytes, ...]
    delays_ms: tuple[float, ...] | float = 0.0
    status: int = 200
    headers: tuple[tuple[str, str], ...] = (("content-type", "text/event-stream"),)
    trailing: bool = True
    fixed_length: bool = False

    def __post_init__(self) -> None:
        chunks: list[bytes] = []
        for i, chunk in enumerate(self.chunks):
            data = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
            if not data:
                raise ValueError(f"Script chunk {i} is empty (would end the chunked body)")
            chunks.append(data)
        object.__setattr__(self, "chunks", tuple(chunks))

        delays = self.delays_ms
        if isinstance(delays, (int, float)):
            if delays < 0:
                raise ValueError("delays_ms must be >= 0")
            object.__setattr__(self, "delays_ms", float(delays))
        else:
            norm = tuple(float(d) for d in delays)
            if len(norm) not in (len(chunks), len(chunks) + 1):
                raise ValueError(
                    f"delays_ms has {len(norm)} entries; expected {len(chunks)} "
                    f"(one per chunk) or {len(chunks) + 1} (plus the end of body)"
                )
            if any(d < 0 for d in norm):
                raise ValueError("delays_ms must be >= 0")
            object.__setattr__(self, "delays_ms", norm)

        if not 100 <= int(self.status) <= 999:
            raise ValueError(f"bad status {self.status!r}")
        object.__setattr__(self, "status", int(self.status))

        headers = tuple((str(k).lower(), str(v)) for k, v in self.headers)
        for name, value in headers:
            if not name or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9a-z]+", name):
                raise ValueError(f"bad header name {name!r}")
            if name in ("content-length", "transfer-encoding"):
                raise ValueError(f"script header {name!r} is managed by the server")
            _check_header_text(value, f"header {name!r}")
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "trailing", bool(self.trailing))

    def delay_before(self, index: int) -> float:
        """Delay in ms before write ``index`` (``len(chunks)`` = end of body)."""
        if isinstance(self.delays_ms, tuple):
            if index < len(self.delays_ms):
                return self.delays_ms[index]
            return 0.0
        return self.delays_ms if index < len(self.chunks) else 0.0


def _b64url_decode(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64_decode_any(text: str) -> bytes:
    text = text.strip()
    padded = text + "=" * (-len(text) % 4)
    if "-" in text or "_" in text:
        return base64.urlsafe_b64decode(padded)
    return base64.b64decode(padded, validate=True)


def inline_script_header(script: Script) -> str:
    """The ``x-fake-script-inline`` header value that carries ``script``.

    base64url (unpadded) of JSON ``{"chunks": [<base64>...], "delay_ms": n | [n...],
    "status": n, "headers": [[k, v]...], "trailing": bool, "fixed_length": bool}``.
    """
    doc = {
        "chunks": [base64.b64encode(c).decode("ascii") for c in script.chunks],
        "delay_ms": list(script.delays_ms)
        if isinstance(script.delays_ms, tuple)
        else script.delays_ms,
        "status": script.status,
        "headers": [list(h) for h in script.headers],
        "trailing": script.trailing,
        "fixed_length": script.fixed_length,
    }
    raw = _compact_json(doc).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def parse_inline_script(value: str) -> Script:
    """Parse an ``x-fake-script-inline`` header value (raises ``ValueError``)."""
    try:
        doc = json.loads(_b64url_decode(value))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{HEADER_SCRIPT_INLINE}: not base64url JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("chunks"), list):
        raise ValueError(f"{HEADER_SCRIPT_INLINE}: expected an object with a 'chunks' list")
    try:
        chunks = tuple(_b64_decode_any(str(c)) for c in doc["chunks"])
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{HEADER_SCRIPT_INLINE}: bad base64 chunk ({exc})") from exc
    delay = doc.get("delay_ms", doc.get("delays_ms", 0.0))
    delays: tuple[float, ...] | float
    if isinstance(delay, list):
        delays = tuple(float(d) for d in delay)
    else:
        delays = float(delay or 0.0)
    kwargs: dict[str, Any] = {
        "chunks": chunks,
        "delays_ms": delays,
        "status": int(doc.get("status", 200)),
        "trailing": bool(doc.get("trailing", True)),
        "fixed_length": bool(doc.get("fixed_length", False)),
    }
    if "headers" in doc:
        headers = doc["headers"]
        if not isinstance(headers, list) or not all(
            isinstance(h, list) and len(h) == 2 for h in headers
        ):
            raise ValueError(f"{HEADER_SCRIPT_INLINE}: 'headers' must be [[name, value], ...]")
        kwargs["headers"] = tuple((str(k), str(v)) for k, v in headers)
    return Script(**kwargs)


# --------------------------------------------------------------------------
# Canned answers of the default model
# --------------------------------------------------------------------------

_LONG_PARAGRAPHS = (
    "Lighthouses have guided sailors along dangerous coastlines for more than two "
    "thousand years. The earliest known example, the Pharos of Alexandria, used an "
    "open fire at the top of a stone tower, and its light was said to be visible "
    "from many miles out at sea.",
    "For centuries the light itself was the weak point. Wood fires, coal braziers and "
    "tallow candles produced smoke and soot that dimmed the glass, and keepers spent "
    "long nights trimming wicks and polishing reflectors so that the beam would not "
    "fade before dawn.",
    "The great change came in 1822, when Augustin Fresnel designed a lens built from "
    "concentric rings of glass prisms. A Fresnel lens gathers light that would "
    "otherwise escape sideways and bends it into a narrow horizontal beam, which "
    "allowed a single oil lamp to be seen twenty miles away.",
    "Each lighthouse was also given its own signature. Some flash once every few "
    "seconds, others show groups of flashes, alternate colours or stay dark for "
    "precise intervals. Navigators compare what they see with the light list on "
    "their charts and know at once which headland lies ahead.",
    "Keeping a light was demanding work. Keepers and their families lived at remote "
    "stations, hauled fuel up narrow spiral stairs, wound the clockwork that turned "
    "the lens, and recorded the weather in logbooks several times a night. In fog "
    "they sounded horns, bells or sirens for hours on end.",
    "Electrification in the twentieth century made the stations far easier to run. "
    "Automatic lamp changers, light sensors and radio monitoring meant that a "
    "keeper no longer needed to be present, and by the end of the century almost "
    "every light in the world had been automated.",
    "Today satellite navigation tells a ship its position to within a few metres, yet "
    "lighthouses remain in service. Electronics can fail, and a bright, reliable "
    "light on a known rock is still the simplest way to confirm where you are when "
    "the coast is close and the night is dark.",
    "Many of the old towers have found new lives as museums, guest houses and "
    "observation points. Volunteers restore the lenses, repaint the lanterns and "
    "tell visitors the stories of the keepers who once climbed those stairs every "
    "evening at sunset.",
    "If you visit one, look up at the lantern room and notice how much engineering "
    "is packed into so small a space: the lens, the rotating pedestal, the "
    "ventilation that carries away heat, and the gallery where keepers once stood "
    "to clean salt from the glass.",
    "Lighthouse engineering also pushed construction forward. Towers were built on "
    "wave-swept reefs where masons could only work for a few hours at low tide, "
    "and the interlocking granite blocks developed for those sites later shaped "
    "the design of harbour walls, bridges and breakwaters around the world.",
    "It is a fitting reminder that some of the most important safety systems are the "
    "quiet ones, doing the same simple job every night for generations so that "
    "everyone reaches the harbour safely.",
)


def _build_long_answer() -> str:
    return "\n\n".join(_LONG_PARAGRAPHS)


#: keyword -> canned answer; the first keyword (in this order) found as a word
#: in the last user message wins.
CANNED_ANSWERS: Mapping[str, str] = MappingProxyType(
    {
        "project": (
            "Happy to help. The initiative you are asking about is internally "
            "code-named Project Nightingale, and it is expected to reach the first "
            "pilot customers early next quarter."
        ),
        "email": (
            "You can reach our account manager Jane Doe at jane.doe@example.com, "
            "and she usually replies within one business day."
        ),
        "phone": (
            "Our support line is +1 206 555 0100 and it is staffed from 8am to 6pm "
            "Pacific time on weekdays."
        ),
        "ticket": (
            "I have opened ticket TKT-123456 for your request, and an engineer will "
            "follow up with you shortly."
        ),
        "long": _build_long_answer(),
        "weather": (
            "I do not have access to live weather data, but any weather service or "
            "app can give you the current forecast for your location."
        ),
    }
)

_KEYWORD_RES = tuple(
    (kw, re.compile(rf"\b{re.escape(kw)}(?:s|es)?\b", re.IGNORECASE)) for kw in CANNED_ANSWERS
)


def answer_for(message: str) -> str:
    """The default model's text answer to a user message."""
    for keyword, pattern in _KEYWORD_RES:
        if pattern.search(message):
            return CANNED_ANSWERS[keyword]
    return f"You said: {message}"


def _split_words(text: str, words_per_chunk: int) -> list[str]:
    """Split ``text`` into pieces of a few words; ``"".join(pieces) == text``."""
    if not text:
        return []
    tokens = re.findall(r"\S+\s*", text)
    lead = text[: len(text) - len(text.lstrip())]
    if not tokens:
        return [text]
    tokens[0] = lead + tokens[0]
    n = max(1, words_per_chunk)
    pieces = ["".join(tokens[i : i + n]) for i in range(0, len(tokens), n)]
    assert "".join(pieces) == text
    return pieces


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            str(p.get("text", ""))
            for p in content
            if isinstance(p, Mapping) and p.get("type") in ("text", "input_text")
        ]
        return " ".join(parts)
    return ""


def _count_words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What the fake upstream saw and did for one request.

    Times are ``time.monotonic()`` seconds in the server process.
    ``chunks_written`` / ``bytes_written`` / ``chunks`` count body writes
    (payload bytes, without chunk framing).  ``peer_closed`` is set when the
    client went away before the response was complete; ``closed_after_chunks``
    is then the number of body writes that had been made.  ``completed`` means
    every scripted write was made (and the terminating chunk, if any);
    ``finished`` means the server is done with this request either way.
    """

    seq: int
    connection_id: int
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float
    kind: str = "model"  # "script" | "inline" | "model" | "error"
    script_id: str | None = None
    status: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    chunks_written: int = 0
    bytes_written: int = 0
    chunks: list[bytes] = field(default_factory=list)
    write_times: list[float] = field(default_factory=list)
    headers_sent_at: float | None = None
    peer_closed: bool = False
    closed_after_chunks: int | None = None
    closed_at: float | None = None
    completed: bool = False
    finished: bool = False
    finished_at: float | None = None
    error: str | None = None

    def header(self, name: str) -> str | None:
        """First value of request header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        """The request body parsed as JSON."""
        return json.loads(self.body)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (bytes as base64 plus a lossy text rendering)."""
        return {
            "seq": self.seq,
            "connection_id": self.connection_id,
            "method": self.method,
            "path": self.path,
            "headers": [list(h) for h in self.headers],
            "body_b64": base64.b64encode(self.body).decode("ascii"),
            "body_text": self.body.decode("utf-8", "replace"),
            "kind": self.kind,
            "script_id": self.script_id,
            "status": self.status,
            "response_headers": [list(h) for h in self.response_headers],
            "chunks_written": self.chunks_written,
            "bytes_written": self.bytes_written,
            "chunks_b64": [base64.b64encode(c).decode("ascii") for c in self.chunks],
            "received_at": self.received_at,
            "headers_sent_at": self.headers_sent_at,
            "write_times": list(self.write_times),
            "write_offsets_ms": [(t - self.received_at) * 1000.0 for t in self.write_times],
            "peer_closed": self.peer_closed,
            "closed_after_chunks": self.closed_after_chunks,
            "closed_at": self.closed_at,
            "completed": self.completed,
            "finished": self.finished,
            "finished_at": self.finished_at,
            "error": self.error,
        }


# --------------------------------------------------------------------------
# HTTP/1.1 plumbing
# --------------------------------------------------------------------------


class _BadRequest(Exception):
    pass


class _PeerGone(Exception):
    pass


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def path(self) -> str:
        return urlsplit(self.target).path or "/"

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)


@dataclass
class _Plan:
    """A response to send: either chunked writes or one fixed-length body."""

    status: int
    headers: list[tuple[str, str]]
    writes: list[bytes]
    delays_s: list[float]  # before each write; optional extra entry: before end
    chunked: bool = True
    trailing: bool = True


class _Conn:
    """One client connection: a reader with our own push-back buffer."""

    def __init__(
        self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.id = conn_id
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False

    async def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = await self.reader.read(_READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def readline(self) -> bytes:
        """A line including its ``\\n``; b"" on EOF with nothing buffered."""
        start = 0
        while True:
            idx = self.buf.find(b"\n", start)
            if idx >= 0:
                line = bytes(self.buf[: idx + 1])
                del self.buf[: idx + 1]
                return line
            if len(self.buf) > _MAX_LINE:
                raise _BadRequest("line too long")
            start = len(self.buf)
            if not await self._fill():
                if self.buf:
                    raise _PeerGone("EOF in the middle of a line")
                return b""

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise _PeerGone("EOF in the middle of a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def watch_peer(self) -> None:
        """Return once the peer has closed (EOF) or reset the connection.

        Bytes that arrive meanwhile (a pipelined next request) are kept.
        Cancelling this is safe: StreamReader keeps data it has not returned.
        """
        while await self._fill():
            pass

    def peer_gone(self) -> bool:
        return self.eof or self.writer.transport.is_closing()


async def _read_request(conn: _Conn) -> _Request | None:
    while True:
        line = await conn.readline()
        if not line:
            return None
        if line.strip():
            break
    if not line.endswith(b"\n"):
        raise _PeerGone("incomplete request line")
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        raise _BadRequest(f"bad request line {line!r}")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(f"unsupported version {version!r}")
    if target.startswith(("http://", "https://")):
        split = urlsplit(target)
        target = (split.path or "/") + (f"?{split.query}" if split.query else "")

    headers: list[tuple[str, str]] = []
    while True:
        line = await conn.readline()
        if not line:
            raise _PeerGone("EOF in headers")
        if line in (b"\r\n", b"\n"):
            break
        if len(headers) >= _MAX_HEADERS:
            raise _BadRequest("too many headers")
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(f"bad header line {line!r}")
        headers.append((name.lower(), value.strip()))

    def get(name: str) -> str | None:
        for key, val in headers:
            if key == name:
                return val
        return None

    conn_tokens = {t.strip().lower() for t in (get("connection") or "").split(",")}
    if version == "HTTP/1.1":
        keep_alive = "close" not in conn_tokens
    else:
        keep_alive = "keep-alive" in conn_tokens

    te = (get("transfer-encoding") or "").lower()
    cl = get("content-length")
    chunked = bool(te) and te.split(",")[-1].strip() == "chunked"
    if te and not chunked:
        raise _BadRequest(f"unsupported transfer-encoding {te!r}")
    has_body = chunked or (cl is not None and cl.strip() != "0")
    if has_body and (get("expect") or "").lower() == "100-continue":
        conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await conn.writer.drain()

    body = b""
    if chunked:
        parts_: list[bytes] = []
        total = 0
        while True:
            size_line = await conn.readline()
            if not size_line:
                raise _PeerGone("EOF in chunked body")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise _BadRequest(f"bad chunk size {size_line!r}") from exc
            if size == 0:
                while True:  # trailers
                    trailer = await conn.readline()
                    if not trailer:
                        raise _PeerGone("EOF in trailers")
                    if trailer in (b"\r\n", b"\n"):
                        break
                break
            total += size
            if total > _MAX_BODY:
                raise _BadRequest("body too large")
            parts_.append(await conn.readexactly(size))
            if (await conn.readline()) not in (b"\r\n", b"\n"):
                raise _BadRequest("missing CRLF after chunk")
        body = b"".join(parts_)
    elif cl is not None:
        try:
            length = int(cl.strip())
        except ValueError as exc:
            raise _BadRequest(f"bad content-length {cl!r}") from exc
        if length < 0 or length > _MAX_BODY:
            raise _BadRequest(f"bad content-length {cl!r}")
        body = await conn.readexactly(length) if length else b""
    return _Request(method.upper(), target, version, headers, body, keep_alive)


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _response_head(
    status: int,
    headers: Iterable[tuple[str, str]],
    *,
    content_length: int | None,
    keep_alive: bool,
) -> bytes:
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    names = set()
    for name, value in headers:
        names.add(name.lower())
        lines.append(f"{name}: {value}")
    if "server" not in names:
        lines.append("server: fake-llm")
    if content_length is None:
        lines.append("transfer-encoding: chunked")
    else:
        lines.append(f"content-length: {content_length}")
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_plan(status: int, obj: Any, delay_s: float = 0.0) -> _Plan:
    body = json.dumps(obj, ensure_ascii=False).encode()
    return _Plan(
        status=status,
        headers=[("content-type", "application/json")],
        writes=[body],
        delays_s=[delay_s],
        chunked=False,
    )


def _error_plan(status: int, message: str, err_type: str = "invalid_request_error") -> _Plan:
    return _json_plan(
        status, {"error": {"message": message, "type": err_type, "param": None, "code": None}}
    )


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class FakeLLM:
    """A scriptable fake OpenAI-compatible upstream (see the module docstring).

    Thread-safe for the test side: ``register``, ``records``,
    ``wait_for_record`` and ``record_for_script`` may be called from any thread
    while the server runs in its own daemon thread (``start``/``stop``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token_delay_ms: float = 20.0,
        *,
        words_per_chunk: int = 3,
    ) -> None:
        self.host = host
        self.port = port
        self.token_delay_ms = float(token_delay_ms)
        self.words_per_chunk = int(words_per_chunk)
        self._cond = threading.Condition()
        self._records: list[RequestRecord] = []
        self._scripts: dict[str, Script] = {}
        self._script_ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._bound_port: int | None = None
        self._thread_error: BaseException | None = None

    # ---- public API ------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000`` (append ``/v1`` for SDKs)."""
        if self._bound_port is None:
            raise RuntimeError("FakeLLM is not running")
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self._bound_port}"

    @property
    def bound_port(self) -> int | None:
        return self._bound_port

    def register(self, script: Script) -> str:
        """Register ``script``; requests with ``x-fake-script: <id>`` get it."""
        if not isinstance(script, Script):
            raise TypeError(f"expected Script, got {type(script).__name__}")
        with self._cond:
            script_id = f"script-{next(self._script_ids)}"
            self._scripts[script_id] = script
        return script_id

    def script(self, script_id: str) -> Script:
        with self._cond:
            return self._scripts[script_id]

    @property
    def records(self) -> list[RequestRecord]:
        """A snapshot list of all request records so far (oldest first)."""
        with self._cond:
            return list(self._records)

    def clear_records(self) -> None:
        with self._cond:
            self._records.clear()

    def wait_for_record(
        self, predicate: Callable[[RequestRecord], bool], timeout: float = 30.0
    ) -> RequestRecord:
        """Block until some record satisfies ``predicate`` and return it.

        The predicate is re-evaluated whenever any record changes (it runs
        under the records lock, so it sees consistent records).  Raises
        ``TimeoutError`` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for record in self._records:
                    if predicate(record):
                        return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no matching request record after {timeout}s "
                        f"({len(self._records)} records)"
                    )
                self._cond.wait(remaining)

    def records_for_script(self, script_id: str) -> list[RequestRecord]:
        """All records of requests that selected ``script_id`` (``"inline"`` for inline scripts)."""
        with self._cond:
            return [r for r in self._records if r.script_id == script_id]

    def record_for_script(
        self, script_id: str, timeout: float = 30.0, *, finished: bool = True
    ) -> RequestRecord:
        """Wait for the (first) record of ``script_id``; by default until it is finished."""
        return self.wait_for_record(
            lambda r: r.script_id == script_id and (r.finished or not finished), timeout
        )

    def start(self) -> int:
        """Serve from a daemon thread with its own event loop; return the bound port."""
        if self._thread is not None:
            raise RuntimeError("FakeLLM already started")
        ready = threading.Event()
        self._thread_error = None

        def on_started(port: int) -> None:
            ready.set()

        def run() -> None:
            try:
                asyncio.run(self._serve(on_started))
            except BaseException as exc:  # never let a thread exception escape
                self._thread_error = exc
                if ready.is_set():
                    log.exception("fake-llm server thread failed")
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name="fake-llm", daemon=True)
        self._thread.start()
        ready.wait(30)
        if self._thread_error is not None or self._bound_port is None:
            self._thread.join(5)
            self._thread = None
            err = self._thread_error or RuntimeError("fake-llm did not start")
            raise err
        return self._bound_port

    def stop(self) -> None:
        """Stop serving: close the listener and every connection, join the thread."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(30)
        self._thread = None

    def __enter__(self) -> FakeLLM:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- event-loop side -------------------------------------------------

    async def _serve(
        self, started: Callable[[int], None], stop_event: asyncio.Event | None = None
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = stop_event if stop_event is not None else asyncio.Event()
        server = await asyncio.start_server(
            self._handle_connection, self.host, self.port, limit=_MAX_LINE * 2
        )
        try:
            self._bound_port = int(server.sockets[0].getsockname()[1])
            started(self._bound_port)
            await self._stop_event.wait()
        finally:
            server.close()
            tasks = list(self._conn_tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()
            self._loop = None
            self._stop_event = None

    def _update(self, record: RequestRecord, **changes: Any) -> None:
        with self._cond:
            for key, value in changes.items():
                setattr(record, key, value)
            self._cond.notify_all()

    async def _handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        conn = _Conn(next(self._conn_ids), reader, writer)
        aborted = False
        try:
            while True:
                try:
                    request = await _read_request(conn)
                except _PeerGone:
                    break
                except _BadRequest as exc:
                    head = _response_head(
                        400, [("content-type", "text/plain")], content_length=len(str(exc)),
                        keep_alive=False,
                    )
                    writer.write(head + str(exc).encode())
                    await writer.drain()
                    break
                if request is None:
                    break
                keep, aborted = await self._dispatch(conn, request)
                if not keep or aborted:
                    break
        except asyncio.CancelledError:
            # Only stop() cancels connection tasks.  Finish normally: asyncio
            # (3.11) logs an error when a client_connected_cb task ends cancelled.
            aborted = True
        except (ConnectionError, OSError):
            aborted = True
        finally:
            self._conn_tasks.discard(task)
            await self._close_writer(writer, abort=aborted)

    @staticmethod
    async def _close_writer(writer: asyncio.StreamWriter, *, abort: bool) -> None:
        if abort:
            writer.transport.abort()
        else:
            writer.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(writer.wait_closed(), 2.0)
        if not writer.transport.is_closing():  # pragma: no cover - belt and braces
            writer.transport.abort()

    async def _dispatch(self, conn: _Conn, request: _Request) -> tuple[bool, bool]:
        """Answer one request; return (keep_alive, aborted)."""
        # Internal endpoints (not recorded) unless a script was asked for.
        if (
            request.path.startswith("/_")
            and request.header(HEADER_SCRIPT) is None
            and request.header(HEADER_SCRIPT_INLINE) is None
        ):
            plan = self._internal(request)
            if plan is not None:
                return await self._send_untracked(conn, plan, request.keep_alive), False

        record = RequestRecord(
            seq=next(self._seq),
            connection_id=conn.id,
            method=request.method,
            path=request.target,
            headers=list(request.headers),
            body=request.body,
            received_at=time.monotonic(),
        )
        with self._cond:
            self._records.append(record)
            self._cond.notify_all()
        try:
            plan = self._plan(request, record)
            return await self._send(conn, record, plan, request.keep_alive)
        finally:
            changes: dict[str, Any] = {"finished": True, "finished_at": time.monotonic()}
            if not record.completed and not record.peer_closed and record.error is None:
                changes["error"] = "response interrupted (server stopping?)"
            self._update(record, **changes)

    # ---- choosing a response ---------------------------------------------

    def _plan(self, request: _Request, record: RequestRecord) -> _Plan:
        script_id = request.header(HEADER_SCRIPT)
        inline = request.header(HEADER_SCRIPT_INLINE)
        if script_id is not None:
            with self._cond:
                script = self._scripts.get(script_id)
            self._update(record, kind="script", script_id=script_id)
            if script is None:
                self._update(record, kind="error", error=f"unknown script id {script_id!r}")
                return _error_plan(404, f"fake-llm: unknown script id {script_id!r}", "fake_llm")
            return self._script_plan(script)
        if inline is not None:
            self._update(record, kind="inline", script_id="inline")
            try:
                script = parse_inline_script(inline)
            except (ValueError, TypeError) as exc:
                self._update(record, kind="error", error=str(exc))
                return _error_plan(400, f"fake-llm: {exc}", "fake_llm")
            return self._script_plan(script)
        self._update(record, kind="model")
        return self._model_plan(request, record)

    @staticmethod
    def _script_plan(script: Script) -> _Plan:
        n = len(script.chunks)
        return _Plan(
            status=script.status,
            headers=list(script.headers),
            writes=list(script.chunks),
            delays_s=[script.delay_before(i) / 1000.0 for i in range(n + 1)],
            chunked=not script.fixed_length,
            trailing=script.trailing,
        )

    def _internal(self, request: _Request) -> _Plan | None:
        path = request.path
        if path == "/_records" and request.method == "GET":
            script = request.query.get("script", [None])[0]
            with self._cond:
                recs = [r.to_dict() for r in self._records if script in (None, r.script_id)]
            return _json_plan(200, recs)
        if path == "/_records" and request.method == "DELETE":
            self.clear_records()
            return _json_plan(200, {"cleared": True})
        if path == "/_scripts" and request.method == "POST":
            try:
                doc = json.loads(request.body or b"{}")
                value = base64.urlsafe_b64encode(_compact_json(doc).encode()).decode()
                script_id = self.register(parse_inline_script(value))
            except (ValueError, TypeError) as exc:
                return _error_plan(400, f"fake-llm: {exc}", "fake_llm")
            return _json_plan(200, {"id": script_id})
        if path in ("/_health", "/_ready") and request.method in ("GET", "HEAD"):
            return _json_plan(200, {"ok": True})
        return None

    def _model_plan(self, request: _Request, record: RequestRecord) -> _Plan:
        path = request.path.rstrip("/")
        if path.endswith("/models") and request.method == "GET":
            return _json_plan(
                200,
                {
                    "object": "list",
                    "data": [{"id": "demo", "object": "model", "created": 0,
                              "owned_by": "fake-llm"}],
                },
            )
        route = providers.match_route(request.method, request.path, request.query)
        if route is not None:
            return self._provider_plan(request, record, route)
        if not path.endswith("/chat/completions"):
            self._update(record, error="no such route")
            return _error_plan(404, f"fake-llm: no route for {request.method} {request.path}")
        if request.method != "POST":
            self._update(record, error="method not allowed")
            return _error_plan(405, "fake-llm: use POST for chat completions")
        try:
            doc = json.loads(request.body or b"null")
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
            self._update(record, error="bad chat completions body")
            return _error_plan(400, "fake-llm: expected a JSON body with a 'messages' list")

        delay_s = self._delay_ms(request) / 1000.0

        messages = [m for m in doc["messages"] if isinstance(m, Mapping)]
        user_text = next(
            (_message_text(m) for m in reversed(messages) if m.get("role") == "user"), ""
        )
        model = str(doc.get("model") or "demo")
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        prompt_tokens = max(1, sum(_count_words(_message_text(m)) for m in messages))

        tool_call: tuple[str, str, str] | None = None  # (call id, name, arguments)
        tools = doc.get("tools")
        if (
            isinstance(tools, list)
            and tools
            and doc.get("tool_choice") != "none"
            and re.search(r"\bweather\b", user_text, re.IGNORECASE)
        ):
            tool_call = (
                f"call_{uuid.uuid4().hex[:24]}",
                _pick_tool_name(tools),
                _weather_arguments(user_text),
            )
            answer = ""
            completion_tokens = max(1, _count_words(tool_call[2]))
        else:
            answer = answer_for(user_text)
            completion_tokens = max(1, _count_words(answer))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

        if not doc.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": answer, "refusal": None}
            finish = "stop"
            if tool_call is not None:
                message["content"] = None
                message["tool_calls"] = [
                    {
                        "id": tool_call[0],
                        "type": "function",
                        "function": {"name": tool_call[1], "arguments": tool_call[2]},
                    }
                ]
                finish = "tool_calls"
            return _json_plan(
                200,
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                    ],
                    "usage": usage,
                    "system_fingerprint": None,
                },
                delay_s,
            )

        stream_options = doc.get("stream_options")
        include_usage = isinstance(stream_options, Mapping) and bool(
            stream_options.get("include_usage")
        )
        common: dict[str, Any] = {"id": completion_id, "model": model, "created": created}

        def event(**kwargs: Any) -> dict[str, Any]:
            obj = chat_chunk(**kwargs, **common)
            if include_usage:
                obj["usage"] = None
            return obj

        events: list[dict[str, Any] | str] = []
        if tool_call is not None:
            call_id, name, arguments = tool_call
            first = event(
                role="assistant",
                tool_calls=[
                    {
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ],
            )
            first["choices"][0]["delta"]["content"] = None
            events.append(first)
            for i in range(0, len(arguments), 8):
                events.append(
                    event(tool_calls=[
                        {"index": 0, "function": {"arguments": arguments[i : i + 8]}}])
                )
            events.append(event(finish_reason="tool_calls"))
        else:
            events.append(event(role="assistant", content=""))
            for piece in _split_words(answer, self.words_per_chunk):
                events.append(event(content=piece))
            events.append(event(finish_reason="stop"))
        if include_usage:
            usage_event = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            events.append(usage_event)
        events.append("[DONE]")
        writes = [sse_data(e) for e in events]
        return _Plan(
            status=200,
            headers=[
                ("content-type", DEFAULT_SSE_CONTENT_TYPE),
                ("cache-control", "no-cache"),
                ("x-request-id", f"req_{uuid.uuid4().hex[:24]}"),
            ],
            writes=writes,
            delays_s=[delay_s] * len(writes),
            chunked=True,
        )

    def _delay_ms(self, request: _Request) -> float:
        """The default model's delay before each write (``x-fake-delay-ms`` overrides)."""
        delay_ms = self.token_delay_ms
        override = request.header(HEADER_DELAY_MS)
        if override is not None:
            with contextlib.suppress(ValueError):
                delay_ms = max(0.0, float(override))
        return delay_ms

    def _provider_plan(
        self, request: _Request, record: RequestRecord, route: providers.Route
    ) -> _Plan:
        """The default model on a provider-native API (``testkit.providers``)."""
        try:
            doc = json.loads(request.body or b"null")
        except ValueError:
            doc = None
        problem = providers.request_error(route, doc)
        if problem is not None:
            self._update(record, error=f"bad {route.provider} {route.operation} body")
            reply = providers.error_reply(route, 400, f"fake-llm: {problem}")
        else:
            answer = answer_for(providers.user_text(route, doc))
            reply = providers.build_reply(
                route, doc, answer, _split_words(answer, self.words_per_chunk),
                delay_ms=self._delay_ms(request),
            )
        delay_s = self._delay_ms(request) / 1000.0 if reply.status == 200 else 0.0
        if reply.streamed:
            return _Plan(reply.status, list(reply.headers), list(reply.writes),
                         [delay_s] * len(reply.writes), chunked=True)
        return _Plan(reply.status, list(reply.headers), [b"".join(reply.writes)], [delay_s],
                     chunked=False)

    # ---- writing a response ----------------------------------------------

    async def _send_untracked(self, conn: _Conn, plan: _Plan, keep_alive: bool) -> bool:
        body = b"".join(plan.writes)
        conn.writer.write(
            _response_head(plan.status, plan.headers, content_length=len(body),
                           keep_alive=keep_alive)
            + body
        )
        await conn.writer.drain()
        return keep_alive

    async def _send(
        self, conn: _Conn, record: RequestRecord, plan: _Plan, keep_alive: bool
    ) -> tuple[bool, bool]:
        """Write ``plan`` while watching for the peer going away.

        Returns (keep_alive, aborted).
        """
        writer = conn.writer
        watcher = asyncio.create_task(conn.watch_peer())

        def peer_went_away() -> tuple[bool, bool]:
            self._update(
                record,
                peer_closed=True,
                closed_after_chunks=record.chunks_written,
                closed_at=time.monotonic(),
            )
            return False, True

        try:
            if plan.chunked:
                head = _response_head(
                    plan.status, plan.headers, content_length=None, keep_alive=keep_alive
                )
            else:
                length = sum(len(w) for w in plan.writes)
                head = _response_head(
                    plan.status, plan.headers, content_length=length, keep_alive=keep_alive
                )
            self._update(record, status=plan.status, response_headers=list(plan.headers))

            if plan.chunked:
                if conn.peer_gone():
                    return peer_went_away()
                try:
                    writer.write(head)
                    await writer.drain()
                except (ConnectionError, OSError):
                    return peer_went_away()
                self._update(record, headers_sent_at=time.monotonic())

            for index, data in enumerate(plan.writes):
                delay = plan.delays_s[index] if index < len(plan.delays_s) else 0.0
                if await _pause(delay, watcher) or conn.peer_gone():
                    return peer_went_away()
                if plan.chunked:
                    frame = b"%x\r\n" % len(data) + data + b"\r\n"
                else:
                    frame = head + data if index == 0 else data
                now = time.monotonic()
                try:
                    writer.write(frame)
                    await writer.drain()
                except (ConnectionError, OSError):
                    return peer_went_away()
                with self._cond:
                    if not plan.chunked and index == 0:
                        record.headers_sent_at = now
                    record.chunks_written += 1
                    record.bytes_written += len(data)
                    record.chunks.append(data)
                    record.write_times.append(now)
                    self._cond.notify_all()
                await asyncio.sleep(0)  # let EOF / reset notifications in

            n_writes = len(plan.writes)
            end_delay = plan.delays_s[n_writes] if len(plan.delays_s) > n_writes else 0.0
            if await _pause(end_delay, watcher) or conn.peer_gone():
                return peer_went_away()
            if plan.chunked and plan.trailing:
                try:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                except (ConnectionError, OSError):
                    return peer_went_away()
            elif plan.chunked:
                # trailing=False: the upstream "dies" after its last write.
                self._update(record, completed=True)
                writer.transport.abort()
                return False, True
            self._update(record, completed=True)
            return keep_alive, False
        finally:
            if not watcher.done():
                watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _pause(delay_s: float, watcher: asyncio.Task[None]) -> bool:
    """Sleep ``delay_s`` (never less); return True early if the peer went away."""
    if watcher.done():
        return True
    if delay_s <= 0:
        return False
    deadline = time.monotonic() + delay_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return watcher.done()
        await asyncio.wait({watcher}, timeout=remaining)
        if watcher.done():
            return True


def _pick_tool_name(tools: Sequence[Any]) -> str:
    names: list[str] = []
    for tool in tools:
        if isinstance(tool, Mapping):
            fn = tool.get("function")
            if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
                names.append(fn["name"])
    for name in names:
        if "weather" in name.lower():
            return name
    return names[0] if names else "get_weather"


def _weather_arguments(message: str) -> str:
    match = re.search(r"\b(?:in|for|at)\s+([A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*)", message)
    location = match.group(1) if match else "Seattle"
    return json.dumps({"location": location, "unit": "celsius"})


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    try:
        return host, int(port)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad port in {value!r}") from exc


async def _cli_serve(fake: FakeLLM) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    def started(port: int) -> None:
        print(f"fake-llm listening on {fake.url}", flush=True)

    await fake._serve(started, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testkit.upstream",
        description="Fake OpenAI-compatible LLM upstream for demos and tests.",
    )
    parser.add_argument(
        "--listen", type=_parse_listen, default=("127.0.0.1", 8000), metavar="HOST:PORT",
        help="address to listen on (port 0 picks a free port; default 127.0.0.1:8000)",
    )
    parser.add_argument(
        "--token-delay-ms", type=float, default=20.0,
        help="default model: delay before each streamed write (default 20)",
    )
    parser.add_argument(
        "--words-per-chunk", type=int, default=3,
        help="default model: words per streamed content chunk (default 3)",
    )
    args = parser.parse_args(argv)
    host, port = args.listen
    fake = FakeLLM(host, port, args.token_delay_ms, words_per_chunk=args.words_per_chunk)
    try:
        asyncio.run(_cli_serve(fake))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
