"""The ``whole_request`` prompt scope: every text of a JSON request a model may read, whatever
the API, grouped so that one message is checked as one text.

Nothing is chosen by shape. Every string in the request is text, and every key of a JSON
schema's ``properties`` (a model reads those too), except where a key says it carries none
(``NO_TEXT_KEYS``: ids, model names, roles and types, URLs, binary data, options the server
reads and the model does not). An unknown part type, block type, role or field is therefore
read like a known one: an attacker gains nothing by choosing a shape the sidecar has not seen.

A *group* is one top-level field of the request, or one element when that field is a list (a
message, an input item, a tool, a prompt). Its *check text* is what a chat template renders
of it: its strings in document order, one line each; strings that are elements of one list (a
message's parts) are rendered both ways servers render them, joined with nothing (a chat
template's ``{% for part %}{{ part.text }}``: "baz" + "inga" reads "bazinga") and one per
line (vLLM's ``"\\n".join`` for a string-content model: "x" + "bazinga" must not read
"xbazinga" and pass a whole-word filter).

Masking puts a masked check text back into the strings it was made from (``rewrite``): a
masked span that lies inside one string is put there; one that spans two strings cannot be
put back, so ``rewrite`` reports failure and the caller blocks. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any, Final

#: Keys whose string values carry no text the model reads.
NO_TEXT_KEYS: Final = frozenset({
    # identities and references
    "id", "object", "type", "role", "model", "user", "safety_identifier", "prompt_cache_key",
    "previous_response_id", "conversation", "status", "index", "signature",
    "encrypted_content", "cache_control", "service_tier", "store",
    # media and binary data (what the guardrail cannot read as text anyway)
    "url", "image_url", "media_type", "mime_type", "format", "detail", "file_id",
    "images",  # (Ollama: base64 pictures)
    "mimeType", "fileUri", "thoughtSignature", "thought_signature",  # (Gemini)
    # options the server reads and the model does not
    "tool_choice", "reasoning_effort", "effort", "modalities", "voice", "include",
    "truncation", "stop", "stop_sequences", "metadata", "logit_bias", "response_modalities",
    "encoding_format", "verbosity", "parallel_tool_calls",
})
#: Keys whose values are often binary data: skipped when the value looks like base64 (a data
#: URL, or a long run of the base64 alphabet); read when they hold text (Anthropic's plain-text
#: document source is ``{"type": "text", "data": ...}``).
BINARY_KEYS: Final = frozenset({"data", "file_data", "b64_json", "audio", "bytes"})
#: (Line breaks only, as MIME wraps base64: with spaces, any sentence of 64 letters and spaces
#: looked like base64 and passed unread.)
_BASE64: Final = re.compile(r"[A-Za-z0-9+/=_\-\r\n]{64,}")
#: Keys whose objects map names to JSON schemas: the names are read by the model.
SCHEMA_MAPS: Final = frozenset({"properties", "$defs", "definitions", "patternProperties"})


def declares_text(container: Any) -> bool:
    """Whether an object says its ``data`` is text: ``type`` ``text`` (Anthropic's plain-text
    document source) or a ``text/*`` media type."""
    if not isinstance(container, dict):
        return False
    if container.get("type") == "text":
        return True
    for name in ("media_type", "mime_type", "mimeType"):
        media = container.get(name)
        if isinstance(media, str) and media.strip().lower().startswith("text/"):
            return True
    return False


def skipped(key: Any, value: str, container: Any = None) -> bool:
    """True when the string ``value`` under ``key`` (a member of ``container``, when given)
    carries no text a model reads. A binary key's value is read, whatever it looks like, when
    its object declares it text (``declares_text``) or it is a ``data:text/`` URL."""
    if isinstance(key, str):
        if key in NO_TEXT_KEYS or key.endswith("_id"):
            return True
        if key in BINARY_KEYS:
            if declares_text(container) or value[:10].lower() == "data:text/":
                return not value
            return value.startswith("data:") or _BASE64.fullmatch(value) is not None
    return not value


@dataclass(frozen=True, slots=True)
class Leaf:
    """One string of the request: ``container[key]``, or (``is_key``) the key ``key`` itself
    of the schema map ``container``. ``run``: the list whose element holds it (strings of one
    list are a run, rendered both joined and one per line), or None."""

    container: Any
    key: Any
    run: int | None
    is_key: bool = False

    def get(self) -> str:
        return str(self.key) if self.is_key else str(self.container[self.key])

    def set(self, text: str) -> None:
        if not self.is_key:
            self.container[self.key] = text
            return
        if text == self.key:
            return
        mapping = self.container
        if text in mapping:
            raise ValueError("a masked schema name collides with another")
        items = [(text if name == self.key else name, value) for name, value in mapping.items()]
        mapping.clear()
        mapping.update(items)


@dataclass
class Group:
    """One message, item or field: its strings and its check text."""

    leaves: list[Leaf] = field(default_factory=list)

    def spans(self, texts: list[str] | None = None) -> tuple[str, list[tuple[int, int, int]]]:
        """The check text (of ``texts`` in place of the strings, when given) and, for every
        place a string is rendered in it, (leaf, start, end)."""
        if texts is None:
            texts = [leaf.get() for leaf in self.leaves]
        parts: list[str] = []
        spans: list[tuple[int, int, int]] = []
        length = 0

        def put(text: str, leaf: int | None = None) -> None:
            nonlocal length
            if leaf is not None:
                spans.append((leaf, length, length + len(text)))
            parts.append(text)
            length += len(text)

        leaves = self.leaves
        index = 0
        while index < len(leaves):
            end = index + 1
            run = leaves[index].run
            while run is not None and end < len(leaves) and leaves[end].run == run:
                end += 1
            if parts:
                put("\n")
            if end - index > 1:
                for number in range(index, end):
                    put(texts[number], number)  # joined, as a template renders parts
                for number in range(index, end):
                    put("\n")
                    put(texts[number], number)  # one per line
            else:
                put(texts[index], index)
            index = end
        return "".join(parts), spans

    def text(self) -> str:
        return self.spans()[0]

    def rewrite(self, masked: str) -> bool:
        """Put the masked check text back into the strings; False when it cannot be: a change
        that spans two strings or touches a separator, or a string rendered twice and masked
        differently (the masked strings must render ``masked`` exactly)."""
        original, spans = self.spans()
        if masked == original:
            return True
        texts = map_masked(original, spans, masked, len(self.leaves))
        if texts is None:
            return False
        if self.spans(texts)[0] != masked:
            return False
        try:
            for leaf, text in zip(self.leaves, texts, strict=True):
                leaf.set(text)
        except (ValueError, KeyError, IndexError, TypeError):
            return False
        return True


def map_masked(original: str, spans: list[tuple[int, int, int]], masked: str,
               count: int) -> list[str] | None:
    """The masked text of each of ``count`` strings rendered in ``original`` at ``spans``
    ((string, start, end); a string rendered twice takes its first rendering), given the masked
    ``original``; None when a change crosses a span's ends or a string is not rendered. The
    caller renders the result again and compares it with ``masked``."""
    opcodes = SequenceMatcher(None, original, masked, autojunk=False).get_opcodes()
    outputs: dict[int, str] = {}
    for number, start, end in spans:
        if number in outputs:
            continue
        text = _map_span(opcodes, start, end, masked)
        if text is None:
            return None
        outputs[number] = text
    if len(outputs) != count:
        return None
    return [outputs[number] for number in range(count)]


def _map_span(opcodes: Sequence[tuple[str, int, int, int, int]], start: int, end: int,
              masked: str) -> str | None:
    """The masked text of ``original[start:end]`` (insertions at its ends included), or None
    when a replaced region crosses its ends. The caller verifies the result."""
    out: list[str] = []
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            lo, hi = max(i1, start), min(i2, end)
            if lo < hi:
                out.append(masked[j1 + lo - i1:j1 + hi - i1])
        elif i1 == i2:  # an insertion
            if start <= i1 <= end:
                out.append(masked[j1:j2])
        elif i1 < end and i2 > start:  # a replaced or deleted region that overlaps the span
            if i1 < start or i2 > end:
                return None
            out.append(masked[j1:j2])
    return "".join(out)


def _walk(value: Any, key: Any, container: Any, run: int | None, out: list[Leaf],
          runs: Iterator[int]) -> None:
    if isinstance(value, str):
        if not skipped(key, value, container):
            out.append(Leaf(container, key, run))
    elif isinstance(value, dict):
        schema_map = key in SCHEMA_MAPS
        for name, item in value.items():
            if isinstance(name, str) and name in NO_TEXT_KEYS and not schema_map:
                continue
            if schema_map and name:
                out.append(Leaf(value, name, run, is_key=True))
            _walk(item, name, value, run, out, runs)
    elif isinstance(value, list):
        inner = next(runs)
        for position, item in enumerate(value):
            _walk(item, position, value, inner, out, runs)


def groups(request: Any) -> list[Group]:
    """The groups of a parsed request body, in document order (empty ones left out). A body
    that is not an object (a list, a bare string) is one group."""
    found: list[Group] = []
    runs = iter(range(1 << 62))
    items: list[tuple[Any, Any, Any]] = []
    if isinstance(request, dict):
        for name, value in request.items():
            if name in NO_TEXT_KEYS:
                continue
            if isinstance(value, list):
                items += [(position, item, value) for position, item in enumerate(value)]
            else:
                items.append((name, value, request))
    for key, value, container in items:
        group = Group()
        _walk(value, key, container, None, group.leaves, runs)
        if group.leaves:
            found.append(group)
    return found


class PromptUnreadable(ValueError):
    """The request hands its model input the guardrail cannot read (token ids, embeddings)."""


#: Fields that carry model input as something other than text (vLLM, legacy Completions).
UNREADABLE_KEYS: Final = ("prompt_embeds", "prompt_token_ids")


def _tokens(value: Any) -> bool:
    """True for a number, or a list that holds one at any depth (a token-id prompt)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, list) and any(_tokens(item) for item in value)


def texts(request: Any) -> list[str]:
    """The check texts of a parsed request body, one per group; ``PromptUnreadable`` when the
    request also gives the model input that is not text (a token-id ``prompt``, embeddings)."""
    if isinstance(request, dict):
        for key in UNREADABLE_KEYS:
            if request.get(key) is not None:
                raise PromptUnreadable(f"the request carries {key}")
        if _tokens(request.get("prompt")):
            raise PromptUnreadable("the prompt is token ids")
    return [group.text() for group in groups(holder(request))]


def rewrite(request: Any, masked: list[str]) -> Any:
    """``request`` with masked check texts (``texts``' order and count) put back (in place
    when it is an object); ``UNCHANGED`` when that is not possible."""
    held = holder(request)
    found = groups(held)
    if len(found) != len(masked):
        return UNCHANGED
    if not all(group.rewrite(text) for group, text in zip(found, masked, strict=True)):
        return UNCHANGED
    return unhold(held, request)


#: ``rewrite``'s answer when the masked texts cannot be put back.
UNCHANGED: Final[Any] = object()


def holder(request: Any) -> Any:
    """An object is its own groups' holder; any other JSON value is held as one field."""
    return request if isinstance(request, dict) else {"body": request}


def unhold(held: Any, request: Any) -> Any:
    """The (rewritten) request of ``holder(request)``."""
    return request if held is request else held["body"]
