"""Many streams opened at once on one channel: the server's stream bound refuses clearly, nothing is CANCELLED."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import grpc
import pytest

from agentvault.common.server import GrpcServer
from agentvault.common.settings import CommonSettings, Env
from agentvault.healthmonitor.v1 import health_monitor_service_pb2 as pb
from agentvault.healthmonitor.v1 import health_monitor_service_pb2_grpc as pb_grpc

from .test_runtime import details

BURST = 2_000
BOUND = 100


class EndlessWatch(pb_grpc.HealthMonitorServiceServicer):
    """One message, then open until the client leaves: every admitted stream stays open."""

    async def WatchHealth(
        self, request: pb.WatchHealthRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchHealthResponse]:
        yield pb.WatchHealthResponse()
        await asyncio.Event().wait()


@pytest.fixture
async def watch_stub() -> AsyncIterator[pb_grpc.HealthMonitorServiceStub]:
    env = Env({"HEALTH_MONITOR_PORT": "0", "GRPC_MAX_CONCURRENT_STREAMS": str(BOUND)})
    server = GrpcServer(CommonSettings.load("watch", "HEALTH_MONITOR_PORT", env))
    server.add(
        "agentvault.healthmonitor.v1.HealthMonitorService",
        lambda s: pb_grpc.add_HealthMonitorServiceServicer_to_server(EndlessWatch(), s),
    )
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.HealthMonitorServiceStub(channel)
    await server.stop()


async def test_a_burst_of_streams_past_the_bound_is_refused_with_resource_exhausted(
    watch_stub: pb_grpc.HealthMonitorServiceStub,
) -> None:
    calls = [watch_stub.WatchHealth(pb.WatchHealthRequest()) for _ in range(BURST)]

    async def first(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError | None:
        try:
            await call.read()
        except grpc.aio.AioRpcError as exc:
            return exc
        return None

    try:
        results = await asyncio.gather(*(first(c) for c in calls))
    finally:
        for call in calls:
            call.cancel()
    outcomes = collections.Counter("OK" if r is None else r.code().name for r in results)
    refused = next(r for r in results if r is not None)
    info = details(refused)["ErrorInfo"]
    assert info.reason == "TOO_MANY_STREAMS" and info.metadata["limit"] == str(BOUND)
    assert "GRPC_MAX_CONCURRENT_STREAMS" in (refused.details() or "")
    # Before the bound existed, gRPC core's queue cancelled about a tenth of such a burst at random.
    assert outcomes == {"OK": BOUND, "RESOURCE_EXHAUSTED": BURST - BOUND}


def test_the_bound_is_a_setting() -> None:
    assert CommonSettings.load("x", "REGISTRY_PORT", Env({})).max_concurrent_streams == 1000
    with pytest.raises(ValueError, match="GRPC_MAX_CONCURRENT_STREAMS must be >= 1"):
        CommonSettings.load("x", "REGISTRY_PORT", Env({"GRPC_MAX_CONCURRENT_STREAMS": "0"}))
