"""Ollama's native API: ``/api/chat`` and ``/api/generate``, streamed as NDJSON or not.

Streamed answers (the default when a request does not say ``"stream": false``) are
``application/x-ndjson``: one JSON object per line (``extproc.framing.NDJSONDecoder``).
Chat lines hold ``message.content``, ``message.thinking`` and whole ``message.tool_calls``;
generate lines ``response`` and ``thinking``; the last line says ``"done": true``. The
official clients show every one of them, so every one is read:

==========================  ===========================  ==================================
text                        channel                      masked
==========================  ===========================  ==================================
content / ``response``      ``("content",)``             in place
``thinking``                ``("thinking",)``            in place
a tool call's name          ``("tool_name", n)``         in place
a tool call's arguments     ``("tool", n)`` (as JSON)    in place when still a JSON object,
                                                         else ``{}``
a line that is not an       ``("data",)``                the masked text as the line
object Ollama writes
==========================  ===========================  ==================================

(An upstream's own ``error`` line is the server's, not the model's: it passes, as error
events do in the other formats. ``n`` is ``(line, call)``: the line's number in the stream and
the call's index in it; Ollama sends each call whole, in one line.)

The ``ollama`` Python client parses every line with ``json.loads`` and raises
``ResponseError`` when the object's ``error`` is truthy (``_client.py``, ``_request`` of
``stream=True``); a blank line or an ``error`` that is not a string breaks it (a
``JSONDecodeError``, a ``TypeError`` in ``ResponseError``). Hence: the terminal frame is one
line ``{"error": "Violated guardrail policy"}``, the error a string; no keep-alive bytes
exist for this framing. A soft block is the guardrail's message as the content of one line,
then a ``done`` line with ``done_reason: "content_filter"``. A non-streamed answer is the
object of a stream's last line with the whole text; an error before headers is
``{"error": message}`` with the kind's status, which the clients raise as ``ResponseError``
carrying the message and status.

Prompts: chat ``messages[].content`` (``images`` hold base64 pictures, not text); generate
``prompt``, ``suffix`` (user text), ``system`` and ``template`` (instructions).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from typing import Any

from extproc.formats import PromptScope, StreamCodec
from extproc.formats import _common as c
from extproc.framing import Decoder, NDJSONDecoder
from extproc.sse import SSEEvent, utf8

NDJSON_TYPE = "application/x-ndjson"
DATA_CHANNEL: Hashable = ("data",)
_SYSTEM_ROLES = ("system",)


def error_body(kind: str) -> tuple[int, bytes]:
    status, message = c.error_status(kind)
    return status, utf8(c.dumps({"error": message}))


def error_line(kind: str) -> bytes:
    return (c.dumps({"error": c.error_status(kind)[1]}) + "\n").encode()


def _chat_slots(request: dict[str, Any], scope: str) -> list[c.Slot]:
    return [slot for message in c.scoped_messages(request.get("messages"), scope, _SYSTEM_ROLES)
            for slot in c.text_slot(message, "content")]


def _generate_slots(request: dict[str, Any], scope: str) -> list[c.Slot]:
    slots = c.text_slot(request, "prompt") + c.text_slot(request, "suffix")
    if scope == PromptScope.ALL_WITH_SYSTEM:
        slots += c.text_slot(request, "system") + c.text_slot(request, "template")
    return slots


def _tool_slots(message: dict[str, Any], line: int) -> list[c.Slot]:
    calls = message.get("tool_calls")
    slots: list[c.Slot] = []
    if not isinstance(calls, list):
        return slots
    for index, call in enumerate(calls):
        number = (line, index)
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        slots += c.text_slot(function, "name", ("tool_name", number))
        if isinstance(function.get("arguments"), dict) and function["arguments"]:
            slots.append(_ArgumentsSlot(function, "arguments", ("tool", number), True))
    return slots


class _ArgumentsSlot(c.Slot):
    """A tool call's ``arguments`` object, checked as its JSON; a mask that leaves no JSON
    object empties it (nothing of the original goes out)."""

    __slots__ = ()

    def set(self, text: str) -> None:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = None
        self.container[self.key] = value if isinstance(value, dict) else {}


def _answer_slots(answer: dict[str, Any], line: int = 0) -> list[c.Slot]:
    """The text of one answer object (a stream's ``line``, or a whole answer)."""
    slots: list[c.Slot] = []
    message = answer.get("message")
    if isinstance(message, dict):
        slots += c.text_slot(message, "content", ("content",))
        slots += c.text_slot(message, "thinking", ("thinking",))
        slots += _tool_slots(message, line)
    slots += c.text_slot(answer, "response", ("content",))
    slots += c.text_slot(answer, "thinking", ("thinking",))
    tokens = answer.get("logprobs")
    if isinstance(tokens, list) and tokens:
        # Logprob tokens that are not the text, and the alternatives (Chat's reading,
        # ``_common.extract_logprobs``); a mask of anything in the line drops them.
        text = message.get("content") if isinstance(message, dict) else answer.get("response")
        found: list[tuple[Hashable, str]] = []
        c.extract_logprobs({"content": tokens}, {"content": text}, None, found)
        slots += [c.DropSlot(answer, "logprobs", channel, text=shown)
                  for channel, shown in found]
    return slots


class OllamaFormat:
    """``/api/chat`` (``generate=False``) or ``/api/generate``."""

    def __init__(self, generate: bool) -> None:
        self._generate = generate
        self.name = "ollama.generate" if generate else "ollama.chat"
        self._path = "/api/generate" if generate else "/api/chat"
        self._slots = _generate_slots if generate else _chat_slots

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith(self._path)

    def prompt_texts(self, body: bytes, scope: str = PromptScope.LAST_USER) -> list[str]:
        return c.prompt_texts(body, scope, self._slots)

    def rewrite_prompt(self, body: bytes, scope: str, texts: list[str]) -> bytes | None:
        return c.rewrite_prompt(body, scope, texts, self._slots)

    def response_texts(self, body: bytes) -> list[tuple[Hashable, str]]:
        return c.response_texts(body, _answer_slots)

    def rewrite_response(self, body: bytes, texts: Mapping[Hashable, str]) -> bytes:
        def find(answer: dict[str, Any]) -> list[c.Slot]:
            slots = _answer_slots(answer)
            if texts and answer.get("logprobs") is not None:
                answer["logprobs"] = None  # they would repeat the original tokens
            return slots

        return c.rewrite_response(body, texts, find)

    def soft_block_response(self, body: bytes | None, message: str) -> bytes:
        answer = c.load_object(body) or {}
        return utf8(c.dumps(_done(answer, message, self._generate)))

    def error_body(self, kind: str) -> tuple[int, bytes]:
        return error_body(kind)

    def stream_codec(self) -> StreamCodec:
        return OllamaCodec(self._generate)

    def stream_decoder(self, content_type: str) -> Decoder | None:
        return NDJSONDecoder() if content_type.startswith(NDJSON_TYPE) else None


def _head(answer: Mapping[str, Any]) -> dict[str, Any]:
    head: dict[str, Any] = {}
    for key in ("model", "created_at"):
        if isinstance(answer.get(key), str):
            head[key] = answer[key]
    return head


def _done(answer: Mapping[str, Any], text: str, generate: bool) -> dict[str, Any]:
    """A last line (or whole answer) whose text is ``text``, stopped by the guardrail."""
    done = _head(answer)
    if generate:
        done["response"] = text
    else:
        done["message"] = {"role": "assistant", "content": text}
    done["done"] = True
    done["done_reason"] = "content_filter"
    return done


class OllamaCodec:
    """One streamed Ollama answer (NDJSON lines as ``SSEEvent``s: ``data`` is the line)."""

    holds_trailing_events = True

    def __init__(self, generate: bool) -> None:
        self._generate = generate
        self._head: dict[str, Any] = {}
        # Lines extracted and rewritten: every line is both, in order (``StreamCodec``), so
        # the two counts number a line alike (a tool call's channel holds its line's number).
        self._read = 0
        self._written = 0
        self.text_ended = False

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        number = self._read
        self._read = number + 1
        data = event.data
        if data is None:
            return []
        line = c.load_object(data)
        if line is None:
            # Not an object Ollama writes: the clients raise on it or skip it; what it says
            # is text all the same.
            return [(DATA_CHANNEL, data)] if data.strip() else []
        if not self._head:
            self._head = _head(line)
        slots = _answer_slots(line, number)
        found = [(slot.channel, slot.get()) for slot in slots]
        if line.get("done") is True:
            self.text_ended = True
        elif found:
            self.text_ended = False
        return found

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        number = self._written
        self._written = number + 1
        if not texts:
            return event.raw
        ending = event.raw[len(event.raw.rstrip(b"\r\n")):] or b"\n"
        line = c.load_object(event.data)
        if line is None:
            masked = texts.get(DATA_CHANNEL)
            return event.raw if masked is None else utf8(masked) + ending
        slots = {slot.channel: slot for slot in _answer_slots(line, number)}
        for channel, text in texts.items():
            slot = slots.get(channel)
            if slot is not None:
                slot.set(text)
        if line.get("logprobs") is not None:
            line["logprobs"] = None  # they would repeat the original tokens
        return utf8(c.dumps(line)) + ending

    def terminal_frame(self, kind: str) -> bytes:
        return error_line(kind)

    def soft_block_frame(self, message: str) -> bytes:
        text = dict(self._head)
        if self._generate:
            text["response"] = message
        else:
            text["message"] = {"role": "assistant", "content": message}
        text["done"] = False
        return utf8(c.dumps(text) + "\n" + c.dumps(_done(self._head, "", self._generate))
                      + "\n")
