"""The first window holds back the word it may end inside (issue 14, class 9), through real
Envoy and the sidecar process.

The first check starts as soon as there is text to release, for a fast first token, and was
released in full: an e-mail address it cut (``jane.doe@exam`` + ``ple.com``) went out in
part before the rest arrived, and no later window could mask what was out. Now the first
window releases up to the start of its trailing run of ASCII characters other than whitespace
(``extproc.domain.windows.held_tail``); the address goes out with a later window, masked. The
time-to-first-token cost: the first release waits for the first word boundary (one more delta
when the first ends inside a word), not for a round trip more.
"""

from __future__ import annotations

from testkit.upstream import Script
from tests.e2e.conftest import Stack
from tests.e2e.test_apis import EMAIL, ChatAPI, parse_sse, post_raw, sse_script

CHAT = ChatAPI()


def contents(body: bytes) -> list[str]:
    return [e.json()["choices"][0]["delta"].get("content") or ""
            for e in parse_sse(body) if e.data != "[DONE]"]


def test_an_address_the_first_window_cuts_goes_out_masked(stack: Stack) -> None:
    # The upstream pauses after the first delta: the first check reads "... jane.doe@exam"
    # alone (the old code released it at once; the assertions do not depend on the pause).
    events = CHAT.stream_events(["Write to jane.doe@exam", "ple.com today, ",
                                 "she answers within a day."])
    script = sse_script(events)
    script = Script(chunks=(b"".join(events[:2]), *events[2:]), delays_ms=300,
                    headers=script.headers)
    response, body = post_raw(stack, CHAT.path, CHAT.request("Mail?", True),
                              stack.llm.register(script))
    assert response.status_code == 200
    assert b"jane.doe" not in body and EMAIL.encode() not in body
    text = "".join(contents(body))
    assert text == "Write to {EMAIL} today, she answers within a day."


def test_a_first_word_waits_for_its_end(stack: Stack) -> None:
    # "Hel" + "lo" + " world": nothing is checked or released before "Hello " is whole.
    events = CHAT.stream_events(["Hel", "lo", " world, fine."])
    response, body = post_raw(stack, CHAT.path, CHAT.request("Hi", True),
                              stack.llm.register(sse_script(events, delays_ms=20)))
    assert response.status_code == 200
    assert body == b"".join(events)
