"""Helpers shared by the format modules: JSON in and out, error messages, text slots.

A *slot* is a place in a parsed JSON document that holds text we check: ``container[key]``.
Reading the texts and writing masked texts back walk the same slots, so the two always agree
on order and count.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from extproc.formats import ErrorKind, PromptScope, whole
from extproc.sse import SSEEvent, encode_event
from extproc.stream.masking import Opcode, align, shift_offset

_ERRORS: Mapping[str, tuple[int, str]] = {
    ErrorKind.VIOLATION: (400, "Violated guardrail policy"),
    ErrorKind.UNAVAILABLE: (503, "Guardrail unavailable"),
    ErrorKind.TOO_LARGE: (413, "Request too large for the guardrail"),
    ErrorKind.UNREADABLE: (415, "Request body could not be read by the guardrail"),
    ErrorKind.INVALID: (400, "Request body is not valid JSON the guardrail can read"),
    ErrorKind.UNRECOGNISED: (403, "Request not recognised by the guardrail"),
    ErrorKind.IMAGE_REFERENCE: (400, "Image not checked: the guardrail does not fetch image "
                                     "URLs or files; send the image inline as base64 data"),
    ErrorKind.IMAGE_FORMAT: (400, "Image not checked: the guardrail reads PNG and JPEG only"),
    ErrorKind.IMAGE_TOO_LARGE: (400, "Image not checked: over the guardrail's limit of 4 MB "
                                     "or 8000x8000 pixels"),
    ErrorKind.IMAGE_UNREADABLE: (400, "Image not checked: its data could not be decoded"),
    ErrorKind.IMAGE_NOT_GUARDED: (400, "Image not checked: the guardrail does not screen "
                                       "images"),
}

DONE = b"data: [DONE]\n\n"


def error_status(kind: str) -> tuple[int, str]:
    """HTTP status and client message of an ``ErrorKind``; ``KeyError`` for anything else."""
    return _ERRORS[kind]


def check_scope(scope: str) -> str:
    if scope not in PromptScope.VALUES:
        raise ValueError(f"unknown prompt scope {scope!r}")
    return scope


def load_json(data: bytes | str | None) -> Any:
    """The parsed JSON, or None when it is not JSON."""
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: hostile nesting; not JSON we can read, so not text we check.
        return None


_raw_decode = json.JSONDecoder().raw_decode


def load_object(data: bytes | str | None) -> dict[str, Any] | None:
    """The parsed JSON object, or None when it is not a JSON object."""
    if type(data) is str and data[:1] == "{":
        # Every streamed event's data goes through here. ``json.loads`` on such text is
        # ``raw_decode`` at 0 plus a check that only whitespace follows; calling ``raw_decode``
        # directly skips two regex matches and two Python frames (~1 µs of ~2.5). Anything but
        # an object that ends the text exactly takes the general path, so the result is the same.
        try:
            value, end = _raw_decode(data)
        except (ValueError, RecursionError):
            return None  # json.loads raises the same error for it
        if end == len(data):
            return value  # type: ignore[no-any-return]  # text opening with "{": a dict
    value = load_json(data)
    return value if isinstance(value, dict) else None


def dumps(value: Any) -> str:
    """Compact JSON, UTF-8 text kept as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def event_bytes(payload: Any, event: str | None = None) -> bytes:
    """One SSE message event carrying ``payload`` as compact JSON."""
    return encode_event(dumps(payload), event)


#: ``Notes.take`` for an event whose ``extract`` it did not see.
UNREAD: Any = object()


class Notes:
    """What a codec's ``extract`` read from each event, kept for that event's ``rewrite``.

    The caller extracts every event as it arrives and rewrites the released ones in the same
    order, a prefix of them (``StreamCodec``): the notes form a queue whose oldest entry is the
    next rewrite's. Without this, every released event is parsed twice. An event ``extract``
    did not see (the caller checks no text) has no note (``UNREAD``): the codec reads it again.
    Notes of text deltas are small tuples, not the parsed event (held events are many), so a
    delta whose text is replaced (masking, rare) is parsed again.
    """

    __slots__ = ("_events", "_notes")

    def __init__(self) -> None:
        # Two queues, not one of (event, note) pairs: a pair per held event would be one more
        # object for every garbage collection to walk.
        self._events: deque[SSEEvent] = deque()
        self._notes: deque[Any] = deque()

    def put(self, event: SSEEvent, note: Any) -> None:
        self._events.append(event)
        self._notes.append(note)

    def take(self, event: SSEEvent) -> Any:
        """The note of ``event`` (``UNREAD`` when ``extract`` did not see it)."""
        events = self._events
        if events and events[0] is event:
            events.popleft()
            return self._notes.popleft()
        return UNREAD


