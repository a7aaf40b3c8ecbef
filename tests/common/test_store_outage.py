"""Store outages over real gRPC: every one is UNAVAILABLE with STORE_UNAVAILABLE, and readiness follows the stores."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from agentvault.common.healthcheck import LIVENESS_SERVICE
from agentvault.common.redis import create_redis
from agentvault.common.server import GrpcServer
from agentvault.common.settings import CommonSettings, Env
from agentvault.devserver.embedded import EmbeddedRedis, free_port
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from tests.conftest import Infra

SERVICE = "agentvault.registry.v1.RegistryService"


class Probe(pb_grpc.RegistryServiceServicer):
    """GetAgent(id) fails the way a store outage makes a handler fail, each time with a real client library."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def GetAgent(self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext) -> pb.Agent:
        if request.id == "redis-down":
            redis = create_redis(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
            try:
                await redis.ping()
            finally:
                await redis.aclose()
        if request.id == "postgres-down":
            await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", timeout=2)
        conn = await asyncpg.connect(self.dsn)
        try:
            if request.id == "busy":
                # What a connection still busy with an aborted call's statement answers during an outage.
                slow = asyncio.create_task(conn.fetchval("SELECT pg_sleep(0.2)"))
                await asyncio.sleep(0.02)
                try:
                    await conn.fetchval("SELECT 1")
                finally:
                    await slow
            if request.id == "client-bug":
                await conn.fetchval("SELECT $1::int", "not a number")
        finally:
            await conn.close()
        return pb.Agent(id=request.id)


@pytest.fixture(scope="module")
async def probe(infra: Infra) -> AsyncIterator[pb_grpc.RegistryServiceStub]:
    server = GrpcServer(CommonSettings.load("probe", "REGISTRY_PORT", Env({"REGISTRY_PORT": "0"})))
    server.add(SERVICE, lambda s: pb_grpc.add_RegistryServiceServicer_to_server(Probe(infra.admin_dsn), s))
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.RegistryServiceStub(channel)
    await server.stop()


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None, "the status carries google.rpc details"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status")


@pytest.mark.parametrize(
    ("case", "store"),
    [("busy", "postgres"), ("postgres-down", "postgres"), ("redis-down", "redis")],
)
async def test_store_outages_are_unavailable_with_a_reason(
    probe: pb_grpc.RegistryServiceStub, case: str, store: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await probe.GetAgent(pb.GetAgentRequest(id=case))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    info = error_info(err.value)
    assert info.reason == "STORE_UNAVAILABLE"
    assert info.metadata["store"] == store


async def test_a_client_side_argument_error_stays_internal(probe: pb_grpc.RegistryServiceStub) -> None:
    # asyncpg raises its argument errors as InterfaceError subclasses too; they are bugs, not outages.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await probe.GetAgent(pb.GetAgentRequest(id="client-bug"))
    assert err.value.code() == grpc.StatusCode.INTERNAL


# ------------------------------------------------------------------------------------------ readiness


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    with tempfile.TemporaryDirectory(prefix="agentvault-watch-") as root:
        redis = EmbeddedRedis(Path(root) / "redis")
        redis.start()
        try:
            yield redis
        finally:
            redis.stop()


async def statuses(health: health_pb2_grpc.HealthStub) -> set[int]:
    replies = [await health.Check(health_pb2.HealthCheckRequest(service=name)) for name in ("", SERVICE)]
    return {reply.status for reply in replies}


async def until_status(health: health_pb2_grpc.HealthStub, status: int, seconds: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while (found := await statuses(health)) != {status}:
        assert asyncio.get_running_loop().time() < deadline, f"health still {found}, expected {status}"
        await asyncio.sleep(0.05)
    # Liveness is the process, not its stores: an outage must not get a replica restarted.
    alive = await health.Check(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE))
    assert alive.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_follows_redis_and_postgres(infra: Infra, own_redis: EmbeddedRedis) -> None:
    # A database that does not exist yet: PostgreSQL answers every ping with an error until it is created.
    database = f"watch_{secrets.token_hex(4)}"
    env = {
        "REGISTRY_PORT": "0",
        "DATABASE_URL": infra.dsn(database),
        "REDIS_URL": own_redis.url(),
        "STORE_CHECK_INTERVAL": "0.1",
    }
    server = GrpcServer(CommonSettings.load("probe", "REGISTRY_PORT", Env(env)))
    server.add(SERVICE, lambda s: pb_grpc.add_RegistryServiceServicer_to_server(Probe(infra.admin_dsn), s))
    port = await server.start()
    admin = await asyncpg.connect(infra.admin_dsn)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await until_status(health, health_pb2.HealthCheckResponse.NOT_SERVING)
            await admin.execute(f'CREATE DATABASE "{database}"')
            await until_status(health, health_pb2.HealthCheckResponse.SERVING)

            assert own_redis.process is not None
            own_redis.process.send_signal(signal.SIGKILL)
            await until_status(health, health_pb2.HealthCheckResponse.NOT_SERVING)
            own_redis.restart()
            await until_status(health, health_pb2.HealthCheckResponse.SERVING)
    finally:
        await server.stop()
        with contextlib.suppress(asyncpg.PostgresError):
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
