"""gRPC-tier fixtures: the real ``grpc.aio`` server from ``extproc.server.start_server`` on an
ephemeral port with a ``FakeGuardrail``, and a real channel and stub to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.transport.server import RunningServer, start_server
from tests.support import WAIT_S, FakeGuardrail, settings


@pytest.fixture
def guardrail() -> FakeGuardrail:
    return FakeGuardrail()


@pytest.fixture
async def server(guardrail: FakeGuardrail) -> AsyncIterator[RunningServer]:
    running = await start_server(settings(listen_host="127.0.0.1", listen_port=0), guardrail)
    assert running.port > 0
    try:
        yield running
    finally:
        await asyncio.wait_for(running.server.stop(None), WAIT_S)


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        await asyncio.wait_for(ch.channel_ready(), WAIT_S)
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.ExternalProcessorStub:
    return pb_grpc.ExternalProcessorStub(channel)
