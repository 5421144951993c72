"""Wire formats of the LLM APIs we guard, behind one ``StreamFormat`` interface.

A format recognises its requests by method and path, pulls the text to check out of a request
body (the prompt) and out of each SSE event of a streamed answer, and builds the terminal
frames and error bodies that its own clients understand. Formats are pure: no I/O, no state
across calls, no Envoy or gRPC types.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Protocol

from extproc.sse import SSEEvent


class ErrorKind:
    """The two client-facing errors; the only things a client ever learns about a failure."""

    VIOLATION = "guardrail_violation"
    UNAVAILABLE = "guardrail_unavailable"


class StreamFormat(Protocol):
    """One LLM API's request and stream shapes."""

    name: str

    def matches(self, method: str, path: str) -> bool:
        """True when a request with this method and path (query stripped) is this API's."""
        ...

    def prompt_texts(self, body: bytes) -> list[str]:
        """The prompt text to check with source INPUT; empty when there is nothing to check."""
        ...

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        """The model text in one SSE event, as (channel, text) pairs in stream order."""
        ...

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        """The event with the text of the given channels replaced (masking), same shape."""
        ...

    def terminal_frame(self, kind: str) -> bytes:
        """The bytes that end a stream cut by the guardrail (error frame and terminator)."""
        ...

    def error_body(self, kind: str) -> tuple[int, bytes]:
        """HTTP status and JSON body for an error sent before response headers went out."""
        ...


def strip_query(path: str) -> str:
    """The path without query string or fragment."""
    for sep in ("?", "#"):
        index = path.find(sep)
        if index >= 0:
            path = path[:index]
    return path


def find_format(method: str, path: str, formats: tuple[StreamFormat, ...]) -> StreamFormat | None:
    """The first format that recognises the request, or None for traffic we do not guard."""
    bare = strip_query(path)
    for fmt in formats:
        if fmt.matches(method, bare):
            return fmt
    return None


def all_formats() -> tuple[StreamFormat, ...]:
    """Every format the sidecar guards, most specific first."""
    from extproc.formats.openai_chat import OpenAIChat

    return (OpenAIChat(),)
