"""AWS Bedrock Runtime: ``Converse`` / ``ConverseStream`` and ``InvokeModel`` /
``InvokeModelWithResponseStream``, as boto3 (and every AWS SDK) calls them.

Paths (``POST``, the canonical path): ``/model/{modelId}/converse``,
``/model/{modelId}/converse-stream`` (format ``bedrock.converse``), ``/model/{modelId}/invoke``,
``/model/{modelId}/invoke-with-response-stream`` (format ``bedrock.invoke``), behind any prefix.
The model id may hold ``:`` and, percent-decoded, ``/`` (an inference profile's ARN,
``arn:aws:bedrock:us-east-1:123:inference-profile/us.anthropic.claude...``): a path matches when
its last segment is the operation and a ``model`` segment comes at least two segments before
it. Not matched: ``/model/{id}/count-tokens``, ``/guardrail/...`` (``ApplyGuardrail``),
``/async-invoke``, any other method.

Prompt. Converse: ``messages[].content[]`` blocks: ``text``, ``guardContent.text.text``, a
document's ``source.text`` and ``source.content[].text``, ``citationsContent.content[].text``,
and, except for ``last_user``, tool results (``toolResult.content[]``: ``text``, every string of
``json``, document text). ``last_user``: the last ``user`` message that is a human turn (a
message of only ``toolResult`` blocks is a tool turn and is skipped); ``all``: every message but
``system``-role ones; ``all_with_system``: ``system[]`` (``text``, ``guardContent.text.text``)
first, then every message. ``promptVariables[].text`` (a managed prompt's inputs) are read in
every scope. InvokeModel's body is the model's own JSON: with ``anthropic_version``
(Anthropic Messages on Bedrock, ``"bedrock-2023-05-31"``) the Anthropic format's reading
(``extproc.formats.anthropic_messages``); other ``messages`` bodies (Amazon Nova, Mistral and
other chat models) the Converse reading above (a string ``content`` too); otherwise ``prompt``
(Llama, Mistral, DeepSeek, Claude text completions), ``inputText`` (Titan), ``message``
(Cohere), plus Cohere's ``chat_history[].message`` for ``all`` and ``preamble`` / a string
``system`` for ``all_with_system``. ``whole_request`` is the generic reading
(``extproc.formats.whole``).

Answers and their channels (``i``: the content block index, ``contentBlockIndex`` in a stream):

===========================================  =======================  ===========================
text                                         channel                  where
===========================================  =======================  ===========================
``text`` / ``delta.text``                    ``("text", i)``          Converse, Nova
``reasoningContent`` text                    ``("reasoning", i)``     Converse, Nova
``toolUse.input`` (whole: as JSON; stream:   ``("tool", i)``          Converse, Nova
the ``delta.toolUse.input`` fragments)
``toolUse.name`` / ``contentBlockStart``     ``("tool_name", i)``     Converse, Nova
``start.toolUse.name``
``citationsContent.content[j].text``         ``("citations", i, j)``  Converse, Nova (whole)
Anthropic Messages text, thinking, input     the Anthropic format's   InvokeModel, Anthropic
                                             (``("text",)`` joined
                                             in a stream)
``completion``, ``generation``,              ``("native", *path)``    InvokeModel, other models
``outputText``, ``text``,
``results[n].outputText``,
``outputs[n].text``, ``generations[n].text``,
``completions[n].data.text``, ``choices[n]``
``.text`` / ``.message.content`` /
``.delta.content``
every other string leaf of an event or       ``("unknown", *where)``  anything else: a native
chunk none of the above reads (stop fields                            model's tool calls, a Nova
are enums, not text)                                                  chunk's second event
===========================================  =======================  ===========================

A non-streamed ``toolUse.input`` whose mask is no longer JSON of its type makes
``rewrite_response`` raise ``ValueError``. Not checked (not model-written, as in the Anthropic
format): ``citation`` deltas (quotes of the caller's documents), reasoning ``signature`` and
``redactedContent``, server tool results (``toolResult`` blocks and deltas), images; nor the
``metadata`` event, ``additionalModelResponseFields``, ``amazon-bedrock-*`` fields or the
``p`` padding of stream events; nor exception and error frames (the server's, not the model's:
they pass). Unknown event types, unknown delta members and model chunks of an unknown shape are
read by rule (every string leaf not under a ``whole.NO_TEXT_KEYS`` key, channel
``("unknown", event, ...path)``): boto3 skips undeclared events and members, other clients may
not, and nothing passes unread.

Streams are AWS event streams (``application/vnd.amazon.eventstream``,
``extproc.eventstream.EventStreamDecoder``). ConverseStream sends ``messageStart``,
``contentBlockStart`` (tool use only: text blocks start with their first delta),
``contentBlockDelta``, ``contentBlockStop``, ``messageStop`` (``text_ended``) and ``metadata``.
InvokeModelWithResponseStream sends ``chunk`` events whose ``bytes`` (base64) hold the model's
own streaming JSON: Anthropic events (read by the Anthropic format's codec, fed each chunk's
JSON as an event named by its ``type``), Nova's Converse-shaped events
(``{"contentBlockDelta": {...}}``), or another model's chunk; the last chunk carries
``amazon-bedrock-invocationMetrics`` (``text_ended``, as are a model's own stop fields:
``stop_reason``, ``completionReason``, ``finish_reason``, ``is_finished``). A frame passes
as its exact bytes unless a mask changes its text: then its payload is replaced (a chunk's
JSON re-encoded and base64'd again) and the frame rebuilt around the received header bytes,
whatever their types and order, with new lengths and CRCs.

What is built:

* ``error_body``: ``{"message": ..., "__type": <code>}``, status of
  ``_common.error_status``; code ``ValidationException`` (400, 413, 415),
  ``AccessDeniedException`` (403), ``ServiceUnavailableException`` (503). AWS sends the code in
  the ``x-amzn-errortype`` header (:data:`ERROR_TYPE_HEADER`, :func:`error_type`); botocore
  (``RestJSONParser``) takes it from there, else from the body's ``code``, else from its
  ``__type``, so the body alone is enough and the header, when sent, agrees.
* ``terminal_frame``: one ``exception_frame``: ``validationException`` with the kind's message,
  ``serviceUnavailableException`` for ``guardrail_unavailable`` (both declared by both
  streaming operations, so botocore raises ``EventStreamError`` with code and message).
* Soft block, Converse (and Nova): ``contentBlockStop`` for every block the client has open, a
  ``contentBlockDelta`` with the message on a new block index (after every index the client
  saw), its ``contentBlockStop``, then ``messageStop`` with ``stopReason:
  "guardrail_intervened"`` (Bedrock's own guardrail stop reason); a ``messageStart`` first when
  the client has received none. Whole answers: the message as the only content block, same
  stop reason, ``usage`` and ``metrics`` kept. InvokeModel, Anthropic (and by default): the
  Anthropic format's soft block with ``stop_reason: "guardrail_intervened"`` (the stop reason
  Bedrock's guardrails give a Claude answer, as LangChain's Bedrock integration reads it; not
  checked against the live service) and no ``stop_details``, each event in a chunk; whole
  answers also say ``"amazon-bedrock-guardrailAction": "INTERVENED"``, as Bedrock does. Other
  models: their text field (the first one read) holding the message, the others emptied; in a
  stream one chunk with the stream's text field.

SDK behaviours verified (``tests/unit/test_formats_bedrock.py``; boto3/botocore 1.44, the HTTP
exchange replaced by a ``before-send`` hook; ``anthropic`` 2.17's ``AnthropicBedrock``):

* botocore's ``RestJSONParser`` takes a non-streamed error's code from the
  ``x-amzn-errortype`` header (cut at ``:``), else the body's ``code``/``Code``, else its
  ``__type``, the message from ``message``/``Message``; the client raises the modelled
  exception of that code (``client.exceptions.ValidationException``, a ``ClientError``)
  whatever the status (``test_error_body_raises_client_error``, all four operations, with and
  without the header; ``AnthropicBedrock`` raises ``BadRequestError``).
* ``converse()`` / ``invoke_model()`` read our soft blocks and masked answers as Bedrock's
  (``test_converse_soft_block_read_by_boto3``, ``test_converse_masked_answer_read_by_boto3``,
  ``test_invoke_soft_block_read_by_boto3``, ``test_invoke_response_texts_and_masks``).
* ``converse_stream()`` / ``invoke_model_with_response_stream()`` yield every released event,
  then raise ``EventStreamError`` (``response["Error"]``: code and message) at our terminal
  frame (``test_converse_stream_terminal_frame_in_boto3``,
  ``test_invoke_stream_terminal_frame_in_boto3``); ``AnthropicBedrock`` turns it into an
  ``error`` event and raises ``APIStatusError`` with the message
  (``test_invoke_stream_terminal_frame_in_anthropic_bedrock``).
* Our soft blocks end both streams normally, after any released prefix
  (``test_converse_stream_soft_block_in_boto3``, ``test_invoke_stream_soft_block_in_boto3``:
  ``AnthropicBedrock``'s accumulator keeps ``stop_reason: "guardrail_intervened"``);
  masked frames are read with their masked text, their other headers and padding kept
  (``test_masked_converse_frames_read_by_boto3``, ``test_masked_frames_keep_their_other_headers``,
  ``test_masked_invoke_chunks_read_by_boto3_and_anthropic_bedrock``).
* botocore decodes a chunk's ``bytes`` with the lenient ``base64.b64decode``, as read here;
  it skips event types and members its model does not declare, which are read here all the
  same (``test_unknown_events_and_members_are_read_apart_and_exceptions_pass``).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from collections.abc import Collection, Hashable, Mapping
from typing import Any, Final

from extproc.eventstream import (
    CONTENT_TYPE,
    PRELUDE_LENGTH,
    EventFrame,
    EventStreamDecoder,
    event_frame,
    exception_frame,
)
from extproc.formats import ErrorKind, PromptScope, StreamCodec, whole
from extproc.formats import _common as c
from extproc.formats.anthropic_messages import AnthropicCodec, AnthropicMessages
from extproc.formats.anthropic_messages import (
    _prompt_slots as _anthropic_prompt_slots,
)
from extproc.formats.anthropic_messages import (
    _response_slots as _anthropic_response_slots,
)
from extproc.framing import Decoder
from extproc.sse import SSEDecoder, SSEEvent, utf8

__all__ = [
    "CONVERSE",
    "INVOKE",
    "ERROR_TYPE_HEADER",
    "GUARDRAIL_STOP",
    "BedrockRuntime",
    "ConverseStreamCodec",
    "InvokeStreamCodec",
    "error_type",
]

#: The two operation families, one format each.
CONVERSE: Final = "converse"
INVOKE: Final = "invoke"
_OPERATIONS: Final[Mapping[str, frozenset[str]]] = {
    CONVERSE: frozenset({"converse", "converse-stream"}),
    INVOKE: frozenset({"invoke", "invoke-with-response-stream"}),
}

#: The response header AWS names a non-streamed error's code in (botocore reads it first).
ERROR_TYPE_HEADER: Final = "x-amzn-errortype"
#: The stop reason Bedrock reports when a guardrail stops an answer.
GUARDRAIL_STOP: Final = "guardrail_intervened"
#: What Bedrock adds to an InvokeModel answer its guardrail intervened in.
_GUARDRAIL_ACTION: Final = "amazon-bedrock-guardrailAction"
_INVOCATION_METRICS: Final = "amazon-bedrock-invocationMetrics"

#: Modelled error code by HTTP status (each declared by all four operations).
_ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "ValidationException",
    403: "AccessDeniedException",
    413: "ValidationException",
    415: "ValidationException",
    503: "ServiceUnavailableException",
}


def error_type(kind: str) -> str:
    """The Bedrock error code of an ``ErrorKind`` (the ``x-amzn-errortype`` header's value)."""
    status, _ = c.error_status(kind)
    return _ERROR_TYPES.get(status, "ValidationException")


def _stream_exception(kind: str) -> str:
    """The exception event of an ``ErrorKind`` (declared by both streaming operations)."""
    c.error_status(kind)  # KeyError for anything but an ErrorKind
    if kind == ErrorKind.UNAVAILABLE:
        return "serviceUnavailableException"
    return "validationException"


# -- paths -----------------------------------------------------------------------------------


def _matches(method: str, path: str, operations: frozenset[str]) -> bool:
    if method != "POST":
        return False
    segments = path.split("/")
    if segments[-1] not in operations:
        return False
    return "model" in segments[1:-2]  # a model id (one segment or more) between


# -- reading helpers -------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _no_text(name: Any) -> bool:
    """Keys whose values no leaf reading enters: ``whole.NO_TEXT_KEYS`` and Bedrock's own
    ``amazon-bedrock-*`` fields (metrics, guardrail traces)."""
    return isinstance(name, str) and (name in whole.NO_TEXT_KEYS
                                      or name.startswith("amazon-bedrock-"))


def _leaf_slots(root: Any, prefix: tuple[Any, ...],
                names: Collection[str] | None = None) -> list[c.Slot]:
    """``_common.leaf_slots`` with Bedrock's no-text keys; a top-level ``p`` (Bedrock's
    padding of stream events) is skipped."""
    return c.leaf_slots(root, prefix, names, no_text=_no_text, top_skip=_PADDING)


_PADDING: Final = frozenset({"p"})


def _put(slots: list[c.Slot], texts: Mapping[Hashable, str]) -> bool:
    """Put the texts of their channels into ``slots``; whether any text changed."""
    changed = False
    for slot in slots:
        text = texts.get(slot.channel)
        if text is not None and text != slot.get():
            slot.set(text)
            changed = True
    return changed


# -- prompt ----------------------------------------------------------------------------------


def _document_slots(document: Any) -> list[c.Slot]:
    source = _dict(_dict(document) and document.get("source"))
    if source is None:
        return []
    slots = c.text_slot(source, "text")
    for part in _list(source.get("content")):
        slots += c.text_slot(part, "text") if isinstance(part, dict) else []
    return slots


def _guard_slots(block: dict[str, Any]) -> list[c.Slot]:
    guard = _dict(block.get("guardContent"))
    text = _dict(guard.get("text")) if guard is not None else None
    return c.text_slot(text, "text") if text is not None else []


def _block_slots(block: dict[str, Any], tool_results: bool) -> list[c.Slot]:
    """The prompt text of one Converse content block (Nova's and OpenAI-style parts too)."""
    slots = c.text_slot(block, "text") + _guard_slots(block)
    if "document" in block:
        slots += _document_slots(block["document"])
    citations = _dict(block.get("citationsContent"))
    if citations is not None:
        for part in _list(citations.get("content")):
            slots += c.text_slot(part, "text") if isinstance(part, dict) else []
    result = _dict(block.get("toolResult"))
    if tool_results and result is not None:
        for part in _list(result.get("content")):
            if not isinstance(part, dict):
                continue
            slots += c.text_slot(part, "text")
            if "json" in part:
                slots += c.string_slots(part, "json")
            if "document" in part:
                slots += _document_slots(part["document"])
    return slots


def _message_slots(message: dict[str, Any], tool_results: bool) -> list[c.Slot]:
    content = message.get("content")
    if isinstance(content, str):
        return c.text_slot(message, "content")
    slots: list[c.Slot] = []
    for block in _list(content):
        if isinstance(block, dict):
            slots += _block_slots(block, tool_results)
    return slots


def _tool_turn(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return (isinstance(content, list) and bool(content)
            and all(isinstance(b, dict) and "toolResult" in b for b in content))


def _variable_slots(request: dict[str, Any]) -> list[c.Slot]:
    slots: list[c.Slot] = []
    variables = _dict(request.get("promptVariables"))
    for value in (variables or {}).values():
        slots += c.text_slot(value, "text") if isinstance(value, dict) else []
    return slots


def _converse_prompt_slots(request: dict[str, Any], scope: str) -> list[c.Slot]:
    messages = [m for m in _list(request.get("messages")) if isinstance(m, dict)]
    if scope == PromptScope.LAST_USER:
        for message in reversed(messages):
            if message.get("role") == "user" and not _tool_turn(message):
                return _message_slots(message, tool_results=False) + _variable_slots(request)
        return _variable_slots(request)
    slots: list[c.Slot] = []
    if scope == PromptScope.ALL_WITH_SYSTEM:
        system = request.get("system")
        if isinstance(system, str):
            slots += c.text_slot(request, "system")
        for block in _list(system):
            if isinstance(block, dict):
                slots += c.text_slot(block, "text") + _guard_slots(block)
    for message in messages:
        if scope == PromptScope.ALL and message.get("role") == "system":
            continue
        slots += _message_slots(message, tool_results=True)
    return slots + _variable_slots(request)


def _native_prompt_slots(request: dict[str, Any], scope: str) -> list[c.Slot]:
    slots = (c.text_slot(request, "prompt") + c.text_slot(request, "inputText")
             + c.text_slot(request, "message"))
    if scope == PromptScope.LAST_USER:
        return slots
    for turn in _list(request.get("chat_history")):
        slots += c.text_slot(turn, "message") if isinstance(turn, dict) else []
    if scope == PromptScope.ALL_WITH_SYSTEM:
        slots = c.text_slot(request, "preamble") + c.text_slot(request, "system") + slots
    return slots


def _invoke_prompt_slots(request: dict[str, Any], scope: str) -> list[c.Slot]:
    if isinstance(request.get("messages"), list):
        if "anthropic_version" in request:
            return _anthropic_prompt_slots(request, scope)
        return _converse_prompt_slots(request, scope)
    return _native_prompt_slots(request, scope)


# -- non-streamed answers --------------------------------------------------------------------


def _content_slots(content: Any) -> list[c.Slot]:
    """The slots of a Converse ``output.message.content`` (Nova's answer too)."""
    slots: list[c.Slot] = []
    for index, block in enumerate(_list(content)):
        if not isinstance(block, dict):
            continue
        slots += c.text_slot(block, "text", ("text", index))
        reasoning = _dict(block.get("reasoningContent"))
        text = _dict(reasoning.get("reasoningText")) if reasoning is not None else None
        if text is not None:
            slots += c.text_slot(text, "text", ("reasoning", index))
        tool = _dict(block.get("toolUse"))
        if tool is not None:
            slots += c.text_slot(tool, "name", ("tool_name", index))
            if tool.get("input") not in (None, {}, [], ""):
                slots.append(c.Slot(tool, "input", ("tool", index), as_json=True))
        citations = _dict(block.get("citationsContent"))
        if citations is not None:
            for number, part in enumerate(_list(citations.get("content"))):
                if isinstance(part, dict):
                    slots += c.text_slot(part, "text", ("citations", index, number))
    return slots


def _message_content(answer: dict[str, Any]) -> Any:
    output = _dict(answer.get("output"))
    message = _dict(output.get("message")) if output is not None else None
    return message.get("content") if message is not None else None


def _converse_answer_slots(answer: dict[str, Any]) -> list[c.Slot]:
    return _content_slots(_message_content(answer))


#: Where other models put their text (``*``: each element of a list).
_NATIVE_PATHS: Final[tuple[tuple[str, ...], ...]] = (
    ("completion",),  # Claude text completions
    ("generation",),  # Llama
    ("outputText",),  # Titan stream chunks
    ("text",),  # Cohere Command R
    ("results", "*", "outputText"),  # Titan
    ("outputs", "*", "text"),  # Mistral
    ("generations", "*", "text"),  # Cohere Command
    ("completions", "*", "data", "text"),  # AI21 Jurassic
    ("choices", "*", "text"),  # OpenAI-style completions (DeepSeek)
    ("choices", "*", "message", "content"),  # OpenAI-style chat (Jamba, gpt-oss)
    ("choices", "*", "message", "reasoning_content"),
    ("choices", "*", "delta", "content"),
    ("choices", "*", "delta", "reasoning_content"),
)
_NATIVE_KEYS: Final = frozenset(path[0] for path in _NATIVE_PATHS)
#: Stop fields of those models' chunks (top level, or in the elements of their lists).
_STOP_KEYS: Final = ("stop_reason", "completionReason", "finish_reason", "finishReason")


def _native_slots(answer: dict[str, Any]) -> tuple[list[c.Slot], tuple[str, ...] | None]:
    """The slots of ``_NATIVE_PATHS`` and the first path that found text."""
    slots: list[c.Slot] = []
    first: tuple[str, ...] | None = None
    for path in _NATIVE_PATHS:
        if path[0] not in answer:
            continue
        found: list[c.Slot] = []
        _walk(answer, path, (), found)
        if found and first is None:
            first = path
        slots += found
    return slots, first


def _native_no_text(name: Any) -> bool:
    return _no_text(name) or name in _STOP_KEYS


def _rest_slots(model: Any, known: list[c.Slot], prefix: tuple[Any, ...]) -> list[c.Slot]:
    """Every string leaf of a model's JSON that the ``known`` slots do not read, by rule (a
    model's tool calls, a ``text`` that is not a string, what a model adds next); stop
    fields are enums, not text."""
    taken = {(id(slot.container), slot.key) for slot in known}
    return [slot for slot in c.leaf_slots(model, prefix, no_text=_native_no_text,
                                          top_skip=_PADDING)
            if (id(slot.container), slot.key) not in taken]


def _walk(value: Any, path: tuple[str, ...], where: tuple[Any, ...],
          found: list[c.Slot]) -> None:
    step, rest = path[0], path[1:]
    if step == "*":
        for index, item in enumerate(_list(value)):
            if rest:
                _walk(item, rest, (*where, index), found)
        return
    if not isinstance(value, dict) or step not in value:
        return
    if rest:
        _walk(value[step], rest, (*where, step), found)
    elif c.is_text(value[step]):
        found.append(c.Slot(value, step, ("native", *where, step)))


def _anthropic_answer(answer: dict[str, Any]) -> bool:
    if answer.get("type") == "message":
        return True
    content = answer.get("content")
    return isinstance(content, list) and any(
        isinstance(block, dict) and isinstance(block.get("type"), str) for block in content)


def _invoke_answer_slots(answer: dict[str, Any]) -> list[c.Slot]:
    if _anthropic_answer(answer):
        return _anthropic_response_slots(answer)
    if _message_content(answer) is not None:
        return _converse_answer_slots(answer)
    slots, _ = _native_slots(answer)
    if slots or not _NATIVE_KEYS.isdisjoint(answer):
        return slots + _rest_slots(answer, slots, ("unknown",))
    return _leaf_slots(answer, ("unknown",))


def _converse_soft_block(answer: dict[str, Any], message: str) -> dict[str, Any]:
    usage = _dict(answer.get("usage"))
    metrics = _dict(answer.get("metrics"))
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": message}]}},
        "stopReason": GUARDRAIL_STOP,
        "usage": usage if usage is not None else {"inputTokens": 0, "outputTokens": 0,
                                                  "totalTokens": 0},
        "metrics": metrics if metrics is not None else {"latencyMs": 0},
    }


_ANTHROPIC = AnthropicMessages()


def _anthropic_soft_block(body: bytes | None, message: str) -> dict[str, Any]:
    result: dict[str, Any] = c.load_object(_ANTHROPIC.soft_block_response(body, message)) or {}
    result["stop_reason"] = GUARDRAIL_STOP
    result.pop("stop_details", None)
    result[_GUARDRAIL_ACTION] = "INTERVENED"
    return result


def _invoke_soft_block(body: bytes | None, message: str) -> dict[str, Any]:
    answer = c.load_object(body)
    if answer is None or _anthropic_answer(answer):
        return _anthropic_soft_block(body, message)
    if _message_content(answer) is not None:
        result = _converse_soft_block(answer, message)
        result[_GUARDRAIL_ACTION] = "INTERVENED"
        return result
    slots, _ = _native_slots(answer)
    if not slots:
        slots = _leaf_slots(answer, ("unknown",))
    if not slots:
        return _anthropic_soft_block(body, message)
    for number, slot in enumerate(slots):
        slot.set(message if number == 0 else "")
    answer[_GUARDRAIL_ACTION] = "INTERVENED"
    return answer


# -- the formats -----------------------------------------------------------------------------


class BedrockRuntime:
    """One Bedrock Runtime operation family: ``BedrockRuntime(CONVERSE)`` (Converse and
    ConverseStream, ``bedrock.converse``) or ``BedrockRuntime(INVOKE)`` (InvokeModel and
    InvokeModelWithResponseStream, ``bedrock.invoke``)."""

    def __init__(self, family: str) -> None:
        if family not in _OPERATIONS:
            raise ValueError(f"unknown Bedrock operation family {family!r}")
        self.family = family
        self.name = f"bedrock.{family}"
        self._operations = _OPERATIONS[family]
        converse = family == CONVERSE
        self._prompt_slots = _converse_prompt_slots if converse else _invoke_prompt_slots
        self._answer_slots = _converse_answer_slots if converse else _invoke_answer_slots

    def matches(self, method: str, path: str) -> bool:
        return _matches(method, path, self._operations)

    def prompt_texts(self, body: bytes, scope: str = PromptScope.LAST_USER) -> list[str]:
        return c.prompt_texts(body, scope, self._prompt_slots)

    def rewrite_prompt(self, body: bytes, scope: str, texts: list[str]) -> bytes | None:
        return c.rewrite_prompt(body, scope, texts, self._prompt_slots)

    def response_texts(self, body: bytes) -> list[tuple[Hashable, str]]:
        return c.response_texts(body, self._answer_slots)

    def rewrite_response(self, body: bytes, texts: Mapping[Hashable, str]) -> bytes:
        return c.rewrite_response(body, texts, self._answer_slots)

    def soft_block_response(self, body: bytes | None, message: str) -> bytes:
        if self.family == CONVERSE:
            result = _converse_soft_block(c.load_object(body) or {}, message)
        else:
            result = _invoke_soft_block(body, message)
        return utf8(c.dumps(result))

    def error_body(self, kind: str) -> tuple[int, bytes]:
        status, message = c.error_status(kind)
        return status, utf8(c.dumps({"message": message, "__type": error_type(kind)}))

    def stream_codec(self) -> StreamCodec:
        if self.family == CONVERSE:
            return ConverseStreamCodec()
        return InvokeStreamCodec()

    def stream_decoder(self, content_type: str) -> Decoder | None:
        if not content_type.startswith(CONTENT_TYPE):
            return None
        # (``feed`` returns ``list[EventFrame]``, a list of ``SSEEvent`` subclasses: a Decoder
        # in every way but list invariance.)
        return EventStreamDecoder()


# -- frames ----------------------------------------------------------------------------------

_UINT32 = struct.Struct("!I")
_LENGTHS = struct.Struct("!II")


def _message_type(event: SSEEvent) -> str:
    """``exception``, ``error`` or ``event``: botocore reads every other ``:message-type``
    (missing, ``Event``...) as an event named by ``:event-type``, so the codec does too."""
    kind = event.message_type if isinstance(event, EventFrame) else "event"
    return kind if kind in ("exception", "error") else "event"


def _reframe(event: SSEEvent, payload: bytes) -> bytes:
    """``event``'s frame with ``payload``: the received header bytes kept as they are (types,
    order, unknown headers), lengths and CRCs computed anew."""
    raw = event.raw
    if not isinstance(event, EventFrame) or len(raw) < PRELUDE_LENGTH + 4:
        return event_frame(event.event or "", payload)
    (headers_length,) = _UINT32.unpack_from(raw, 4)
    headers = raw[PRELUDE_LENGTH:PRELUDE_LENGTH + headers_length]
    lengths = _LENGTHS.pack(PRELUDE_LENGTH + 4 + headers_length + len(payload), headers_length)
    head = lengths + _UINT32.pack(zlib.crc32(lengths))
    crc = zlib.crc32(payload, zlib.crc32(headers, zlib.crc32(head)))
    return b"".join((head, headers, payload, _UINT32.pack(crc)))


def _unknown_slots(event: SSEEvent, value: Any) -> list[c.Slot]:
    return _leaf_slots(value, ("unknown", event.event))


def _unknown_texts(event: SSEEvent) -> list[tuple[Hashable, str]]:
    """The text of an event the codec does not know: its JSON's string leaves, or the whole
    payload when it is not JSON."""
    data = event.data
    if not data:
        return []
    value = c.load_json(data)
    if value is None and data.strip() != "null":
        return [(("unknown", event.event), data)] if data.strip() else []
    return [(slot.channel, slot.get()) for slot in _unknown_slots(event, value)]


def _rewrite_unknown(event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
    data = event.data
    if not data:
        return event.raw
    value = c.load_json(data)
    if value is None and data.strip() != "null":
        masked = texts.get(("unknown", event.event))
        return event.raw if masked is None else _reframe(event, utf8(masked))
    if not _put(_unknown_slots(event, value), texts):
        return event.raw
    return _reframe(event, utf8(c.dumps(value)))


# -- Converse events (ConverseStream frames, Nova chunks) ------------------------------------

_CONVERSE_EVENTS: Final = frozenset({"messageStart", "contentBlockStart", "contentBlockDelta",
                                     "contentBlockStop", "messageStop", "metadata"})
#: Delta and start members read or deliberately not read; any other is read by rule.
_DELTA_MEMBERS: Final = frozenset({"text", "toolUse", "reasoningContent", "citation", "image",
                                   "toolResult"})
_START_MEMBERS: Final = frozenset({"toolUse", "toolResult", "image"})


def _event_slots(kind: str, payload: dict[str, Any]) -> list[c.Slot]:
    """The slots of one Converse stream event."""
    if kind not in ("contentBlockDelta", "contentBlockStart"):
        return []
    index = c.key(payload.get("contentBlockIndex", 0))
    if kind == "contentBlockStart":
        start = _dict(payload.get("start"))
        if start is None:
            return []
        tool = _dict(start.get("toolUse"))
        slots = c.text_slot(tool, "name", ("tool_name", index)) if tool is not None else []
        others = [name for name in start if name not in _START_MEMBERS]
        if others:
            slots += _leaf_slots(start, ("unknown", kind, index), others)
        return slots
    delta = _dict(payload.get("delta"))
    if delta is None:
        return []
    slots = c.text_slot(delta, "text", ("text", index))
    tool = _dict(delta.get("toolUse"))
    if tool is not None:
        slots += c.text_slot(tool, "input", ("tool", index))
    reasoning = _dict(delta.get("reasoningContent"))
    if reasoning is not None:
        slots += c.text_slot(reasoning, "text", ("reasoning", index))
    others = [name for name in delta if name not in _DELTA_MEMBERS]
    if others:
        slots += _leaf_slots(delta, ("unknown", kind, index), others)
    return slots


def _chunk_event_slots(model: dict[str, Any]) -> list[c.Slot]:
    """The slots of a model chunk holding Converse events (Nova's): each event member's, then
    the other members' by rule (a chunk may hold two events, or an event and text)."""
    slots: list[c.Slot] = []
    others: list[str] = []
    for name, value in model.items():
        if name in _CONVERSE_EVENTS and isinstance(value, dict):
            slots += _event_slots(name, value)
        else:
            others.append(name)
    if others:
        slots += c.leaf_slots(model, ("unknown", "chunk"), others, no_text=_native_no_text,
                              top_skip=_PADDING)
    return slots


def _block_index(payload: dict[str, Any]) -> int | None:
    index = payload.get("contentBlockIndex")
    return index if isinstance(index, int) and not isinstance(index, bool) else None


class _ConverseView:
    """What the client received of a Converse-shaped stream: whether the message started,
    the block indexes seen and those still open."""

    __slots__ = ("started", "seen", "open")

    def __init__(self) -> None:
        self.started = False
        self.seen: set[int] = set()
        self.open: set[int] = set()

    def see(self, kind: str, index: int | None) -> None:
        if kind == "messageStart":
            self.started = True
        elif kind in ("contentBlockStart", "contentBlockDelta"):
            if index is not None:
                self.seen.add(index)
                self.open.add(index)
        elif kind == "contentBlockStop" and index is not None:
            self.open.discard(index)

    def soft_block(self, message: str) -> list[tuple[str, dict[str, Any]]]:
        """The events that end the message with ``message`` as a text block of its own."""
        events: list[tuple[str, dict[str, Any]]] = []
        if not self.started:
            events.append(("messageStart", {"role": "assistant"}))
        events += [("contentBlockStop", {"contentBlockIndex": index})
                   for index in sorted(self.open)]
        index = max(self.seen) + 1 if self.seen else 0
        events += [
            ("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": message}}),
            ("contentBlockStop", {"contentBlockIndex": index}),
            ("messageStop", {"stopReason": GUARDRAIL_STOP}),
        ]
        return events


