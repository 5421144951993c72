"""The first window holds back the word it may end inside (issue 14, class 9): ``held_tail``
and the fast first check's trigger (``should_check``)."""

from __future__ import annotations

import pytest

from extproc.domain.windows import WindowPolicy, held_tail, should_check


@pytest.mark.parametrize(("text", "held"), [
    ("Write to jane.doe@exam", len("jane.doe@exam")),  # an address cut by the window
    ("Write to ", 0),  # ends at a word boundary: nothing held
    ("Hello", 5),  # the first word may go on
    ("see https://example.com/a?b=c", len("https://example.com/a?b=c")),
    ("card 4111111111", len("4111111111")),
    ("Zürich", len("rich")),  # the run stops at a character that is not ASCII
    ("東京は晴れ", 0),  # no spaces between words: nothing held
    ("line\n", 0),
    ("", 0),
])
def test_held_tail(text: str, held: int) -> None:
    assert held_tail(text) == held


def check(first_done: bool, releasable: bool, pending: int = 5) -> bool:
    return should_check(pending_chars=pending, first_check_done=first_done,
                        upstream_done=False, policy=WindowPolicy(min_chars=800),
                        first_releasable=releasable)


def test_the_first_check_waits_for_text_it_may_release() -> None:
    assert check(first_done=False, releasable=True)  # at once: one round trip to first token
    assert not check(first_done=False, releasable=False)  # "Hello": wait for the next delta
    assert check(first_done=False, releasable=False, pending=800)  # never past min_chars
    assert not check(first_done=True, releasable=True)  # later checks wait for min_chars
    assert should_check(pending_chars=5, first_check_done=False, upstream_done=True,
                        policy=WindowPolicy(), first_releasable=False)  # the end: check all
