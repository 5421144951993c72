"""Images in prompts through real Envoy, the sidecar process and the local ApplyGuardrail
endpoint (boto3), with the official ``openai`` and ``anthropic`` SDKs.

* a clean inline PNG reaches the upstream byte-identical to what the SDK sent, and the
  guardrail saw that very image (its SHA-256) as an image block;
* a PNG the guardrail blocks (the demo policy's text-chunk marker) is a 400 the SDK raises,
  and the upstream is never contacted;
* a remote image URL is refused by default (``--unchecked-images reject``) with the API's own
  error, and passes unchecked on a route with ``x-guardrail-unchecked-images: pass``;
* an image bomb, corrupt base64, a GIF get a clear 400 each; the sidecar serves on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from extproc.localbedrock import parse_policy
from testkit.images import GIF, b64, data_url, jpeg, png
from testkit.stack import REPO_ROOT
from tests.e2e.conftest import Stack, StackFactory, with_routes
from tests.e2e.test_apis import (
    TIMEOUT,
    AnthropicAPI,
    ChatAPI,
    ResponsesAPI,
    assert_never_contacted,
    json_script,
    post_raw,
)
from tests.support import VIOLATION_MESSAGE

MARKER = "guardrail-demo:violence"  # the demo policy's image rule (PNG text chunk)
CLEAN = png(8, 8, seed=42)
BLOCKED = png(8, 8, text={"Comment": f"totally {MARKER}"})
CHAT, RESPONSES, ANTHROPIC = ChatAPI(), ResponsesAPI(), AnthropicAPI()


@pytest.fixture(scope="module")
def images_stack(stacks: StackFactory) -> Stack:
    """Defaults (prompt checked before the upstream, unchecked images rejected) and a route
    ``/pass`` whose unchecked images pass."""
    return stacks(tweak_envoy=with_routes({"/pass": {"x-guardrail-unchecked-images": "pass"}}))


class Sent:
    """The request bodies an SDK's httpx client sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def hook(self, request: httpx.Request | httpx2.Request) -> None:
        self.bodies.append(request.read())


@pytest.fixture
def sent() -> Iterator[Sent]:
    yield Sent()


def openai_sdk(stack: Stack, script_id: str, sent: Sent, prefix: str = "") -> openai.OpenAI:
    http = httpx.Client(timeout=TIMEOUT, event_hooks={"request": [sent.hook]})
    return openai.OpenAI(base_url=f"{stack.url}{prefix}/v1", api_key="dummy", max_retries=0,
                         timeout=TIMEOUT, default_headers={"x-fake-script": script_id},
                         http_client=http)


def anthropic_sdk(stack: Stack, script_id: str, sent: Sent) -> anthropic.Anthropic:
    # The anthropic SDK is built on httpx2 (the same API under another name).
    http = httpx2.Client(timeout=TIMEOUT, event_hooks={"request": [sent.hook]})
    return anthropic.Anthropic(base_url=stack.url, api_key="dummy", max_retries=0,
                               timeout=TIMEOUT, default_headers={"x-fake-script": script_id},
                               http_client=http)


def chat_image(url: str) -> list[Any]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": url}}]}]


def anthropic_image(data: bytes, media_type: str = "image/png") -> list[Any]:
    return [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                     "data": b64(data)}},
        {"type": "text", "text": "Describe the picture."}]}]


def images_seen(stack: Stack, data: bytes) -> list[str]:
    """The outcomes of the guardrail calls that held this image."""
    digest = hashlib.sha256(data).hexdigest()
    return [c.outcome for c in stack.bedrock.stats.recent if digest in c.images]


def test_openai_chat_clean_image_is_byte_identical_at_the_upstream(
        images_stack: Stack, sent: Sent) -> None:
    script_id = images_stack.llm.register(json_script(CHAT.json_answer("A small grey square.")))
    with openai_sdk(images_stack, script_id, sent) as sdk:
        answer = sdk.chat.completions.create(model=CHAT.model,
                                             messages=chat_image(data_url(CLEAN)))
    assert answer.choices[0].message.content == "A small grey square."
    record = images_stack.llm.record_for_script(script_id)
    assert record.body == sent.bodies[-1]
    assert images_seen(images_stack, CLEAN) == ["NONE"]


