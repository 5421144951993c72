"""Nothing on a guarded route passes unread, judged by real upstreams: every case of ``cases``
goes client -> real Envoy -> the sidecar -> a judge (FastAPI on uvicorn, Node + Express), and
the judge says what its model would read.

The verdict for each: EITHER the request was refused before the upstream (a 4xx, and the judge
recorded nothing for it) OR the judge's record of what the model reads does not hold the
blocked word. A case where the model read the word is a hole: it is marked in ``HOLES`` with
the class of issue 14 it belongs to, as a strict expected failure (``raises=Hole``: nothing but
the judged hole counts), so the suite stays green and documents it. When a hole is closed its
test passes, the strict XPASS fails the run, and its line in ``HOLES`` must go.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.adversarial.cases import ALL_CASES, WORD, Case
from tests.adversarial.conftest import JUDGES, JudgedStack
from tests.adversarial.wire import Answer, http1, http2
from tests.judges.process import CASE_HEADER

READ = re.compile(WORD, re.IGNORECASE)


class Hole(AssertionError):
    """A judge's model read the blocked word: the sidecar let it through unchecked."""


#: case id -> the hole it shows (for every judge), or judge -> the hole (for those judges),
#: with the class of issue 14 it belongs to. Empty: the 104 holes this tier first found (class
#: 2: a body in charset UTF-7 that Express decodes; class 4: part types, roles, documents,
#: search results, prompt variables, tool definitions, the Completions suffix, a phrase split
#: over parts; class 10: everything outside the last user turn) were closed by the
#: ``whole_request`` scope and the refusal of non-UTF-8 charsets. A new hole goes here.
HOLES: dict[str, str | dict[str, str]] = {}


def hole(case: Case, judge: str) -> str | None:
    reason = HOLES.get(case.id)
    if isinstance(reason, dict):
        return reason.get(judge)
    return reason


def params() -> Iterator[Any]:
    for case in ALL_CASES:
        for judge in JUDGES:
            reason = hole(case, judge)
            marks = [pytest.mark.xfail(strict=True, raises=Hole, reason=reason)] if reason else []
            yield pytest.param(judge, case, id=f"{judge}-{case.id}", marks=marks)


def send(stack: JudgedStack, case: Case, case_id: str) -> Answer:
    headers = [*case.headers, (CASE_HEADER, case_id)]
    trailers = [("x-checksum", "abc")] if case.transport.endswith("trailers") else []
    if case.transport.startswith("http1"):
        return http1(stack.port, "POST", case.request_path, headers, case.body,
                     chunked="chunked" in case.transport, trailers=trailers)
    return http2(stack.port, "POST", case.request_path, headers, case.body, trailers)


def error_type(body: bytes) -> str:
    """The ``error.type`` of a JSON error body (OpenAI or Anthropic shape), or ''."""
    try:
        value = json.loads(body)
    except ValueError:
        return ""
    error = value.get("error") if isinstance(value, dict) else None
    return str(error.get("type", "")) if isinstance(error, dict) else ""


def verdict(stack: JudgedStack, case_id: str, answer: Answer) -> str:
    """What happened to the request, or ``Hole`` when the judge's model read the word."""
    records = stack.judge.records(case_id)
    read = [text for record in records for text in record["texts"] if READ.search(text)]
    if read:
        raise Hole(f"the {stack.name} judge's model read {read!r} (answer {answer.status}); "
                   f"records: {records!r}")
    kind = error_type(answer.body)
    if kind.startswith("guardrail_"):
        assert not records, f"refused with {kind}, yet the judge saw it: {records!r}"
        return f"refused {answer.status} {kind}"
    if answer.status == 0 and not records:
        return "reset by envoy (no answer)"
    if 400 <= answer.status < 500 and not records:
        return f"refused {answer.status} by envoy"
    if not records:
        return f"judge: no record, answer {answer.status}"
    outcomes = sorted({record["outcome"] for record in records})
    return f"judge: {'/'.join(outcomes)}, word not read (answer {answer.status})"


@pytest.mark.parametrize(("target", "case"), list(params()), indirect=["target"])
def test_the_model_never_reads_what_the_guard_let_through(
        target: JudgedStack, case: Case, record_property: Any) -> None:
    case_id = uuid.uuid4().hex
    answer = send(target, case, case_id)
    record_property("judge", target.name)
    record_property("case", case.id)
    try:
        outcome = verdict(target, case_id, answer)
    except Hole:
        record_property("outcome", "hole")
        raise
    record_property("outcome", outcome)
