"""Google Gemini ``generateContent`` / ``streamGenerateContent``, as served by the Gemini API
(generativelanguage.googleapis.com) and Vertex AI (aiplatform.googleapis.com).

Paths: any ``POST`` whose last segment is ``{name}:generatecontent`` or
``{name}:streamgeneratecontent`` (the path is already case-folded) under a ``models``,
``tunedmodels`` or ``endpoints`` collection: ``/v1beta/models/{m}:...`` (and ``v1``,
``v1alpha``), ``/v1beta/tunedmodels/{m}:...``, Vertex AI's
``/v1/projects/{p}/locations/{l}/publishers/google/models/{m}:...`` (and ``v1beta1``, express
mode's ``/v1/publishers/google/models/{m}:...``) and deployed models'
``.../endpoints/{e}:...``, behind any prefix (a gateway's). Not matched: ``:counttokens``,
``:embedcontent``, ``:batchgeneratecontent`` (an operation, no answer text) and other verbs.

Prompt: ``contents[].parts[].text`` (a ``role`` of ``user`` or none is the user's, ``model`` the
model's). ``last_user``: the text parts of the last user content that is a human turn (a
content of only ``functionResponse`` parts is a tool turn and is skipped, as Anthropic's
``tool_result`` turns are); ``all``: the text parts of every content, and the strings of each
``functionResponse.response`` (tool results); ``all_with_system``: the text parts of
``systemInstruction`` first, then ``all``. Google's JSON reader takes the proto field names as
well (``system_instruction``, ``function_response``) and one object for a repeated field
(``"parts": {"text": ...}``): both are read. ``whole_request`` is the generic reading
(``extproc.formats.whole``).

Answers. A ``GenerateContentResponse`` holds ``candidates[]`` (``index`` defaults to 0, as
the SDK reads a missing or null one); each candidate's text is in ``content.parts[]``.
Channels, per candidate index, each joining the candidate's parts in order and continuing
across the events of a stream (and the elements of an array answer):

* ``("text", i)``: text parts; ``("thought", i)``: text parts with ``thought`` true (as the
  SDK's pydantic model reads it: ``true``, ``1``, ``"yes"``... ; ``GenerateContentResponse.text``
  leaves them out, apps show them as thinking);
* ``("function", i)``: each ``functionCall.args`` checked as its JSON text (``Slot(as_json)``;
  several calls join their JSON texts), ``("function_name", i)`` the calls' names,
  ``("function_arg", i, path)`` the ``stringValue`` of Vertex AI's streamed ``partialArgs``
  (per JSON path);
* ``("code", i)``: ``executableCode.code``; ``("code_result", i)``:
  ``codeExecutionResult.output``;
* ``("grounding", i)``: ``groundingMetadata.groundingSupports[].segment.text``, copies of
  answer text (a mask of the answer would leave them in clear otherwise);
* ``("logprobs", i)``: ``logprobsResult.chosenCandidates[].token`` joined, when it is not the
  candidate's text, and ``("top_logprobs", i)``: the alternatives in ``topCandidates``, one
  per line; a mask drops the candidate's ``logprobsResult`` (it would repeat the original
  tokens), as it does when the candidate's text is masked.

A channel spanning several parts (of one event, or of a whole answer) is put back by
``extproc.stream.masking.map_region``: each part gets the masked text of its own span, a
replaced span going whole to the part where it starts, so the masks stay where they were and
no part's text moves to another. A masked ``args`` that is no longer a JSON object makes
``rewrite_response`` raise ``ValueError`` (the caller blocks); in a stream the call's
``args`` become ``{}``. Part and candidate members the format does not know
(``toolCall``, ``audioTranscription``, ``finishMessage``, what Google adds next) are read by
rule (``_common.leaf_slots``), on ``("unknown", i, "part", *path)`` and
``("unknown", i, *path)``. Not checked: citations and grounding chunks (sources, not the
model's text), ``webSearchQueries`` and ``searchEntryPoint``, ``promptFeedback``, safety
ratings, inline data. The
offsets that ``citationMetadata`` and grounding segments hold are not moved by a mask.

The Python SDK (``google-genai``) reads ``candidates[0]`` of each object, whatever its
``index`` (``GenerateContentResponse.text``, ``.parts``, ``.function_calls``), where a
by-index reader joins each candidate's own text: once the first candidates of a stream (or of
an array answer) change index, their text is also checked joined on ``("first", field)``
(``field``: the channel's first element), a stream's starting with the last
``_common.JOINED_HISTORY`` characters of that reading (the ``ChoicesCodec`` "joined" reading).

Non-streamed answers: one object, or, for ``:streamGenerateContent`` without ``alt=sse``
(``application/json``), a JSON array of them; both are read, rewritten and soft-blocked (an
array's soft block is an array of one object). Streams (``alt=sse``, ``text/event-stream``):
each ``data:`` is one ``GenerateContentResponse``; Google ends every line with CR LF and sends
no terminator. Rewritten events and our frames keep the stream's line endings.

SDK behaviour verified (``google-genai`` 3.6.1, ``google/genai/_api_client.py``):

* ``HttpResponse._iter_response_stream`` cuts lines at CR, LF and CR LF
  (``_SseLineDecoder``), joins ``data: `` lines (with the space) until a blank line, and hands
  every other non-blank line to ``_RawJsonLineBuffer``, which joins lines until the braces
  outside strings balance; the joined text must then parse as JSON or
  ``_load_json_from_response`` raises ``UnknownApiResponseError``. An SSE comment
  (``: keep-alive``), an ``event:`` or ``id:`` line, ``data:`` without its space or a first
  line after a byte order mark therefore end the stream with that error; but JSON lines
  without ``data: `` (even across blank lines) are an answer the SDK shows, where SSE readers
  skip them as unknown fields: ``GeminiSSEDecoder`` reads them as the SDK does. So the stream
  decoder has no keep-alive (``keepalive`` None; blank lines would stall the older JavaScript
  SDK's ``^data: `` reader), and text that WHATWG readers show after such a line continues its
  channel as they read it (the Python SDK's view is a prefix of it).
* ``BaseApiClient.request_streamed`` raises only for a chunk whose ``json.dumps`` starts with
  ``{"error":`` (``error`` its first key), through ``errors.APIError.raise_error(code, ...)``:
  ``ClientError`` for a code in 400-499, ``ServerError`` for 500-599, ``.message`` the
  error's ``message``, ``.status`` its ``status``. A chunk whose first key is not ``error`` is
  read as a response: its ``error`` is dropped silently and its candidates are shown. (With
  ``error`` first, a code that is not an int raises ``TypeError`` and a non-object ``error``
  ``AttributeError``: the stream ends either way.) The terminal frame is therefore
  ``data: {"error": {"code": 400, ...}}``.
* A ``data:`` holding a JSON array is dumped, not raised, and ``models.py``'s
  ``_generate_content_stream`` reads it as a response without candidates: the SDK skips its
  text. It is checked on channels of its own (``("skipped", *channel)``), never glued to the
  text the SDK shows, and gives no finish.
* Non-streamed errors (``errors.APIError.raise_for_response``): any non-200 status raises
  ``ClientError`` / ``ServerError`` with the body's ``error.message``.

Hard block: ``data: {"error": {"code", "message", "status", "details"}}`` (the message of
``_common.error_status``; ``details`` one ``google.rpc.ErrorInfo`` whose ``reason`` is the
kind, upper case, in domain ``guardrail``). Soft block: one event whose candidates (each open
candidate, else index 0) hold the message as their text with ``finishReason: "SAFETY"``,
``modelVersion`` / ``responseId`` those of the stream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, Final

from extproc.formats import PromptScope, StreamCodec
from extproc.formats import _common as c
from extproc.framing import Decoder
from extproc.sse import SSEDecoder, SSEEvent, encode_event
from extproc.stream.masking import map_region

#: Google's canonical status names for the HTTP statuses of our errors.
_STATUS_NAMES: Final[Mapping[int, str]] = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    413: "INVALID_ARGUMENT",  # Google answers an oversized request with INVALID_ARGUMENT
    415: "INVALID_ARGUMENT",
    503: "UNAVAILABLE",
}


def error_object(kind: str) -> dict[str, Any]:
    """``{"error": {"code", "message", "status", "details"}}`` as Google's APIs send it;
    ``error`` is the only (so the first) key, ``code`` an int: what the SDK raises on."""
    code, message = c.error_status(kind)
    return {"error": {
        "code": code,
        "message": message,
        "status": _STATUS_NAMES.get(code, "UNKNOWN"),
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                     "reason": kind.upper(), "domain": "guardrail"}],
    }}


# -- paths -----------------------------------------------------------------------------------

_VERBS: Final = frozenset({"generatecontent", "streamgeneratecontent"})
_COLLECTIONS: Final = frozenset({"models", "tunedmodels", "endpoints"})


def _matches(method: str, path: str) -> bool:
    if method != "POST":
        return False
    head, _, last = path.rpartition("/")
    name, colon, verb = last.rpartition(":")
    if not colon or not name or verb not in _VERBS:
        return False
    return head.rpartition("/")[2] in _COLLECTIONS


# -- reading helpers -------------------------------------------------------------------------


def _items(value: Any) -> list[Any]:
    """A repeated field's elements: a list, or one object (Google's JSON reader takes it)."""
    if isinstance(value, list):
        return value
    return [value] if isinstance(value, dict) else []


def _fields(container: dict[str, Any], *names: str) -> list[Any]:
    """The values of the spellings of one field (``functionCall``, ``function_call``)."""
    return [container[name] for name in names if name in container]


_TRUE_STRINGS: Final = frozenset({"1", "on", "t", "true", "y", "yes"})


def _is_thought(value: Any) -> bool:
    """``part.thought`` as the SDK's pydantic model reads it (lax bool)."""
    if value is True:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 1
    return isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS


