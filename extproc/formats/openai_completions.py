"""OpenAI legacy Completions (``POST .../completions``, not chat), still served by vLLM, TGI,
llama.cpp and Azure (``/openai/deployments/{name}/completions``).

Paths: any ``POST`` whose path (query stripped) ends with ``/completions`` but not with
``/chat/completions`` (``all_formats`` also tries Chat Completions first).

Prompt: ``prompt``, a string or a list of strings (token-id prompts carry no text). Every
scope gives every prompt string: the API has no roles.

Streamed answers are ``data: {text_completion}`` events ended by ``data: [DONE]``; the model
text is ``choices[].text``, channel ``("text", choice index)`` (the non-streamed answer uses the
same keys, the choice's position as its index). A rewritten choice loses its ``logprobs``.

Hard block: the Chat Completions frame, ``data: {"error": {...}}`` then ``data: [DONE]`` (the
``openai`` SDK raises ``openai.APIError``). Soft block: a chunk with the message as each open
choice's ``text``, a chunk with ``finish_reason: "content_filter"``, then ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from extproc.formats import PromptScope, StreamCodec
from extproc.formats import _common as c
from extproc.formats.openai_chat import error_body, error_frame
from extproc.framing import Decoder, sse_decoder


def _prompt_slots(request: dict[str, Any], scope: str) -> list[c.Slot]:
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return c.text_slot(request, "prompt")
    if isinstance(prompt, list):
        slots: list[c.Slot] = []
        for index in range(len(prompt)):
            slots += c.text_slot(prompt, index)
        return slots
    return []


def _response_slots(answer: dict[str, Any]) -> list[c.Slot]:
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return []
    slots: list[c.Slot] = []
    for position, choice in enumerate(choices):
        if isinstance(choice, dict):
            slots += c.text_slot(choice, "text", ("text", position))
    return slots


class OpenAICompletions:
    """The legacy Completions format."""

    name = "openai.completions"

    def matches(self, method: str, path: str) -> bool:
        return (method == "POST" and path.endswith("/completions")
                and not path.endswith("/chat/completions"))

    def prompt_texts(self, body: bytes, scope: str = PromptScope.LAST_USER) -> list[str]:
        return c.prompt_texts(body, scope, _prompt_slots)

    def rewrite_prompt(self, body: bytes, scope: str, texts: list[str]) -> bytes | None:
        return c.rewrite_prompt(body, scope, texts, _prompt_slots)

    def response_texts(self, body: bytes) -> list[tuple[Hashable, str]]:
        return c.response_texts(body, _response_slots)

    def rewrite_response(self, body: bytes, texts: Mapping[Hashable, str]) -> bytes:
        def find(answer: dict[str, Any]) -> list[c.Slot]:
            slots = _response_slots(answer)
            for slot in slots:
                if slot.channel in texts and slot.container.get("logprobs") is not None:
                    slot.container["logprobs"] = None
            return slots

        return c.rewrite_response(body, texts, find)

    def soft_block_response(self, body: bytes | None, message: str) -> bytes:
        answer = c.load_object(body) or {}
        choices = answer.get("choices")
        indexes = [choice.get("index", position) for position, choice in enumerate(choices)
                   if isinstance(choice, dict)] if isinstance(choices, list) else []
        result: dict[str, Any] = {
            "id": answer.get("id") or "cmpl-guardrail",
            "object": "text_completion",
            "created": answer.get("created") if isinstance(answer.get("created"), int) else 0,
            "model": answer.get("model") if isinstance(answer.get("model"), str) else "",
        }
        if "system_fingerprint" in answer:
            result["system_fingerprint"] = answer["system_fingerprint"]
        result["choices"] = [{"index": index, "text": message, "logprobs": None,
                              "finish_reason": "content_filter"} for index in (indexes or [0])]
        if "usage" in answer:
            result["usage"] = answer["usage"]
        return c.dumps(result).encode()

    def error_body(self, kind: str) -> tuple[int, bytes]:
        return error_body(kind)

    def stream_codec(self) -> StreamCodec:
        return CompletionsCodec()

    def stream_decoder(self, content_type: str) -> Decoder | None:
        return sse_decoder(content_type)


class CompletionsCodec(c.ChoicesCodec):
    """One streamed Completions answer."""

    HEAD_KEYS = ("id", "created", "model", "system_fingerprint")

    def _extract_choice(self, choice: dict[str, Any], found: list[tuple[Hashable, str]],
                        states: list[c.State]) -> None:
        index = c.key(choice.get("index", 0))
        states.append((index, bool(choice.get("finish_reason")), -1))
        text = choice.get("text")
        if c.is_text(text):
            found.append((("text", index), text))

    def _rewrite_choice(self, choice: dict[str, Any], index: Any,
                        texts: Mapping[Hashable, str], start: int) -> bool:
        key = ("text", index)
        if key in texts and isinstance(choice.get("text"), str):
            choice["text"] = texts[key]
            return True
        return False

    def terminal_frame(self, kind: str) -> bytes:
        return error_frame(kind)

    def soft_block_frame(self, message: str) -> bytes:
        head: dict[str, Any] = {
            "id": self._head.get("id") or "cmpl-guardrail",
            "object": "text_completion",
            "created": self._head.get("created", 0),
            "model": self._head.get("model", ""),
        }
        if "system_fingerprint" in self._head:
            head["system_fingerprint"] = self._head["system_fingerprint"]
        open_choices = [i for i, finished in self._choices.items() if not finished]
        targets = open_choices or list(self._choices) or [0]
        text = {**head, "choices": [{"index": i, "text": message, "logprobs": None,
                                     "finish_reason": None} for i in targets]}
        finish = {**head, "choices": [{"index": i, "text": "", "logprobs": None,
                                       "finish_reason": "content_filter"} for i in targets]}
        return c.event_bytes(text) + c.event_bytes(finish) + c.DONE