def test_openai_chat_blocked_image_is_a_bad_request_before_the_upstream(
        images_stack: Stack, sent: Sent) -> None:
    script_id = images_stack.llm.register(json_script(CHAT.json_answer("never shown")))
    with pytest.raises(openai.BadRequestError) as caught, \
            openai_sdk(images_stack, script_id, sent) as sdk:
        sdk.chat.completions.create(model=CHAT.model, messages=chat_image(data_url(BLOCKED)))
    assert caught.value.status_code == 400
    assert VIOLATION_MESSAGE in str(caught.value)
    assert_never_contacted(images_stack, script_id)
    assert images_seen(images_stack, BLOCKED) == ["GUARDRAIL_INTERVENED"]


def test_openai_chat_remote_image_url_is_rejected_by_default(
        images_stack: Stack, sent: Sent) -> None:
    script_id = images_stack.llm.register(json_script(CHAT.json_answer("never shown")))
    with pytest.raises(openai.BadRequestError) as caught, \
            openai_sdk(images_stack, script_id, sent) as sdk:
        sdk.chat.completions.create(model=CHAT.model,
                                    messages=chat_image("https://example.com/cat.png"))
    assert caught.value.status_code == 400
    assert caught.value.type == "guardrail_image_not_inline"
    assert "send the image inline" in caught.value.message
    assert_never_contacted(images_stack, script_id)


def test_openai_chat_remote_image_url_passes_on_a_pass_route(
        images_stack: Stack, sent: Sent) -> None:
    script_id = images_stack.llm.register(json_script(CHAT.json_answer("A cat.")))
    with openai_sdk(images_stack, script_id, sent, prefix="/pass") as sdk:
        answer = sdk.chat.completions.create(
            model=CHAT.model, messages=chat_image("https://example.com/cat.png"))
    assert answer.choices[0].message.content == "A cat."
    record = images_stack.llm.record_for_script(script_id)
    assert record.body == sent.bodies[-1]


def test_openai_responses_blocked_input_image(images_stack: Stack, sent: Sent) -> None:
    script_id = images_stack.llm.register(json_script(RESPONSES.json_answer("never shown")))
    with pytest.raises(openai.BadRequestError) as caught, \
            openai_sdk(images_stack, script_id, sent) as sdk:
        sdk.responses.create(model=RESPONSES.model, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": data_url(BLOCKED), "detail": "auto"}]}])
    assert caught.value.status_code == 400
    assert VIOLATION_MESSAGE in str(caught.value)
    assert_never_contacted(images_stack, script_id)


def test_anthropic_clean_base64_image_is_byte_identical(images_stack: Stack, sent: Sent) -> None:
    photo = jpeg(64, 48)
    script_id = images_stack.llm.register(json_script(ANTHROPIC.json_answer("A photo.")))
    with anthropic_sdk(images_stack, script_id, sent) as sdk:
        answer = sdk.messages.create(model=ANTHROPIC.model, max_tokens=100,
                                     messages=anthropic_image(photo, "image/jpeg"))
    assert answer.content[0].type == "text" and answer.content[0].text == "A photo."
    record = images_stack.llm.record_for_script(script_id)
    assert record.body == sent.bodies[-1]
    assert images_seen(images_stack, photo) == ["NONE"]


def test_anthropic_blocked_image_is_a_bad_request(images_stack: Stack, sent: Sent) -> None:
    script_id = images_stack.llm.register(json_script(ANTHROPIC.json_answer("never shown")))
    with pytest.raises(anthropic.BadRequestError) as caught, \
            anthropic_sdk(images_stack, script_id, sent) as sdk:
        sdk.messages.create(model=ANTHROPIC.model, max_tokens=100,
                            messages=anthropic_image(BLOCKED))
    assert caught.value.status_code == 400
    assert VIOLATION_MESSAGE in str(caught.value)
    assert_never_contacted(images_stack, script_id)


def test_anthropic_url_image_is_rejected(images_stack: Stack, sent: Sent) -> None:
    script_id = images_stack.llm.register(json_script(ANTHROPIC.json_answer("never shown")))
    with pytest.raises(anthropic.BadRequestError) as caught, \
            anthropic_sdk(images_stack, script_id, sent) as sdk:
        sdk.messages.create(model=ANTHROPIC.model, max_tokens=100, messages=[
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {"type": "text", "text": "Describe it."}]}])
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "guardrail_image_not_inline"
    assert_never_contacted(images_stack, script_id)


