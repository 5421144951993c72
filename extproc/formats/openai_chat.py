"""OpenAI Chat Completions (``POST .../chat/completions``), also spoken by vLLM, Azure OpenAI
(``/openai/deployments/{name}/chat/completions``) and most OpenAI-compatible servers.

Paths: any ``POST`` whose path (query stripped) ends with ``/chat/completions``.

Prompt: ``messages[].content`` (a string, or each ``text`` part of a list). ``last_user``: the
last ``user`` message (nothing when it has no text); ``all``: every message but ``system`` and
``developer`` (assistant and tool messages included); ``all_with_system``: every message.

Streamed answers are ``data: {chat.completion.chunk}`` events ended by ``data: [DONE]``. The
model text is each choice's ``delta.content``, ``delta.refusal`` and reasoning
(``delta.reasoning_content``, ``delta.reasoning``), plus streamed tool-call
arguments (``delta.tool_calls[].function.arguments``, and the legacy ``delta.function_call``),
their names, an audio answer's ``delta.audio.transcript``, and a ``content`` that is a list of
chunks (Mistral: ``text`` parts continue the content, the text inside ``thinking`` parts is
reasoning). Channels: ``("content", choice)``, ``("refusal", choice)``,
``("reasoning_content", choice)``, ``("reasoning", choice)``, ``("thinking", choice)``,
``("audio", choice)``, ``("tool", choice, call index)``, ``("tool_name", choice, call index)``,
``("function", choice)``, ``("function_name", choice)``; the non-streamed answer uses the same
keys (``message`` instead of ``delta``; the choice's and the tool call's positions are their
indexes, so that channels stay unique even in an answer that repeats an index; list parts are
``("content_part" | "thinking_part", choice, n)``). A ``data:`` line that is not
JSON carries no text for us and passes through unchanged. A rewritten (masked) choice loses its
``logprobs``, which would repeat the original tokens.

Hard block: ``data: {"error": {...}}`` then ``data: [DONE]``; the ``openai`` SDK raises
``openai.APIError`` with the message on any ``data:`` object with an ``error`` key. Soft block:
a chunk with the message as ``delta.content`` for each open choice, a chunk with
``finish_reason: "content_filter"``, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from typing import Any

from extproc.formats import PromptScope, StreamCodec
from extproc.formats import _common as c
from extproc.framing import Decoder, sse_decoder


def error_object(kind: str) -> dict[str, Any]:
    """``{"error": {"message", "code", "type"}}`` as OpenAI clients expect it."""
    code, message = c.error_status(kind)
    return {"error": {"message": message, "code": code, "type": kind}}


def error_frame(kind: str) -> bytes:
    """``data: {"error": ...}`` then ``data: [DONE]`` (shared with legacy Completions)."""
    return f"data: {json.dumps(error_object(kind))}\n\n".encode() + c.DONE


def error_body(kind: str) -> tuple[int, bytes]:
    status, _ = c.error_status(kind)
    return status, json.dumps(error_object(kind)).encode()


_SYSTEM_ROLES = ("system", "developer")
#: The model's reasoning, streamed beside the content: ``reasoning_content`` (vLLM's reasoning
#: parsers, DeepSeek), ``reasoning`` (OpenRouter, newer vLLM). Clients show it: it is answer
#: text like the content, on channels of its own.
_REASONING = ("reasoning_content", "reasoning")
_TEXT_FIELDS = ("content", "refusal", *_REASONING)


def _prompt_slots(request: dict[str, Any], scope: str) -> list[c.Slot]:
    return [slot for message in c.scoped_messages(request.get("messages"), scope, _SYSTEM_ROLES)
            for slot in c.content_slots(message)]


def _response_slots(answer: dict[str, Any]) -> list[c.Slot]:
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return []
    slots: list[c.Slot] = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        index = position  # unique even when an answer repeats an index
        message = choice.get("message")
        if not isinstance(message, dict):
            continue
        for field in _TEXT_FIELDS:
            slots += c.text_slot(message, field, (field, index))
        logprobs = choice.get("logprobs")
        if logprobs:
            found: list[tuple[Hashable, str]] = []
            c.extract_logprobs(logprobs, message, index, found)
            slots += [c.DropSlot(choice, "logprobs", channel, text=text)
                      for channel, text in found]
        for kind, parts in _content_parts(message.get("content")).items():
            slots += [c.Slot(slot.container, slot.key, (kind, index, number))
                      for number, slot in enumerate(parts)]
        audio = message.get("audio")
        if isinstance(audio, dict):
            slots += c.text_slot(audio, "transcript", ("audio", index))
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for number, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    slots += c.text_slot(function, "arguments", ("tool", index, number))
                    slots += c.text_slot(function, "name", ("tool_name", index, number))
        function_call = message.get("function_call")
        if isinstance(function_call, dict):
            slots += c.text_slot(function_call, "arguments", ("function", index))
            slots += c.text_slot(function_call, "name", ("function_name", index))
    return slots


def _content_parts(content: Any) -> dict[str, list[c.Slot]]:
    """The text of a ``content`` that is a list of parts (Mistral's chunks): ``text`` parts
    (``"content_part"``) and the text inside ``thinking`` parts (``"thinking_part"``), in
    order. Clients show both."""
    if not isinstance(content, list):
        return {}
    found: dict[str, list[c.Slot]] = {}
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            found.setdefault("content_part", []).extend(c.text_slot(part, "text"))
        elif kind == "thinking":
            thinking = part.get("thinking")
            if isinstance(thinking, str):
                found.setdefault("thinking_part", []).extend(c.text_slot(part, "thinking"))
            elif isinstance(thinking, list):
                for inner in thinking:
                    if isinstance(inner, dict) and inner.get("type", "text") == "text":
                        found.setdefault("thinking_part", []).extend(
                            c.text_slot(inner, "text"))
    return found


def _joined(slots: list[c.Slot]) -> str:
    return "".join(slot.get() for slot in slots)


def _put_joined(slots: list[c.Slot], text: str) -> None:
    """A channel's text for one event, spread back over its slots: all of it in the first."""
    for number, slot in enumerate(slots):
        slot.set(text if number == 0 else "")


class OpenAIChat:
    """The Chat Completions format."""

    name = "openai.chat_completions"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith("/chat/completions")

    def prompt_texts(self, body: bytes, scope: str = PromptScope.LAST_USER) -> list[str]:
        return c.prompt_texts(body, scope, _prompt_slots)

    def rewrite_prompt(self, body: bytes, scope: str, texts: list[str]) -> bytes | None:
        return c.rewrite_prompt(body, scope, texts, _prompt_slots)

    def response_texts(self, body: bytes) -> list[tuple[Hashable, str]]:
        return c.response_texts(body, _response_slots)

    def rewrite_response(self, body: bytes, texts: Mapping[Hashable, str]) -> bytes:
        changed = {key[1] for key in texts if isinstance(key, tuple) and len(key) > 1}

        def find(answer: dict[str, Any]) -> list[c.Slot]:
            slots = _response_slots(answer)
            choices = answer.get("choices")
            for position, choice in enumerate(choices if isinstance(choices, list) else []):
                if isinstance(choice, dict) and position in changed \
                        and choice.get("logprobs") is not None:
                    choice["logprobs"] = None
            return slots

        return c.rewrite_response(body, texts, find)

    def soft_block_response(self, body: bytes | None, message: str) -> bytes:
        answer = c.load_object(body) or {}
        choices = answer.get("choices")
        indexes = [choice.get("index", position) for position, choice in enumerate(choices)
                   if isinstance(choice, dict)] if isinstance(choices, list) else []
        result: dict[str, Any] = {
            "id": answer.get("id") or "chatcmpl-guardrail",
            "object": "chat.completion",
            "created": answer.get("created") if isinstance(answer.get("created"), int) else 0,
            "model": answer.get("model") if isinstance(answer.get("model"), str) else "",
        }
        for key in ("service_tier", "system_fingerprint"):
            if key in answer:
                result[key] = answer[key]
        result["choices"] = [
            {"index": index, "message": {"role": "assistant", "content": message,
                                         "refusal": None, "annotations": []},
             "logprobs": None, "finish_reason": "content_filter"}
            for index in (indexes or [0])
        ]
        if "usage" in answer:
            result["usage"] = answer["usage"]
        return c.dumps(result).encode()

    def error_body(self, kind: str) -> tuple[int, bytes]:
        return error_body(kind)

    def stream_codec(self) -> StreamCodec:
        return ChatCodec()

    def stream_decoder(self, content_type: str) -> Decoder | None:
        return sse_decoder(content_type)


def _extract_choice(choice: dict[str, Any], found: list[tuple[Hashable, str]],
                    states: list[c.State], read: dict[Hashable, int]) -> None:
    """``ChatCodec.extract`` of one choice (once per event: ``c.key`` and ``c.is_text`` inlined
    for the usual values); ``read``: choice index -> characters of content read so far."""
    index = choice.get("index", 0)
    if type(index) is not int:
        index = c.key(index)
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        states.append((index, bool(choice.get("finish_reason")), -1))
        return
    content = delta.get("content")
    if content and isinstance(content, str):
        start = read.get(index, 0)
        read[index] = start + len(content)
        states.append((index, bool(choice.get("finish_reason")), start))
    else:
        states.append((index, bool(choice.get("finish_reason")), -1))
    logprobs = choice.get("logprobs")
    if logprobs:  # (requested explicitly; null in the usual chunk)
        c.extract_logprobs(logprobs, delta, index, found)
    if content and isinstance(content, str):
        found.append((("content", index), content))
    elif isinstance(content, list):
        for kind, slots in _content_parts(content).items():
            text = _joined(slots)
            if text:
                found.append(((_PART_CHANNELS[kind], index), text))
    refusal = delta.get("refusal")
    if refusal and isinstance(refusal, str):
        found.append((("refusal", index), refusal))
    if len(delta) == 1 and content is not None:
        return  # the usual delta holds its content alone
    for field in _REASONING:
        reasoning = delta.get(field)
        if reasoning and isinstance(reasoning, str):
            found.append(((field, index), reasoning))
    audio = delta.get("audio")
    if isinstance(audio, dict):
        transcript = audio.get("transcript")
        if c.is_text(transcript):
            found.append((("audio", index), transcript))
    tool_calls = delta.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            if not isinstance(call, dict):
                continue
            function = call.get("function")
            if isinstance(function, dict):
                number = c.key(call.get("index", 0))
                name = function.get("name")
                if c.is_text(name):
                    found.append((("tool_name", index, number), name))
                arguments = function.get("arguments")
                if c.is_text(arguments):
                    found.append((("tool", index, number), arguments))
    function_call = delta.get("function_call")
    if isinstance(function_call, dict):
        name = function_call.get("name")
        if c.is_text(name):
            found.append((("function_name", index), name))
        arguments = function_call.get("arguments")
        if c.is_text(arguments):
            found.append((("function", index), arguments))


#: a streamed list content's part kind -> its channel kind: text parts continue the content
_PART_CHANNELS = {"content_part": "content", "thinking_part": "thinking"}


def _put(container: dict[str, Any], field: str, key: Hashable,
         texts: Mapping[Hashable, str]) -> bool:
    if key in texts and isinstance(container.get(field), str):
        container[field] = texts[key]
        return True
    return False


class ChatCodec(c.ChoicesCodec):
    """One streamed Chat Completions answer."""

    HEAD_KEYS = ("id", "created", "model", "service_tier", "system_fingerprint")

    def __init__(self) -> None:
        super().__init__()
        # choice index -> characters of its content read (where a piece starts, so that a
        # mask can move the offsets that ``delta.annotations`` hold into the content)
        self._read: dict[Hashable, int] = {}

    def _extract_choice(self, choice: dict[str, Any], found: list[tuple[Hashable, str]],
                        states: list[c.State]) -> None:
        _extract_choice(choice, found, states, self._read)

    def _annotations(self, choice: dict[str, Any]) -> Any:
        delta = choice.get("delta")
        return delta.get("annotations") if isinstance(delta, dict) else None

    def _rewrite_choice(self, choice: dict[str, Any], index: Any,
                        texts: Mapping[Hashable, str], start: int) -> bool:
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return False
        changed = False
        key: Hashable
        for field in _TEXT_FIELDS:
            key = (field, index)
            if key in texts and isinstance(delta.get(field), str):
                if field == "content":
                    self._record_edit(index, start, delta[field], texts[key])
                delta[field] = texts[key]
                changed = True
        for kind, slots in _content_parts(delta.get("content")).items():
            key = (_PART_CHANNELS[kind], index)
            if key in texts:
                _put_joined(slots, texts[key])
                changed = True
        audio = delta.get("audio")
        if ("audio", index) in texts and isinstance(audio, dict) \
                and isinstance(audio.get("transcript"), str):
            audio["transcript"] = texts[("audio", index)]
            changed = True
        for call in delta.get("tool_calls") or []:
            if not isinstance(call, dict):
                continue
            number = c.key(call.get("index", 0))
            function = call.get("function")
            if isinstance(function, dict):
                changed |= _put(function, "arguments", ("tool", index, number), texts)
                changed |= _put(function, "name", ("tool_name", index, number), texts)
        function_call = delta.get("function_call")
        if isinstance(function_call, dict):
            changed |= _put(function_call, "arguments", ("function", index), texts)
            changed |= _put(function_call, "name", ("function_name", index), texts)
        if any((kind, field, index) in texts for kind in ("logprobs", "top_logprobs")
               for field in ("content", "refusal")):
            changed = True  # masked tokens: the choice's logprobs are dropped
        return changed

    def terminal_frame(self, kind: str) -> bytes:
        return error_frame(kind)

    def soft_block_frame(self, message: str) -> bytes:
        head = {
            "id": self._head.get("id") or "chatcmpl-guardrail",
            "object": "chat.completion.chunk",
            "created": self._head.get("created", 0),
            "model": self._head.get("model", ""),
        }
        for key in ("service_tier", "system_fingerprint"):
            if key in self._head:
                head[key] = self._head[key]
        open_choices = [i for i, finished in self._choices.items() if not finished]
        targets = open_choices or list(self._choices) or [0]
        content = {**head, "choices": [
            {"index": i, "delta": {"content": message} if i in self._choices
             else {"role": "assistant", "content": message},
             "logprobs": None, "finish_reason": None} for i in targets]}
        finish = {**head, "choices": [
            {"index": i, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}
            for i in targets]}
        return c.event_bytes(content) + c.event_bytes(finish) + c.DONE
