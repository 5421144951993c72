"""extproc.formats.prompt_images: the image parts of Chat, Responses and Anthropic prompts."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.formats.prompt_images import (
    BASE64,
    DATA_URL,
    FILE,
    URL,
    ImagePart,
    find_images,
    resolve,
)
from extproc.images import ImageRefused, Reason
from testkit.images import GIF, b64, data_url, jpeg, png

PNG = png(3, 3)


def test_chat_image_url_parts_data_and_remote() -> None:
    request = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": data_url(PNG), "detail": "low"}},
        {"type": "image_url", "image_url": "https://example.com/cat.png"}]}]}
    assert [p.kind for p in find_images(request)] == [DATA_URL, URL]


def test_responses_input_image_url_and_file_id() -> None:
    request = {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "hi"},
        {"type": "input_image", "image_url": data_url(PNG)},
        {"type": "input_image", "file_id": "file-abc"}]}]}
    assert [p.kind for p in find_images(request)] == [DATA_URL, FILE]


def test_anthropic_image_sources_and_images_in_tool_results() -> None:
    request = {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": b64(PNG)}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
        {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
        {"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                         "data": b64(jpeg())}}]}]}]}
    assert [p.kind for p in find_images(request)] == [BASE64, URL, FILE, BASE64]


def test_resolve_decodes_and_sniffs() -> None:
    assert resolve(ImagePart(DATA_URL, data_url(PNG))).data == PNG
    assert resolve(ImagePart(BASE64, b64(jpeg()))).format == "jpeg"


@pytest.mark.parametrize(("part", "reason"), [
    (ImagePart(URL, "https://example.com/cat.png"), Reason.REFERENCE),
    (ImagePart(FILE, "file-abc"), Reason.REFERENCE),
    (ImagePart(DATA_URL, data_url(GIF, "image/gif")), Reason.FORMAT),
    (ImagePart(BASE64, "not base64!"), Reason.UNREADABLE),
    (ImagePart(BASE64, b64(png(1, 1, claimed=(50_000, 50_000)))), Reason.TOO_LARGE),
])
def test_what_cannot_be_checked_says_why(part: ImagePart, reason: Reason) -> None:
    with pytest.raises(ImageRefused) as info:
        resolve(part)
    assert info.value.reason is reason


def test_no_images_no_parts() -> None:
    assert find_images({"messages": [{"role": "user", "content": "hello"}]}) == []
    assert find_images([1, "x", None]) == []


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.sampled_from(["image", "image_url", "input_image", "base64", "url", "file", "data:",
                       "data:image/png;base64,iVBORw0KGgo=", "https://x/y.png"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "image_url", "url", "source", "data", "file_id", "content"]),
        children, max_size=4),
    max_leaves=30)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_JSON)
def test_arbitrary_json_never_crashes_finding_or_resolving(request: object) -> None:
    for part in find_images(request):
        try:
            image = resolve(part)
        except ImageRefused as exc:
            assert exc.reason in Reason
        else:
            assert image.format in ("png", "jpeg")


def test_gemini_bedrock_and_ollama_images_are_found() -> None:
    """Regression (issue 16): images of the other prompt formats passed unread."""
    gemini = {"contents": [{"role": "user", "parts": [
        {"text": "what is this?"},
        {"inlineData": {"mimeType": "image/png", "data": b64(PNG)}},
        {"inline_data": {"mime_type": "IMAGE/JPEG", "data": b64(jpeg())}},
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},  # not an image
        {"fileData": {"mimeType": "image/png", "fileUri": "gs://bucket/cat.png"}},
        {"fileData": {"mimeType": "application/pdf", "fileUri": "gs://bucket/doc.pdf"}}]}]}
    assert [p.kind for p in find_images(gemini)] == [BASE64, BASE64, URL]
    converse = {"messages": [{"role": "user", "content": [
        {"text": "what is this?"},
        {"image": {"format": "png", "source": {"bytes": b64(PNG)}}},
        {"image": {"format": "jpeg", "source": {"s3Location": {"uri": "s3://b/k"}}}}]}]}
    assert [p.kind for p in find_images(converse)] == [BASE64, FILE]
    ollama = {"model": "llava", "messages": [
        {"role": "user", "content": "what is this?", "images": [b64(PNG), b64(jpeg())]}]}
    assert [p.kind for p in find_images(ollama)] == [BASE64, BASE64]
    assert resolve(find_images(ollama)[0]).data == PNG
    generate = {"model": "llava", "prompt": "what is this?", "images": [b64(GIF)]}
    with pytest.raises(ImageRefused) as refused:
        resolve(find_images(generate)[0])
    assert refused.value.reason is Reason.FORMAT


@pytest.mark.parametrize("part", [
    # vLLM's multimodal uuids: an image_url of null and a uuid shows the model a cached image
    {"type": "image_url", "image_url": None, "uuid": "sku-1234"},
    {"type": "image_url", "image_url": {"uuid": "sku-1234"}},
    {"type": "image_url", "image_url": {"URL": "data:image/png;base64,AAAA"}},
    {"type": "input_image", "image_url": None},
    {"type": "image", "source": {"type": "BASE64", "media_type": "image/png", "data": "AAAA"}},
    {"type": "image", "source": {"type": "base64", "data": ["AAAA"]}},
    # vLLM's precomputed image embeddings: the model reads a tensor the guardrail cannot
    {"type": "image_embeds", "image_embeds": "AAAA"},
    {"type": "image_pil", "image_pil": "AAAA"},
])
def test_regression_image_parts_of_an_unread_shape_are_refused_not_skipped(
        part: dict[str, object]) -> None:
    """An image-typed part whose image the finder did not find was skipped: a lenient upstream
    (vLLM's cached uuids and embeddings) still shows its model an image."""
    found = find_images({"messages": [{"role": "user", "content": [part]}]})
    assert len(found) == 1
    with pytest.raises(ImageRefused) as refused:
        resolve(found[0])
    assert refused.value.reason in (Reason.REFERENCE, Reason.UNREADABLE)


def test_regression_a_generated_image_passed_back_in_responses_input_is_read() -> None:
    """A Responses ``image_generation_call`` item given back as input carries its image in
    ``result`` (base64), which the model sees; it passed unread."""
    request = {"model": "m", "input": [
        {"type": "image_generation_call", "id": "ig_1", "status": "completed",
         "result": b64(PNG)},
        {"role": "user", "content": "make it bigger"}]}
    found = find_images(request)
    assert [p.kind for p in found] == [BASE64]
    assert resolve(found[0]).data == PNG


def test_gemini_blobs_take_url_safe_base64_and_other_apis_do_not() -> None:
    """Refusing URL-safe base64 (a lenient decoder reads other bytes) must not refuse Gemini's
    blobs: its protobuf JSON bytes take either alphabet, and google-genai sends URL-safe."""
    data = next(png(5, 5, seed=s) for s in range(50)
                if b"-" in base64.urlsafe_b64encode(png(5, 5, seed=s))
                or b"_" in base64.urlsafe_b64encode(png(5, 5, seed=s)))
    urlsafe = base64.urlsafe_b64encode(data).decode()
    gemini = {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png",
                                                      "data": urlsafe}}]}]}
    assert resolve(find_images(gemini)[0]).data == data
    anthropic = {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": urlsafe}}]}]}
    with pytest.raises(ImageRefused) as refused:
        resolve(find_images(anthropic)[0])
    assert refused.value.reason is Reason.UNREADABLE


def test_regression_vllm_parts_without_a_type_are_found() -> None:
    """vLLM infers a part's type from its one key: ``{"image_url": ...}`` with no ``type`` is an
    image to it, and was only text (its base64 read as a string) to the sidecar."""
    url = data_url(PNG)
    request = {"model": "m", "messages": [{"role": "user", "content": [
        {"text": "what is this?"},
        {"image_url": url},
        {"image_url": {"url": url}},
        {"image_embeds": "AAAA"}]}]}
    found = find_images(request)
    assert [p.kind for p in found[:2]] == [DATA_URL, DATA_URL]
    assert resolve(found[0]).data == PNG
    assert len(found) == 3
    with pytest.raises(ImageRefused):
        resolve(found[2])


def test_regression_an_input_image_with_a_file_id_too_is_a_reference() -> None:
    """An ``input_image`` with both an inline ``image_url`` and a ``file_id``: the sidecar checked
    the inline image, an upstream may show the file."""
    part = {"type": "input_image", "image_url": data_url(PNG), "file_id": "file-abc"}
    found = find_images({"input": [{"role": "user", "content": [part]}]})
    assert [p.kind for p in found] == [FILE]


def test_regression_an_image_sent_as_a_file_part_is_found() -> None:
    """A Chat ``file`` part or a Responses ``input_file`` whose ``file_data`` is a ``data:`` URL
    of an image type: an upstream that takes files by their media type (a proxy turning them
    into the provider's image blocks) shows the model an image the sidecar did not read."""
    url = data_url(PNG)
    chat = {"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": url, "filename": "cat.png"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=",
                                  "filename": "doc.pdf"}}]}]}
    found = find_images(chat)
    assert [p.kind for p in found] == [DATA_URL]
    assert resolve(found[0]).data == PNG
    responses = {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_data": url.replace("image/png", "IMAGE/PNG"),
         "filename": "cat.png"}]}]}
    assert [p.kind for p in find_images(responses)] == [DATA_URL]


