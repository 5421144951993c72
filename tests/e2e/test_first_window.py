"""Masking, through real Envoy and the sidecar process (issue 14, class 9): the first window
holds back the word it may end inside, and a mask moves the character offsets that point into
the text it shortened.

The first check starts as soon as there is text to release, for a fast first token, and was
released in full: an e-mail address it cut (``jane.doe@exam`` + ``ple.com``) went out in
part before the rest arrived, and no later window could mask what was out. Now the first
window releases up to the start of its trailing run of ASCII characters other than whitespace
(``extproc.domain.windows.held_tail``); the address goes out with a later window, masked. The
time-to-first-token cost: the first release waits for the first word boundary (one more delta
when the first ends inside a word), not for a round trip more.
"""

from __future__ import annotations

import json

import pytest

from testkit.upstream import Script
from tests.e2e.conftest import Stack
from tests.e2e.test_apis import (
    EMAIL,
    ChatAPI,
    ResponsesAPI,
    json_script,
    named_event,
    parse_sse,
    post_raw,
    sse_data,
    sse_script,
)

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


def test_citation_offsets_follow_the_mask(stack: Stack) -> None:
    # A Responses answer citing a source after an address the guardrail masks: its
    # url_citation (in annotation.added, the done part and item, the completed response)
    # pointed 13 characters too far once "jane.doe@example.com" became "{EMAIL}".
    api = ResponsesAPI()
    deltas = ["Write to ", f"{EMAIL} today. ", "Prices rose 5% in May, ", "says the report."]
    text = "".join(deltas)
    cited = "Prices rose 5%"
    annotation = {"type": "url_citation", "start_index": text.index(cited),
                  "end_index": text.index(cited) + len(cited),
                  "title": "Prices", "url": "https://example.com/prices"}
    events = []
    for event in parse_sse(b"".join(api.stream_events(deltas))):
        assert event.event is not None
        payload = event.json()
        if event.event == "response.output_text.done":
            events.append(named_event("response.output_text.annotation.added", {
                "type": "response.output_text.annotation.added",
                "sequence_number": payload["sequence_number"], "item_id": api.msg_id,
                "output_index": 0, "content_index": 0, "annotation_index": 0,
                "annotation": annotation}))
        for part in ([payload.get("part")] + [c for i in [payload.get("item")] if i
                                              for c in i.get("content", [])]
                     + [c for i in (payload.get("response") or {}).get("output", [])
                        for c in i.get("content", [])]):
            if isinstance(part, dict) and part.get("text") == text:
                part["annotations"] = [dict(annotation)]
        events.append(named_event(event.event, payload))
    script_id = stack.llm.register(sse_script(events))
    response, body = post_raw(stack, api.path, api.request("Prices?", True), script_id)
    assert response.status_code == 200
    assert EMAIL.encode() not in body
    masked = text.replace(EMAIL, "{EMAIL}")
    spans = []
    for event in parse_sse(body):
        payload = event.json()
        found = [payload.get("annotation")] if "annotation" in payload else []
        for holder in (payload.get("part"), *(payload.get("item") or {}).get("content", []),
                       *[c for i in (payload.get("response") or {}).get("output", [])
                         for c in i.get("content", [])]):
            if isinstance(holder, dict):
                found += holder.get("annotations", [])
        spans += [(a["start_index"], a["end_index"]) for a in found if a]
    assert len(spans) == 4  # annotation.added, content_part.done, item done, completed
    assert all(masked[start:end] == cited for start, end in spans), spans


@pytest.mark.parametrize("stream", [True, False])
def test_chat_citation_offsets_follow_the_mask(stack: Stack, stream: bool) -> None:
    # A Chat answer citing a source after an address the guardrail masks: its url_citation
    # (delta.annotations of a later chunk as OpenAI's search models stream it, or
    # message.annotations) points into the content as the SDK accumulates it.
    deltas = ["Write to ", f"{EMAIL} today. ", "Prices rose 5% in May, ", "says the report."]
    text = "".join(deltas)
    cited = "Prices rose 5%"
    citation = {"type": "url_citation", "url_citation": {
        "start_index": text.index(cited), "end_index": text.index(cited) + len(cited),
        "title": "Prices", "url": "https://example.com/prices"}}
    if stream:
        events = CHAT.stream_events(deltas)
        events.insert(-2, sse_data(CHAT.chunk(content="", annotations=[citation])))
        script = sse_script(events)
    else:
        answer = CHAT.json_answer(text)
        answer["choices"][0]["message"]["annotations"] = [citation]
        script = json_script(answer)
    response, body = post_raw(stack, CHAT.path, CHAT.request("Prices?", stream),
                              stack.llm.register(script))
    assert response.status_code == 200
    assert EMAIL.encode() not in body
    if stream:
        chunks = [e.json()["choices"][0]["delta"] for e in parse_sse(body) if e.data != "[DONE]"]
        content = "".join(d.get("content") or "" for d in chunks)
        (found,) = [a for d in chunks for a in d.get("annotations", [])]
    else:
        message = json.loads(body)["choices"][0]["message"]
        content, (found,) = message["content"], message["annotations"]
    assert content == text.replace(EMAIL, "{EMAIL}")
    span = found["url_citation"]
    assert content[span["start_index"]:span["end_index"]] == cited
