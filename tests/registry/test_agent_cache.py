"""GetAgent's cache across two real registry replicas: writes on one are seen at once on the other."""

from __future__ import annotations

import asyncio
import functools
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import field_mask_pb2

from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import SERVICES, Mesh
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from agentvault_registry.cache import CHANNEL, AgentCache

from ..conftest import MeshFactory, MeshHandle, bearer, eventually, unique_did
from .test_agents_grpc import make_agent
from .test_federation_api import signed

SEARCH_HITS = "registry_federated_search_cache_lookups_total"
CREDENTIAL_HITS = "registry_federation_credential_cache_lookups_total"
CREDENTIAL_READS = "registry_federation_credential_reads_total"

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


def metric(mesh: Mesh, sample: str) -> float:
    """A sample's value on the replica's /metrics (0 before it is first counted)."""
    url = f"http://127.0.0.1:{mesh.env['REGISTRY_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def cache_hits(mesh: Mesh, name: str = "registry_agent_cache_lookups_total") -> float:
    return metric(mesh, name + '{result="hit"}')


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

    await eventually(functools.partial(not_found, two, agent.id))


async def not_found(stub: pb_grpc.RegistryServiceStub, agent_id: str) -> None:
    """Raises AssertionError, which `eventually` retries, while the agent is still served. (pytest.raises failing
    raises pytest's Failed, a BaseException `eventually` does not catch: the invalidation's delivery to the other
    replica, a few milliseconds under load, then failed the test at once.)"""
    try:
        await stub.GetAgent(pb.GetAgentRequest(id=agent_id))
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
    else:
        raise AssertionError(f"agent {agent_id} is still served")
    assert code == grpc.StatusCode.NOT_FOUND


async def redis_command(url: str, *args: str) -> Any:
    client = aioredis.Redis.from_url(url)
    try:
        return await client.execute_command(*args)
    finally:
        await client.aclose()


async def subscribers(url: str) -> int:
    reply = await redis_command(url, "PUBSUB", "NUMSUB", CHANNEL)
    return int(reply[1])


async def test_an_invalidation_missed_while_reconnecting_serves_nothing_stale(
    replicas: tuple[MeshHandle, Mesh], stubs: tuple[pb_grpc.RegistryServiceStub, ...]
) -> None:
    """redis-py reconnects a dropped pub/sub connection and resubscribes on its own, without telling the cache:
    what was published in between is lost. The cache must then start empty, or a deleted agent is served for
    the TTL (600 s here). The lost message is made certain by deleting the row behind the registries' back while
    the subscriptions are down: nothing is ever published for it."""
    first, _ = replicas
    one, two = stubs
    admin = bearer(first.admin_token)
    agent = await one.CreateAgent(pb.CreateAgentRequest(agent=make_agent(name="Doomed")), metadata=admin)
    hits = cache_hits(replicas[1])
    for _ in range(2):
        assert (await two.GetAgent(pb.GetAgentRequest(id=agent.id))).name == "Doomed"
    assert cache_hits(replicas[1]) == hits + 1  # the second replica serves it from memory

    # Pub/sub ignores database numbers: other meshes of the session listen on the same channel, and are cut too.
    listening = await subscribers(first.redis_url)
    assert listening >= 2
    await redis_command(first.redis_url, "CLIENT", "KILL", "TYPE", "pubsub")
    conn = await asyncpg.connect(first.database_url)
    try:
        assert await conn.execute("DELETE FROM agents WHERE id = $1", uuid.UUID(agent.id)) == "DELETE 1"
    finally:
        await conn.close()

    async def resubscribed() -> None:
        assert await subscribers(first.redis_url) == listening

    await eventually(resubscribed)
    await eventually(functools.partial(not_found, two, agent.id))


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
    second = replicas[1]
    ch1, ch2 = channels
    peers_one, fed_two = fpb_grpc.PeerServiceStub(ch1), fpb_grpc.FederationServiceStub(ch2)
    issued = await peers_one.CreateFederationCredential(
        fpb.CreateFederationCredentialRequest(name="revoked-elsewhere"), metadata=admin
    )
    request = fpb.SearchAgentsRequest(search="anything")
    await fed_two.SearchAgents(request, metadata=signed(issued.token, request))  # read from the database
    reads, hits = metric(second, CREDENTIAL_READS), cache_hits(second, CREDENTIAL_HITS)
    await fed_two.SearchAgents(request, metadata=signed(issued.token, request))
    # The second call found the credential in the second replica's memory: no database read, one cache hit.
    assert (metric(second, CREDENTIAL_READS), cache_hits(second, CREDENTIAL_HITS)) == (reads, hits + 1)
    await peers_one.RevokeFederationCredential(
        fpb.RevokeFederationCredentialRequest(id=issued.credential.id), metadata=admin
    )

    async def refused() -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fed_two.SearchAgents(request, metadata=signed(issued.token, request))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    await eventually(refused)


CACHE_BUDGET = 16 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def gauge(mesh: Mesh, name: str) -> float:
    url = f"http://127.0.0.1:{mesh.env['REGISTRY_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return next((float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name), 0.0)