def stream_chunk(data: str | None) -> dict[str, Any] | None:
    """The JSON object of an OpenAI-style ``data:`` line (``[DONE]`` and non-objects: None)."""
    if not data or data == "[DONE]":
        return None
    return load_object(data)


class ChoicesCodec:
    """What the Chat Completions and legacy Completions stream codecs share: each chunk holds
    ``choices``; the codec keeps the stream's head (``HEAD_KEYS``, for soft-block frames) and
    which choices the client saw finish, and hands each choice's ``(index, finished, start)``
    from ``extract`` to ``rewrite`` as a note, so that an unchanged event is not parsed again
    (``start``: where the choice's piece of main text begins in the text read so far, or -1).

    A subclass says how to read one choice (``_extract_choice``) and how to replace its text
    (``_rewrite_choice``); a rewritten choice loses its ``logprobs``, which would repeat the
    original tokens.
    """

    holds_trailing_events = True

    HEAD_KEYS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}  # id, created, model, ... of the stream's chunks
        self._choices: dict[Any, bool] = {}  # choice index the client saw -> finished
        self._notes = Notes()
        self.text_ended = False
        self._streaming: set[Hashable] = set()  # choices extract saw without a finish_reason
        self._finished: set[Hashable] = set()  # ... and with one
        # ``[DONE]`` seen: the ``openai`` SDKs stop reading there (Python breaks, Node skips the
        # rest); clients that read on (the Vercel AI SDK) show what follows. Its text is checked
        # on channels of its own (``("after_done", ...)``), never glued to the text the SDKs
        # show. Likewise the first event after a byte order mark, which the ``openai`` SDKs do
        # not read (its first line's field name starts with U+FEFF) and WHATWG readers do
        # (``("after_bom", ...)``).
        self._done_read = False
        # Clients that read ``choices[0]`` of each chunk whatever its ``index`` (the Vercel AI
        # SDK, most hand-written loops) show the first choice's text of every chunk joined;
        # the SDKs' accumulators show it by index. Both readings are checked: by index on
        # ``(field, index)``, and, once a first choice has another index than before, joined
        # on ``("joined", field)``, which starts with the last ``JOINED_HISTORY`` characters of
        # the joined text so far (as a window's overlap: what it may continue).
        self._first_index: Hashable = _UNSET
        self._first: dict[str, list[str]] = {}  # field -> the first choices' text pieces
        self._joined: set[Hashable] = set()  # joined channels started
        # id(event) -> joined channel -> (history, original piece), for ``rewrite``
        self._joined_read: dict[int, dict[Hashable, tuple[str, str]]] = {}
        # choice index -> masks of its main text: (start, original piece, masked piece), in
        # order, to move the offsets annotations hold (``_shift_annotations``)
        self._edits: dict[Hashable, list[tuple[int, str, str]]] = {}

    def _remember_head(self, chunk: dict[str, Any]) -> None:
        if self._head:
            return
        for name in self.HEAD_KEYS:
            if name in chunk:
                self._head[name] = chunk[name]

    def _extract_choice(self, choice: dict[str, Any], found: list[tuple[Hashable, str]],
                        states: list[State]) -> None:
        """Append the choice's ``(index, finished, start)`` to ``states`` and its texts to
        ``found``."""
        raise NotImplementedError

    def _rewrite_choice(self, choice: dict[str, Any], index: Any,
                        texts: Mapping[Hashable, str], start: int) -> bool:
        """Put ``texts`` into the choice (``start``: its note's); whether anything changed."""
        raise NotImplementedError

    def _annotations(self, choice: dict[str, Any]) -> Any:
        """The annotations of a choice (offsets into its main text), if its API has any."""
        return None

    def _record_edit(self, index: Hashable, start: int, original: str, masked: str) -> None:
        """The client gets ``masked`` for the main text ``original`` read at ``start``."""
        if start >= 0 and original != masked:
            self._edits.setdefault(index, []).append((start, original, masked))

    def _shift_annotations(self, index: Hashable, annotations: Any) -> bool:
        """Move the offsets into choice ``index``'s main text that ``annotations`` hold from
        the text read to the text the client got; whether any moved."""
        edits = self._edits.get(index)
        if not edits or not isinstance(annotations, list):
            return False
        opcodes: list[Opcode] = []
        i = j = 0
        for start, original, masked in edits:
            if start > i:
                opcodes.append(("equal", i, start, j, j + start - i))
                j += start - i
            for tag, i1, i2, j1, j2 in align(original, masked):
                opcodes.append((tag, start + i1, start + i2, j + j1, j + j2))
            i, j = start + len(original), j + len(masked)
        return shift_offsets(annotations, opcodes)

    def extract(self, event: SSEEvent) -> list[tuple[Hashable, str]]:
        found: list[tuple[Hashable, str]] = []
        # Each choice's (index, finished): all that ``rewrite`` needs of an unchanged event.
        states: list[State] = []
        chunk = stream_chunk(event.data)
        if chunk is not None:
            if not self._head:
                self._remember_head(chunk)
            choices = chunk.get("choices")
            if isinstance(choices, list):
                for position, choice in enumerate(choices):
                    if isinstance(choice, dict):
                        start = len(found)
                        self._extract_choice(choice, found, states)
                        if position == 0 and len(found) > start:
                            self._read_first(event, found, start, states[-1][0])
            if found and (self._done_read or event.raw.startswith(BOM)):
                where = "after_done" if self._done_read else "after_bom"
                found = [(apart(where, channel), text) for channel, text in found]
        elif event.data is not None and event.data.startswith("[DONE]"):
            self._done_read = True
        self._notes.put(event, tuple(states))  # (a tuple of atoms: the collector drops it)
        finish = False
        for index, finished, _ in states:
            if finished:
                self._finished.add(index)
                finish = True
            else:
                self._streaming.add(index)
        if finish:
            self.text_ended = self._streaming <= self._finished  # every choice seen finished
        elif found:
            self.text_ended = False
        return found

    def _read_first(self, event: SSEEvent, found: list[tuple[Hashable, str]], start: int,
                    index: Hashable) -> None:
        """The texts ``found[start:]`` of a chunk's first choice, for the joined reading."""
        if self._first_index is _UNSET:
            self._first_index = index
        diverged = bool(self._joined) or index != self._first_index
        for channel, text in found[start:]:
            if not (isinstance(channel, tuple) and len(channel) == 2
                    and isinstance(channel[0], str)):
                continue  # (tool calls: by index only)
            field = channel[0]
            if not diverged:
                pieces = self._first.setdefault(field, [])
                pieces.append(text)
                if len(pieces) > 64:  # only the last JOINED_HISTORY characters are needed
                    pieces[:] = ["".join(pieces)[-JOINED_HISTORY:]]
                continue
            joined: Hashable = ("joined", field)
            history = ""
            if joined not in self._joined:
                self._joined.add(joined)
                history = "".join(self._first.pop(field, ()))[-JOINED_HISTORY:]
            self._joined_read.setdefault(id(event), {})[joined] = (history, text)
            found.append((joined, history + text))

    def _from_joined(self, event: SSEEvent, index: Hashable,
                     texts: Mapping[Hashable, str]) -> Mapping[Hashable, str]:
        """``texts`` with a masked joined piece given to the first choice's own channel (the
        part of it after the history; a by-index mask of the same text wins)."""
        read = self._joined_read.pop(id(event), None)
        return joined_masks(read, texts, index) if read else texts

    def rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str]) -> bytes:
        states = self._notes.take(event)
        if texts:
            texts = apart_texts(texts)
        if self._joined_read:
            if texts:
                first = states[0][0] if states and states is not UNREAD else None
                texts = self._from_joined(event, first, texts)
            else:
                self._joined_read.pop(id(event), None)
        if texts or states is UNREAD or (self._edits and _ANNOTATIONS in event.raw):
            return self._rewrite(event, texts, () if states is UNREAD else states)
        seen = self._choices
        for index, finished, _ in states:
            if not seen.get(index):
                seen[index] = finished
        return event.raw

    def _rewrite(self, event: SSEEvent, texts: Mapping[Hashable, str],
                 states: tuple[State, ...]) -> bytes:
        """``rewrite`` from the event's data: text to replace, offsets to move, or an event
        not extracted."""
        chunk = stream_chunk(event.data)
        if chunk is None:
            return event.raw
        self._remember_head(chunk)
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return event.raw
        changed = False
        starts = {state[0]: state[2] for state in states}
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = key(choice.get("index", 0))
            self._choices[index] = self._choices.get(index, False) or bool(
                choice.get("finish_reason"))
            if texts and self._rewrite_choice(choice, index, texts, starts.get(index, -1)):
                changed = True
                if choice.get("logprobs") is not None:
                    choice["logprobs"] = None
            if self._edits and self._shift_annotations(index, self._annotations(choice)):
                changed = True
        if not changed:
            return event.raw
        return encode_event(dumps(chunk), event.event)


