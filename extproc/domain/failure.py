"""Failure modes: what a stream gets when the guardrail gives no verdict, per error class.

``FailureMode`` is the choice (closed: the stream ends with ``guardrail_unavailable`` or the
request gets a 503; open: the text goes on unchecked, logged and counted). ``FailurePolicy``
holds one choice per error class of ``extproc.domain.errors``; ``parse_failure_policy`` reads the
setting (``closed``, ``open``, or ``closed,throttled=open,timeout=open``). Pure values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from extproc.domain.errors import ERROR_CLASSES, GuardrailError


class FailureMode(enum.Enum):
    """What a stream gets when the guardrail cannot give a verdict."""

    CLOSED = "closed"  # the stream ends with a guardrail_unavailable frame (a 503 before headers)
    OPEN = "open"  # the text is released unchecked; logged and counted


@dataclass(frozen=True, slots=True)
class FailurePolicy:
    """Per error class: fail ``closed`` (end the stream / 503) or ``open`` (release unchecked).

    Fields may be given as ``FailureMode`` or as the strings "closed" / "open".
    """

    throttled: FailureMode = FailureMode.CLOSED
    timeout: FailureMode = FailureMode.CLOSED
    server_error: FailureMode = FailureMode.CLOSED
    input_too_large: FailureMode = FailureMode.CLOSED
    rejected: FailureMode = FailureMode.CLOSED
    circuit_open: FailureMode = FailureMode.CLOSED
    budget: FailureMode = FailureMode.CLOSED
    overload: FailureMode = FailureMode.CLOSED

    def __post_init__(self) -> None:
        for name in ERROR_CLASSES:
            value = getattr(self, name)
            if isinstance(value, FailureMode):
                continue
            if isinstance(value, str):
                object.__setattr__(self, name, _parse_mode(value, name))
            else:
                raise TypeError(f"{name}: expected 'closed' or 'open', got {value!r}")

    @classmethod
    def uniform(cls, mode: FailureMode | str) -> FailurePolicy:
        """The same mode for every class."""
        # The fields take the strings too (__post_init__ parses them); their types say the result.
        return cls(**{name: mode for name in ERROR_CLASSES})  # type: ignore[arg-type]

    def mode_for(self, error: GuardrailError | str) -> FailureMode:
        """The mode for an error (or an error class); an unknown class fails closed."""
        name = error if isinstance(error, str) else error.error_class
        if name in ERROR_CLASSES:
            mode: FailureMode = getattr(self, name)
            return mode
        return FailureMode.CLOSED

    def fails_open(self, error: GuardrailError | str) -> bool:
        return self.mode_for(error) is FailureMode.OPEN

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name).value for name in ERROR_CLASSES}

    def __str__(self) -> str:
        """Canonical text, accepted by ``parse_failure_policy``: the mode most classes have,
        then the exceptions, e.g. ``closed,throttled=open,timeout=open``."""
        modes = self.as_dict()
        opened = sum(1 for m in modes.values() if m == FailureMode.OPEN.value)
        default = FailureMode.OPEN.value if opened * 2 > len(modes) else FailureMode.CLOSED.value
        exceptions = [f"{name}={mode}" for name, mode in modes.items() if mode != default]
        return ",".join([default, *exceptions])


def _parse_mode(value: str, where: str) -> FailureMode:
    lowered = value.strip().lower()
    try:
        return FailureMode(lowered)
    except ValueError:
        raise ValueError(
            f"failure policy: {where}: {value.strip()!r} is not a failure mode (closed or open)"
        ) from None


def parse_failure_policy(text: str) -> FailurePolicy:
    """Parse ``closed``, ``open``, or a comma list of ``class=mode`` entries with an optional
    bare mode (or ``default=mode``) for the classes not listed, e.g.
    ``throttled=open,timeout=open,rejected=closed`` or ``open,rejected=closed``. Unlisted
    classes default to closed. Case and spaces around entries do not matter."""
    if not isinstance(text, str):
        raise TypeError(f"failure policy must be a string, got {type(text).__name__}")
    known = ", ".join(ERROR_CLASSES)
    if not text.strip():
        raise ValueError(
            "failure policy is empty: give closed, open, or class=mode entries such as "
            f"'throttled=open,timeout=open' (classes: {known})"
        )
    default: FailureMode | None = None
    modes: dict[str, FailureMode] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"failure policy {text!r}: empty entry between commas")
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name in ("default", "*"):
            mode = _parse_mode(value if sep else item, "default")
            if default is not None:
                raise ValueError(
                    f"failure policy {text!r}: the default mode is given twice "
                    f"({default.value} and {mode.value})"
                )
            default = mode
            continue
        if name not in ERROR_CLASSES:
            raise ValueError(
                f"failure policy {text!r}: unknown error class {name!r} (known: {known})"
            )
        if name in modes:
            raise ValueError(f"failure policy {text!r}: {name} is given twice")
        if not value.strip():
            raise ValueError(f"failure policy {text!r}: {name}= needs a mode (closed or open)")
        modes[name] = _parse_mode(value, name)
    fallback = default or FailureMode.CLOSED
    return FailurePolicy(**{name: modes.get(name, fallback) for name in ERROR_CLASSES})