#: ``Notes`` of frames that hold no text and change nothing (exceptions, errors).
_PASS: Final = ("pass", None)
_UNKNOWN: Final = ("unknown", None)


class ConverseStreamCodec:
    """One ConverseStream answer; keeps the client's view of its content blocks."""

    holds_trailing_events = True

    def __init__(self) -> None:
        self.text_ended = False
        self._notes = c.Notes()
        self._view = _ConverseView()

    @staticmethod
    def _read(event: SSEEvent) -> tuple[tuple[str, int | None], dict[str, Any] | None]:
        """The frame's note (kind, block index) and its payload when it is a known event."""
        message_type = _message_type(event)
        if message_type in ("exception", "error"):
            return _PASS, None
        kind = event.event
        if message_type != "event" or kind not in _CONVERSE_EVENTS:
            return _UNKNOWN, None
        payload = c.load_object(event.data)
        if payload is None:
            return _UNKNOWN, None
        return (kind, _block_index(payload)), payload

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        note, payload = self._read(event)
        self._notes.put(event, note)
        kind = note[0]
        if kind == "unknown":
            found = _unknown_texts(event)
        elif payload is None:
            return []
        elif kind == "contentBlockDelta" and type(delta := payload.get("delta")) is dict \
                and len(delta) == 1 and type(text := delta.get("text")) is str:
            # The usual frame: a text delta alone (``_event_slots`` reads the same).
            found = [(("text", c.key(payload.get("contentBlockIndex", 0))), text)] if text \
                else []
        else:
            found = [(slot.channel, slot.get()) for slot in _event_slots(kind, payload)]
        if kind == "messageStop":
            self.text_ended = True
        elif found:
            self.text_ended = False
        return found

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        note = self._notes.take(event)
        payload = None
        if note is c.UNREAD:
            note, payload = self._read(event)
        kind, index = note
        self._view.see(kind, index)
        if not texts or kind == "pass":
            return event.raw
        if kind == "unknown":
            return _rewrite_unknown(event, texts)
        if payload is None:
            payload = c.load_object(event.data)
            if payload is None:
                return event.raw
        if not _put(_event_slots(kind, payload), texts):
            return event.raw
        return _reframe(event, utf8(c.dumps(payload)))

    def terminal_frame(self, kind: str) -> bytes:
        return exception_frame(_stream_exception(kind), c.error_status(kind)[1])

    def soft_block_frame(self, message: str) -> bytes:
        return b"".join(event_frame(kind, utf8(c.dumps(payload)))
                        for kind, payload in self._view.soft_block(message))


