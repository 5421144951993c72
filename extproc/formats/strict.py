"""Strict reading of a JSON request body: exactly one JSON value in UTF-8, read the same way by
every parser an upstream may use, or refused.

A guardrail only sees the text its parser finds. Where Python's ``json`` and the upstream's
parser read the same bytes differently, an attacker writes the bytes so that we see nothing
and the model sees the prompt. The differences found (issue "Nothing on a guarded route passes
unread"), each refused here with the reason named:

====================================  =====================================================
bytes                                 what other parsers do
====================================  =====================================================
invalid UTF-8 in a string             Go replaces it with U+FFFD and reads on; Node too
a byte order mark before the value    some strip it
data after the value                  Go's ``json.Decoder`` reads the first value only
a key given twice                     every parser keeps the last one, silently
a key that only case-folds to a       Go's ``encoding/json`` matches struct fields without
known one (``Messages``, or ``s``     regard to case, with simple folding (U+017F is ``s``):
written as U+017F)                    Ollama and other Go servers read it as ``messages``
nesting deeper than ``MAX_DEPTH``      Python raises ``RecursionError``, Node and Go read on
a number of more than                 Python refuses integers of more than 4,300 digits,
``MAX_NUMBER_CHARS`` characters, or   Node and Go read them; ``1e999`` is infinity for
one too large for a double            Python and Node, an error for Go
``NaN``, ``Infinity``                 not JSON; Python reads them
====================================  =====================================================

``parse_request`` returns the value or raises ``BodyRejected``. Pure: no I/O, no logging.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from itertools import accumulate
from typing import Any, Final

#: Deepest nesting of arrays and objects accepted (a tool's JSON schema rarely goes past 20).
MAX_DEPTH: Final = 100
#: Longest number accepted, in characters (a 64-bit seed has 20).
MAX_NUMBER_CHARS: Final = 100

_BOM: Final = b"\xef\xbb\xbf"
# A JSON string literal (unrolled: linear, no backtracking).
_STRING: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_DELTA: Final = {"[": 1, "{": 1, "]": -1, "}": -1}
_NOT_BRACKETS: Final = re.compile(r"[^\[\]{}]+")

#: Keys the formats read, by their case-folded spelling: a key that folds to one of these but
#: is spelt otherwise is refused (Go would read it as the known key, we would not).
KNOWN_KEYS: Final[Mapping[str, str]] = {key.casefold(): key for key in (
    "messages", "content", "role", "text", "input", "instructions", "system", "prompt",
    "suffix", "tools", "tool_choice", "tool_calls", "function", "functions", "function_call",
    "arguments", "name", "description", "parameters", "type", "source", "data", "title",
    "context", "refusal", "reasoning", "reasoning_content", "thinking", "output", "stream",
    "model", "variables", "summary", "image_url", "url", "file", "audio", "transcript",
    "documents", "citations", "cache_control", "id", "call_id", "tool_use_id", "is_error",
)}


class BodyRejected(ValueError):
    """The body is not one JSON value every parser reads alike; ``reason`` says why (for logs:
    never shown to clients)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BodyRejected(f"the key {key!r} is given twice")
            seen.add(key)
    for key in value:
        known = KNOWN_KEYS.get(key.casefold())
        if known is not None and key != known:
            raise BodyRejected(f"the key {key!r} is a case variant of {known!r}")
    return value


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise BodyRejected(f"a number of {len(text)} characters")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise BodyRejected(f"a number of {len(text)} characters")
    value = float(text)
    if math.isinf(value):
        raise BodyRejected(f"the number {text[:20]} is too large")
    return value


def _constant(text: str) -> Any:
    raise BodyRejected(f"{text} is not JSON")


def _levels(brackets: str) -> int:
    """The deepest nesting of a run of brackets (``[{`` open, ``]}`` close)."""
    return max(accumulate(_DELTA[ch] for ch in brackets), default=0)


#: Charsets a request body may declare: JSON is UTF-8 (RFC 8259 8.1), and ASCII is a subset.
UTF8_CHARSETS: Final = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


def check_charset(content_type: str) -> None:
    """``BodyRejected`` when the request's content-type names a charset other than UTF-8:
    Express (body-parser, iconv-lite) decodes the body in that charset, so in UTF-7 the ASCII
    ``+AGI-azinga`` we would check is ``bazinga`` to its model."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').strip().lower()
            if charset not in UTF8_CHARSETS:
                raise BodyRejected(f"the body is declared in charset {charset!r}, not UTF-8")


def parse_request(body: bytes) -> Any:
    """The JSON value of ``body``; ``BodyRejected`` when it is not exactly one JSON value in
    UTF-8 that every parser reads alike (see the module docstring)."""
    if body.startswith(_BOM):
        raise BodyRejected("a byte order mark before the JSON value")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyRejected(f"invalid UTF-8 at byte {exc.start}") from None
    brackets = _NOT_BRACKETS.sub("", _STRING.sub("", text))
    if brackets and _levels(brackets) > MAX_DEPTH:
        raise BodyRejected(f"nesting deeper than {MAX_DEPTH}")
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_int=_int, parse_float=_float,
                          parse_constant=_constant)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            raise BodyRejected(f"data after the JSON value at character {exc.pos}") from None
        raise BodyRejected(f"not JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise BodyRejected(f"nesting deeper than {MAX_DEPTH}") from None