#: A choice's note: its index, whether it finished, where its main text piece starts (or -1).
State = tuple[Hashable, bool, int]
_ANNOTATIONS = b'"annotations"'
_UNSET: Any = object()
#: Characters of the joined text so far a joined channel starts with (``ChoicesCodec``).
JOINED_HISTORY = 200

BOM = b"\xef\xbb\xbf"
#: Prefixes of the channels of text some clients show and others skip, checked apart.
APART = frozenset({"after_done", "after_bom", "skipped"})


def apart(prefix: str, channel: Hashable) -> Hashable:
    return (prefix, *channel) if isinstance(channel, tuple) else (prefix, channel)


def apart_texts(texts: Mapping[Hashable, str]) -> Mapping[Hashable, str]:
    """``texts`` of an event whose text was checked apart, keyed by its own channels again."""
    first = next(iter(texts))
    if isinstance(first, tuple) and first and first[0] in APART:
        return {channel[1:]: text for channel, text in texts.items()
                if isinstance(channel, tuple)}
    return texts


def key(value: Any) -> Hashable:
    """An index from the wire as part of a channel key: ints and strings as they are, anything
    else (a list, an object, a bool) as its JSON text, so a malformed index still gives a
    stable, hashable channel instead of an error."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return value
    return dumps(value)


def is_text(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value != ""


@dataclass(frozen=True, slots=True)
class Slot:
    """``container[key]`` holds checked text; ``as_json``: it holds a JSON value checked as its
    serialisation (Anthropic's non-streamed ``tool_use.input``)."""

    container: Any
    key: Any
    channel: Hashable = None
    as_json: bool = False

    def get(self) -> str:
        value = self.container[self.key]
        return dumps(value) if self.as_json else value

    def set(self, text: str) -> None:
        if self.as_json:
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"masked JSON of {self.channel!r} is no longer JSON") from exc
            if type(value) is not type(self.container[self.key]):
                raise ValueError(f"masked JSON of {self.channel!r} changed type")
            self.container[self.key] = value
        else:
            self.container[self.key] = text


