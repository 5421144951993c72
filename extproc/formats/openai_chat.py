"""OpenAI Chat Completions (``POST .../chat/completions``), also spoken by vLLM and most
OpenAI-compatible servers.

Streamed answers are ``data: {chat.completion.chunk}`` events ended by ``data: [DONE]``. The
model text is each choice's ``delta.content`` and ``delta.refusal``, plus streamed tool-call
arguments (``delta.tool_calls[].function.arguments``, and the legacy ``delta.function_call``).
A ``data:`` line that is not JSON carries no text for us and passes through unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from typing import Any

from extproc.formats import ErrorKind
from extproc.sse import SSEEvent, encode_event

_ERRORS: Mapping[str, tuple[int, str]] = {
    ErrorKind.VIOLATION: (400, "Violated guardrail policy"),
    ErrorKind.UNAVAILABLE: (503, "Guardrail unavailable"),
}


def error_object(kind: str) -> dict[str, Any]:
    """``{"error": {"message", "code", "type"}}`` as OpenAI clients expect it."""
    code, message = _ERRORS[kind]
    return {"error": {"message": message, "code": code, "type": kind}}


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            part.get("text", "")
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        ]
        return "\n".join(p for p in parts if p)
    return ""


class OpenAIChat:
    """The Chat Completions format."""

    name = "openai.chat_completions"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.endswith("/chat/completions")

    def prompt_texts(self, body: bytes) -> list[str]:
        """The last user message (text parts joined)."""
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return []
        messages = request.get("messages") if isinstance(request, Mapping) else None
        if not isinstance(messages, list):
            return []
        for message in reversed(messages):
            if isinstance(message, Mapping) and message.get("role") == "user":
                text = _message_text(message.get("content"))
                return [text] if text else []
        return []

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        data = event.data
        if not data or data == "[DONE]":
            return []
        try:
            chunk = json.loads(data)
        except ValueError:
            return []
        if not isinstance(chunk, Mapping):
            return []
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return []
        found: list[tuple[Hashable, str]] = []
        for choice in choices:
            if not isinstance(choice, Mapping):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta")
            if not isinstance(delta, Mapping):
                continue
            content = delta.get("content")
            if isinstance(content, str) and content:
                found.append((("content", index), content))
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                found.append((("refusal", index), refusal))
            tool_calls = delta.get("tool_calls")
            if isinstance(tool_calls, list):
                for call in tool_calls:
                    if not isinstance(call, Mapping):
                        continue
                    function = call.get("function")
                    if isinstance(function, Mapping):
                        arguments = function.get("arguments")
                        if isinstance(arguments, str) and arguments:
                            found.append((("tool", index, call.get("index", 0)), arguments))
            function_call = delta.get("function_call")
            if isinstance(function_call, Mapping):
                arguments = function_call.get("arguments")
                if isinstance(arguments, str) and arguments:
                    found.append((("function", index), arguments))
        return found

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        chunk = json.loads(event.data or "")
        for choice in chunk.get("choices", []):
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            if ("content", index) in texts and isinstance(delta.get("content"), str):
                delta["content"] = texts[("content", index)]
            if ("refusal", index) in texts and isinstance(delta.get("refusal"), str):
                delta["refusal"] = texts[("refusal", index)]
            for call in delta.get("tool_calls") or []:
                key = ("tool", index, call.get("index", 0))
                function = call.get("function") or {}
                if key in texts and isinstance(function.get("arguments"), str):
                    function["arguments"] = texts[key]
            function_call = delta.get("function_call") or {}
            if ("function", index) in texts and isinstance(function_call.get("arguments"), str):
                function_call["arguments"] = texts[("function", index)]
        data = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)
        return encode_event(data, event.event)

    def terminal_frame(self, kind: str) -> bytes:
        body = json.dumps(error_object(kind))
        return f"data: {body}\n\ndata: [DONE]\n\n".encode()

    def error_body(self, kind: str) -> tuple[int, bytes]:
        status, _ = _ERRORS[kind]
        return status, json.dumps(error_object(kind)).encode()
