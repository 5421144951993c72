"""Anthropic Messages (``POST .../messages``), as served by api.anthropic.com and by gateways
that speak it (LiteLLM, OpenRouter, vLLM's ``/v1/messages``).

Paths: any ``POST`` whose path (query stripped) ends with ``/messages``, except OpenAI
Assistants' ``/threads/{id}/messages`` (creating a thread message is not a model call).
``/v1/messages/count_tokens`` and ``/v1/messages/batches`` do not end with ``/messages``.

Prompt: ``messages[].content``, a string or blocks: ``text`` blocks, plain-text ``document``
blocks (``source.type == "text"``, its ``data``) and, for ``all``, the text of ``tool_result``
blocks (a string or text blocks). ``last_user``: the last ``user`` message that is a human turn
(a message of only ``tool_result`` blocks is a tool turn and is skipped; it is checked with
``all``, like Chat Completions' ``tool`` messages); ``all``: every message;
``all_with_system``: ``system`` (a string or text blocks) first, then every message.

Streamed answers are named events (``message_start``, ``content_block_start``,
``content_block_delta``, ``content_block_stop``, ``message_delta``, ``message_stop``,
``ping``), with no terminator. Text comes from ``content_block_delta`` events; channel per
content block index:

* ``text_delta.text``: ``("text", index)``;
* ``input_json_delta.partial_json`` (``tool_use`` and server tool input): ``("input", index)``;
* ``thinking_delta.thinking``: ``("thinking", index)``. Thinking is model text the client
  receives (and often shows), so it is checked like the answer. A masked thinking block no
  longer matches its ``signature``: sending it back in a later turn is rejected by the API, so
  a client must drop it (blocks and passing text are unaffected).

A ``message_start`` whose message already has content, or a ``content_block_start`` whose
block already has text, thinking or tool input, starts those channels with it: the SDK's
accumulator shows it before the deltas (real streams start empty, and pass unchanged).

Not checked: ``citations_delta`` (quotes of the caller's own documents), ``signature_delta``,
``redacted_thinking`` (encrypted) and server tool results (``web_search_tool_result`` ...),
which arrive whole in ``content_block_start`` and are not model-written text. The non-streamed
answer uses the same channels: ``content[i].text``, ``content[i].thinking`` and
``content[i].input`` (a ``tool_use`` JSON object, checked as its JSON text; a masked input that
is no longer a JSON object makes ``rewrite_response`` raise ``ValueError``).

Hard block: ``event: error`` with ``{"type": "error", "error": {"type", "message"}}``; the
``anthropic`` SDK raises ``anthropic.APIStatusError`` (status 200, ``.type`` the kind,
``.api_message`` the message) on any ``error`` event. Soft block: ``content_block_stop`` for
every block the client has open, a new text block with the message
(``content_block_start``/``delta``/``stop``), ``message_delta`` with ``stop_reason: "refusal"``
(``stop_details.explanation``: the message), then ``message_stop``; a ``message_start`` first
when the client has not received one.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from typing import Any

from extproc.formats import PromptScope, StreamCodec
from extproc.formats import _common as c
from extproc.framing import Decoder, sse_decoder
from extproc.sse import SSEEvent, encode_event


def error_object(kind: str) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}`` as Anthropic clients expect it."""
    _, message = c.error_status(kind)
    return {"type": "error", "error": {"type": kind, "message": message}}


def _stop_details(message: str) -> dict[str, Any]:
    return {"type": "refusal", "category": None, "explanation": message}


# -- prompt ----------------------------------------------------------------------------------


def _tool_turn(content: Any) -> bool:
    return (isinstance(content, list) and bool(content)
            and all(isinstance(b, dict) and b.get("type") == "tool_result" for b in content))


def _block_slots(blocks: Any, tool_results: bool) -> list[c.Slot]:
    if not isinstance(blocks, list):
        return []
    slots: list[c.Slot] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            slots += c.text_slot(block, "text")
        elif kind == "document":
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") == "text":
                slots += c.text_slot(source, "data")
        elif kind == "tool_result" and tool_results:
            content = block.get("content")
            if isinstance(content, str):
                slots += c.text_slot(block, "content")
            else:
                slots += _block_slots(content, tool_results=False)
    return slots


