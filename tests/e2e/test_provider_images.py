"""Prompt images of the other providers' APIs through real Envoy and the sidecar, read by their
official clients (issue 16): Ollama's ``images``, Gemini's ``inlineData`` and Bedrock
Converse's ``image`` blocks are checked as image blocks like OpenAI's and Anthropic's; an image
the guardrail blocks is the API's 400 before the upstream, one it cannot be given follows
``--unchecked-images`` (reject by default)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
import ollama
import pytest
from botocore.exceptions import ClientError
from google import genai
from google.genai import errors, types

from testkit.images import GIF, png
from testkit.upstream import Script
from tests.e2e.conftest import Stack
from tests.e2e.test_apis import VIOLATION, assert_never_contacted, json_script

MARKER = "guardrail-demo:violence"  # the demo policy's image rule (PNG text chunk)
CLEAN = png(8, 8, seed=7)
BLOCKED = png(8, 8, text={"Comment": f"totally {MARKER}"})


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for one in made:
        one.close()


def ollama_client(stack: Stack, script_id: str, closing: list[Any]) -> ollama.Client:
    client = ollama.Client(host=stack.url, headers={"x-fake-script": script_id}, timeout=30)
    closing.append(client)
    return client


def ollama_answer(text: str) -> Script:
    line = {"model": "llava", "created_at": "2026-12-06T00:00:00Z",
            "message": {"role": "assistant", "content": text}, "done": True,
            "done_reason": "stop"}
    return Script(chunks=(json.dumps(line).encode() + b"\n",),
                  headers=(("content-type", "application/json; charset=utf-8"),))


def test_ollama_images_are_checked(stack: Stack, closing: list[Any]) -> None:
    script_id = stack.llm.register(ollama_answer("A small square."))
    answer = ollama_client(stack, script_id, closing).chat(
        model="llava", stream=False,
        messages=[{"role": "user", "content": "What is this?", "images": [CLEAN]}])
    assert answer.message.content == "A small square."
    for image, message in ((BLOCKED, VIOLATION), (GIF, "")):
        script_id = stack.llm.register(ollama_answer("never"))
        with pytest.raises(ollama.ResponseError) as raised:
            ollama_client(stack, script_id, closing).chat(
                model="llava", stream=False,
                messages=[{"role": "user", "content": "What is this?", "images": [image]}])
        assert raised.value.status_code == 400
        assert message in raised.value.error
        assert_never_contacted(stack, script_id)


def test_gemini_inline_images_are_checked(stack: Stack, closing: list[Any]) -> None:
    script_id = stack.llm.register(json_script({"candidates": [{"content": {
        "parts": [{"text": "never"}], "role": "model"}, "index": 0, "finishReason": "STOP"}]}))
    client = genai.Client(api_key="dummy", http_options=types.HttpOptions(
        base_url=stack.url, headers={"x-fake-script": script_id}))
    closing.append(client)
    with pytest.raises(errors.ClientError) as raised:
        client.models.generate_content(model="gemini-2.5-flash", contents=[
            types.Part.from_bytes(data=BLOCKED, mime_type="image/png"), "What is this?"])
    assert raised.value.code == 400 and raised.value.message == VIOLATION
    assert_never_contacted(stack, script_id)


def test_bedrock_converse_images_are_checked(stack: Stack) -> None:
    script_id = stack.llm.register(json_script({"output": {"message": {
        "role": "assistant", "content": [{"text": "never"}]}}, "stopReason": "end_turn",
        "usage": {"inputTokens": 1, "outputTokens": 1, "totalTokens": 2},
        "metrics": {"latencyMs": 1}}))
    bedrock = boto3.client(
        "bedrock-runtime", region_name="us-east-1", endpoint_url=stack.url,
        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
        config=botocore.config.Config(retries={"max_attempts": 1}, read_timeout=30))

    def add_script(request: Any, **_: Any) -> None:
        request.headers["x-fake-script"] = script_id

    bedrock.meta.events.register("before-sign.bedrock-runtime.*", add_script)
    with pytest.raises(ClientError) as raised:
        bedrock.converse(modelId="amazon.nova-lite-v1:0", messages=[{"role": "user", "content": [
            {"text": "What is this?"},
            {"image": {"format": "png", "source": {"bytes": BLOCKED}}}]}])
    assert raised.value.response["Error"]["Message"] == VIOLATION
    assert_never_contacted(stack, script_id)
    bedrock.close()