def _index(value: Any) -> Hashable:
    """A candidate's index as a channel key; missing or null is 0, as the SDK reads it."""
    return 0 if value is None else c.key(value)


# -- prompt ----------------------------------------------------------------------------------


def _function_responses(part: dict[str, Any]) -> list[Any]:
    return _fields(part, "functionResponse", "function_response")


def _tool_turn(content: dict[str, Any]) -> bool:
    parts = _items(content.get("parts"))
    return bool(parts) and all(isinstance(p, dict) and _function_responses(p) for p in parts)


def _part_slots(content: dict[str, Any], tool_results: bool) -> list[c.Slot]:
    slots: list[c.Slot] = []
    for part in _items(content.get("parts")):
        if not isinstance(part, dict):
            continue
        slots += c.text_slot(part, "text")
        if tool_results:
            for response in _function_responses(part):
                if isinstance(response, dict) and "response" in response:
                    slots += c.string_slots(response, "response")
    return slots


def _prompt_slots(request: dict[str, Any], scope: str) -> list[c.Slot]:
    contents = _items(request.get("contents"))
    if scope == PromptScope.LAST_USER:
        for content in reversed(contents):
            if (isinstance(content, dict) and content.get("role") in ("user", None)
                    and not _tool_turn(content)):
                return _part_slots(content, tool_results=False)
        return []
    slots: list[c.Slot] = []
    if scope == PromptScope.ALL_WITH_SYSTEM:
        for name in ("systemInstruction", "system_instruction"):
            system = request.get(name)
            if isinstance(system, str):
                slots += c.text_slot(request, name)
            elif isinstance(system, dict):
                slots += _part_slots(system, tool_results=False)
    for content in contents:
        if isinstance(content, dict):
            slots += _part_slots(content, tool_results=True)
    return slots