def _message_slots(message: dict[str, Any], tool_results: bool) -> list[c.Slot]:
    content = message.get("content")
    if isinstance(content, str):
        return c.text_slot(message, "content")
    return _block_slots(content, tool_results)


def _prompt_slots(request: dict[str, Any], scope: str) -> list[c.Slot]:
    messages = request.get("messages")
    messages = messages if isinstance(messages, list) else []
    if scope == PromptScope.LAST_USER:
        for message in reversed(messages):
            if (isinstance(message, dict) and message.get("role") == "user"
                    and not _tool_turn(message.get("content"))):
                return _message_slots(message, tool_results=False)
        return []
    slots: list[c.Slot] = []
    if scope == PromptScope.ALL_WITH_SYSTEM:
        system = request.get("system")
        if isinstance(system, str):
            slots += c.text_slot(request, "system")
        else:
            slots += _block_slots(system, tool_results=False)
    for message in messages:
        if isinstance(message, dict):
            slots += _message_slots(message, tool_results=True)
    return slots


# -- non-streamed answer ---------------------------------------------------------------------


def _response_slots(answer: dict[str, Any]) -> list[c.Slot]:
    content = answer.get("content")
    if not isinstance(content, list):
        return []
    slots: list[c.Slot] = []
    for index, block in enumerate(content):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            slots += c.text_slot(block, "text", ("text", index))
        elif kind == "thinking":
            slots += c.text_slot(block, "thinking", ("thinking", index))
        elif kind in ("tool_use", "server_tool_use") and isinstance(block.get("input"), dict) \
                and block["input"]:
            slots.append(c.Slot(block, "input", ("input", index), as_json=True))
    return slots


class AnthropicMessages:
    """The Anthropic Messages format."""

    name = "anthropic.messages"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith("/messages") and "/threads/" not in path

    def prompt_texts(self, body: bytes, scope: str = PromptScope.LAST_USER) -> list[str]:
        return c.prompt_texts(body, scope, _prompt_slots)

    def rewrite_prompt(self, body: bytes, scope: str, texts: list[str]) -> bytes | None:
        return c.rewrite_prompt(body, scope, texts, _prompt_slots)

    def response_texts(self, body: bytes) -> list[tuple[Hashable, str]]:
        return c.response_texts(body, _response_slots)

    def rewrite_response(self, body: bytes, texts: Mapping[Hashable, str]) -> bytes:
        return c.rewrite_response(body, texts, _response_slots)

    def soft_block_response(self, body: bytes | None, message: str) -> bytes:
        answer = c.load_object(body) or {}
        usage = answer.get("usage")
        result = {
            "id": answer.get("id") or "msg_guardrail",
            "type": "message",
            "role": "assistant",
            "model": answer.get("model") if isinstance(answer.get("model"), str) else "",
            "content": [{"type": "text", "text": message}],
            "stop_reason": "refusal",
            "stop_sequence": None,
            "stop_details": _stop_details(message),
            "usage": usage if isinstance(usage, dict) else {"input_tokens": 0,
                                                            "output_tokens": 0},
        }
        return c.dumps(result).encode()

    def error_body(self, kind: str) -> tuple[int, bytes]:
        status, _ = c.error_status(kind)
        return status, json.dumps(error_object(kind)).encode()

    def stream_codec(self) -> StreamCodec:
        return AnthropicCodec()

    def stream_decoder(self, content_type: str) -> Decoder | None:
        return sse_decoder(content_type)


# -- stream ----------------------------------------------------------------------------------

_DELTA_FIELDS: Mapping[str, tuple[str, str]] = {
    "text_delta": ("text", "text"),
    "input_json_delta": ("partial_json", "input"),
    "thinking_delta": ("thinking", "thinking"),
}

# Events whose payload changes the client's view of the message.
_TRACKED = frozenset({"message_start", "content_block_start", "content_block_stop",
                      "message_delta", "message_stop"})


