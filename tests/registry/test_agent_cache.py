"""GetAgent's cache across two real registry replicas: writes on one are seen at once on the other."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import SERVICES, Mesh
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, MeshHandle, bearer
from .test_agents_grpc import make_agent

# Far longer than any test: a fresh answer can only come from invalidation, never from expiry.
TTL = "600"


@pytest.fixture(scope="module")
def replicas(mesh_factory: MeshFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshHandle, Mesh]]:
    first = mesh_factory(services=SERVICES[:1], name="cache", env={"REGISTRY_AGENT_CACHE_TTL": TTL})
    second = Mesh(
        dict(first.env, REGISTRY_PORT=str(free_port()), REGISTRY_METRICS_PORT=str(free_port())),
        log_dir=Path(tmp_path_factory.mktemp("replica2")),
        services=SERVICES[:1],
    )
    second.start()
    yield first, second
    second.stop()


@pytest.fixture(scope="module")
async def stubs(replicas: tuple[MeshHandle, Mesh]) -> AsyncIterator[tuple[pb_grpc.RegistryServiceStub, ...]]:
    first, second = replicas
    async with (
        grpc.aio.insecure_channel(first.address("registry")) as one,
        grpc.aio.insecure_channel(second.address("registry")) as two,
    ):
        yield pb_grpc.RegistryServiceStub(one), pb_grpc.RegistryServiceStub(two)


def cache_hits(mesh: Mesh) -> float:
    url = f"http://127.0.0.1:{mesh.env['REGISTRY_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith('registry_agent_cache_lookups_total{result="hit"}'):
            return float(line.split()[-1])
    return 0.0


async def eventually(check: object, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            await check()  # type: ignore[operator]
            return
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_update_and_delete_on_one_replica_are_seen_by_the_other(
    replicas: tuple[MeshHandle, Mesh], stubs: tuple[pb_grpc.RegistryServiceStub, ...]
) -> None:
    one, two = stubs
    admin = bearer(replicas[0].admin_token)
    agent = await one.CreateAgent(pb.CreateAgentRequest(agent=make_agent(name="Before")), metadata=admin)
    hits = cache_hits(replicas[1])
    for _ in range(3):  # the first read fills the second replica's cache, the others are served from it
        assert (await two.GetAgent(pb.GetAgentRequest(id=agent.id))).name == "Before"
    assert cache_hits(replicas[1]) == hits + 2

    await one.UpdateAgent(
        pb.UpdateAgentRequest(
            agent=pb.Agent(id=agent.id, name="After"), update_mask=field_mask_pb2.FieldMask(paths=["name"])
        ),
        metadata=admin,
    )

    async def renamed() -> None:
        assert (await two.GetAgent(pb.GetAgentRequest(id=agent.id))).name == "After"

    await eventually(renamed)

    await one.DeleteAgent(pb.DeleteAgentRequest(id=agent.id), metadata=admin)

    async def gone() -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await two.GetAgent(pb.GetAgentRequest(id=agent.id))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    await eventually(gone)


async def test_cached_private_agent_is_still_hidden(
    replicas: tuple[MeshHandle, Mesh], stubs: tuple[pb_grpc.RegistryServiceStub, ...]
) -> None:
    one, two = stubs
    admin = bearer(replicas[0].admin_token)
    agent = await one.CreateAgent(pb.CreateAgentRequest(agent=make_agent(sharing=pb.SHARING_PRIVATE)), metadata=admin)
    assert (await two.GetAgent(pb.GetAgentRequest(id=agent.id), metadata=admin)).id == agent.id
    assert (await two.GetAgent(pb.GetAgentRequest(id=agent.id), metadata=admin)).id == agent.id  # from cache
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await two.GetAgent(pb.GetAgentRequest(id=agent.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
