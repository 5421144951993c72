"""Traffic of a guarded route that no format recognises (``--unknown-traffic generic``): an API
we do not know, a provider's own path, a new version of a known one. Read by rule, not by
shape, like the ``whole_request`` scope (``extproc.formats.whole``): every string a model
may read, except where its key says it carries none.

Prompt: the ``whole_request`` check texts of the JSON body, whatever the scope.

Non-streamed JSON answer: one channel per group of ``whole`` (a top-level field, or an element
of a top-level list), checked as that group's check text; a masked text is put back into the
strings it came from, or ``rewrite_response`` raises ``ValueError`` (the caller blocks).

Streamed answer (SSE): each event's ``data`` parsed as JSON; every string leaf not under a
no-text key is text of the channel named by its path (``("choices", 0, "delta", "content")``:
the same path in the next event continues the same text, as OpenAI-, Gemini- and most
OpenAI-compatible streams are built). A ``data`` that is not JSON is text of the channel
``("data",)``; ``[DONE]`` carries none. The model's text is never known to be complete before
the body ends (``text_ended`` stays False).

Hard block and soft block: the OpenAI shape (``data: {"error": {...}}`` then ``data: [DONE]``),
which most OpenAI-compatible clients raise on; an error before headers is the OpenAI JSON
error. A soft block cannot be written in an unknown API's own shape, so it is the hard block.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from extproc.formats import PromptScope, StreamCodec, whole
from extproc.formats import _common as c
from extproc.formats.openai_chat import error_body, error_frame
from extproc.framing import Decoder, sse_decoder
from extproc.sse import SSEEvent, encode_event

DATA_CHANNEL: Hashable = ("data",)


def _leaves(value: Any, path: tuple[Any, ...], key: Any,
            found: list[tuple[Hashable, str]], container: Any = None) -> None:
    if isinstance(value, str):
        if not whole.skipped(key, value, container):
            found.append((path, value))
    elif isinstance(value, dict):
        for name, item in value.items():
            if name in whole.NO_TEXT_KEYS:
                continue
            _leaves(item, (*path, name), name, found, value)
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _leaves(item, (*path, position), position, found, value)


def _set(value: Any, path: tuple[Any, ...], text: str) -> bool:
    for step in path[:-1]:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            return False
    try:
        if not isinstance(value[path[-1]], str):
            return False
    except (KeyError, IndexError, TypeError):
        return False
    value[path[-1]] = text
    return True


class GenericCodec:
    """One streamed answer of an API no format recognises."""

    holds_trailing_events = True

    def __init__(self) -> None:
        self.text_ended = False

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        data = event.data
        if not data or data == "[DONE]":
            return []
        value = c.load_json(data)
        if value is None and data.strip() != "null":
            return [(DATA_CHANNEL, data)]
        found: list[tuple[Hashable, str]] = []
        _leaves(value, (), None, found)
        return found

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        if not texts or not event.data:
            return event.raw
        if DATA_CHANNEL in texts and c.load_json(event.data) is None:
            return encode_event(texts[DATA_CHANNEL], event.event)
        value = c.load_json(event.data)
        changed = False
        for channel, text in texts.items():
            if isinstance(channel, tuple) and channel and _set(value, channel, text):
                changed = True
        return encode_event(c.dumps(value), event.event) if changed else event.raw

    def terminal_frame(self, kind: str) -> bytes:
        return error_frame(kind)

    def soft_block_frame(self, message: str) -> bytes:
        return error_frame("guardrail_violation")


class GenericFormat:
    """Any API: the fallback of a guarded route (never chosen by path)."""

    name = "generic"

    def matches(self, method: str, path: str) -> bool:
        return True

    def prompt_texts(self, body: bytes, scope: str = PromptScope.WHOLE_REQUEST) -> list[str]:
        return c.prompt_texts(body, PromptScope.WHOLE_REQUEST, _no_slots)

    def rewrite_prompt(self, body: bytes, scope: str, texts: list[str]) -> bytes | None:
        return c.rewrite_prompt(body, PromptScope.WHOLE_REQUEST, texts, _no_slots)

    def response_texts(self, body: bytes) -> list[tuple[Hashable, str]]:
        value = c.load_json(body)
        if value is None:
            return []
        return [(index, group.text()) for index, group in enumerate(whole.groups(
            whole.holder(value)))]

    def rewrite_response(self, body: bytes, texts: Mapping[Hashable, str]) -> bytes:
        value = c.load_json(body)
        if value is None:
            raise ValueError("the answer is not JSON")
        holder = whole.holder(value)
        found = whole.groups(holder)
        for channel, text in texts.items():
            if not isinstance(channel, int) or not 0 <= channel < len(found):
                raise ValueError(f"no such channel in the answer: {channel!r}")
            if not found[channel].rewrite(text):
                raise ValueError("a masked text cannot be put back into the answer")
        return c.dumps(whole.unhold(holder, value)).encode()

    def soft_block_response(self, body: bytes | None, message: str) -> bytes:
        return error_body("guardrail_violation")[1]

    def error_body(self, kind: str) -> tuple[int, bytes]:
        return error_body(kind)

    def stream_codec(self) -> StreamCodec:
        return GenericCodec()

    def stream_decoder(self, content_type: str) -> Decoder | None:
        return sse_decoder(content_type)


def _no_slots(request: Any, scope: str) -> list[c.Slot]:
    return []  # never called: the whole_request scope reads by rule


GENERIC = GenericFormat()