# -- answers ---------------------------------------------------------------------------------

#: channel -> its slots in one object (or event, or answer), in order
Groups = dict[Hashable, list[c.Slot]]

_LOGPROBS: Final = ("logprobsResult", "logprobs_result")


def _add(groups: Groups, channel: Hashable, slot: c.Slot) -> None:
    slots = groups.get(channel)
    if slots is None:
        groups[channel] = [slot]
    else:
        slots.append(slot)


def _add_text(groups: Groups, channel: Hashable, container: dict[str, Any], key: str) -> None:
    value = container.get(key)
    if isinstance(value, str) and value:
        _add(groups, channel, c.Slot(container, key, channel))


def _candidate_groups(candidate: dict[str, Any], index: Hashable, groups: Groups) -> None:
    """The slots of one candidate, added to ``groups``."""
    text: list[str] = []  # every text part, thoughts included (for the logprobs)
    answer: list[str] = []  # the text parts that are not thoughts
    content = candidate.get("content")
    if isinstance(content, dict):
        for part in _items(content.get("parts")):
            if not isinstance(part, dict):
                continue
            value = part.get("text")
            if isinstance(value, str) and value:
                kind = "thought" if _is_thought(part.get("thought")) else "text"
                channel: Hashable = (kind, index)
                _add(groups, channel, c.Slot(part, "text", channel))
                text.append(value)
                if kind == "text":
                    answer.append(value)
            if part.keys() <= _TEXT_PART:
                continue  # the usual part: nothing else to read
            for call in _fields(part, "functionCall", "function_call"):
                if isinstance(call, dict):
                    _call_groups(call, index, groups)
            for code in _fields(part, "executableCode", "executable_code"):
                if isinstance(code, dict):
                    _add_text(groups, ("code", index), code, "code")
            for result in _fields(part, "codeExecutionResult", "code_execution_result"):
                if isinstance(result, dict):
                    _add_text(groups, ("code_result", index), result, "output")
            _add_by_rule(groups, part, _PART_MEMBERS, ("unknown", index, "part"))
    if candidate.keys() <= _PLAIN_CANDIDATE:
        return  # the usual candidate: no grounding, logprobs or other members
    _add_by_rule(groups, candidate, _CANDIDATE_MEMBERS, ("unknown", index))
    for grounding in _fields(candidate, "groundingMetadata", "grounding_metadata"):
        if not isinstance(grounding, dict):
            continue
        for supports in _fields(grounding, "groundingSupports", "grounding_supports"):
            for support in _items(supports):
                segment = support.get("segment") if isinstance(support, dict) else None
                if isinstance(segment, dict):
                    _add_text(groups, ("grounding", index), segment, "text")
    for key in _LOGPROBS:
        logprobs = candidate.get(key)
        if isinstance(logprobs, dict):
            _logprob_groups(candidate, key, logprobs, index, ("".join(text), "".join(answer)),
                            groups)


