"""The Model Context Protocol over Streamable HTTP: JSON-RPC 2.0 messages ``POST``ed to the MCP
endpoint, answered ``application/json`` (one message) or as an SSE stream of ``event: message``
events (one JSON-RPC message each); a ``GET`` to the endpoint opens an SSE stream of messages
the server starts. ``Mcp-Session-Id`` and every other header pass untouched.

Recognised on a route whose ``api`` is ``mcp`` (any path), and by default on ``POST`` and
``GET`` of a path ending with ``/mcp`` (the SDKs' default endpoint).

What is read (a JSON-RPC message is read whatever its method says; an answer by its shape,
since a response does not name its method). The known paths first, then by rule everything
else a client may show a user or hand a model (``_rule_slots``: every string leaf, and the names
of schema maps such as ``properties``, except under keys that carry no text: ids, types,
roles, MIME types, URLs and URIs, image and audio ``data`` (base64), icons, cursors, progress
tokens; a resource ``blob`` that decodes to UTF-8 text is read decoded):

==============================  ==============================  ============================
message                         text                            source
==============================  ==============================  ============================
request ``tools/call``          every string in                 INPUT, before the tool
                                ``params.arguments``            server is contacted
any other request or            ``params`` by rule (not         INPUT
notification of the client      ``params.name``, which names
                                a listed tool or prompt)
a response the client posts     ``result``/``error`` by rule    INPUT
(sampling, elicitation)         (model output; what the user
                                typed)
a result's ``content[]``        ``text`` items, an embedded     OUTPUT
(``tools/call``)                ``resource.text``; by rule a
                                ``resource_link``'s name,
                                title, description
``structuredContent``           every string                    OUTPUT
``tools`` (``tools/list``)      each tool's ``name``,           OUTPUT (tool poisoning)
                                ``title``, ``description``,
                                schema ``description`` and
                                ``title`` strings; by rule
                                the rest of the schemas
                                (parameter names, ``enum``,
                                ``default``), annotations
``messages`` (``prompts/get``)  content ``text``, embedded      OUTPUT
                                resource text; ``description``
``contents`` (``resources/      ``text``                        OUTPUT
read``)
the rest of any ``result``      by rule (``resources/list``,    OUTPUT
                                ``prompts/list`` descriptions,
                                ``completion/complete``
                                values, ``_meta``)
an ``error`` answer (at any     ``message``, ``data``: agents   OUTPUT
HTTP status: the SDK client     hand a tool's error to the
reads a non-2xx body's error)   model
a request or notification of    ``params`` by rule:             OUTPUT
the server (in an SSE answer    ``sampling/createMessage``
or a ``GET`` stream)            messages and system prompt
                                (model input),
                                ``elicitation/create``
                                message and schema (shown to
                                the user), logging data and
                                progress messages
an SSE event whose data is      the data, as text               OUTPUT
JSON Python cannot read and
Node or Go can (nesting past
Python's recursion limit, an
integer of 4,300+ digits)
==============================  ==============================  ============================

Every other member of a message but ``jsonrpc``, ``id`` and ``method`` is read by rule too (a
Go client on ``encoding/json`` reads ``"Result"`` as the result). An answer that is not JSON at
all is read as text
(``extproc.stream.answer``), an event whose data is JSON to no client (``[DONE]``) passes.

Blocks are JSON-RPC errors for the ``id`` at stake, HTTP 200 ``application/json`` (or, in an SSE
answer, one ``event: message`` with the error, then the end of the stream):

=====================  ======  =========================================================
kind                   code    message
=====================  ======  =========================================================
violation              -32010  ``Violated guardrail policy``
unavailable            -32011  ``Guardrail unavailable``
=====================  ======  =========================================================

(-32000..-32019 is the band the MCP specification leaves to implementations; the SDK uses
-32000 and -32001.) Requests refused before the upstream for what they are, not what they say,
keep their HTTP status and carry a JSON-RPC error without an ``id`` (``null``), as the
specification asks of a server that cannot accept a message: not JSON (-32700, HTTP 400), not a
JSON-RPC 2.0 message or a batch array (-32600, HTTP 400; so is a member spelt as a case
variant of ``jsonrpc``, ``id``, ``method``, ``params`` or of ``params``' ``name``, ``arguments``,
``_meta``, which a Go server on ``encoding/json`` reads as that member), too large (-32600,
413), an unreadable content-encoding (-32600, 415). Batch arrays (allowed by protocol
revision 2025-03-26 only, sent by no SDK) are refused when the request is read; an answer
that is an array has each element read, and a block of it is one error with ``id`` ``null``.

A soft block (``--soft-block on``) answers a tool result with ``isError: true`` whose one text
item is the guardrail's message.

Formats are stateless and shared; this one is bound to each stream (``for_stream``): the
request it read (method, ``id``, tool) names the error for that ``id`` and the metrics' method
and tool, and a ``tools/list`` answer streamed as SSE is taken whole (one message; a poisoned
tool can then be removed, ``--mcp-poisoned-tools``).
"""

