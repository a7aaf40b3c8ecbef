"""Retries: idempotent calls ride out UNAVAILABLE, writes never repeat.

The policy lives in the channel's service config, so these tests check gRPC really applies it: first against an
in-process server that answers UNAVAILABLE on purpose (counting attempts exactly), then across a real registry
restart.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from agentvault.client import RegistryClient, RetryPolicy, UnavailableError
from agentvault.client.registry import IDEMPOTENT_METHODS
from agentvault.common.logs import request_id_var
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from tests.client.conftest import REGISTRY_ONLY
from tests.conftest import MeshFactory, MeshHandle, unique_did

FAST = RetryPolicy(initial_backoff=0.05, max_backoff=0.1)


class Flaky(pb_grpc.RegistryServiceServicer):
    """Answers UNAVAILABLE to the first `failures` attempts of every call, recording each attempt's metadata."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: Counter[str] = Counter()
        self.metadata: list[dict[str, Any]] = []

    async def _answer(self, method: str, context: grpc.aio.ServicerContext, reply: Any) -> Any:
        self.attempts[method] += 1
        self.metadata.append(dict(context.invocation_metadata() or ()))
        if self.attempts[method] <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded, try again")
        return reply

    async def GetAgent(self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext) -> pb.Agent:
        return await self._answer("GetAgent", context, pb.Agent(id=request.id))

    async def ListAgents(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ListAgentsResponse:
        return await self._answer("ListAgents", context, pb.ListAgentsResponse())

    async def GetHealth(self, request: Any, context: grpc.aio.ServicerContext) -> pb.GetHealthResponse:
        return await self._answer("GetHealth", context, pb.GetHealthResponse(status=pb.HEALTH_STATUS_HEALTHY))

    async def ListApiKeys(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ListApiKeysResponse:
        return await self._answer("ListApiKeys", context, pb.ListApiKeysResponse())

    async def CreateAgent(self, request: pb.CreateAgentRequest, context: grpc.aio.ServicerContext) -> pb.Agent:
        return await self._answer("CreateAgent", context, request.agent)

    async def UpdateAgent(self, request: pb.UpdateAgentRequest, context: grpc.aio.ServicerContext) -> pb.Agent:
        return await self._answer("UpdateAgent", context, request.agent)

    async def DeleteAgent(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        from google.protobuf import empty_pb2

        return await self._answer("DeleteAgent", context, empty_pb2.Empty())

    async def CreateApiKey(self, request: Any, context: grpc.aio.ServicerContext) -> pb.CreateApiKeyResponse:
        return await self._answer("CreateApiKey", context, pb.CreateApiKeyResponse())

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: grpc.aio.ServicerContext) -> pb.ApiKey:
        return await self._answer("RevokeApiKey", context, pb.ApiKey(id=request.id))


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[Flaky, str]]:
    servicer = Flaky(failures=2)
    server = grpc.aio.server()
    pb_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_idempotent_calls_are_retried_on_unavailable(flaky: tuple[Flaky, str]) -> None:
    servicer, address = flaky
    async with RegistryClient(address, token="t0ken", retry=FAST) as client:
        assert (await client.get_agent("a1")).id == "a1"
        await client.list_agents(tag="x")
        await client.health()
        await client.list_api_keys()
    assert {m: servicer.attempts[m] for m in IDEMPOTENT_METHODS} == dict.fromkeys(IDEMPOTENT_METHODS, 3)
    # gRPC numbers the attempts, and every attempt of a call carries the same request id and credential.
    first_call = servicer.metadata[:3]
    assert [md.get("grpc-previous-rpc-attempts") for md in first_call] == [None, "1", "2"]
    assert len({md["x-request-id"] for md in first_call}) == 1
    assert all(md["authorization"] == "Bearer t0ken" for md in first_call)


async def test_writes_are_never_retried(flaky: tuple[Flaky, str]) -> None:
    servicer, address = flaky
    async with RegistryClient(address, token="t0ken", retry=FAST) as client:
        writes = [
            client.create_agent(pb.Agent(did=unique_did())),
            client.update_agent(pb.Agent(id="a1"), ["name"]),
            client.delete_agent("a1"),
            client.create_api_key("someone"),
            client.revoke_api_key("k1"),
        ]
        for write in writes:
            with pytest.raises(UnavailableError) as caught:
                await write
            # The server said it, so it is not reported as a server that could not be reached.
            assert caught.value.message == "overloaded, try again"
            assert not caught.value.unreachable
    assert dict(servicer.attempts) == dict.fromkeys(
        ["CreateAgent", "UpdateAgent", "DeleteAgent", "CreateApiKey", "RevokeApiKey"], 1
    )


async def test_retries_can_be_disabled(flaky: tuple[Flaky, str]) -> None:
    servicer, address = flaky
    async with RegistryClient(address, retry=None) as client:
        with pytest.raises(UnavailableError):
            await client.get_agent("a1")
    assert servicer.attempts["GetAgent"] == 1


async def test_request_id_of_the_current_request_travels_on(flaky: tuple[Flaky, str]) -> None:
    servicer, address = flaky
    servicer.failures = 0
    token = request_id_var.set("rid-from-the-caller")
    try:
        async with RegistryClient(address, token="") as client:
            await client.get_agent("a1")
    finally:
        request_id_var.reset(token)
    assert servicer.metadata[-1]["x-request-id"] == "rid-from-the-caller"
    assert "authorization" not in servicer.metadata[-1]


@pytest.fixture
def restartable(mesh_factory: MeshFactory) -> MeshHandle:
    """A mesh of its own, since the test takes its registry down."""
    return mesh_factory(services=REGISTRY_ONLY, name="retry")


@pytest.mark.slow
async def test_reads_ride_out_a_registry_restart_and_writes_fail_fast(restartable: MeshHandle) -> None:
    handle = restartable
    address = handle.address("registry")
    async with (
        RegistryClient(address, token=handle.admin_token, timeout=30) as client,
        RegistryClient(address, timeout=30, retry=None) as no_retries,
    ):
        for connected in (client, no_retries):
            assert (await connected.health()).status == pb.HEALTH_STATUS_HEALTHY
        handle.mesh.stop_service("registry")

        start = time.monotonic()
        with pytest.raises(UnavailableError):
            await client.create_agent(pb.Agent(did=unique_did(), name="n", version="1.0.0"))
        with pytest.raises(UnavailableError):
            await no_retries.list_agents(page_size=1)
        assert time.monotonic() - start < 10, "without a retry policy nothing waits for the server (deadline 30 s)"

        # Something that is not a gRPC server takes the registry's port and counts the read's connection attempts:
        # after several have failed, the read must still be waiting between attempts rather than have failed.
        attempts = 0

        def refuse(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal attempts
            attempts += 1
            writer.close()

        host, _, port = address.rpartition(":")
        impostor = await asyncio.start_server(refuse, host, int(port))
        read = asyncio.ensure_future(client.list_agents(page_size=1))
        deadline = time.monotonic() + 10
        while attempts < 2 and not read.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        impostor.close()
        await impostor.wait_closed()
        assert attempts >= 2, f"the read made {attempts} connection attempts"
        assert not read.done(), "the read is waiting between attempts, not failed"
        await asyncio.to_thread(handle.mesh.start_service, "registry")
        reply = await read
        assert reply.next_page_token == ""
        assert time.monotonic() - start < 15, "the read succeeded soon after the restart, not at its deadline"