#: Part members read above or deliberately not read (``thought`` is a flag); any other
#: (``toolCall``, ``audioTranscription``, ``partMetadata``, a member Google adds) is read by
#: rule (``_common.leaf_slots``: every string leaf but ids, URIs, MIME types and base64 data).
_PART_MEMBERS: Final = frozenset({
    "text", "thought", "functionCall", "function_call", "executableCode", "executable_code",
    "codeExecutionResult", "code_execution_result"})
#: Candidate members read above or deliberately not read: flags, enums, numbers, sources
#: (citations, grounding chunks, URL metadata: the caller's documents, not the model's text)
#: and safety ratings; any other (``finishMessage``, a member Google adds) is read by rule.
_CANDIDATE_MEMBERS: Final = frozenset({
    "content", "index", "finishReason", "finish_reason", "groundingMetadata",
    "grounding_metadata", "logprobsResult", "logprobs_result", "avgLogprobs", "avg_logprobs",
    "tokenCount", "token_count", "safetyRatings", "safety_ratings", "citationMetadata",
    "citation_metadata", "urlContextMetadata", "url_context_metadata"})


#: A part holding only these has nothing but its text to read; a candidate holding only
#: these has nothing but its parts.
_TEXT_PART: Final = frozenset({"text", "thought", "thoughtSignature", "thought_signature"})
_PLAIN_CANDIDATE: Final = frozenset({"content", "index", "finishReason", "finish_reason"})


def _add_by_rule(groups: Groups, holder: dict[str, Any], known: frozenset[str],
                 prefix: tuple[Any, ...]) -> None:
    """The members of ``holder`` not in ``known``, read by rule, each leaf on
    ``prefix + path``."""
    others = [name for name in holder if name not in known]
    if others:
        for slot in c.leaf_slots(holder, prefix, others):
            _add(groups, slot.channel, slot)


def _call_groups(call: dict[str, Any], index: Hashable, groups: Groups) -> None:
    _add_text(groups, ("function_name", index), call, "name")
    args = call.get("args")
    if isinstance(args, dict) and args:
        channel: Hashable = ("function", index)
        _add(groups, channel, c.Slot(call, "args", channel, as_json=True))
    for partials in _fields(call, "partialArgs", "partial_args"):
        for partial in _items(partials):
            if not isinstance(partial, dict):
                continue
            path = next(iter(_fields(partial, "jsonPath", "json_path")), None)
            for key in ("stringValue", "string_value"):
                _add_text(groups, ("function_arg", index, c.key(path)), partial, key)


def _logprob_groups(candidate: dict[str, Any], key: str, logprobs: dict[str, Any],
                    index: Hashable, texts: tuple[str, str], groups: Groups) -> None:
    """The tokens of a candidate's ``logprobsResult`` that are not its text (clients that show
    tokens show them), and the alternatives not chosen; a mask drops ``logprobsResult``."""
    chosen: list[str] = []
    for chosen_list in _fields(logprobs, "chosenCandidates", "chosen_candidates"):
        for token in _items(chosen_list):
            value = token.get("token") if isinstance(token, dict) else None
            chosen.append(value if isinstance(value, str) else "")
    joined = "".join(chosen)
    if joined and joined not in texts:
        channel: Hashable = ("logprobs", index)
        _add(groups, channel, c.DropSlot(candidate, key, channel, text=joined))
    lines: list[str] = []
    for top_list in _fields(logprobs, "topCandidates", "top_candidates"):
        for position, top in enumerate(_items(top_list)):
            if not isinstance(top, dict):
                continue
            picked = chosen[position] if position < len(chosen) else None
            for alternative in _items(top.get("candidates")):
                other = alternative.get("token") if isinstance(alternative, dict) else None
                if isinstance(other, str) and other != picked and other.strip():
                    lines.append(other)
    if lines:
        channel = ("top_logprobs", index)
        _add(groups, channel, c.DropSlot(candidate, key, channel, text="\n".join(lines) + "\n"))


#: A candidate's note: its index and whether it has a finish reason.
State = tuple[Hashable, bool]


class _Read:
    """One ``GenerateContentResponse`` read: its channels, its candidates' states, and the
    channels of its first candidate (``candidates[0]``, what the SDK reads) alone."""

    __slots__ = ("first", "first_index", "groups", "states")

    def __init__(self, answer: dict[str, Any]) -> None:
        self.groups: Groups = {}
        self.states: list[State] = []
        self.first: Groups | None = None
        self.first_index: Hashable = None
        candidates = answer.get("candidates")
        if not isinstance(candidates, list):
            return
        for position, candidate in enumerate(candidates):
            if not isinstance(candidate, dict):
                continue
            index = _index(candidate.get("index"))
            self.states.append((index, bool(candidate.get("finishReason")
                                            or candidate.get("finish_reason"))))
            if position == 0:
                first: Groups = {}
                _candidate_groups(candidate, index, first)
                self.first, self.first_index = first, index
                self.groups = {channel: list(slots) for channel, slots in first.items()}
            else:
                _candidate_groups(candidate, index, self.groups)


