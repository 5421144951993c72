"""Wire formats of the LLM APIs we guard: one module per API behind two small interfaces.

A :class:`StreamFormat` is stateless, one instance per API. It recognises its requests by
method and path, takes the prompt text out of a request body (and puts a masked prompt back),
takes the answer text out of a non-streamed JSON answer (and puts masked text back), and builds
the answers its clients understand: a soft block, an error body.

A :class:`StreamCodec` is made per streamed answer (``StreamFormat.stream_codec()``). It reads
the text out of each SSE event, rewrites events for masking, and builds the frames that end a
stream: the terminal frame of a hard block (the API's official SDK raises an error) and the
soft-block frame (the stream ends normally, the guardrail's message as the last content, with
the API's content-filter finish/stop reason).

A codec keeps the client's view of the stream (ids, open content blocks, output items,
sequence numbers, the text already sent), because the closing frames must continue exactly the
events the client received. It learns that view from :meth:`StreamCodec.rewrite`, which the
caller invokes for **every event it releases to the client, in order**; :meth:`extract` is
invoked for every event as it arrives (the events released are always a prefix of those).
Both run once per event of every stream, so a codec parses an event's JSON once: ``extract``
keeps what ``rewrite`` will need of it (``_common.Notes``), and ``rewrite`` parses again only
to replace text or for an event ``extract`` did not see (a caller that checks no text).

Formats and codecs are pure: no I/O, no logging, no Envoy or gRPC types.

Modules and the paths they recognise (``POST``, path without query, by suffix):

========================  ===========================  ===========================
module                    API                          path ends with
========================  ===========================  ===========================
``openai_chat``           OpenAI Chat Completions      ``/chat/completions``
``openai_responses``      OpenAI Responses             ``/responses``
``anthropic_messages``    Anthropic Messages           ``/messages`` (not Assistants
                                                       ``/threads/{id}/messages``)
``openai_completions``    OpenAI legacy Completions    ``/completions`` (not chat)
``gemini``                Google Gemini, Vertex AI     ``{model}:generatecontent``,
                                                       ``{model}:streamgeneratecontent``
``bedrock``               AWS Bedrock Runtime (event   ``/model/{id}/converse``,
                          streams)                     ``.../converse-stream``, ``.../invoke``,
                                                       ``.../invoke-with-response-stream``
``ollama``                Ollama (NDJSON streams)      ``/api/chat``, ``/api/generate``
``mcp``                   MCP over Streamable HTTP     ``/mcp`` (also ``GET``, ``DELETE``;
                          (JSON-RPC; JSON or SSE)      any path on a route ``api: mcp``)
========================  ===========================  ===========================
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote

from extproc.sse import SSEEvent

if TYPE_CHECKING:
    from extproc.framing import Decoder

__all__ = [
    "ErrorKind",
    "PromptScope",
    "StreamCodec",
    "StreamFormat",
    "all_formats",
    "canonical_path",
    "find_format",
    "is_reasoning",
    "strip_query",
]


class ErrorKind:
    """The client-facing errors; the only things a client ever learns about a failure."""

    VIOLATION = "guardrail_violation"  # HTTP 400, "Violated guardrail policy"
    UNAVAILABLE = "guardrail_unavailable"  # HTTP 503, "Guardrail unavailable"
    # Requests only (before anything went upstream):
    TOO_LARGE = "guardrail_request_too_large"  # HTTP 413: over --max-request-bytes
    UNREADABLE = "guardrail_unreadable_request"  # HTTP 415: a content-encoding we cannot read
    # HTTP 400: not exactly one JSON value every parser reads alike (``extproc.formats.strict``)
    INVALID = "guardrail_invalid_request"
    # HTTP 403: no format recognises the request and its route says ``--unknown-traffic reject``
    UNRECOGNISED = "guardrail_unrecognised_request"
    # HTTP 400: a prompt image the guardrail cannot be given, on a route with
    # ``--unchecked-images reject`` (one kind per reason, ``extproc.images.Reason``)
    IMAGE_REFERENCE = "guardrail_image_not_inline"
    IMAGE_FORMAT = "guardrail_image_format"
    IMAGE_TOO_LARGE = "guardrail_image_too_large"
    IMAGE_UNREADABLE = "guardrail_image_unreadable"
    # the guardrail answered without screening the images (``guardrailCoverage.images``)
    IMAGE_NOT_GUARDED = "guardrail_image_not_guarded"


class PromptScope:
    """Which prompt text ``prompt_texts`` returns (``extproc.domain.values.PromptScope``'s values).

    * ``whole_request`` (the default): every text of the request a model may read, one check
      text per message or field (``extproc.formats.whole``), whatever its shape.
    * ``last_user``: the text of the last user turn.
    * ``all``: the text of every conversation turn, tool results included; no instructions.
    * ``all_with_system``: ``all`` plus the system / developer instructions.
    """

    WHOLE_REQUEST = "whole_request"
    LAST_USER = "last_user"
    ALL = "all"
    ALL_WITH_SYSTEM = "all_with_system"
    VALUES = (WHOLE_REQUEST, LAST_USER, ALL, ALL_WITH_SYSTEM)


class StreamCodec(Protocol):
    """The events of one streamed answer. May keep state; one instance per stream."""

    #: Set by ``extract``: the events so far say the model's text is complete (every choice
    #: has a ``finish_reason``, the message a ``stop_reason``, the response is completed), so
    #: the guard checks the tail now rather than at the end of the body. Later text clears it.
    text_ended: bool

    #: In sync mode the events after the end of the text (finish, usage, terminator) wait for
    #: the end of the body, so that a client stopping at the terminator does not hang up
    #: before the stream's metadata reached Envoy (True); or go out as soon as they may
    #: (False: MCP, whose events are whole messages and whose GET streams may never end).
    holds_trailing_events: bool

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        """The model text in one SSE event as (channel, text) pairs in stream order, each text
        non-empty.

        Called once per event as it arrives, in order. A channel is one independent stream of
        text (a choice's content, a tool call's arguments, a content block) and is the same
        hashable key for every event of that stream of text.
        """
        ...

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        """The bytes to send for an event released to the client.

        Called for every released event, in release order, ``texts`` holding the new text of
        the channels that changed (masking; empty when nothing changed). Returns the same event
        shape with those texts replaced, or ``event.raw`` unchanged when there is nothing to
        change. Events repeating text already streamed (Responses ``*.done`` events,
        ``response.completed``) are rewritten with the text the client actually received.
        """
        ...

    def terminal_frame(self, kind: str) -> bytes:
        """The bytes that end a stream cut by the guardrail (``kind``: an ``ErrorKind``);
        the API's official SDK raises its error with the kind's message."""
        ...

    def soft_block_frame(self, message: str) -> bytes:
        """The bytes that end the stream normally: ``message`` as the last content, the API's
        content-filter finish/stop reason and its terminator, continuing the released events."""
        ...


class StreamFormat(Protocol):
    """One LLM API's request and answer shapes. Stateless; one instance per API."""

    name: str

    def matches(self, method: str, path: str) -> bool:
        """True when a request with this method and path (query stripped) is this API's."""
        ...

    def prompt_texts(self, body: bytes, scope: str) -> list[str]:
        """The prompt text to check with source INPUT (``scope``: a ``PromptScope`` value);
        empty when there is nothing to check or the body is not this API's JSON."""
        ...

    def rewrite_prompt(self, body: bytes, scope: str, texts: list[str]) -> bytes | None:
        """The request body with the texts of ``prompt_texts(body, scope)`` replaced by
        ``texts`` (same order and count); None when that is not possible."""
        ...

    def response_texts(self, body: bytes) -> list[tuple[Hashable, str]]:
        """The model text of a non-streamed JSON answer as (channel, text) pairs."""
        ...

    def rewrite_response(self, body: bytes, texts: Mapping[Hashable, str]) -> bytes:
        """The non-streamed answer with the given channels' texts replaced (masking).
        Raises ``ValueError`` when a text cannot be put back (the caller must then block)."""
        ...

    def soft_block_response(self, body: bytes | None, message: str) -> bytes:
        """A normal non-streamed answer whose content is ``message`` and whose finish/stop
        reason is the API's content-filter one; ids, model and usage kept from ``body``."""
        ...

    def error_body(self, kind: str) -> tuple[int, bytes]:
        """HTTP status and the API's own JSON error body, for an answer before headers."""
        ...

    def stream_codec(self) -> StreamCodec:
        """A fresh codec for one streamed answer."""
        ...

    def stream_decoder(self, content_type: str) -> Decoder | None:
        """A fresh decoder (``extproc.framing``) for a 2xx answer of this content type (lower
        case) that streams in a framing this format reads (SSE for most), or None: the answer
        is taken whole."""
        ...


#: The first element of the channels that carry a model's reasoning text, in every format.
REASONING_CHANNELS = frozenset({"reasoning_content", "reasoning", "thinking", "thinking_part",
                                "summary", "thought"})
#: Channels that wrap another channel as their last element (text read a second way).
_WRAPPERS = frozenset({"after_done", "after_bom", "skipped", "joined", "first"})


def is_reasoning(channel: Hashable) -> bool:
    """Whether a channel (``StreamCodec.extract``, ``StreamFormat.response_texts``) carries
    reasoning text (``--reasoning-check``), read directly or a second way (``apart``,
    ``("joined", field)``)."""
    if not isinstance(channel, tuple) or not channel:
        return False
    head = channel[0]
    if head in _WRAPPERS and len(channel) > 1:
        head = channel[1]
    return isinstance(head, str) and head in REASONING_CHANNELS


def strip_query(path: str) -> str:
    """The path without query string or fragment."""
    for sep in ("?", "#"):
        index = path.find(sep)
        if index >= 0:
            path = path[:index]
    return path


def canonical_path(path: str) -> str:
    """The path as the most lenient server routes it: query and fragment cut, percent-escapes
    decoded (``%2F`` and ``%73`` included, until none is left, so a double escape cannot hide
    a path either), ``;params`` cut from each segment, empty and ``.`` segments dropped, ``..``
    resolved, backslashes read as slashes, case folded, no trailing slash. uvicorn decodes
    before routing, Express folds case and ignores a trailing slash: a variant one of them
    routes to an API must reach its format here. Matching more than an upstream would only ever
    guard more."""
    path = strip_query(path)
    for _ in range(4):
        decoded = unquote(path, errors="surrogateescape")
        if decoded == path:
            break
        path = decoded
    segments: list[str] = []
    for segment in path.replace("\\", "/").split("/"):
        segment = segment.split(";", 1)[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments).casefold()


def find_format(method: str, path: str, formats: tuple[StreamFormat, ...]) -> StreamFormat | None:
    """The first format that recognises the request (by its ``canonical_path`` and upper-case
    method), or None for traffic we do not guard."""
    bare = canonical_path(path)
    verb = method.upper()
    for fmt in formats:
        if fmt.matches(verb, bare):
            return fmt
    return None


def all_formats() -> tuple[StreamFormat, ...]:
    """Every format the sidecar guards, most specific first (``/chat/completions`` before
    ``/completions``)."""
    from extproc.formats.anthropic_messages import AnthropicMessages
    from extproc.formats.bedrock import CONVERSE, INVOKE, BedrockRuntime
    from extproc.formats.gemini import GeminiGenerateContent
    from extproc.formats.mcp import McpFormat
    from extproc.formats.ollama import OllamaFormat
    from extproc.formats.openai_chat import OpenAIChat
    from extproc.formats.openai_completions import OpenAICompletions
    from extproc.formats.openai_responses import OpenAIResponses

    return (OpenAIChat(), OpenAIResponses(), AnthropicMessages(), OpenAICompletions(),
            GeminiGenerateContent(), BedrockRuntime(CONVERSE), BedrockRuntime(INVOKE),
            OllamaFormat(generate=False), OllamaFormat(generate=True), McpFormat())