@dataclass(frozen=True, slots=True)
class DropSlot(Slot):
    """Text read from ``container[key]`` (``text``) that a mask drops: ``container[key]``
    becomes null (a Chat choice's ``logprobs``)."""

    text: str = ""

    def get(self) -> str:
        return self.text

    def set(self, text: str) -> None:
        self.container[self.key] = None


def string_slots(container: Any, key: Any) -> list[Slot]:
    """A slot for every non-empty string in ``container[key]``, at any depth, in document
    order (iterative: a deep tool result must not exhaust the stack)."""
    slots: list[Slot] = []
    stack: list[tuple[Any, Any]] = [(container, key)]
    while stack:
        holder, name = stack.pop()
        value = holder[name]
        if isinstance(value, str):
            if value:
                slots.append(Slot(holder, name))
        elif isinstance(value, dict):
            stack.extend((value, inner) for inner in reversed(list(value)))
        elif isinstance(value, list):
            stack.extend((value, position) for position in range(len(value) - 1, -1, -1))
    return slots


def no_text(name: Any) -> bool:
    """Keys whose values no leaf reading enters (``whole.NO_TEXT_KEYS``)."""
    return isinstance(name, str) and name in whole.NO_TEXT_KEYS


def leaf_slots(root: Any, prefix: tuple[Any, ...], names: Collection[str] | None = None, *,
               no_text: Callable[[Any], bool] = no_text,
               top_skip: Collection[str] = ()) -> list[Slot]:
    """The reading by rule of what a format does not know: every string leaf of ``root`` (an
    object or array; of an object, only its members ``names`` when given, never those in
    ``top_skip``) not under a ``no_text`` key nor one ``whole.skipped`` rejects, as a slot on
    channel ``prefix + path``, in document order (iterative: no recursion limit)."""
    slots: list[Slot] = []
    stack: list[tuple[Any, Any, tuple[Any, ...]]] = []
    if isinstance(root, dict):
        stack.extend((root, name, (name,)) for name in reversed(list(root))
                     if name not in top_skip and not no_text(name)
                     and (names is None or name in names))
    elif isinstance(root, list):
        stack.extend((root, i, (i,)) for i in range(len(root) - 1, -1, -1))
    while stack:
        holder, name, path = stack.pop()
        value = holder[name]
        if isinstance(value, str):
            if not whole.skipped(name, value, holder):
                slots.append(Slot(holder, name, (*prefix, *path)))
        elif isinstance(value, dict):
            stack.extend((value, inner, (*path, inner)) for inner in reversed(list(value))
                         if not no_text(inner))
        elif isinstance(value, list):
            stack.extend((value, i, (*path, i)) for i in range(len(value) - 1, -1, -1))
    return slots