# -- InvokeModelWithResponseStream -----------------------------------------------------------

_ANTHROPIC_EVENTS: Final = frozenset({"message_start", "content_block_start",
                                      "content_block_delta", "content_block_stop",
                                      "message_delta", "message_stop", "ping", "error"})
_TYPE_PREFIX: Final = '{"type":"'


def _chunk_json(event: SSEEvent) -> tuple[dict[str, Any], str] | None:
    """The ``chunk`` frame's payload and its ``bytes`` decoded as text (what boto3 yields as
    ``chunk["bytes"]``), or None when it has none."""
    wrapper = c.load_object(event.data)
    if wrapper is None:
        return None
    encoded = wrapper.get("bytes")
    if not isinstance(encoded, str):
        return None
    try:
        decoded = base64.b64decode(encoded)  # as botocore decodes a blob: lenient
    except (binascii.Error, ValueError):
        return None
    # As a boto3 user's ``json.loads(chunk["bytes"])`` reads it: UTF-8, or UTF-16/32 by
    # its first bytes (a UTF-16 chunk read as UTF-8 is text no guardrail policy matches).
    return wrapper, decoded.decode(json.detect_encoding(decoded), "replace")


def _chunk_frame(model: Any) -> bytes:
    """A ``chunk`` event holding ``model`` (the model's JSON)."""
    encoded = base64.b64encode(utf8(c.dumps(model))).decode("ascii")
    return event_frame("chunk", utf8(c.dumps({"bytes": encoded})))