from __future__ import annotations

import base64
import json
import re
from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from extproc.formats import ErrorKind, StreamCodec, whole
from extproc.formats import _common as c
from extproc.formats.whole import PromptUnreadable
from extproc.framing import Decoder, sse_decoder
from extproc.sse import SSEDecoder, SSEEvent, utf8

VIOLATION_CODE: Final = -32010
UNAVAILABLE_CODE: Final = -32011
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600

#: Methods named in metrics as they are; any other is ``other`` (labels stay bounded).
KNOWN_METHODS: Final = frozenset({
    "initialize", "ping", "tools/list", "tools/call", "prompts/list", "prompts/get",
    "resources/list", "resources/read", "resources/templates/list", "resources/subscribe",
    "resources/unsubscribe", "completion/complete", "logging/setLevel", "server/discover",
    "subscriptions/listen",
})
#: What the metrics call a message that is not a request with a method.
NOTIFICATION = "notification"
RESPONSE = "response"
BATCH = "batch"
STREAM = "stream"  # a GET: the server's own messages
OTHER = "other"

_SCHEMA_TEXT_KEYS: Final = ("description", "title")


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER


class RequestInfo:
    """What a stream's request said (set when it is read)."""

    __slots__ = ("method", "id", "has_id", "tool", "batch", "reason")

    def __init__(self) -> None:
        self.method: str | None = None
        self.id: Any = None
        self.has_id = False
        self.tool: str | None = None
        self.batch = False
        self.reason: tuple[int, str] | None = None  # (code, message) of a refused request