def _delta_text(payload: dict[str, Any]) -> tuple[Hashable, str, dict[str, Any], str] | None:
    """(channel, text, delta, field) of a ``content_block_delta`` carrying text."""
    delta = payload.get("delta")
    if not isinstance(delta, dict):
        return None
    spec = _DELTA_FIELDS.get(delta.get("type"))  # type: ignore[arg-type]  # None finds nothing
    if spec is None:
        return None
    field, kind = spec
    text = delta.get(field)
    if not c.is_text(text):
        return None
    return (kind, c.key(payload.get("index", 0))), text, delta, field


#: The ``anthropic`` SDK skips events named ``ping`` and events without a name, and reads
#: every other event by its data's ``type``; other clients (the Vercel AI SDK) read them all.
_SKIPPED = (None, "ping")


def _stream_channel(channel: Hashable, event: SSEEvent) -> Hashable:
    """The channel a block's text is checked on, as clients show it. Text blocks are read
    joined (``get_final_text()``, the AI SDK's ``text``): one channel for all of them. Text of
    an event the SDK skips (named ``ping`` or nothing; the first event after a byte order
    mark, whose ``event:`` line it does not recognise) is checked on a channel of its own,
    never glued to the text it shows (an "x" there would turn a shown "zorblax" into
    "xzorblax")."""
    if event.event in _SKIPPED or event.raw.startswith(c.BOM):
        return c.apart("skipped", channel)
    if isinstance(channel, tuple) and channel and channel[0] == "text":
        return ("text",)
    return channel


def _start_texts(payload: dict[str, Any], event: SSEEvent
                 ) -> list[tuple[Hashable, list[c.Slot]]]:
    """The slots of a start grouped by stream channel, in order."""
    groups: dict[Hashable, list[c.Slot]] = {}
    for slot in _start_slots(payload):
        groups.setdefault(_stream_channel(slot.channel, event), []).append(slot)
    return list(groups.items())


def _start_slots(payload: dict[str, Any]) -> list[c.Slot]:
    """Text a ``message_start`` or ``content_block_start`` already holds. The ``anthropic``
    SDK's accumulator starts the message from ``message_start.message`` (its ``content``
    included) and each block from ``content_block_start.content_block``, then appends the
    deltas: a start's text is the beginning of its channel and is shown."""
    kind = payload.get("type")
    if kind == "message_start":
        message = payload.get("message")
        return _response_slots(message) if isinstance(message, dict) else []
    block = payload.get("content_block")
    if kind != "content_block_start" or not isinstance(block, dict):
        return []
    index = c.key(payload.get("index", 0))
    # channels of a one-block answer are ("kind", 0): the block's own index replaces the 0
    return [c.Slot(slot.container, slot.key, (slot.channel[0], index), slot.as_json)  # type: ignore[index]
            for slot in _response_slots({"content": [block]})]