def scoped_messages(messages: Any, scope: str,
                    system_roles: tuple[str, ...]) -> list[dict[str, Any]]:
    """The messages of a chat-style ``messages`` list a prompt scope reads: the last user
    message (``last_user``), every message but the system ones (``all``), or all of them."""
    if not isinstance(messages, list):
        return []
    if scope == PromptScope.LAST_USER:
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return [message]
        return []
    return [message for message in messages if isinstance(message, dict) and not (
        scope == PromptScope.ALL and message.get("role") in system_roles)]


def joined_masks(read: Mapping[Hashable, tuple[str, str]], texts: Mapping[Hashable, str],
                 index: Hashable) -> Mapping[Hashable, str]:
    """``texts`` with each masked joined reading (``("joined", field)``: history + original
    piece, ``ChoicesCodec``) given to the first choice's own channel ``(field, index)``: the
    part after the history. A by-index mask of the same text wins."""
    merged = dict(texts)
    for joined, (history, original) in read.items():
        masked = texts.get(joined)
        if masked is None or not isinstance(joined, tuple):
            continue
        own = (joined[1], index)
        if own not in merged:
            split = shift_offset(align(history + original, masked), len(history))
            merged[own] = masked[split:]
    return merged


def text_slot(container: Any, key: Any, channel: Hashable = None) -> list[Slot]:
    """A one-slot list when ``container[key]`` is non-empty text, else an empty list."""
    try:
        value = container[key]
    except (KeyError, IndexError, TypeError):
        return []
    return [Slot(container, key, channel)] if is_text(value) else []


SlotFinder = Callable[[Any, str], Iterable[Slot]]


def prompt_texts(body: bytes, scope: str, find: SlotFinder) -> list[str]:
    if check_scope(scope) == PromptScope.WHOLE_REQUEST:
        return whole.texts(load_json(body))
    request = load_object(body)
    if request is None:
        return []
    return [slot.get() for slot in find(request, scope)]


def rewrite_prompt(body: bytes, scope: str, texts: list[str], find: SlotFinder) -> bytes | None:
    if check_scope(scope) == PromptScope.WHOLE_REQUEST:
        if not all(isinstance(t, str) for t in texts):
            return None
        request = load_json(body)
        if request is None or not texts:
            return None
        rewritten = whole.rewrite(request, texts)
        return None if rewritten is whole.UNCHANGED else dumps(rewritten).encode()
    request = load_object(body)
    if request is None:
        return None
    slots = list(find(request, scope))
    if len(slots) != len(texts) or not all(isinstance(t, str) for t in texts):
        return None
    for slot, text in zip(slots, texts, strict=True):
        slot.set(text)
    return dumps(request).encode()


def response_texts(body: bytes, find: Callable[[dict[str, Any]], Iterable[Slot]]
                   ) -> list[tuple[Hashable, str]]:
    answer = load_object(body)
    if answer is None:
        return []
    return [(slot.channel, slot.get()) for slot in find(answer)]


def rewrite_response(body: bytes, texts: Mapping[Hashable, str],
                     find: Callable[[dict[str, Any]], Iterable[Slot]]) -> bytes:
    answer = load_object(body)
    if answer is None:
        raise ValueError("the answer is not a JSON object")
    slots = {slot.channel: slot for slot in find(answer)}
    unknown = [channel for channel in texts if channel not in slots]
    if unknown:
        raise ValueError(f"no such channels in the answer: {unknown!r}")
    for channel, text in texts.items():
        slot = slots[channel]
        if isinstance(slot.container, dict) and not slot.as_json:
            shift_annotations(slot.container.get("annotations"), slot.get(), text)
        slot.set(text)
    return dumps(answer).encode()


