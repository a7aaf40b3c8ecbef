"""GetAgent's cache across two real registry replicas: writes on one are seen at once on the other."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import SERVICES, Mesh
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, MeshHandle, bearer, eventually, unique_did
from .test_agents_grpc import make_agent
from .test_federation_api import signed

SEARCH_HITS = "registry_federated_search_cache_lookups_total"

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
async def channels(replicas: tuple[MeshHandle, Mesh]) -> AsyncIterator[tuple[grpc.aio.Channel, grpc.aio.Channel]]:
    first, second = replicas
    async with (
        grpc.aio.insecure_channel(first.address("registry")) as one,
        grpc.aio.insecure_channel(second.address("registry")) as two,
    ):
        yield one, two


@pytest.fixture(scope="module")
def stubs(channels: tuple[grpc.aio.Channel, grpc.aio.Channel]) -> tuple[pb_grpc.RegistryServiceStub, ...]:
    return tuple(pb_grpc.RegistryServiceStub(c) for c in channels)


def cache_hits(mesh: Mesh, metric: str = "registry_agent_cache_lookups_total") -> float:
    url = f"http://127.0.0.1:{mesh.env['REGISTRY_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(metric + '{result="hit"}'):
            return float(line.split()[-1])
    return 0.0


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


async def test_answers_to_peers_follow_every_write_on_any_replica(
    replicas: tuple[MeshHandle, Mesh], channels: tuple[grpc.aio.Channel, grpc.aio.Channel]
) -> None:
    """Peers' searches are answered from memory; creating, changing, re-sharing, health-reporting or deleting an
    agent on one replica is reflected at once there and, through pub/sub, on the other (the TTL is 600 s)."""
    first, second = replicas
    admin = bearer(first.admin_token)
    ch1, ch2 = channels
    one, fed_one = pb_grpc.RegistryServiceStub(ch1), fpb_grpc.FederationServiceStub(ch1)
    fed_two = fpb_grpc.FederationServiceStub(ch2)
    issued = await fpb_grpc.PeerServiceStub(ch1).CreateFederationCredential(
        fpb.CreateFederationCredentialRequest(name="cache-peer"), metadata=admin
    )
    word = "peercache" + unique_did()[-8:].replace("-", "")
    request = fpb.SearchAgentsRequest(search=word)

    async def answer(stub: fpb_grpc.FederationServiceStub) -> dict[str, fpb.SearchAgentsResponse]:
        reply = await stub.SearchAgents(request, metadata=signed(issued.token, request))
        return {a.id: a for a in reply.agents}

    a1 = await one.CreateAgent(
        pb.CreateAgentRequest(agent=make_agent(name=f"{word} one", sharing=pb.SHARING_FEDERATED)), metadata=admin
    )
    assert set(await answer(fed_two)) == {a1.id}
    hits = cache_hits(second, SEARCH_HITS)
    assert set(await answer(fed_two)) == {a1.id}
    assert cache_hits(second, SEARCH_HITS) == hits + 1  # the second answer came from memory

    a2 = await one.CreateAgent(
        pb.CreateAgentRequest(agent=make_agent(name=f"{word} two", sharing=pb.SHARING_FEDERATED)), metadata=admin
    )
    assert set(await answer(fed_one)) == {a1.id, a2.id}  # the writing replica: at once

    async def both() -> None:
        assert set(await answer(fed_two)) == {a1.id, a2.id}

    await eventually(both)

    await one.UpdateAgent(
        pb.UpdateAgentRequest(
            agent=pb.Agent(id=a1.id, sharing=pb.SHARING_LOCAL),
            update_mask=field_mask_pb2.FieldMask(paths=["sharing"]),
        ),
        metadata=admin,
    )

    async def unshared() -> None:
        assert set(await answer(fed_two)) == {a2.id}

    await eventually(unshared)

    await one.ReportAgentHealth(
        pb.ReportAgentHealthRequest(id=a2.id, health_status=pb.HEALTH_STATUS_UNHEALTHY), metadata=admin
    )

    async def unhealthy() -> None:
        assert (await answer(fed_two))[a2.id].health_status == pb.HEALTH_STATUS_UNHEALTHY

    await eventually(unhealthy)

    await one.DeleteAgent(pb.DeleteAgentRequest(id=a2.id), metadata=admin)

    async def deleted() -> None:
        assert await answer(fed_two) == {}

    await eventually(deleted)


async def test_credential_revoked_on_one_replica_is_refused_by_the_other(
    replicas: tuple[MeshHandle, Mesh], channels: tuple[grpc.aio.Channel, grpc.aio.Channel]
) -> None:
    admin = bearer(replicas[0].admin_token)
    ch1, ch2 = channels
    peers_one, fed_two = fpb_grpc.PeerServiceStub(ch1), fpb_grpc.FederationServiceStub(ch2)
    issued = await peers_one.CreateFederationCredential(
        fpb.CreateFederationCredentialRequest(name="revoked-elsewhere"), metadata=admin
    )
    request = fpb.SearchAgentsRequest(search="anything")
    for _ in range(2):  # the second call finds the credential in the second replica's memory
        await fed_two.SearchAgents(request, metadata=signed(issued.token, request))
    await peers_one.RevokeFederationCredential(
        fpb.RevokeFederationCredentialRequest(id=issued.credential.id), metadata=admin
    )

    async def refused() -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fed_two.SearchAgents(request, metadata=signed(issued.token, request))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    await eventually(refused)