class AnthropicCodec:
    """One streamed Messages answer; keeps which content blocks the client has open."""

    holds_trailing_events = True

    def __init__(self) -> None:
        self._message: dict[str, Any] | None = None  # the message_start message seen
        self._output_tokens = 0
        self._started = False  # the client received message_start
        self._blocks = 0  # content blocks the client received a start for
        self._open: set[int] = set()
        self._notes = c.Notes()
        self.text_ended = False

    def _seen(self, payload: dict[str, Any]) -> None:
        kind = payload.get("type")
        if kind == "message_start" and isinstance(payload.get("message"), dict):
            self._message = payload["message"]
            usage = self._message.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
                self._output_tokens = max(self._output_tokens, usage["output_tokens"])
        elif kind == "message_delta":
            usage = payload.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
                self._output_tokens = max(self._output_tokens, usage["output_tokens"])

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        payload = c.load_object(event.data)
        kind = payload.get("type") if payload is not None else None
        # ``rewrite`` needs the payload of the few events that change the client's view.
        self._notes.put(event, payload if isinstance(kind, str) and kind in _TRACKED else None)
        if payload is None:
            return []
        if kind in ("message_start", "content_block_start"):
            self._seen(payload)
            started = [(channel, "".join(slot.get() for slot in slots))
                       for channel, slots in _start_texts(payload, event)]
            if started:
                self.text_ended = False
            return started
        if kind == "message_delta":
            self._seen(payload)
            delta = payload.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                self.text_ended = True
            return []
        if kind != "content_block_delta":
            if kind == "message_stop":
                self.text_ended = True
            return []
        found = _delta_text(payload)
        if found is None:
            return []
        self.text_ended = False
        return [(_stream_channel(found[0], event), found[1])]

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        payload = self._notes.take(event)
        name = event.event
        if not texts and name in ("ping", "error", "content_block_delta"):
            return event.raw
        if payload is c.UNREAD or (payload is None and texts):
            # Not extracted, or maybe a text delta to rewrite: read the event (again).
            payload = c.load_object(event.data)
        if payload is None:
            return event.raw
        kind = payload.get("type")
        if isinstance(kind, str) and kind in _TRACKED:  # (a hostile list is not hashable)
            self._seen(payload)
            index = payload.get("index")
            if kind == "message_start":
                self._started = True
            elif kind == "content_block_start":
                self._blocks += 1
                if isinstance(index, int):
                    self._open.add(index)
            elif kind == "content_block_stop" and isinstance(index, int):
                self._open.discard(index)
            if texts and kind in ("message_start", "content_block_start"):
                return self._rewrite_start(event, payload, texts)
            return event.raw
        if kind != "content_block_delta" or not texts:
            return event.raw
        found = _delta_text(payload)
        if found is None:
            return event.raw
        channel = _stream_channel(found[0], event)
        if channel not in texts:
            return event.raw
        _, _, delta, field = found
        delta[field] = texts[channel]
        return encode_event(c.dumps(payload), event.event)

    def _rewrite_start(self, event: SSEEvent, payload: dict[str, Any],
                       texts: Mapping[Hashable, str]) -> bytes:
        """A start whose text was masked, with the masked text. A tool input that the mask
        left no longer a JSON object starts empty (the deltas, if any, fill it)."""
        changed = False
        for channel, slots in _start_texts(payload, event):
            text = texts.get(channel)
            if text is None:
                continue
            for number, slot in enumerate(slots):  # all of it in the first of them
                try:
                    slot.set(text if number == 0 else "")
                except ValueError:
                    slot.container[slot.key] = {}
            changed = True
        return encode_event(c.dumps(payload), event.event) if changed else event.raw

    def terminal_frame(self, kind: str) -> bytes:
        return encode_event(json.dumps(error_object(kind)), "error")

    def soft_block_frame(self, message: str) -> bytes:
        out: list[bytes] = []
        if not self._started:
            start: dict[str, Any] = dict(self._message) if self._message is not None else {
                "id": "msg_guardrail", "type": "message", "role": "assistant", "model": "",
                "usage": {"input_tokens": 0, "output_tokens": 0}}
            start.update(content=[], stop_reason=None, stop_sequence=None)
            out.append(c.event_bytes({"type": "message_start", "message": start},
                                     "message_start"))
        for index in sorted(self._open):
            out.append(c.event_bytes({"type": "content_block_stop", "index": index},
                                     "content_block_stop"))
        index = self._blocks
        out.append(c.event_bytes({"type": "content_block_start", "index": index,
                                  "content_block": {"type": "text", "text": ""}},
                                 "content_block_start"))
        out.append(c.event_bytes({"type": "content_block_delta", "index": index,
                                  "delta": {"type": "text_delta", "text": message}},
                                 "content_block_delta"))
        out.append(c.event_bytes({"type": "content_block_stop", "index": index},
                                 "content_block_stop"))
        out.append(c.event_bytes({"type": "message_delta",
                                  "delta": {"stop_reason": "refusal", "stop_sequence": None,
                                            "stop_details": _stop_details(message)},
                                  "usage": {"output_tokens": self._output_tokens}},
                                 "message_delta"))
        out.append(c.event_bytes({"type": "message_stop"}, "message_stop"))
        return b"".join(out)