def _merge(into: Groups, groups: Groups) -> None:
    for channel, slots in groups.items():
        known = into.get(channel)
        if known is None:
            into[channel] = list(slots)
        else:
            known += slots


def _elements_groups(items: Iterable[Any]) -> Groups:
    """The channels of several responses (an array), continuing from one to the next."""
    groups: Groups = {}
    for item in items:
        if isinstance(item, dict):
            _merge(groups, _Read(item).groups)
    return groups


def _first_field(channel: Hashable) -> str | None:
    """``field`` of a by-index ``(field, index)`` channel, the ones read joined by position."""
    if isinstance(channel, tuple) and len(channel) == 2 and isinstance(channel[0], str) \
            and channel[0] != "first":
        return channel[0]
    return None


def _answer_groups(objects: list[dict[str, Any]]) -> Groups:
    """The channels of a non-streamed answer (one object, or an array's objects), with the
    ``("first", field)`` reading when its objects' first candidates change index."""
    groups: Groups = {}
    first: Groups = {}
    indexes: list[Hashable] = []
    for answer in objects:
        read = _Read(answer)
        _merge(groups, read.groups)
        if read.first is not None:
            indexes.append(read.first_index)
            for channel, slots in read.first.items():
                field = _first_field(channel)
                if field is not None:
                    _add_all(first, ("first", field), slots)
    if len(set(indexes)) > 1:
        groups.update(first)
    return groups


def _add_all(groups: Groups, channel: Hashable, slots: list[c.Slot]) -> None:
    groups.setdefault(channel, []).extend(slots)


def _joined(slots: list[c.Slot]) -> str:
    return slots[0].get() if len(slots) == 1 else "".join(slot.get() for slot in slots)


def _put(slots: list[c.Slot], original: str, masked: str, *, lenient: bool) -> None:
    """A channel's masked text back into its slots (``original``: their text joined): each
    slot gets the masked text of its own span (``map_region``). A JSON slot whose piece is no
    longer its JSON raises ``ValueError``, or (``lenient``, a stream) becomes ``{}``."""
    if len(slots) == 1:
        pieces = [masked]
    else:
        cuts: list[int] = []
        position = 0
        for slot in slots[:-1]:
            position += len(slot.get())
            cuts.append(position)
        pieces, _ = map_region(original, masked, 0, cuts, len(original))
    for slot, piece in zip(slots, pieces, strict=True):
        try:
            slot.set(piece)
        except ValueError:
            if not lenient:
                raise
            slot.container[slot.key] = {}


def _candidate_text(candidate: dict[str, Any]) -> str:
    content = candidate.get("content")
    if not isinstance(content, dict):
        return ""
    return "".join(part["text"] for part in _items(content.get("parts"))
                   if isinstance(part, dict) and isinstance(part.get("text"), str))


def _watch_logprobs(candidates: Iterable[Any]) -> list[tuple[dict[str, Any], str]]:
    """The candidates with logprobs and their text, before a mask (``_drop_stale``)."""
    return [(candidate, _candidate_text(candidate)) for candidate in candidates
            if isinstance(candidate, dict)
            and any(candidate.get(key) is not None for key in _LOGPROBS)]


def _drop_stale(watched: list[tuple[dict[str, Any], str]]) -> None:
    """Drop the logprobs of the candidates whose text a mask changed: they repeat it."""
    for candidate, text in watched:
        if _candidate_text(candidate) != text:
            for key in _LOGPROBS:
                if candidate.get(key) is not None:
                    candidate[key] = None


def _all_candidates(objects: Iterable[Any]) -> list[Any]:
    found: list[Any] = []
    for answer in objects:
        candidates = answer.get("candidates") if isinstance(answer, dict) else None
        if isinstance(candidates, list):
            found += candidates
    return found


def _load_answer(body: bytes | None) -> tuple[Any, list[dict[str, Any]]] | None:
    """The parsed answer and its response objects: one object, or an array's objects
    (``_common.load_object`` refuses arrays); None when it is neither."""
    value = c.load_json(body)
    if isinstance(value, dict):
        return value, [value]
    if isinstance(value, list):
        return value, [item for item in value if isinstance(item, dict)]
    return None


_HEAD_KEYS: Final = ("modelVersion", "responseId", "createTime")