@pytest.mark.slow
def test_answers_to_distinct_peer_queries_stay_within_the_cache_budget(mesh_factory: MeshFactory) -> None:
    """A peer asking many distinct queries that each match ~430 KiB of agents: the registry's caches stay within
    REGISTRY_AGENT_CACHE_BYTES and so does the growth of its resident memory (256 such answers were kept before,
    over 300 MiB)."""
    handle = mesh_factory(
        services=SERVICES[:1],
        name="cache_budget",
        env={
            "REGISTRY_AGENT_CACHE_TTL": TTL,
            "REGISTRY_AGENT_CACHE_BYTES": str(CACHE_BUDGET),
            "REGISTRY_METRICS_PORT": str(free_port()),
        },
    )
    pid = handle.mesh.processes["registry"].pid
    word = "budget" + unique_did()[-8:].replace("-", "")

    async def run() -> tuple[int, float]:
        admin = bearer(handle.admin_token)
        async with grpc.aio.insecure_channel(handle.address("registry")) as channel:
            registry, peers = pb_grpc.RegistryServiceStub(channel), fpb_grpc.PeerServiceStub(channel)
            federation = fpb_grpc.FederationServiceStub(channel)
            for i in range(50):
                agent = make_agent(
                    name=f"{word} {i}",
                    description="x" * 4000,
                    sharing=pb.SHARING_FEDERATED,
                    capabilities=[
                        pb.Capability(
                            kind=pb.CAPABILITY_KIND_SKILL, name=f"c{c}", version="9.0.0", description="y" * 1000
                        )
                        for c in range(4)
                    ],
                )
                await registry.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=admin)
            issued = await peers.CreateFederationCredential(
                fpb.CreateFederationCredentialRequest(name="hungry-peer"), metadata=admin
            )

            async def ask(i: int) -> int:
                # Every constraint is a different query matching the same 50 agents.
                request = fpb.SearchAgentsRequest(search=word, capability_name="c0", capability_version=f">=1.0.{i}")
                reply = await federation.SearchAgents(request, metadata=signed(issued.token, request))
                return len(reply.agents)

            for i in range(10):
                assert await ask(i) == 50
            before = rss_bytes(pid)
            for i in range(10, 160):
                assert await ask(i) == 50
            return rss_bytes(pid) - before, gauge(handle.mesh, "registry_cache_bytes")

    grown, charged = asyncio.run(run())
    print(f"RSS grew by {grown / 2**20:.1f} MiB; caches charged {charged / 2**20:.1f} MiB")
    # 150 answers of ~430 KiB, each kept as agents and a reply; the slack is for what is not cached (allocator
    # fragmentation, buffers).
    assert grown < CACHE_BUDGET + 32 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert 0 < charged <= CACHE_BUDGET


async def test_the_invalidation_listener_stops_when_cancelled(replicas: tuple[MeshHandle, Mesh]) -> None:
    """Shutdown (and a start that fails after the listener began) cancels it and waits for it: a cancellation
    landing while redis-py reads was swallowed and the blocked listener never returned. Cancelled at every stage,
    from before its first step to listening, it must end."""
    redis = aioredis.Redis.from_url(replicas[0].redis_url)
    try:
        for steps in [*range(12), *([None] * 8)]:
            cache = AgentCache(redis, 30, 10)
            task = asyncio.create_task(cache.run())
            if steps is None:

                async def listening(cache: AgentCache = cache) -> None:
                    assert cache.subscribed

                await eventually(listening)
            else:
                for _ in range(steps):
                    await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=10)
            assert done == {task}, f"the listener ignored its cancellation (cancelled after {steps} steps)"
            assert task.cancelled()
    finally:
        await redis.aclose()


async def test_the_credential_cache_has_its_own_ttl(mesh_factory: MeshFactory) -> None:
    """FEDERATION_CREDENTIAL_CACHE_TTL=0: every peer call reads its credential from the database, while GetAgent
    is still answered from memory under REGISTRY_AGENT_CACHE_TTL."""
    handle = mesh_factory(
        services=SERVICES[:1],
        name="cred_ttl",
        env={
            "FEDERATION_CREDENTIAL_CACHE_TTL": "0",
            "REGISTRY_AGENT_CACHE_TTL": TTL,
            "REGISTRY_METRICS_PORT": str(free_port()),
        },
    )
    admin = bearer(handle.admin_token)
    async with grpc.aio.insecure_channel(handle.address("registry")) as channel:
        registry, federation = pb_grpc.RegistryServiceStub(channel), fpb_grpc.FederationServiceStub(channel)
        issued = await fpb_grpc.PeerServiceStub(channel).CreateFederationCredential(
            fpb.CreateFederationCredentialRequest(name="uncached-peer"), metadata=admin
        )
        request = fpb.SearchAgentsRequest(search="anything")
        reads = metric(handle.mesh, CREDENTIAL_READS)
        for _ in range(2):
            await federation.SearchAgents(request, metadata=signed(issued.token, request))
        assert metric(handle.mesh, CREDENTIAL_READS) == reads + 2

        agent = await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=admin)
        hits = cache_hits(handle.mesh)
        for _ in range(2):
            await registry.GetAgent(pb.GetAgentRequest(id=agent.id))
        assert cache_hits(handle.mesh) == hits + 1
