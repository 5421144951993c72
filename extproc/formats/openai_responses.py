"""OpenAI Responses (``POST .../responses``), as served by OpenAI, Azure OpenAI
(``/openai/v1/responses``) and the gateways that speak it.

Paths: any ``POST`` whose path (query stripped) ends with ``/responses`` (not
``/responses/{id}/cancel``, ``/responses/input_tokens`` ...).

Prompt: ``input``, a string (one user message) or a list of items. ``last_user``: the string,
or the last item with ``role: "user"`` (its content string, or its ``input_text`` parts);
``all``: every message item but ``system`` and ``developer`` ones (assistant ``output_text``
parts included) plus tool results (``function_call_output`` / ``custom_tool_call_output``
``output``, a string or ``input_text`` parts); ``all_with_system``: ``instructions`` first,
then all of the above and the ``system`` / ``developer`` messages.

Streamed answers are named events (``event: response.output_text.delta`` ...) whose JSON
carries ``type`` and an increasing ``sequence_number``; there is no ``[DONE]``. Text deltas and
their channels (the non-streamed answer's ``output[]`` uses the same keys):

==========================================  =====================================
event                                       channel
==========================================  =====================================
``response.output_text.delta``              ``("text", output_index, content_index)``
``response.refusal.delta``                  ``("refusal", output_index, content_index)``
``response.function_call_arguments.delta``  ``("arguments", output_index)``
``response.mcp_call_arguments.delta``       ``("arguments", output_index)``
``response.custom_tool_call_input.delta``   ``("input", output_index)``
``response.reasoning_summary_text.delta``   ``("summary", output_index, summary_index)``
``response.reasoning_text.delta``           ``("reasoning", output_index, content_index)``
==========================================  =====================================

The ``*.done`` events, the parts (``content_part.added`` / ``.done``), the items
(``output_item.added`` / ``.done``) and the lifecycle and final responses repeat the text, and
clients show them (the ``openai`` SDK's stream helper starts a part from the one
``content_part.added`` carries; applications read the completed response). Each copy is
compared with what the channel's deltas said: the same text is not read again; text that
continues it (a part added with text, a completed response with no deltas before it) is more
of the channel; anything else is read whole on a channel of its own (``("copy", channel,
n)``, once per distinct text). When a channel or a copy was masked the codec rewrites every
copy with the text the client received (and drops its ``logprobs``), so masked text never
comes back through them. A clean stream whose copies agree passes byte for byte.

Hard block: ``event: error`` with ``{"type": "error", "code", "message", "param",
"sequence_number", "error": {"type", "code", "message", "param"}}``: the flat fields are the
documented event, the nested ``error`` is what the API sends at runtime and what makes the
``openai`` SDK raise ``openai.APIError`` (its stream raises on any JSON with an ``error`` key;
the flat form alone is yielded as a ``ResponseErrorEvent`` and nothing raises). ``type`` is
the error kind (``guardrail_violation``) and ``code`` its HTTP status as a string (``"400"``),
as the Chat frame's ``code: 400``: the Vercel AI SDK takes a stream error's status from a
three-digit code, else guesses it from words in code and type and falls back to a retryable
500, which would have an application retry a policy block. When the client has the
``response.created``, a ``response.failed`` (status ``failed``, ``error`` set) follows
for clients that read on. Sequence numbers continue after the last one seen.

Soft block: every output item the client has open is closed (``response.output_text.done`` /
``response.refusal.done`` and ``response.content_part.done`` for open parts,
``response.function_call_arguments.done``, then ``response.output_item.done`` with status
``incomplete``), a new message item carries the text (``output_item.added``,
``content_part.added``, ``output_text.delta``, ``output_text.done``, ``content_part.done``,
``output_item.done``), then ``response.completed`` whose response has ``status:
"incomplete"`` and ``incomplete_details: {"reason": "content_filter"}`` and lists every item
the client received. ``response.completed`` (rather than ``response.incomplete``) because the
SDK's ``responses.stream()`` helper only has a final response after it.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping
from typing import Any

from extproc.formats import PromptScope, StreamCodec
from extproc.formats import _common as c
from extproc.formats.openai_chat import error_body
from extproc.framing import Decoder, sse_decoder
from extproc.sse import SSEEvent, encode_event

# delta event -> (channel kind, field of the second index or None)
_DELTAS: Mapping[str, tuple[str, str | None]] = {
    "response.output_text.delta": ("text", "content_index"),
    "response.refusal.delta": ("refusal", "content_index"),
    "response.function_call_arguments.delta": ("arguments", None),
    "response.mcp_call_arguments.delta": ("arguments", None),
    "response.custom_tool_call_input.delta": ("input", None),
    "response.reasoning_summary_text.delta": ("summary", "summary_index"),
    "response.reasoning_text.delta": ("reasoning", "content_index"),
}

# done event -> (channel kind, field of the second index or None, field holding the text)
_DONES: Mapping[str, tuple[str, str | None, str]] = {
    "response.output_text.done": ("text", "content_index", "text"),
    "response.refusal.done": ("refusal", "content_index", "refusal"),
    "response.function_call_arguments.done": ("arguments", None, "arguments"),
    "response.mcp_call_arguments.done": ("arguments", None, "arguments"),
    "response.custom_tool_call_input.done": ("input", None, "input"),
    "response.reasoning_summary_text.done": ("summary", "summary_index", "text"),
    "response.reasoning_text.done": ("reasoning", "content_index", "text"),
}

# content part type -> channel kind, field holding the text
_PARTS: Mapping[str, tuple[str, str]] = {
    "output_text": ("text", "text"),
    "refusal": ("refusal", "refusal"),
    "reasoning_text": ("reasoning", "text"),
}

_LIFECYCLE = ("response.created", "response.queued", "response.in_progress")
_FINAL = ("response.completed", "response.incomplete", "response.failed")

_SYSTEM_ROLES = ("system", "developer")


def _base_response() -> dict[str, Any]:
    """A Response object for a stream whose ``response.created`` we never saw."""
    return {
        "id": "resp_guardrail", "object": "response", "created_at": 0,
        "status": "in_progress", "background": False, "error": None,
        "incomplete_details": None, "instructions": None, "max_output_tokens": None,
        "model": "", "output": [], "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": None,
        "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
        "top_p": None, "truncation": "disabled", "usage": None, "metadata": {},
    }


def _guardrail_item(message: str, status: str) -> dict[str, Any]:
    return {"id": "msg_guardrail", "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [],
                         "text": message}]}


# -- item text slots (non-streamed answers, done items, final responses) ---------------------


def _item_slots(item: Any, index: int) -> list[c.Slot]:
    """Slots of one output item, keyed by the stream channels."""
    if not isinstance(item, dict):
        return []
    kind = item.get("type")
    slots: list[c.Slot] = []
    if kind in ("function_call", "mcp_call"):
        slots += c.text_slot(item, "arguments", ("arguments", index))
    elif kind == "custom_tool_call":
        slots += c.text_slot(item, "input", ("input", index))
    if kind == "reasoning":
        summary = item.get("summary")
        if isinstance(summary, list):
            for number, part in enumerate(summary):
                if isinstance(part, dict):
                    slots += c.text_slot(part, "text", ("summary", index, number))
    content = item.get("content")
    if kind in ("message", "reasoning") and isinstance(content, list):
        for number, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            spec = _PARTS.get(part.get("type"))  # type: ignore[arg-type]  # None finds nothing
            if spec is not None:
                slots += c.text_slot(part, spec[1], (spec[0], index, number))
    return slots


_PART_EVENTS = ("response.content_part.added", "response.content_part.done",
                "response.reasoning_summary_part.added", "response.reasoning_summary_part.done")
_ITEM_EVENTS = ("response.output_item.added", "response.output_item.done")


def _part_slots(payload: Mapping[str, Any], kind: str) -> list[c.Slot]:
    index, part = payload.get("output_index"), payload.get("part")
    summary = "summary" in kind
    number = payload.get("summary_index" if summary else "content_index")
    if not (isinstance(part, dict) and isinstance(number, int) and isinstance(index, int)):
        return []
    if summary:
        return c.text_slot(part, "text", ("summary", index, number))
    spec = _PARTS.get(part.get("type"))  # type: ignore[arg-type]  # None finds nothing
    return [] if spec is None else c.text_slot(part, spec[1], (spec[0], index, number))


def _copy_slots(payload: Mapping[str, Any], kind: str) -> list[c.Slot]:
    """The slots of an event that is not a delta but holds a channel's text: a ``*.done``
    event, a content or summary part, an output item, a lifecycle or final response."""
    done = _DONES.get(kind)
    if done is not None:
        return c.text_slot(payload, done[2], _channel(payload, done[0], done[1]))
    if kind in _PART_EVENTS:
        return _part_slots(payload, kind)
    if kind in _ITEM_EVENTS:
        index = payload.get("output_index")
        return _item_slots(payload.get("item"), index) if isinstance(index, int) else []
    if kind in _LIFECYCLE or kind in _FINAL:
        response = payload.get("response")
        return _output_slots(response) if isinstance(response, dict) else []
    return []


class _Copies:
    """The note of an event holding copies: its payload, their slots, and for each what
    ``extract`` made of it: None (the stream's text), ``("extend", channel, extra)`` or
    ``("copy", copy channel, text)``."""

    __slots__ = ("decisions", "payload", "slots")

    def __init__(self, payload: dict[str, Any], slots: list[c.Slot],
                 decisions: list[tuple[str, Hashable, str] | None]) -> None:
        self.payload = payload
        self.slots = slots
        self.decisions = decisions


def _output_slots(answer: dict[str, Any]) -> list[c.Slot]:
    output = answer.get("output")
    if not isinstance(output, list):
        return []
    slots: list[c.Slot] = []
    for index, item in enumerate(output):
        slots += _item_slots(item, index)
    return slots


def _drop_logprobs(slot: c.Slot) -> None:
    container = slot.container
    if isinstance(container, dict) and container.get("logprobs"):
        container["logprobs"] = []


# -- prompt ----------------------------------------------------------------------------------


def _content_slots(item: dict[str, Any], key: str) -> list[c.Slot]:
    return c.content_slots(item, key, ("input_text", "output_text", "text"))


def _prompt_slots(request: dict[str, Any], scope: str) -> list[c.Slot]:
    items = request.get("input")
    if isinstance(items, str):
        slots = c.text_slot(request, "input")
        if scope == PromptScope.ALL_WITH_SYSTEM:
            slots = c.text_slot(request, "instructions") + slots
        return slots
    if not isinstance(items, list):
        return c.text_slot(request, "instructions") if scope == PromptScope.ALL_WITH_SYSTEM \
            else []
    if scope == PromptScope.LAST_USER:
        for item in reversed(items):
            if isinstance(item, dict) and item.get("role") == "user" \
                    and item.get("type", "message") == "message":
                return _content_slots(item, "content")
        return []
    slots = c.text_slot(request, "instructions") if scope == PromptScope.ALL_WITH_SYSTEM \
        else []
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message" and "role" in item:
            if scope == PromptScope.ALL and item.get("role") in _SYSTEM_ROLES:
                continue
            slots += _content_slots(item, "content")
        elif kind in ("function_call_output", "custom_tool_call_output"):
            slots += _content_slots(item, "output")
    return slots


class OpenAIResponses:
    """The Responses format."""

    name = "openai.responses"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith("/responses")

    def prompt_texts(self, body: bytes, scope: str = PromptScope.LAST_USER) -> list[str]:
        return c.prompt_texts(body, scope, _prompt_slots)

    def rewrite_prompt(self, body: bytes, scope: str, texts: list[str]) -> bytes | None:
        return c.rewrite_prompt(body, scope, texts, _prompt_slots)

    def response_texts(self, body: bytes) -> list[tuple[Hashable, str]]:
        return c.response_texts(body, _output_slots)

    def rewrite_response(self, body: bytes, texts: Mapping[Hashable, str]) -> bytes:
        def find(answer: dict[str, Any]) -> list[c.Slot]:
            slots = _output_slots(answer)
            for slot in slots:
                if slot.channel in texts:
                    _drop_logprobs(slot)
            return slots

        return c.rewrite_response(body, texts, find)

    def soft_block_response(self, body: bytes | None, message: str) -> bytes:
        answer = c.load_object(body)
        result = answer if answer is not None and (
            answer.get("object") == "response" or isinstance(answer.get("output"), list)) \
            else _base_response()
        result.update(status="incomplete", incomplete_details={"reason": "content_filter"},
                      error=None, output=[_guardrail_item(message, "completed")])
        result.pop("output_text", None)
        return c.dumps(result).encode()

    def error_body(self, kind: str) -> tuple[int, bytes]:
        return error_body(kind)

    def stream_codec(self) -> StreamCodec:
        return ResponsesCodec()

    def stream_decoder(self, content_type: str) -> Decoder | None:
        return sse_decoder(content_type)


# -- stream ----------------------------------------------------------------------------------


def _channel(payload: Mapping[str, Any], kind: str, second: str | None) -> Hashable:
    index = c.key(payload.get("output_index", 0))
    if second is None:
        return (kind, index)
    return (kind, index, c.key(payload.get(second, 0)))


def _put(items: list[Any], index: Any, value: Any) -> None:
    if not isinstance(index, int) or index < 0 or index > 10_000:
        return
    while len(items) <= index:
        items.append(None)
    items[index] = value


class ResponsesCodec:
    """One streamed Responses answer; keeps the client's view of the output items."""

    holds_trailing_events = True

    def __init__(self) -> None:
        self._seq = -1  # highest sequence_number seen
        self._response: dict[str, Any] | None = None  # the lifecycle response seen
        self._created = False  # the client received response.created
        self._items: dict[int, dict[str, Any]] = {}  # output_index -> item as the client has it
        self._open_items: set[int] = set()
        self._open_parts: set[tuple[int, int]] = set()
        self._sent: dict[Hashable, list[str]] = {}  # channel -> text pieces the client received
        self._masked: set[Hashable] = set()  # channels whose sent text differs from upstream
        # channel -> text pieces read from upstream deltas (and copies that extended them)
        self._read_text: dict[Hashable, list[str]] = {}
        # (channel, text) -> the channel a copy that disagrees with the stream is checked on
        self._copies: dict[tuple[Hashable, str], Hashable] = {}
        self._copy_sent: dict[Hashable, str] = {}  # copy channel -> the text the client got
        # masked channel -> the original of the pieces in ``_sent`` (to shift offsets)
        self._orig: dict[Hashable, list[str]] = {}
        self._notes = c.Notes()
        self.text_ended = False

    # -- reading ------------------------------------------------------------------------------

    def _payload(self, event: SSEEvent) -> dict[str, Any] | None:
        payload = c.load_object(event.data)
        return None if payload is None else self._read(payload)

    def _read(self, payload: dict[str, Any]) -> dict[str, Any]:
        seq = payload.get("sequence_number")
        if isinstance(seq, int) and not isinstance(seq, bool) and seq > self._seq:
            self._seq = seq
        if payload.get("type") in _LIFECYCLE and isinstance(payload.get("response"), dict):
            self._response = payload["response"]
        return payload

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        payload = self._payload(event)
        kind = payload.get("type") if payload is not None else None
        spec = _DELTAS.get(kind) if isinstance(kind, str) else None
        if payload is None or spec is None:
            if payload is None or not isinstance(kind, str):
                self._notes.put(event, payload)
                return []
            found = self._read_copies(event, payload, kind)
            if kind in _FINAL:
                self.text_ended = True
            elif found:
                self.text_ended = False
            return found
        delta = payload.get("delta")
        if not isinstance(delta, str):
            self._notes.put(event, None)  # nothing for ``rewrite`` to do
            return []
        # A text delta's note is its channel and text, not the payload: deltas are many.
        channel = _channel(payload, *spec)
        self._notes.put(event, (channel, delta))
        if not delta:
            return []
        self.text_ended = False
        self._read_text.setdefault(channel, []).append(delta)
        return [(channel, delta)]

    def _read_copies(self, event: SSEEvent, payload: dict[str, Any],
                     kind: str) -> list[tuple[Hashable, str]]:
        """The text of an event that repeats a channel's text (``*.done``, parts, items, the
        response): nothing when it is what the deltas said; the rest of it on the channel when
        it continues them (a part added with text, a response with no deltas before it); else
        the whole of it on a channel of its own. A client shows these texts (the SDKs' stream
        accumulators start from the added part and end with the completed response), so none
        passes unread."""
        slots = _copy_slots(payload, kind)
        decisions: list[tuple[str, Hashable, str] | None] = []
        found: list[tuple[Hashable, str]] = []
        for slot in slots:
            text = slot.container[slot.key]
            channel = slot.channel
            pieces = self._read_text.get(channel)
            read = "".join(pieces) if pieces else ""
            if text == read:
                decisions.append(None)
            elif text.startswith(read):
                extra = text[len(read):]
                self._read_text.setdefault(channel, []).append(extra)
                decisions.append(("extend", channel, extra))
                found.append((channel, extra))
            else:
                copy_key = self._copies.get((channel, text))
                if copy_key is None:
                    copy_key = ("copy", channel, len(self._copies))
                    self._copies[(channel, text)] = copy_key
                    found.append((copy_key, text))
                decisions.append(("copy", copy_key, text))
        self._notes.put(event, _Copies(payload, slots, decisions) if slots else payload)
        return found

    # -- releasing ----------------------------------------------------------------------------

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        note = self._notes.take(event)
        if type(note) is tuple:
            channel, delta = note
            if texts.get(channel, delta) == delta:
                self._sent.setdefault(channel, []).append(delta)
                if self._orig and channel in self._orig:
                    self._orig[channel].append(delta)
                return event.raw
            note = c.UNREAD  # masked: read the event again to rewrite it
        if note is None:
            return event.raw
        copies: _Copies | None = None
        if type(note) is _Copies:
            copies = note
            payload: dict[str, Any] | None = self._read(note.payload)
        else:
            payload = self._payload(event) if note is c.UNREAD else self._read(note)
        if payload is None:
            return event.raw
        kind = payload.get("type")
        if not isinstance(kind, str):
            return event.raw  # (a hostile list is not hashable)
        if kind in _DELTAS:
            changed = self._on_delta(payload, texts)
        elif kind == "response.output_text.annotation.added":
            changed = self._shift(_channel(payload, "text", "content_index"),
                                  [payload.get("annotation")])
        else:
            if copies is None:  # nothing read from it: only masks of the stream to apply
                slots = _copy_slots(payload, kind)
                changed = self._apply_copies(slots, [None] * len(slots), texts)
            else:
                changed = self._apply_copies(copies.slots, copies.decisions, texts)
            self._keep(payload, kind)
        if not changed:
            return event.raw
        return encode_event(c.dumps(payload), event.event)

    def _keep(self, payload: dict[str, Any], kind: str) -> None:
        """Follow the client's view of the output items (for the closing frames)."""
        if kind == "response.created":
            self._created = True
        elif kind in _ITEM_EVENTS:
            index, item = payload.get("output_index"), payload.get("item")
            if isinstance(index, int) and isinstance(item, dict):
                self._items[index] = copy.deepcopy(item)
                if kind.endswith(".added"):
                    self._open_items.add(index)
                else:
                    self._open_items.discard(index)
        elif kind in _PART_EVENTS:
            self._on_part(payload, kind)

    def _on_delta(self, payload: dict[str, Any], texts: Mapping[Hashable, str]) -> bool:
        delta = payload.get("delta")
        if not isinstance(delta, str):
            return False
        channel = _channel(payload, *_DELTAS[payload["type"]])
        piece = texts.get(channel, delta)
        self._send(channel, piece, delta)
        if piece == delta:
            return False
        self._masked.add(channel)
        payload["delta"] = piece
        if payload.get("logprobs"):
            payload["logprobs"] = []
        return True

    def _send(self, channel: Hashable, piece: str, original: str) -> None:
        """The client gets ``piece`` of ``channel`` for ``original``."""
        if piece != original and channel not in self._orig:
            self._orig[channel] = list(self._sent.get(channel, ()))  # the same until now
        self._sent.setdefault(channel, []).append(piece)
        if channel in self._orig:
            self._orig[channel].append(original)

    def _shift(self, channel: Hashable, annotations: Any) -> bool:
        """Move the character offsets of ``annotations`` into a masked channel's text from
        the original text to the text the client received; whether any moved."""
        if channel not in self._orig:
            return False
        return c.shift_annotations(annotations, "".join(self._orig[channel]),
                                   self._text(channel))

    def _on_part(self, payload: dict[str, Any], kind: str) -> None:
        index, part = payload.get("output_index"), payload.get("part")
        item = self._items.get(index) if isinstance(index, int) else None
        summary = "summary" in kind
        number = payload.get("summary_index" if summary else "content_index")
        if isinstance(part, dict) and isinstance(number, int) and isinstance(index, int):
            if item is not None:
                parts = item.setdefault("summary" if summary else "content", [])
                if isinstance(parts, list):
                    _put(parts, number, copy.deepcopy(part))
            if not summary:
                if kind.endswith(".added"):
                    self._open_parts.add((index, number))
                else:
                    self._open_parts.discard((index, number))

    def _text(self, channel: Hashable) -> str:
        return "".join(self._sent.get(channel, ()))

    def _apply_copies(self, slots: list[c.Slot],
                      decisions: list[tuple[str, Hashable, str] | None],
                      texts: Mapping[Hashable, str]) -> bool:
        """Give every copy in a released event the text the client received for it."""
        changed = False
        for slot, decision in zip(slots, decisions, strict=True):
            channel = slot.channel
            if decision is not None and decision[0] == "copy":
                key, text = decision[1], decision[2]
                if key in texts:
                    piece = self._copy_sent[key] = texts[key]
                else:
                    piece = self._copy_sent.setdefault(key, text)
                if piece == text:
                    continue
                slot.set(piece)
            else:
                if decision is not None:  # ("extend", channel, extra): more of the stream
                    extra = decision[2]
                    piece = texts.get(channel, extra)
                    self._send(channel, piece, extra)
                    if piece != extra:
                        self._masked.add(channel)
                if channel not in self._masked:
                    continue
                slot.set(self._text(channel))
                if isinstance(slot.container, dict):
                    self._shift(channel, slot.container.get("annotations"))
            _drop_logprobs(slot)
            changed = True
        return changed

    def _view(self, index: int, status: str | None = None) -> dict[str, Any]:
        """Output item ``index`` as the client has it: the text it received filled in."""
        item = copy.deepcopy(self._items[index])
        if index in self._open_items:
            content = item.get("content")
            for spec_kind, key in (("text", "text"), ("refusal", "refusal"),
                                   ("reasoning", "text")):
                for channel in self._sent:
                    if (isinstance(channel, tuple) and len(channel) == 3
                            and channel[0] == spec_kind and channel[1] == index
                            and isinstance(content, list) and isinstance(channel[2], int)
                            and channel[2] < len(content)
                            and isinstance(content[channel[2]], dict)):
                        content[channel[2]][key] = self._text(channel)
            for channel in self._sent:
                if channel == ("arguments", index) and "arguments" in item:
                    item["arguments"] = self._text(channel)
                elif channel == ("input", index) and "input" in item:
                    item["input"] = self._text(channel)
                elif (isinstance(channel, tuple) and len(channel) == 3
                      and channel[0] == "summary" and channel[1] == index):
                    summary = item.get("summary")
                    if isinstance(summary, list) and isinstance(channel[2], int) \
                            and channel[2] < len(summary) and isinstance(summary[channel[2]],
                                                                         dict):
                        summary[channel[2]]["text"] = self._text(channel)
        if status is not None:
            item["status"] = status
        return item

    # -- the end ------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        self._seq += 1
        return c.event_bytes({"type": kind, **fields, "sequence_number": self._seq}, kind)

    def _lifecycle(self) -> dict[str, Any]:
        response = copy.deepcopy(self._response) if self._response is not None \
            else _base_response()
        response.pop("output_text", None)
        return response

    def terminal_frame(self, kind: str) -> bytes:
        status, message = c.error_status(kind)
        code = str(status)
        out = [self._event("error", code=code, message=message, param=None,
                           error={"type": kind, "code": code, "message": message,
                                  "param": None})]
        if self._created:
            response = self._lifecycle()
            response.update(status="failed", error={"code": kind, "message": message},
                            output=[self._view(i) for i in sorted(self._items)])
            out.append(self._event("response.failed", response=response))
        return b"".join(out)

    def soft_block_frame(self, message: str) -> bytes:
        out: list[bytes] = []
        if not self._created:
            response = self._lifecycle()
            response.update(status="in_progress", output=[])
            out.append(self._event("response.created", response=response))
            self._created = True
        for index in sorted(self._open_items):
            item = self._view(index, "incomplete")
            item_id = item.get("id")
            content = item.get("content")
            for _, number in sorted(p for p in self._open_parts if p[0] == index):
                part = content[number] if isinstance(content, list) \
                    and number < len(content) else None
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "output_text":
                    out.append(self._event("response.output_text.done", item_id=item_id,
                                           output_index=index, content_index=number,
                                           text=part.get("text", ""), logprobs=[]))
                elif part.get("type") == "refusal":
                    out.append(self._event("response.refusal.done", item_id=item_id,
                                           output_index=index, content_index=number,
                                           refusal=part.get("refusal", "")))
                out.append(self._event("response.content_part.done", item_id=item_id,
                                       output_index=index, content_index=number, part=part))
            if item.get("type") == "function_call":
                out.append(self._event("response.function_call_arguments.done",
                                       item_id=item_id, output_index=index,
                                       arguments=item.get("arguments", "")))
            out.append(self._event("response.output_item.done", output_index=index,
                                   item=item))
            self._items[index] = item
        self._open_items.clear()
        self._open_parts.clear()
        index = max(self._items) + 1 if self._items else 0
        added = _guardrail_item(message, "in_progress")
        added["content"] = []
        empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        done = _guardrail_item(message, "completed")
        item_id = done["id"]
        out.append(self._event("response.output_item.added", output_index=index, item=added))
        out.append(self._event("response.content_part.added", item_id=item_id,
                               output_index=index, content_index=0, part=empty))
        out.append(self._event("response.output_text.delta", item_id=item_id,
                               output_index=index, content_index=0, delta=message,
                               logprobs=[]))
        out.append(self._event("response.output_text.done", item_id=item_id,
                               output_index=index, content_index=0, text=message, logprobs=[]))
        out.append(self._event("response.content_part.done", item_id=item_id,
                               output_index=index, content_index=0,
                               part=done["content"][0]))
        out.append(self._event("response.output_item.done", output_index=index, item=done))
        self._items[index] = done
        response = self._lifecycle()
        response.update(status="incomplete", incomplete_details={"reason": "content_filter"},
                        error=None, output=[self._items[i] for i in sorted(self._items)])
        out.append(self._event("response.completed", response=response))
        return b"".join(out)