def _soft_block_object(message: str, indexes: Iterable[Hashable],
                       head: Mapping[str, Any]) -> dict[str, Any]:
    targets = [i for i in indexes if isinstance(i, int) and not isinstance(i, bool)] or [0]
    result: dict[str, Any] = {"candidates": [
        {"content": {"parts": [{"text": message}], "role": "model"},
         "finishReason": "SAFETY", "index": index} for index in targets]}
    result.update(head)
    return result


class GeminiGenerateContent:
    """The Gemini ``generateContent`` format (Gemini API and Vertex AI)."""

    name = "google.gemini"

    def matches(self, method: str, path: str) -> bool:
        return _matches(method, path)

    def prompt_texts(self, body: bytes, scope: str = PromptScope.LAST_USER) -> list[str]:
        return c.prompt_texts(body, scope, _prompt_slots)

    def rewrite_prompt(self, body: bytes, scope: str, texts: list[str]) -> bytes | None:
        return c.rewrite_prompt(body, scope, texts, _prompt_slots)

    def response_texts(self, body: bytes) -> list[tuple[Hashable, str]]:
        loaded = _load_answer(body)
        if loaded is None:
            return []
        return [(channel, _joined(slots))
                for channel, slots in _answer_groups(loaded[1]).items()]

    def rewrite_response(self, body: bytes, texts: Mapping[Hashable, str]) -> bytes:
        loaded = _load_answer(body)
        if loaded is None:
            raise ValueError("the answer is not a JSON object or array")
        root, objects = loaded
        groups = _answer_groups(objects)
        unknown = [channel for channel in texts if channel not in groups]
        if unknown:
            raise ValueError(f"no such channels in the answer: {unknown!r}")
        watched = _watch_logprobs(_all_candidates(objects))
        firsts = {channel: [slot.get() for slot in groups[channel]] for channel in texts
                  if isinstance(channel, tuple) and channel[:1] == ("first",)}
        for channel, text in texts.items():
            if channel in firsts:
                continue
            slots = groups[channel]
            original = _joined(slots)
            if text != original:
                _put(slots, original, text, lenient=False)
        for channel, before in firsts.items():
            # The first candidates' text read joined: put back unless a by-index mask already
            # changed those parts otherwise (then the two masks cannot both hold: block).
            slots = groups[channel]
            current = _joined(slots)
            if texts[channel] == current:
                continue
            if [slot.get() for slot in slots] != before:
                raise ValueError(f"masks of {channel!r} and of its candidates disagree")
            _put(slots, current, texts[channel], lenient=False)
        _drop_stale(watched)
        return c.dumps(root).encode()

    def soft_block_response(self, body: bytes | None, message: str) -> bytes:
        loaded = _load_answer(body)
        objects = loaded[1] if loaded is not None else []
        indexes: dict[Hashable, None] = {}
        head: dict[str, Any] = {}
        for answer in objects:
            candidates = answer.get("candidates")
            for candidate in candidates if isinstance(candidates, list) else []:
                if isinstance(candidate, dict):
                    indexes.setdefault(_index(candidate.get("index")))
            for key in _HEAD_KEYS:
                if key not in head and isinstance(answer.get(key), str):
                    head[key] = answer[key]
        usage = next((answer["usageMetadata"] for answer in reversed(objects)
                      if isinstance(answer.get("usageMetadata"), dict)), None)
        ordered: dict[str, Any] = {"usageMetadata": usage} if usage is not None else {}
        ordered.update(head)
        result = _soft_block_object(message, indexes, ordered)
        if loaded is not None and isinstance(loaded[0], list):
            return c.dumps([result]).encode()
        return c.dumps(result).encode()

    def error_body(self, kind: str) -> tuple[int, bytes]:
        status, _ = c.error_status(kind)
        return status, json.dumps(error_object(kind)).encode()

    def stream_codec(self) -> StreamCodec:
        return GeminiCodec()

    def stream_decoder(self, content_type: str) -> Decoder | None:
        if content_type.startswith("text/event-stream"):
            return GeminiSSEDecoder()
        return None


_SDK_EOL: Final = re.compile(rb"\r\n|\r|\n")


class _RawJsonLines:
    """``google-genai``'s ``_RawJsonLineBuffer`` as its stream reader feeds it: every line
    that is neither blank nor a ``data: `` line, joined with nothing until the braces outside
    strings balance; a joined chunk that parses as JSON is read as an answer (the SDK shows
    its candidates), whatever SSE readers make of the same lines (unknown fields: nothing)."""

    __slots__ = ("_lines", "_depth", "_in_string", "_escaped")

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def idle(self) -> bool:
        return not self._lines

    def read(self, raw: bytes) -> list[str]:
        """The chunks the lines of ``raw`` complete that parse as JSON, in order."""
        chunks: list[str] = []
        for piece in _SDK_EOL.split(raw):
            if not piece or piece.startswith(b"data: "):
                continue  # blank, or the SDK's data lines (read as SSE reads them)
            line = str(piece, "utf-8", "replace")
            for char in line:
                if self._in_string:
                    if self._escaped:
                        self._escaped = False
                    elif char == "\\":
                        self._escaped = True
                    elif char == '"':
                        self._in_string = False
                elif char == '"':
                    self._in_string = True
                elif char == "{":
                    self._depth += 1
                elif char == "}":
                    self._depth -= 1
            self._lines.append(line)
            if self._depth == 0:
                chunk = "".join(self._lines)
                self._lines = []
                self._in_string = self._escaped = False
                try:
                    json.loads(chunk)
                except ValueError:
                    continue  # the SDK raises UnknownApiResponseError: it shows nothing more
                chunks.append(chunk)
        return chunks