def test_regression_image_typed_parts_without_a_source_are_read() -> None:
    """``{"type": "image"}`` parts carrying their image beside the type (Hugging Face chat
    templates' ``image``/``url``/``base64``, MCP content's ``data``), which servers built on
    them show their model, were skipped: only Anthropic's ``source`` was read."""
    url = data_url(PNG)
    parts = [{"type": "image", "image": url}, {"type": "image", "url": url},
             {"type": "image", "base64": b64(PNG)},
             {"type": "image", "data": b64(PNG), "mimeType": "image/png"},
             {"type": "image", "url": "https://example.com/cat.png"}]
    found = find_images({"messages": [{"role": "user", "content": parts}]})
    assert [p.kind for p in found] == [DATA_URL, DATA_URL, BASE64, BASE64, URL]
    assert all(resolve(p).data == PNG for p in found[:4])


def test_regression_an_image_with_a_vllm_uuid_is_a_reference_even_with_its_data() -> None:
    """vLLM keys its multimodal cache by a given ``uuid``: a part carrying an inline image and
    a uuid may be shown as the image cached under that uuid (sent earlier by any client), not
    the inline one the sidecar checked."""
    for part in ({"type": "image_url", "image_url": {"url": data_url(PNG)}, "uuid": "cat"},
                 {"image_url": data_url(PNG), "uuid": "cat"}):
        found = find_images({"messages": [{"role": "user", "content": [part]}]})
        assert [p.kind for p in found] == [FILE]


def test_regression_a_gemini_file_without_a_media_type_is_a_reference() -> None:
    """Gemini's ``fileData.mimeType`` is optional (the File API knows the file's type): a file
    without one may be an image the model sees, and was skipped as "not an image type"."""
    gemini = {"contents": [{"parts": [
        {"fileData": {"fileUri": "https://generativelanguage.googleapis.com/v1beta/files/x"}},
        {"file_data": {"file_uri": "gs://bucket/cat"}}]}]}
    assert [p.kind for p in find_images(gemini)] == [URL, URL]
