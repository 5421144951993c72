"""``extproc.domain.decision``: the one table from verdict or error class and route policy to
action, every cell spelt out; and the rule that fails open in exactly one place."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import extproc
from extproc.domain.decision import Action, Decision, decide_error, decide_verdict, fails_open
from extproc.domain.errors import ERROR_CLASSES, GuardrailOverload, GuardrailThrottled
from extproc.domain.failure import FailureMode, FailurePolicy
from extproc.domain.verdict import Outcome


@dataclass(frozen=True)
class Policy:
    shadow: bool = False
    soft_block: bool = False
    failure_mode: FailurePolicy = FailurePolicy()


A = Action

# (outcome, shadow, soft_block, can_mask, can_soft_block) -> (action, audit outcome)
VERDICT_TABLE: dict[tuple[Outcome, bool, bool, bool, bool], tuple[Action, str | None]] = {}
for shadow, soft, can_mask, can_soft in itertools.product((False, True), repeat=4):
    VERDICT_TABLE[Outcome.PASS, shadow, soft, can_mask, can_soft] = (A.PASS, None)
    if shadow:
        VERDICT_TABLE[Outcome.MASK, shadow, soft, can_mask, can_soft] = (
            A.PASS, "shadow_would_mask")
        VERDICT_TABLE[Outcome.BLOCK, shadow, soft, can_mask, can_soft] = (
            A.PASS, "shadow_would_block")
        continue
    VERDICT_TABLE[Outcome.MASK, shadow, soft, can_mask, can_soft] = (
        (A.MASK, "mask") if can_mask else (A.MASK_UNAPPLIED, "mask_unapplied"))
    VERDICT_TABLE[Outcome.BLOCK, shadow, soft, can_mask, can_soft] = (
        (A.SOFT_BLOCK, "soft_block") if soft and can_soft else (A.BLOCK, "block"))


def test_the_verdict_table_has_every_cell() -> None:
    assert len(VERDICT_TABLE) == len(Outcome) * 2 ** 4


@pytest.mark.parametrize(("cell", "expected"), list(VERDICT_TABLE.items()),
                         ids=[f"{o.value}-shadow={s}-soft={b}-can_mask={m}-can_soft={c}"
                              for (o, s, b, m, c) in VERDICT_TABLE])
def test_verdict_cell(cell: tuple[Outcome, bool, bool, bool, bool],
                      expected: tuple[Action, str | None]) -> None:
    outcome, shadow, soft, can_mask, can_soft = cell
    decision = decide_verdict(outcome, Policy(shadow=shadow, soft_block=soft),
                              can_mask=can_mask, can_soft_block=can_soft)
    assert (decision.action, decision.audit) == expected
    # What would have been acted on is named only in shadow mode, and only for a finding.
    if shadow and outcome is not Outcome.PASS:
        assert decision.would == outcome.value
    else:
        assert decision.would is None


# (error class, failure mode of that class, shadow) -> action
ERROR_TABLE: dict[tuple[str, FailureMode, bool], Action] = {
    (name, mode, shadow): (
        A.RELEASE_UNCHECKED if shadow or mode is FailureMode.OPEN else A.UNAVAILABLE)
    for name in ERROR_CLASSES for mode in FailureMode for shadow in (False, True)
}


@pytest.mark.parametrize(("cell", "expected"), list(ERROR_TABLE.items()),
                         ids=[f"{n}-{m.value}-shadow={s}" for (n, m, s) in ERROR_TABLE])
def test_error_cell(cell: tuple[str, FailureMode, bool], expected: Action) -> None:
    name, mode, shadow = cell
    # Only this class has the mode; every other class has the opposite one.
    other = FailureMode.CLOSED if mode is FailureMode.OPEN else FailureMode.OPEN
    policy = Policy(shadow=shadow, failure_mode=FailurePolicy(
        **{n: (mode if n == name else other) for n in ERROR_CLASSES}))
    assert decide_error(name, policy) is expected
    assert fails_open(name, policy) is (expected is A.RELEASE_UNCHECKED)


def test_errors_are_decided_by_their_class() -> None:
    policy = Policy(failure_mode=FailurePolicy(throttled=FailureMode.OPEN))
    assert decide_error(GuardrailThrottled("429"), policy) is A.RELEASE_UNCHECKED
    assert decide_error(GuardrailOverload("held"), policy) is A.UNAVAILABLE


def test_an_unknown_error_class_fails_closed() -> None:
    assert decide_error("no_such_class", Policy(
        failure_mode=FailurePolicy.uniform(FailureMode.OPEN))) is A.UNAVAILABLE
    assert decide_error("no_such_class", Policy(shadow=True)) is A.RELEASE_UNCHECKED


def test_a_decision_names_no_would_be_outcome_when_acted_on() -> None:
    assert Decision(A.BLOCK, "block").would is None
    assert Decision(A.PASS).would is None


def test_the_fail_open_rule_is_written_once() -> None:
    """Regression (issue: restructure): "fail open or shadow, so release unchecked" was written
    about seven times; now only ``fails_open`` asks the failure policy."""
    package = Path(extproc.__file__).parent
    asking = re.compile(r"\.fails_open\(")
    places = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                    for line in path.read_text().splitlines() if asking.search(line))
    assert places == ["domain/decision.py"], places


def test_importing_the_state_machine_loads_no_boto3() -> None:
    code = ("import sys, extproc.stream.processor, extproc.transport.server; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('boto3', 'botocore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