def _plain(raw: bytes) -> bool:
    """``raw`` is one ``data: `` line and its blank line: nothing for the raw JSON reader."""
    return (raw.startswith(b"data: ")
            and raw.count(b"\n") + raw.count(b"\r") - raw.count(b"\r\n") == 2)


class GeminiSSEDecoder(SSEDecoder):
    """SSE without keep-alive comments: ``google-genai`` raises ``UnknownApiResponseError`` on
    any line that is neither ``data: `` nor blank and not part of a JSON chunk (see the module
    docstring). Lines that the SDK joins into a JSON chunk (``_RawJsonLines``) are read: an
    event completing one has that chunk as its ``data`` when it has no ``data`` of its own;
    an event holding two readings (its SSE data and a chunk, or two chunks) cannot be checked
    as one and is refused (``ValueError``: the guard ends the stream)."""

    __slots__ = ("_raw_json",)

    keepalive: bytes | None = None

    def __init__(self) -> None:
        super().__init__()
        self._raw_json = _RawJsonLines()

    def feed(self, data: bytes, *, end_of_stream: bool = False) -> list[SSEEvent]:
        events = super().feed(data, end_of_stream=end_of_stream)
        for i, event in enumerate(events):
            if not (self._raw_json.idle and _plain(event.raw)):
                events[i] = self._as_read(event)
        return events

    def last(self, leftover: bytes) -> SSEEvent | None:
        event = super().last(leftover)
        if event is None:
            chunks = self._raw_json.read(leftover)
            return SSEEvent(leftover, data=self._one(chunks, None)) if chunks else None
        return self._as_read(event)

    def _as_read(self, event: SSEEvent) -> SSEEvent:
        chunks = self._raw_json.read(event.raw)
        if not chunks:
            return event
        return SSEEvent(event.raw, event.event, self._one(chunks, event.data), event.id,
                        event.retry, event.comments)

    @staticmethod
    def _one(chunks: list[str], data: str | None) -> str:
        if len(chunks) > 1 or data is not None:
            raise ValueError("an event holds JSON lines without 'data: ' that google-genai "
                             "reads as an answer of their own")
        return chunks[0]


# -- stream ----------------------------------------------------------------------------------

#: ``Notes`` of a ``data:`` array (the SDK skips it: no candidates the client sees).
_SKIPPED: Final[Any] = "skipped"
_UNSET: Final[Any] = object()


def _array(data: str | None) -> list[Any] | None:
    """The parsed ``data`` of an event that holds a JSON array, else None."""
    if not data or data.lstrip()[:1] != "[":
        return None
    value = c.load_json(data)
    return value if isinstance(value, list) else None


def _encode(payload: Any, event: SSEEvent, crlf: bool) -> bytes:
    raw = encode_event(c.dumps(payload), event.event)
    return raw.replace(b"\n", b"\r\n") if crlf else raw


