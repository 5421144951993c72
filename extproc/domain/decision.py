"""THE decision table: what a stream does with a guardrail verdict, or with no verdict.

Every place that acts on a check calls one of two functions, so each rule is written once:

* ``decide_error``: no verdict (an error class of ``extproc.domain.errors``, or a limit of this
  process). Shadow mode, or a failure mode ``open`` for the class, releases the text unchecked
  (logged and counted); otherwise the stream gets ``guardrail_unavailable``. ``fails_open`` is
  that rule, and the only place it is written.
* ``decide_verdict``: a verdict, given what the place can do (``can_mask``: masked text can
  still replace the original, so not once it went out; ``can_soft_block``: the answer can end
  with the guardrail's message as content). The table, for route policy (shadow, soft block):

  ===========  ===========================  ==========================  ======================
  verdict      shadow                       soft block (if possible)    otherwise
  ===========  ===========================  ==========================  ======================
  PASS         pass                         pass                        pass
  MASK         pass, audit would-be mask    mask (or mask_unapplied)    mask (or mask_unapplied)
  BLOCK        pass, audit would-be block   soft_block                  block
  ===========  ===========================  ==========================  ======================

The ``Decision`` also names the audit record's outcome (``extproc.observe.audit.OUTCOMES``),
so that what is acted on and what is reported cannot disagree. Pure: no I/O, no state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Protocol

from extproc.domain.errors import GuardrailError
from extproc.domain.failure import FailurePolicy
from extproc.domain.verdict import Outcome


class Action(enum.Enum):
    """What the stream does."""

    PASS = "pass"  # the text goes on as it is
    MASK = "mask"  # the guardrail's masked text replaces the original
    MASK_UNAPPLIED = "mask_unapplied"  # masked, but the original already went out: counted
    BLOCK = "block"  # the request or answer ends with the API's error
    SOFT_BLOCK = "soft_block"  # the answer ends normally, the guardrail's message as content
    RELEASE_UNCHECKED = "release_unchecked"  # no verdict, failure mode open (or shadow)
    UNAVAILABLE = "unavailable"  # no verdict, failure mode closed: guardrail_unavailable


class Enforcement(Protocol):
    """The parts of a route policy that decide (``extproc.settings.values.RoutePolicy``)."""

    @property
    def shadow(self) -> bool: ...

    @property
    def soft_block(self) -> bool: ...

    @property
    def failure_mode(self) -> FailurePolicy: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """An action, and the outcome of the audit record that reports it (None: not audited)."""

    action: Action
    audit: str | None = None

    @property
    def would(self) -> str | None:
        """Shadow mode: the outcome that would have been acted on (``block``, ``mask``)."""
        if self.audit is not None and self.audit.startswith(SHADOW_PREFIX):
            return self.audit[len(SHADOW_PREFIX):]
        return None


SHADOW_PREFIX: Final = "shadow_would_"

_PASS: Final = Decision(Action.PASS)


def fails_open(error: GuardrailError | str, policy: Enforcement) -> bool:
    """THE fail-open rule: with no verdict, the text is released unchecked in shadow mode or
    when the failure mode of the error's class is ``open``."""
    return policy.shadow or policy.failure_mode.fails_open(error)


def decide_error(error: GuardrailError | str, policy: Enforcement) -> Action:
    """No verdict (``error``: the error or its class): release unchecked, or unavailable."""
    return Action.RELEASE_UNCHECKED if fails_open(error, policy) else Action.UNAVAILABLE


def decide_verdict(outcome: Outcome, policy: Enforcement, *, can_mask: bool,
                   can_soft_block: bool) -> Decision:
    """A verdict's action where it arrived; see the table in the module docstring."""
    if outcome is Outcome.PASS:
        return _PASS
    if policy.shadow:
        return Decision(Action.PASS, SHADOW_PREFIX + outcome.value)
    if outcome is Outcome.MASK:
        if can_mask:
            return Decision(Action.MASK, "mask")
        return Decision(Action.MASK_UNAPPLIED, "mask_unapplied")
    if policy.soft_block and can_soft_block:
        return Decision(Action.SOFT_BLOCK, "soft_block")
    return Decision(Action.BLOCK, "block")
