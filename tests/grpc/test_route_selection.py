"""The gRPC tier: a stream's route policy chosen from its first message's ext_proc attributes
(no initial metadata), over a real channel to the real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from extproc import envoy
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.domain.values import GuardrailRef, Source
from extproc.domain.verdict import GuardrailVerdict
from extproc.settings.options import load_settings
from extproc.transport.server import RunningServer, start_server
from tests.support import FakeGuardrail, chat_request, request_body, request_headers

WAIT_S = 5.0
CONFIG = """\
guardrail_id: fallback
listen: 127.0.0.1:0
routes:
  openai: {guardrail_id: openaiguard}
  anthropic: {guardrail_id: anthropicguard}
route_selectors:
- attribute: xds.route_name
  routes: {"httproute/llm/openai/*": openai, "httproute/llm/anthropic/*": anthropic}
"""


class RecordingGuardrail(FakeGuardrail):
    """Also records which guardrail each call used."""

    def __init__(self) -> None:
        super().__init__()
        self.used: list[str] = []

    async def apply(self, guardrail: GuardrailRef, source: Source,
                    texts: Sequence[str]) -> GuardrailVerdict:
        self.used.append(guardrail.id)
        return await super().apply(guardrail, source, texts)


@pytest.fixture
async def routed(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, RecordingGuardrail]]:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    guardrail = RecordingGuardrail()
    running = await start_server(load_settings(["--config", str(path)], {}), guardrail)
    try:
        yield running, guardrail
    finally:
        await asyncio.wait_for(running.server.stop(None), WAIT_S)


async def answer(call: Any) -> Any:
    """The next answer, skipping timer extensions (``override_message_timeout`` alone)."""
    while True:
        message = await asyncio.wait_for(call.read(), WAIT_S)
        assert message is not grpc.aio.EOF
        if message.WhichOneof("response") is not None:
            return message


async def prompt_through(port: int, route_name: str | None) -> None:
    """One stream whose request headers carry ``xds.route_name`` (as Envoy sends
    ``request_attributes``), a checked prompt, then the end of the RPC."""
    headers = request_headers()
    if route_name is not None:
        attributes = struct_pb2.Struct()
        attributes.update({"xds.route_name": route_name})
        headers.attributes[envoy.ATTRIBUTES_KEY].CopyFrom(attributes)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await asyncio.wait_for(call.write(headers), WAIT_S)
        assert (await answer(call)).WhichOneof("response") == "request_headers"
        # A prompt of its own each time: the verdict cache would answer for a repeated one.
        prompt = f"hello {route_name}"
        await asyncio.wait_for(call.write(request_body(chat_request(prompt))), WAIT_S)
        assert (await answer(call)).WhichOneof("response") == "request_body"
        await asyncio.wait_for(call.done_writing(), WAIT_S)
        while await asyncio.wait_for(call.read(), WAIT_S) is not grpc.aio.EOF:
            pass


async def test_request_attributes_choose_the_guardrail(
        routed: tuple[RunningServer, RecordingGuardrail]) -> None:
    running, guardrail = routed
    for route_name, expected in [("httproute/llm/openai/rule/0/match/0/*", "openaiguard"),
                                 ("httproute/llm/anthropic/rule/0/match/0/*", "anthropicguard"),
                                 ("httproute/llm/unknown/rule/0/match/0/*", "fallback"),
                                 (None, "fallback")]:
        guardrail.used.clear()
        await prompt_through(running.port, route_name)
        assert guardrail.used == [expected], route_name
    assert running.processor.routes.unknown == {"unmapped": 1, "missing": 1}


async def test_an_rpc_without_messages_is_not_an_unknown_route(
        routed: tuple[RunningServer, RecordingGuardrail]) -> None:
    running, _ = routed
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await asyncio.wait_for(call.done_writing(), WAIT_S)
        assert await asyncio.wait_for(call.read(), WAIT_S) is grpc.aio.EOF
        assert await asyncio.wait_for(call.code(), WAIT_S) == grpc.StatusCode.OK
    assert running.processor.routes.unknown == {"unmapped": 0, "missing": 0}
    assert running.processor.active_streams == 0