def shift_annotations(annotations: Any, original: str, masked: str) -> bool:
    """Move the character offsets (``start_index`` / ``end_index``) that point into
    ``original`` to ``masked``: Responses annotations hold them, Chat Completions annotations
    in their ``url_citation`` object. Whether any moved."""
    if not isinstance(annotations, list) or original == masked:
        return False
    return shift_offsets(annotations, align(original, masked))


def shift_offsets(annotations: list[Any], opcodes: Sequence[Opcode]) -> bool:
    """``shift_annotations`` by ``align``'s opcodes."""
    moved = False
    for annotation in annotations:
        if not isinstance(annotation, dict):
            continue
        for target in (annotation, *(v for v in annotation.values() if isinstance(v, dict))):
            for key, is_end in (("start_index", False), ("end_index", True)):
                value = target.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    shifted = shift_offset(opcodes, value, end=is_end)
                    if shifted != value:
                        target[key] = shifted
                        moved = True
    return moved


def message_parts(content: Any, part_types: tuple[str, ...] = ("text",),
                  channel: Hashable = None) -> list[Slot]:
    """Slots of a message ``content``: the string itself, or each text part of a list
    (``{"type": <one of part_types>, "text": ...}``, or a typeless part with ``text``)."""
    if isinstance(content, str):
        return []  # a string content is a slot of its parent; see ``content_slots``
    if not isinstance(content, list):
        return []
    slots: list[Slot] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind is None or kind in part_types:
            slots += text_slot(part, "text", channel)
    return slots


def content_slots(message: Mapping[str, Any], key: str = "content",
                  part_types: tuple[str, ...] = ("text",)) -> list[Slot]:
    """Slots of ``message[key]``: one for a string, one per text part of a list."""
    content = message.get(key)
    if isinstance(content, str):
        return text_slot(message, key)
    return message_parts(content, part_types)


def extract_logprobs(logprobs: Any, delta: dict[str, Any], index: Hashable,
                     found: list[tuple[Hashable, str]]) -> None:
    """The tokens of a chunk's ``logprobs`` (OpenAI's shape, which Ollama's follows;
    ``content`` and ``refusal``), when they are not the text they stand for: clients that
    show tokens show them, so they are checked, on a channel of their own
    (``("logprobs", field, choice)``); a mask drops the choice's ``logprobs``. Tokens are
    compared as strings, then as their ``bytes`` (a character split over two tokens). The
    alternatives in ``top_logprobs`` that are not the token chosen are text too (a
    playground shows them): checked one per line on ``("top_logprobs", field, choice)``."""
    if not isinstance(logprobs, dict):
        return
    for field in ("content", "refusal"):
        tokens = logprobs.get(field)
        if not isinstance(tokens, list) or not tokens:
            continue
        _extract_alternatives(tokens, field, index, found)
        text = delta.get(field)
        text = text if isinstance(text, str) else ""
        strings = [t.get("token") for t in tokens if isinstance(t, dict)]
        joined = "".join(s for s in strings if isinstance(s, str))
        if joined == text:
            continue
        raw = b""
        for token in tokens:
            values = token.get("bytes") if isinstance(token, dict) else None
            if isinstance(values, list) and all(isinstance(v, int) and 0 <= v < 256
                                                for v in values):
                raw += bytes(values)
        if raw and raw == text.encode():
            continue
        shown = joined or raw.decode("utf-8", "replace")
        if shown:
            found.append((("logprobs", field, index), shown))


def _extract_alternatives(tokens: list[Any], field: str, index: Hashable,
                          found: list[tuple[Hashable, str]]) -> None:
    lines = []
    for token in tokens:
        if not isinstance(token, dict):
            continue
        alternatives = token.get("top_logprobs")
        if not isinstance(alternatives, list):
            continue
        chosen = token.get("token")
        for alternative in alternatives:
            other = alternative.get("token") if isinstance(alternative, dict) else None
            if isinstance(other, str) and other != chosen and other.strip():
                lines.append(other)
    if lines:
        found.append((("top_logprobs", field, index), "\n".join(lines) + "\n"))