@pytest.mark.parametrize(("url", "kind"), [
    # A 57-byte PNG claiming 100,000 x 100,000 pixels (ten gigapixels): refused from its header.
    (data_url(png(1, 1, claimed=(100_000, 100_000))), "guardrail_image_too_large"),
    ("data:image/png;base64,iVBORw0KGgo$$$not-base64", "guardrail_image_unreadable"),
    (data_url(CLEAN[:30]), "guardrail_image_unreadable"),  # a truncated header
    (data_url(GIF, "image/gif"), "guardrail_image_format"),
])
def test_bad_images_get_a_clear_error_and_the_sidecar_serves_on(
        images_stack: Stack, url: str, kind: str) -> None:
    script_id = images_stack.llm.register(json_script(CHAT.json_answer("never shown")))
    response, body = post_raw(images_stack, CHAT.path,
                              {"model": CHAT.model, "messages": chat_image(url)}, script_id)
    assert response.status_code == 400
    error = json.loads(body)["error"]
    assert error["type"] == kind and error["message"].startswith("Image not checked")
    assert_never_contacted(images_stack, script_id)
    # The sidecar is alive and guarding: a clean image still goes through.
    clean_id = images_stack.llm.register(json_script(CHAT.json_answer("fine")))
    response, _ = post_raw(images_stack, CHAT.path,
                           {"model": CHAT.model, "messages": chat_image(data_url(CLEAN))},
                           clean_id)
    assert response.status_code == 200


def test_a_guardrail_that_does_not_screen_images_is_no_check(
        images_stack: Stack, sent: Sent) -> None:
    """The local endpoint with no image rules for prompts answers ``NONE`` with
    ``guardrailCoverage.images.guarded`` 0, as Bedrock does for a guardrail whose content
    filters do not have the image modality on: the image is refused, not passed as checked."""
    policy = images_stack.bedrock.policy
    images_stack.bedrock.policy = parse_policy({"output": {"images": [{"png_text": MARKER}]}})
    try:
        script_id = images_stack.llm.register(json_script(CHAT.json_answer("never shown")))
        with pytest.raises(openai.BadRequestError) as caught, \
                openai_sdk(images_stack, script_id, sent) as sdk:
            sdk.chat.completions.create(model=CHAT.model, messages=chat_image(data_url(BLOCKED)))
        assert caught.value.type == "guardrail_image_not_guarded"
        assert_never_contacted(images_stack, script_id)
        assert images_seen(images_stack, BLOCKED)[-1] == "NONE"  # the guardrail passed it
    finally:
        images_stack.bedrock.policy = policy


def test_an_image_over_the_request_limit_is_the_apis_413(images_stack: Stack) -> None:
    """A 2 MB image is a body over --max-request-bytes (1 MiB by default): answered from the
    content-length, before Envoy buffers it or anything is decoded."""
    script_id = images_stack.llm.register(json_script(CHAT.json_answer("never shown")))
    huge = png(2, 2) + b"\x00" * (2 * 1024 * 1024)
    response, body = post_raw(images_stack, CHAT.path,
                              {"model": CHAT.model, "messages": chat_image(data_url(huge))},
                              script_id)
    assert response.status_code == 413
    assert json.loads(body)["error"]["type"] == "guardrail_request_too_large"
    assert_never_contacted(images_stack, script_id)


def test_the_readmes_image_curls_do_what_it_says(images_stack: Stack) -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Images in prompts"):]
    section = section[:section.index("\n### ")]
    blocked = re.search(r'"url":"(data:image/png;base64,[A-Za-z0-9+/=]+)"', section)
    clean = re.search(r"marker \(`([A-Za-z0-9+/=]+)`\)", section)
    assert blocked is not None and clean is not None
    for url, status in ((blocked[1], 400), ("data:image/png;base64," + clean[1], 200)):
        script_id = images_stack.llm.register(json_script(CHAT.json_answer("fine")))
        response, _ = post_raw(images_stack, CHAT.path,
                               {"model": "demo", "messages": chat_image(url)}, script_id)
        assert response.status_code == status
