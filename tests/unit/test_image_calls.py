"""Image blocks in a guardrail call: Bedrock's content blocks, the call-process wire, splitting
over Bedrock's per-call image limit, masked outputs merged for the text blocks only."""

from __future__ import annotations

import pytest

from extproc.domain.client import Content, ImageBlock
from extproc.domain.verdict import GuardrailVerdict, Outcome, classify
from extproc.guardrail.bedrock import apply_request, content_blocks
from extproc.guardrail.splitting import (
    Part,
    Piece,
    content_units,
    fits_one_call,
    merge_verdicts,
    plan_calls,
)
from extproc.guardrail.wire import decode_content, encode_content
from testkit.images import png

IMAGE = ImageBlock("png", png(2, 2))


def verdict(outcome: Outcome, outputs: tuple[str, ...] = (),
            guarded: int | None = 1) -> GuardrailVerdict:
    return GuardrailVerdict(outcome=outcome, action="NONE" if outcome is Outcome.PASS
                            else "GUARDRAIL_INTERVENED", findings=(), outputs=outputs,
                            text_units=1, usage={"contentPolicyImageUnits": 1},
                            images_guarded=guarded)


def test_content_blocks_are_bedrocks() -> None:
    assert content_blocks(["hi", IMAGE]) == [
        {"text": {"text": "hi"}},
        {"image": {"format": "png", "source": {"bytes": IMAGE.data}}}]
    assert apply_request("g", "1", "INPUT", [IMAGE])["content"][0]["image"]["format"] == "png"


def test_images_cross_the_wire_in_base64_and_back() -> None:
    content: list[Content] = ["text", IMAGE, "more"]
    encoded = encode_content(content)
    assert isinstance(encoded[1]["image"]["b64"], str)
    assert decode_content(encoded) == content
    with pytest.raises(ValueError):
        decode_content([{"image": {"format": "png", "b64": "!!"}}])
    with pytest.raises(ValueError):
        decode_content([3])


def test_an_image_costs_no_text_units_and_twenty_fit_one_call() -> None:
    assert content_units(["x" * 1001, IMAGE]) == 2
    assert fits_one_call([IMAGE] * 20)
    assert not fits_one_call([IMAGE] * 21)


def test_more_than_twenty_images_are_split_never_cut() -> None:
    pieces = [Piece(0, "a question")] + [Piece(i + 1, IMAGE) for i in range(45)]
    calls = plan_calls(pieces, max_units=25)
    assert [sum(isinstance(p.text, ImageBlock) for p in call) for call in calls] == [20, 20, 5]
    assert calls[0][0].text == "a question"


def test_a_mask_beside_images_rebuilds_the_text_blocks_only() -> None:
    first = (Piece(0, "mail a@b.co"), Piece(1, IMAGE))
    second = (Piece(2, IMAGE), Piece(3, "plain"))
    merged = merge_verdicts(4, [Part(first, verdict(Outcome.MASK, ("mail {EMAIL}",))),
                                Part(second, verdict(Outcome.PASS))])
    assert merged.outcome is Outcome.MASK
    assert merged.outputs == ("mail {EMAIL}", "plain")
    assert merged.usage == {"contentPolicyImageUnits": 2}


def test_image_coverage_is_read_and_summed_over_split_calls() -> None:
    answer = {"action": "NONE", "outputs": [], "assessments": [], "usage": {},
              "guardrailCoverage": {"images": {"guarded": 0, "total": 2}}}
    assert classify(answer).images_guarded == 0
    assert classify({"action": "NONE"}).images_guarded is None
    parts = [Part((Piece(0, IMAGE),), verdict(Outcome.PASS, guarded=1)),
             Part((Piece(1, IMAGE),), verdict(Outcome.PASS, guarded=0)),
             Part((Piece(2, "text"),), verdict(Outcome.PASS, guarded=None))]
    assert merge_verdicts(3, parts).images_guarded == 1