class GeminiCodec:
    """One streamed Gemini answer; keeps the candidates the client saw and which finished."""

    holds_trailing_events = True

    def __init__(self) -> None:
        self.text_ended = False
        self._notes = c.Notes()
        self._head: dict[str, Any] = {}  # modelVersion, responseId of the stream
        self._candidates: dict[Hashable, bool] = {}  # index the client saw -> finished
        self._streaming: set[Hashable] = set()  # candidates extract saw without a finish
        self._finished: set[Hashable] = set()  # ... and with one
        self._crlf: bool | None = None  # the stream's line endings (Google's: CR LF)
        # The first candidates read joined (``("first", field)``; see the module docstring).
        self._first_index: Hashable = _UNSET
        self._first: dict[str, list[str]] = {}  # field -> the first candidates' text pieces
        self._joined: set[Hashable] = set()  # joined channels started
        # id(event) -> (its first candidate's index, joined channel -> (history, piece))
        self._joined_read: dict[int, tuple[Hashable, dict[Hashable, tuple[str, str]]]] = {}

    def _remember(self, event: SSEEvent, answer: dict[str, Any] | None) -> None:
        if self._crlf is None:
            self._crlf = event.raw.endswith(b"\r\n")
        if answer is not None and not self._head:
            for key in _HEAD_KEYS:
                if isinstance(answer.get(key), str):
                    self._head[key] = answer[key]

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        data = event.data
        answer = c.load_object(data) if data else None
        self._remember(event, answer)
        if answer is None:
            items = _array(data)
            if items is None:
                self._notes.put(event, ())
                return []
            self._notes.put(event, _SKIPPED)
            skipped = [(c.apart("skipped", channel), _joined(slots))
                       for channel, slots in _elements_groups(items).items()]
            if skipped:
                self.text_ended = False
            return skipped
        read = _Read(answer)
        found = [(channel, _joined(slots)) for channel, slots in read.groups.items()]
        if read.first is not None and found:
            self._read_first(event, found, read.first_index, read.first)
        self._notes.put(event, tuple(read.states))  # (a tuple of atoms: the collector drops it)
        finish = False
        for index, finished in read.states:
            if finished:
                self._finished.add(index)
                finish = True
            else:
                self._streaming.add(index)
        if finish:
            self.text_ended = self._streaming <= self._finished  # every candidate finished
        elif found:
            self.text_ended = False
        return found

    def _read_first(self, event: SSEEvent, found: list[tuple[Hashable, str]], index: Hashable,
                    first: Groups) -> None:
        """The texts of an event's first candidate, for the ``("first", field)`` reading."""
        if self._first_index is _UNSET:
            self._first_index = index
        diverged = bool(self._joined) or index != self._first_index
        for channel, slots in first.items():
            field = _first_field(channel)
            if field is None:
                continue
            text = _joined(slots)
            if not diverged:
                pieces = self._first.setdefault(field, [])
                pieces.append(text)
                if len(pieces) > 64:  # only the last JOINED_HISTORY characters are needed
                    pieces[:] = ["".join(pieces)[-c.JOINED_HISTORY:]]
                continue
            joined: Hashable = ("first", field)
            history = ""
            if joined not in self._joined:
                self._joined.add(joined)
                history = "".join(self._first.pop(field, ()))[-c.JOINED_HISTORY:]
            self._joined_read.setdefault(id(event), (index, {}))[1][joined] = (history, text)
            found.append((joined, history + text))

    def _from_joined(self, event: SSEEvent, texts: Mapping[Hashable, str]
                     ) -> Mapping[Hashable, str]:
        """``texts`` with a masked joined piece given to the first candidate's own channel
        (the part after the history; a by-index mask of the same text wins)."""
        entry = self._joined_read.pop(id(event), None)
        if entry is None:
            return texts
        index, read = entry
        return c.joined_masks(read, texts, index)

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        note = self._notes.take(event)
        if texts:
            texts = c.apart_texts(texts)
        if self._joined_read:
            if texts:
                texts = self._from_joined(event, texts)
            else:
                self._joined_read.pop(id(event), None)
        if texts or note is c.UNREAD:
            return self._rewrite(event, texts)
        if note is not _SKIPPED:
            seen = self._candidates
            for index, finished in note:
                if not seen.get(index):
                    seen[index] = finished
        return event.raw

    def _rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        """``rewrite`` from the event's data: text to replace, or an event not extracted."""
        data = event.data
        answer = c.load_object(data) if data else None
        self._remember(event, answer)
        if answer is None:
            items = _array(data)
            if items is None or not texts:
                return event.raw
            groups = _elements_groups(items)
            if not self._apply(groups, texts, _all_candidates(items)):
                return event.raw
            return _encode(items, event, bool(self._crlf))
        read = _Read(answer)
        seen = self._candidates
        for index, finished in read.states:
            seen[index] = seen.get(index, False) or finished
        if not texts:
            return event.raw
        candidates = answer.get("candidates")
        if not self._apply(read.groups, texts, candidates if isinstance(candidates, list)
                           else []):
            return event.raw
        return _encode(answer, event, bool(self._crlf))

    @staticmethod
    def _apply(groups: Groups, texts: Mapping[Hashable, str], candidates: list[Any]) -> bool:
        watched = _watch_logprobs(candidates)
        changed = False
        for channel, masked in texts.items():
            slots = groups.get(channel)
            if not slots:
                continue
            original = _joined(slots)
            if masked != original:
                _put(slots, original, masked, lenient=True)
                changed = True
        if changed:
            _drop_stale(watched)
        return changed

    def terminal_frame(self, kind: str) -> bytes:
        frame = encode_event(json.dumps(error_object(kind)))
        return frame if self._crlf is False else frame.replace(b"\n", b"\r\n")

    def soft_block_frame(self, message: str) -> bytes:
        open_candidates = [i for i, finished in self._candidates.items() if not finished]
        payload = _soft_block_object(message, open_candidates or list(self._candidates),
                                     self._head)
        frame = c.event_bytes(payload)
        return frame if self._crlf is False else frame.replace(b"\n", b"\r\n")