def _error(id_: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


def error_message(kind: str) -> tuple[int, int, str]:
    """HTTP status, JSON-RPC code and message of an ``ErrorKind`` with no ``id`` at stake."""
    status, message = c.error_status(kind)
    if kind == ErrorKind.VIOLATION:
        return 200, VIOLATION_CODE, message
    if kind == ErrorKind.UNAVAILABLE:
        return status, UNAVAILABLE_CODE, message
    if kind == ErrorKind.INVALID:
        return status, PARSE_ERROR, message
    return status, INVALID_REQUEST, message


def _is_message(value: Any) -> bool:
    """A JSON-RPC 2.0 message: a request or notification (a string ``method``), or a response
    (an ``id`` and a ``result`` or ``error``)."""
    if not isinstance(value, dict) or value.get("jsonrpc") != "2.0":
        return False
    if "method" in value:
        return isinstance(value["method"], str) and (
            "params" not in value or isinstance(value["params"], (dict, list)))
    return "id" in value and ("result" in value or "error" in value)


#: Members a server written in Go with ``encoding/json`` (mcp-go; the go-sdk before
#: CVE-2026-27896) matches without regard to case (and with U+017F as ``s``, U+212A as ``k``),
#: the last one given winning: ``"method": "ping", "Method": "tools/call"`` is a tool call to
#: it and a ping to us. A request with such a variant is refused.
_ENVELOPE_KEYS: Final = frozenset({"jsonrpc", "id", "method", "params"})
#: Members of a message that hold no text (the others are read, whatever their name).
_ENVELOPE_TEXTLESS: Final = frozenset({"jsonrpc", "id", "method"})
_PARAMS_KEYS: Final = frozenset({"name", "arguments", "_meta", "uri", "cursor", "task"})


def _case_variant(value: Any, known: frozenset[str]) -> str | None:
    """A member of the object ``value`` spelt otherwise than, but folding to, one in ``known``."""
    if not isinstance(value, dict):
        return None
    for key in value:
        folded = key.casefold() if isinstance(key, str) else key
        if folded in known and key != folded:
            return str(key)
    return None


def _argument_slots(message: dict[str, Any]) -> list[c.Slot]:
    if message.get("method") != "tools/call":
        return []
    params = message.get("params")
    if not isinstance(params, dict) or "arguments" not in params:
        return []
    return c.string_slots(params, "arguments")


def request_slots(message: dict[str, Any]) -> list[c.Slot]:
    """The text a request body hands the server: a ``tools/call``'s arguments (every string),
    then by rule every other string of any request's or notification's ``params`` (a
    ``prompts/get``'s or ``completion/complete``'s arguments, a method a server adds) and of a
    response the client posts (a ``sampling/createMessage`` result: model output; an
    ``elicitation/create`` result: what the user typed), URIs included (a resource template's
    parameters come from a ``resources/read`` URI). Not ``params.name``: it names the
    tool or prompt the server listed (read there as OUTPUT), and a mask must not change it."""
    slots = _argument_slots(message)
    covered = {(id(slot.container), slot.key) for slot in slots}
    params = message.get("params")
    if isinstance(params, dict):
        covered.add((id(params), "name"))
    for member in message:
        if member not in _ENVELOPE_TEXTLESS:
            slots += _rule_slots(message, member, (member,), covered, _REQUEST_NO_TEXT)
    return slots


def _content_slots(items: Any, channel: tuple[Any, ...], out: list[c.Slot]) -> None:
    """Text items and embedded resources' text of a ``content`` list (or one item)."""
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        return
    for number, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        out += c.text_slot(item, "text", (*channel, number, "text"))
        resource = item.get("resource")
        if isinstance(resource, dict):
            out += c.text_slot(resource, "text", (*channel, number, "resource"))


def _tagged(slots: list[c.Slot], channel: tuple[Any, ...]) -> list[c.Slot]:
    return [c.Slot(slot.container, slot.key, (*channel, number))
            for number, slot in enumerate(slots)]


def tool_slots(tool: dict[str, Any], channel: tuple[Any, ...]) -> list[c.Slot]:
    """A ``tools/list`` tool's text: name, title, description and its schemas' descriptions."""
    slots: list[c.Slot] = []
    for key in ("name", "title", "description"):
        slots += c.text_slot(tool, key)
    annotations = tool.get("annotations")
    if isinstance(annotations, dict):
        slots += c.text_slot(annotations, "title")
    for schema_key in ("inputSchema", "outputSchema"):
        if schema_key in tool:
            slots += [slot for slot in c.string_slots(tool, schema_key)
                      if slot.key in _SCHEMA_TEXT_KEYS]
    return _tagged(slots, channel)


#: Keys whose strings in an answer carry nothing a model or a user reads (beside
#: ``whole.NO_TEXT_KEYS``: ids, types, roles, MIME types, URLs): base64 blobs, icons (image URLs
#: and sizes), cursors and progress tokens, protocol members.
_NO_TEXT: Final = frozenset({"blob", "icons", "progressToken", "cursor", "nextCursor",
                             "protocolVersion", "jsonrpc", "method", "uri", "uriTemplate"})
#: In a request, a URI is read: a resource template's parameters come from it
#: (``notes://{name}``), as a tool's from its arguments.
_REQUEST_NO_TEXT: Final = _NO_TEXT - {"uri", "uriTemplate"}
#: Content types whose ``data`` is base64 (what the guardrail cannot read as text).
_BINARY_TYPES: Final = frozenset({"image", "audio"})


@dataclass(frozen=True, slots=True)
class KeySlot(c.Slot):
    """A name in a schema map (``properties``: a tool's parameter names, which the model reads
    with its descriptions): a mask renames it in place, the order of the names kept."""

    def get(self) -> str:
        return str(self.key)

    def set(self, text: str) -> None:
        if text == self.key:
            return
        mapping = self.container
        if text in mapping:
            raise ValueError(f"a masked name of {self.channel!r} collides with another")
        items = [(text if name == self.key else name, value) for name, value in mapping.items()]
        mapping.clear()
        mapping.update(items)


def _is_binary(kind: Any) -> bool:
    return isinstance(kind, str) and kind in _BINARY_TYPES


def _carries_text(container: Any, name: Any, value: str) -> bool:
    """A string leaf read by rule. ``data`` is base64 only in image and audio content; in a
    logging notification or an error it is text, whatever it looks like (``whole.skipped``
    takes a long run of letters and spaces for base64)."""
    if name == "data":
        return bool(value) and not _is_binary(container.get("type"))
    if name == "blob":
        return False
    return not whole.skipped(name, value)


@dataclass(frozen=True, slots=True)
class Base64Slot(c.Slot):
    """A resource's ``blob`` that is UTF-8 text once decoded (a client shows a ``text/*`` blob
    as text, and may sniff one labelled otherwise): read decoded, a mask encoded back."""

    def get(self) -> str:
        return _b64_text(self.container[self.key]) or ""

    def set(self, text: str) -> None:
        self.container[self.key] = base64.b64encode(text.encode("utf-8")).decode("ascii")


_NOT_BASE64: Final = re.compile(r"[^A-Za-z0-9+/]")


def _b64_text(value: str) -> str | None:
    """``value`` decoded as leniently as Node's ``Buffer.from(value, "base64")`` (and Python's
    ``b64decode`` without ``validate``): URL-safe letters taken, other characters and missing
    padding ignored; None when the bytes are not UTF-8 text."""
    letters = _NOT_BASE64.sub("", value.replace("-", "+").replace("_", "/"))
    letters = letters[:len(letters) - len(letters) % 4 if len(letters) % 4 == 1 else None]
    try:
        return base64.b64decode(letters + "=" * (-len(letters) % 4)).decode("utf-8")
    except ValueError:  # (binascii.Error and UnicodeDecodeError are ValueErrors)
        return None  # binary: what the guardrail cannot read as text


def _blob_slot(container: Any, channel: tuple[Any, ...]) -> list[c.Slot]:
    value = container["blob"]
    text = _b64_text(value) if isinstance(value, str) else None
    if text is None or not any(ch.isprintable() and not ch.isspace() for ch in text):
        return []  # (bytes that happen to be UTF-8 but hold no visible character)
    return [Base64Slot(container, "blob", channel)]


def _set_all(pairs: Iterable[tuple[c.Slot, str]]) -> None:
    """Masked texts put back: the names of schema maps last, so that a value is set under the
    name it was read with (renamed first, it would be set under a new key beside the
    original)."""
    ordered = sorted(pairs, key=lambda pair: isinstance(pair[0], KeySlot))
    for slot, text in ordered:
        slot.set(text)


def _rule_slots(holder: Any, member: Any, prefix: tuple[Any, ...],
                covered: set[tuple[int, Any]], no_text: frozenset[str] = _NO_TEXT
                ) -> list[c.Slot]:
    """The reading by rule of what the known paths do not read: every string leaf of
    ``holder[member]`` (channel ``prefix + path``) not read already (``covered``: (container
    id, key)) nor under a key that carries no text, and every name of a schema map (channel
    ``prefix + path + (("key", name),)``), in document order; iterative (no recursion limit)."""
    slots: list[c.Slot] = []
    # (container, key, path, is_name): is_name, the key itself of the schema map container
    stack: list[tuple[Any, Any, tuple[Any, ...], bool]] = [(holder, member, (), False)]
    while stack:
        container, name, path, is_name = stack.pop()
        if is_name:
            slots.append(KeySlot(container, name, (*prefix, *path[:-1], ("key", name))))
            continue
        value = container[name]
        if isinstance(value, str):
            if (id(container), name) not in covered and _carries_text(container, name, value):
                slots.append(c.Slot(container, name, (*prefix, *path)))
            elif name == "blob" and (id(container), name) not in covered:
                slots += _blob_slot(container, (*prefix, *path))
        elif isinstance(value, dict):
            schema_map = isinstance(name, str) and name in whole.SCHEMA_MAPS
            for inner in reversed(list(value)):
                if schema_map:
                    stack.append((value, inner, (*path, inner), False))
                    if inner:
                        stack.append((value, inner, (*path, inner), True))
                elif not (isinstance(inner, str) and inner in no_text) or inner == "blob":
                    stack.append((value, inner, (*path, inner), False))
        elif isinstance(value, list):
            stack.extend((value, i, (*path, i), False) for i in range(len(value) - 1, -1, -1))
    return slots


def result_slots(message: Any, number: int) -> list[c.Slot]:
    """The text of one message of an answer (``number``: its place in a batch, 0 alone): a
    response's ``result`` by its known paths (below), then everything else a client may show
    or hand to a model by rule (``_rule_slots``): the rest of the ``result`` (``resource_link``
    names and descriptions, the descriptions of ``resources/list`` and ``prompts/list``,
    ``completion/complete`` values, schema ``enum``/``default`` strings and parameter names,
    ``_meta``), an ``error``'s ``message`` and ``data`` (agents hand a tool's error to the model),
    and the ``params`` of a request or notification from the server (``sampling/createMessage``
    messages and system prompt: model input; ``elicitation/create`` messages: shown to the
    user; logging data and progress messages)."""
    if not isinstance(message, dict):
        return []
    slots = _known_result_slots(message, number)
    covered = {(id(slot.container), slot.key) for slot in slots}
    for member in message:
        if member in _ENVELOPE_TEXTLESS or (member == "error" and _is_own_error(message[member])):
            continue
        # (every other member: a Go client on encoding/json reads "Result" as the result)
        prefix = (number,) if member == "result" else (number, (member,))
        slots += _rule_slots(message, member, prefix, covered)
    return slots


def _is_own_error(error: Any) -> bool:
    """The sidecar's own error (a terminal frame read again): no text of the server's."""
    if not isinstance(error, dict) or set(error) != {"code", "message"}:
        return False
    code, message = error["code"], error["message"]
    return any(code == own_code and message == own_message for own_code, own_message in (
        (VIOLATION_CODE, error_message(ErrorKind.VIOLATION)[2]),
        (UNAVAILABLE_CODE, error_message(ErrorKind.UNAVAILABLE)[2])))


def _known_result_slots(message: dict[str, Any], number: int) -> list[c.Slot]:
    result = message.get("result")
    if not isinstance(result, dict):
        return []
    slots: list[c.Slot] = []
    _content_slots(result.get("content"), (number, "content"), slots)
    if "structuredContent" in result:
        slots += _tagged(c.string_slots(result, "structuredContent"), (number, "structured"))
    tools = result.get("tools")
    if isinstance(tools, list):
        for index, tool in enumerate(tools):
            if isinstance(tool, dict):
                slots += tool_slots(tool, (number, "tools", index))
    messages = result.get("messages")
    if isinstance(messages, list):
        for index, item in enumerate(messages):
            if isinstance(item, dict):
                _content_slots(item.get("content"), (number, "messages", index), slots)
    if isinstance(messages, list) or isinstance(result.get("arguments"), list):
        slots += c.text_slot(result, "description", (number, "description"))
    contents = result.get("contents")
    if isinstance(contents, list):
        for index, item in enumerate(contents):
            if isinstance(item, dict):
                slots += c.text_slot(item, "text", (number, "contents", index))
    return slots


def answer_slots(answer: Any) -> list[c.Slot]:
    """The text of an answer body: one message, or each of a batch."""
    if isinstance(answer, list):
        return [slot for number, message in enumerate(answer)
                for slot in result_slots(message, number)]
    return result_slots(answer, 0)


def tool_of(channel: Hashable) -> int | None:
    """The index in ``tools`` of a ``tools/list`` channel (None for any other): a JSON
    answer's ``(message, "tools", index, n)``, an SSE answer's ``("sse", (event, message,
    "tools", index, n))``."""
    if isinstance(channel, tuple) and len(channel) == 2 and channel[0] == "sse":
        channel = channel[1]
    if not isinstance(channel, tuple):
        return None
    for place in range(len(channel) - 2):
        if channel[place + 1] == "tools" and isinstance(channel[place + 2], int) \
                and place <= 1:
            index: int = channel[place + 2]
            return index
    return None


def _encode(payload: Any, event: SSEEvent | None) -> bytes:
    """One ``event: message`` carrying ``payload`` (an original event's name and ``id`` kept,
    so that a rewritten event still resumes a stream)."""
    return _encode_data(c.dumps(payload), event)


def _encode_data(data: str, event: SSEEvent | None) -> bytes:
    lines = [f"event: {event.event if event is not None and event.event else 'message'}"]
    if event is not None and event.id is not None:
        lines.append(f"id: {event.id}")
    # (only CR, LF and CR LF end an SSE line: ``str.splitlines`` would also cut at U+2028 and
    # the other Unicode line breaks, which JSON keeps raw inside a string)
    lines += [f"data: {line}" for line in _SSE_BREAK.split(data)]
    return utf8("\n".join(lines) + "\n\n")


_SSE_BREAK: Final = re.compile(r"\r\n|\r|\n")

#: What ``_event_value`` gives for an event whose data is not JSON Python reads.
_NOT_JSON: Final = object()


def _event_value(event: SSEEvent) -> Any:
    """The JSON value of an event's data; None for an event without data (a comment, a
    ``retry``, the SDK's priming event) or whose data is JSON to no client, ``_NOT_JSON`` for
    JSON that Python does not read and Node's ``JSON.parse`` or Go's ``encoding/json`` do:
    nesting past Python's recursion limit, an integer of more than 4,300 digits."""
    data = event.data
    if data is None or not data.strip():
        return None
    value = c.load_object(data)
    if value is not None:
        return value
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return None  # not JSON (``[DONE]``, a stray line): every client fails on it alike
    except (ValueError, RecursionError):
        return _NOT_JSON


class McpFormat:
    """MCP over Streamable HTTP. The shared instance recognises requests; ``for_stream`` gives
    the one a stream uses (it remembers the request)."""

    name = "mcp"

    def __init__(self, *, any_path: bool = False) -> None:
        self._any_path = any_path
        self.request = RequestInfo()
        self.answer_id: Any = None
        self.has_answer_id = False

    def for_stream(self) -> McpFormat:
        return McpFormat(any_path=self._any_path)

    def matches(self, method: str, path: str) -> bool:
        if method not in ("POST", "GET", "DELETE"):
            return False
        return self._any_path or path.endswith("/mcp")

    # -- the request ------------------------------------------------------------------------

    def _read_request(self, body: bytes) -> dict[str, Any] | None:
        info = self.request
        value = c.load_json(body)
        if isinstance(value, list):
            info.batch = True
            info.method = BATCH
            info.reason = (INVALID_REQUEST, "JSON-RPC batch arrays are not accepted by the "
                           "guardrail")
            raise PromptUnreadable("a JSON-RPC batch array")
        if not _is_message(value):
            info.reason = (INVALID_REQUEST, "Not a JSON-RPC 2.0 message")
            raise PromptUnreadable("not a JSON-RPC 2.0 message")
        assert isinstance(value, dict)
        variant = _case_variant(value, _ENVELOPE_KEYS) or _case_variant(
            value.get("params"), _PARAMS_KEYS)
        if variant is not None:
            info.reason = (INVALID_REQUEST, "Not a JSON-RPC 2.0 message")
            raise PromptUnreadable(f"the member {variant!r} is a case variant of a JSON-RPC "
                                   "or MCP member")
        if "method" in value:
            info.method = value["method"]
            if "id" in value:
                info.id, info.has_id = value["id"], True
            else:
                info.method = NOTIFICATION if not info.method else info.method
            params = value.get("params")
            if info.method == "tools/call" and isinstance(params, dict) \
                    and isinstance(params.get("name"), str):
                info.tool = params["name"]
        else:
            info.method = RESPONSE
        return value

    def method_label(self) -> str:
        """The request's method as a bounded metrics label."""
        method = self.request.method
        if method is None:
            return STREAM
        if method in (NOTIFICATION, RESPONSE, BATCH):
            return method
        if not self.request.has_id:
            return NOTIFICATION
        return method_label(method)

    def prompt_texts(self, body: bytes, scope: str) -> list[str]:
        c.check_scope(scope)
        message = self._read_request(body)
        if message is None:
            return []
        return [slot.get() for slot in request_slots(message)]

    def rewrite_prompt(self, body: bytes, scope: str, texts: list[str]) -> bytes | None:
        c.check_scope(scope)
        message = c.load_object(body)
        if message is None:
            return None
        slots = request_slots(message)
        if len(slots) != len(texts) or not all(isinstance(t, str) for t in texts):
            return None
        try:
            _set_all(zip(slots, texts, strict=True))
        except ValueError:
            return None  # (a masked name that collides with another: the caller blocks)
        return utf8(c.dumps(message))

    # -- answers ----------------------------------------------------------------------------

    def _remember_answer(self, answer: Any) -> None:
        if isinstance(answer, dict) and "id" in answer and "method" not in answer:
            self.answer_id, self.has_answer_id = answer["id"], True
        elif isinstance(answer, list):
            self.answer_id, self.has_answer_id = None, True

    def response_texts(self, body: bytes) -> list[tuple[Hashable, str]]:
        answer = c.load_json(body)
        self._remember_answer(answer)
        return [(slot.channel, slot.get()) for slot in answer_slots(answer)]

    def rewrite_response(self, body: bytes, texts: Mapping[Hashable, str]) -> bytes:
        answer = c.load_json(body)
        if answer is None:
            return self._rewrite_sse(body, texts)
        slots = {slot.channel: slot for slot in answer_slots(answer)}
        unknown = [channel for channel in texts if channel not in slots]
        if unknown:
            raise ValueError(f"no such channels in the answer: {unknown!r}")
        _set_all((slots[channel], text) for channel, text in texts.items())
        return utf8(c.dumps(answer))

    def _rewrite_sse(self, body: bytes, texts: Mapping[Hashable, str]) -> bytes:
        """An SSE answer taken whole (``extproc.stream.answer.answer_texts`` reads it through
        the codec, channels ``("sse", channel)``) with masked texts put back."""
        own = {channel[1]: text for channel, text in texts.items()
               if isinstance(channel, tuple) and len(channel) == 2 and channel[0] == "sse"}
        if len(own) != len(texts):
            raise ValueError("channels of an SSE answer expected")
        codec = McpCodec(self)
        out: list[bytes] = []
        done: set[Hashable] = set()
        for event in whole_events(body):
            found = codec.extract(event)
            changed = {channel: own[channel] for channel, _ in found if channel in own}
            done.update(changed)
            out.append(codec.rewrite(event, changed))
        if done != set(own):
            raise ValueError("masked channels not found in the SSE answer")
        return b"".join(out)

    def remove_tools(self, body: bytes, tools: set[int]) -> bytes:
        """A ``tools/list`` answer (JSON, or SSE taken whole) without the tools at these
        indexes of its ``result.tools``."""
        answer = c.load_json(body)
        if answer is not None:
            return utf8(c.dumps(_without_tools(answer, tools)))
        out: list[bytes] = []
        for event in whole_events(body):
            message = c.load_object(event.data)
            if message is not None and isinstance(message.get("result"), dict) \
                    and isinstance(message["result"].get("tools"), list):
                out.append(_encode(_without_tools(message, tools), event))
            else:
                out.append(event.raw)
        return b"".join(out)

    def soft_block_response(self, body: bytes | None, message: str) -> bytes:
        answer = c.load_object(body) if body else None
        id_ = answer.get("id") if answer is not None else self._id()
        if answer is None and body and body.lstrip()[:6].startswith((b"event:", b"data:",
                                                                      b"id:", b"retry:", b":")):
            # An SSE answer taken whole keeps its content type: the result as one event.
            return _encode(_soft_block(id_, message), None)
        return utf8(c.dumps(_soft_block(id_, message)))

    def _id(self) -> Any:
        if self.has_answer_id:
            return self.answer_id
        return self.request.id if self.request.has_id else None

    def error_body(self, kind: str) -> tuple[int, bytes]:
        status, code, message = error_message(kind)
        info = self.request
        if kind == ErrorKind.INVALID and info.reason is not None:
            code, message = info.reason
        if kind in (ErrorKind.VIOLATION, ErrorKind.UNAVAILABLE) and (
                self.has_answer_id or info.has_id):
            status = 200  # an error for that id: the client's SDK raises it as such
        return status, utf8(c.dumps(_error(self._id(), code, message)))

    def stream_codec(self) -> StreamCodec:
        return McpCodec(self)

    def stream_decoder(self, content_type: str) -> Decoder | None:
        if self.request.method == "tools/list":
            return None  # one message: taken whole, so that a poisoned tool can be removed
        return sse_decoder(content_type)


def whole_events(body: bytes) -> list[SSEEvent]:
    """The events of an SSE body taken whole (the ``raw`` of all is the body: an unterminated
    last event is read as the clients that act on it read it, else kept as bytes)."""
    decoder = SSEDecoder()
    found = list(decoder.feed(body, end_of_stream=True))
    leftover = decoder.flush()
    if leftover:
        last = decoder.last(leftover)
        found.append(last if last is not None else SSEEvent(raw=leftover))
    return found


def _without_tools(answer: Any, tools: set[int]) -> Any:
    result = answer.get("result") if isinstance(answer, dict) else None
    if isinstance(result, dict) and isinstance(result.get("tools"), list):
        result["tools"] = [tool for index, tool in enumerate(result["tools"])
                           if index not in tools]
    return answer


def _soft_block(id_: Any, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "result": {
        "content": [{"type": "text", "text": message}], "isError": True}}


def _numbered(number: int, channel: Hashable) -> Hashable:
    """A message's channel in a stream: the event's number first."""
    return (number, *channel) if isinstance(channel, tuple) else (number, channel)


class McpCodec:
    """One SSE stream of JSON-RPC messages (a ``POST``'s answer or a ``GET`` stream).

    Channels are ``(event number, ...)``: each message's text is checked on its own. Every
    event is a whole message, so the text read so far is complete after each response and
    each message with text (``text_ended``, never withdrawn). Unlike a model API's stream, the
    events without text behind it are not held until the end of the body (the guard knows
    this codec): a ``POST``'s answer ends with its response, and a ``GET`` stream may never
    end. The terminal frame answers the oldest response read and not yet released (else the
    request's ``id``, else ``null``)."""

    holds_trailing_events = False  # whole messages; a GET stream may never end

    def __init__(self, fmt: McpFormat) -> None:
        self._fmt = fmt
        self._read = 0
        self._written = 0
        # (event number, id) of the responses read and not yet released: extract and rewrite
        # both see every event in order, so the counts number an event alike
        self._pending: deque[tuple[int, Any]] = deque()
        self.text_ended = False

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        number = self._read
        self._read = number + 1
        value = _event_value(event)
        if value is _NOT_JSON:
            # Not JSON Python reads (nesting deeper than its recursion limit), which Node's
            # JSON.parse and Go's encoding/json read: the data is checked as text.
            assert isinstance(event.data, str)
            self.text_ended = True
            return [((number, "data"), event.data)]
        response = isinstance(value, dict) and "id" in value and "method" not in value
        if response:
            self._pending.append((number, value["id"]))
        found: list[tuple[Hashable, str]] = [(_numbered(number, slot.channel), slot.get())
                                             for slot in answer_slots(value)]
        if response or found:
            self.text_ended = True
        return found

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        number = self._written
        self._written = number + 1
        pending = self._pending
        while pending and pending[0][0] <= number:
            pending.popleft()
        if not texts:
            return event.raw
        value = _event_value(event)
        if value is _NOT_JSON:
            masked = texts.get((number, "data"))
            if masked is None:
                return event.raw
            return _encode_data(masked, event)
        slots: dict[Hashable, c.Slot] = {_numbered(number, slot.channel): slot
                                         for slot in answer_slots(value)}
        _set_all((slots[channel], text) for channel, text in texts.items() if channel in slots)
        return _encode(value, event)

    def _id(self) -> Any:
        if self._pending:
            return self._pending[0][1]
        request = self._fmt.request
        return request.id if request.has_id else None

    def terminal_frame(self, kind: str) -> bytes:
        _, code, message = error_message(kind)
        return _encode(_error(self._id(), code, message), None)

    def soft_block_frame(self, message: str) -> bytes:
        return _encode(_soft_block(self._id(), message), None)