def _native_ended(model: dict[str, Any]) -> bool:
    """The chunk says the model's text is complete."""
    if _INVOCATION_METRICS in model or model.get("is_finished") is True:
        return True
    holders = [model]
    for name in ("results", "outputs", "generations", "choices", "completions"):
        holders += [item for item in _list(model.get(name)) if isinstance(item, dict)]
    return any(holder.get(key) is not None for holder in holders for key in _STOP_KEYS)


def _nest(path: tuple[str, ...], text: str) -> dict[str, Any]:
    """An object holding ``text`` at ``path`` (``*``: a one-element list)."""
    value: Any = text
    for step in reversed(path):
        value = [value] if step == "*" else {step: value}
    return value  # type: ignore[no-any-return]  # a path starts with a key


class InvokeStreamCodec:
    """One InvokeModelWithResponseStream answer. Each ``chunk``'s model JSON is read by its
    shape: Anthropic events through the Anthropic format's codec (fed as SSE events without
    raw bytes, named by their ``type``), Nova's Converse events, other models' fields."""

    holds_trailing_events = True

    def __init__(self) -> None:
        self.text_ended = False
        self._notes = c.Notes()
        self._anthropic = AnthropicCodec()
        self._view = _ConverseView()  # a Nova stream's
        self._family: str | None = None  # "anthropic", "converse", "native": the first seen
        self._native_path: tuple[str, ...] | None = None  # where the stream's text is

    def _classify(self, event: SSEEvent) -> tuple[Any, Any]:
        """The note of a frame and its model JSON (or the Anthropic event to feed)."""
        message_type = _message_type(event)
        if message_type in ("exception", "error"):
            return _PASS, None
        if message_type != "event" or event.event != "chunk":
            return _UNKNOWN, None
        read = _chunk_json(event)
        if read is None:
            return _UNKNOWN, None
        text = read[1]
        if text.startswith(_TYPE_PREFIX):
            # Bedrock's Anthropic chunks open with their type: the Anthropic codec parses them,
            # so they are not parsed here as well.
            name = text[len(_TYPE_PREFIX):text.find('"', len(_TYPE_PREFIX))]
            if name in _ANTHROPIC_EVENTS:
                return ("anthropic", SSEEvent(b"", event=name, data=text)), None
        model = c.load_object(text)
        if model is None:
            return ("bytes", None), text
        kind = model.get("type")
        if isinstance(kind, str) and kind in _ANTHROPIC_EVENTS:
            return ("anthropic", SSEEvent(b"", event=kind, data=text)), None
        events = tuple((name, _block_index(value)) for name, value in model.items()
                       if name in _CONVERSE_EVENTS and isinstance(value, dict))
        if events:
            return ("converse", events), model
        return ("native", None), model

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        note, model = self._classify(event)
        self._notes.put(event, note)
        kind, detail = note
        found: list[tuple[Hashable, str]]
        ended = False
        if kind == "anthropic":
            self._family = self._family or kind
            found = self._anthropic.extract(detail)
            self.text_ended = self._anthropic.text_ended
            return found
        if kind == "converse":
            self._family = self._family or kind
            found = [(slot.channel, slot.get()) for slot in _chunk_event_slots(model)]
            ended = (any(name == "messageStop" for name, _ in detail)
                     or _INVOCATION_METRICS in model)
        elif kind == "native":
            slots, path = _native_slots(model)
            if slots or not _NATIVE_KEYS.isdisjoint(model):
                self._family = self._family or kind
                if self._native_path is None:
                    self._native_path = path
            slots += _rest_slots(model, slots, ("unknown", "chunk"))
            found = [(slot.channel, slot.get()) for slot in slots]
            ended = _native_ended(model)
        elif kind == "bytes":
            found = [(("unknown", "chunk"), model)] if model.strip() else []
        elif kind == "unknown":
            found = _unknown_texts(event)
        else:
            return []
        if ended:
            self.text_ended = True
        elif found:
            self.text_ended = False
        return found

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        note = self._notes.take(event)
        model: Any = None
        if note is c.UNREAD:
            note, model = self._classify(event)
        kind, detail = note
        if kind == "anthropic":
            out = self._anthropic.rewrite(detail, texts)
            if out is detail.raw:
                return event.raw
            masked = SSEDecoder().feed(out)
            if len(masked) != 1 or masked[0].data is None:
                return event.raw
            return self._rechunk(event, masked[0].data)
        if kind == "converse":
            for name, index in detail:
                self._view.see(name, index)
        if not texts or kind == "pass":
            return event.raw
        if kind == "unknown":
            return _rewrite_unknown(event, texts)
        if model is None:
            note, model = self._classify(event)
        if kind == "bytes":
            masked_text = texts.get(("unknown", "chunk"))
            return event.raw if masked_text is None else self._rechunk(event, masked_text)
        if not isinstance(model, dict):
            return event.raw
        if kind == "converse":
            slots = _chunk_event_slots(model)
        else:
            slots, _ = _native_slots(model)
            slots += _rest_slots(model, slots, ("unknown", "chunk"))
        if not _put(slots, texts):
            return event.raw
        return self._rechunk(event, c.dumps(model))

    @staticmethod
    def _rechunk(event: SSEEvent, text: str) -> bytes:
        """The chunk frame with ``text`` as its model JSON (other payload members kept)."""
        wrapper = c.load_object(event.data) or {}
        wrapper["bytes"] = base64.b64encode(utf8(text)).decode("ascii")
        return _reframe(event, utf8(c.dumps(wrapper)))

    def terminal_frame(self, kind: str) -> bytes:
        return exception_frame(_stream_exception(kind), c.error_status(kind)[1])

    def soft_block_frame(self, message: str) -> bytes:
        if self._family == "converse":
            return b"".join(_chunk_frame({kind: payload})
                            for kind, payload in self._view.soft_block(message))
        if self._family == "native" and self._native_path is not None:
            model = _nest(self._native_path, message)
            model[_GUARDRAIL_ACTION] = "INTERVENED"
            return _chunk_frame(model)
        frames: list[bytes] = []
        for sse in SSEDecoder().feed(self._anthropic.soft_block_frame(message)):
            payload = c.load_object(sse.data)
            if payload is None:
                continue
            delta = _dict(payload.get("delta"))
            if payload.get("type") == "message_delta" and delta is not None:
                delta["stop_reason"] = GUARDRAIL_STOP
                delta.pop("stop_details", None)
            frames.append(_chunk_frame(payload))
        return b"".join(frames)
