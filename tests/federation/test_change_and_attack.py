"""Federated discovery under change (withdrawn agents, renamed and deleted peers) and under attack (hostile answers,
stalls, callers fishing for internals or forcing fan-outs), across two real meshes."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
import redis.asyncio as aioredis

from agentvault.devserver.embedded import free_port
from agentvault.discovery.v1 import discovery_service_pb2 as dpb
from agentvault.discovery.v1 import discovery_service_pb2_grpc as dpb_grpc
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.registry.v1 import registry_service_pb2 as pb

from ..conftest import MeshFactory, MeshHandle, eventually
from .conftest import (
    QUERY_TIMEOUT_MS,
    add_peer,
    admin,
    call,
    discover,
    issue_credential,
    mesh_env,
    register,
    unique_word,
)

# What the rest of a search may add to its deadline (loopback, loaded machine).
MARGIN_SECONDS = 1.0
# The privacy requirement: an agent its mesh stops sharing is gone from peers' results within this.
WITHDRAWAL_SECONDS = 5.0
MEMO_BUDGET = 16 * 1024 * 1024
FORCE_REFRESH_LIMIT = 3


@dataclass
class Pair:
    a: MeshHandle
    b: MeshHandle
    peer_b: str = ""


@pytest.fixture(scope="module")
def meshes(mesh_factory: MeshFactory) -> Pair:
    return Pair(
        a=mesh_factory(
            env=mesh_env(
                "mesh-a",
                FEDERATION_HEALTH_CHECK_INTERVAL="3600",
                DISCOVERY_MEMO_BYTES=str(MEMO_BUDGET),
                DISCOVERY_FORCE_REFRESH_PER_MINUTE=str(FORCE_REFRESH_LIMIT),
            ),
            name="change_a",
        ),
        b=mesh_factory(env=mesh_env("mesh-b"), name="change_b"),
    )


@pytest.fixture(scope="module")
async def pair(meshes: Pair, http: aiohttp.ClientSession) -> Pair:
    token = await issue_credential(http, meshes.b, "mesh-a")
    meshes.peer_b = await add_peer(http, meshes.a, "Partner B", meshes.b.url(), token)
    return meshes


@pytest.fixture
async def discovery_a(pair: Pair) -> AsyncIterator[dpb_grpc.DiscoveryServiceStub]:
    async with grpc.aio.insecure_channel(pair.a.address("discovery")) as channel:
        yield dpb_grpc.DiscoveryServiceStub(channel)


def names(reply: dict[str, Any]) -> list[str]:
    return [a["name"] for a in reply["agents"]]


def peer_stat(reply: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in reply["federation_stats"]["peers"] if p["name"] == name)


async def set_sharing(http: aiohttp.ClientSession, on: MeshHandle, agent_id: str, sharing: str) -> None:
    await call(http, "PATCH", on.url(f"/api/v1/agents/{agent_id}"), headers=admin(on), json={"sharing": sharing})


async def update_peer(http: aiohttp.ClientSession, on: MeshHandle, peer_id: str, **fields: Any) -> None:
    await call(http, "PATCH", on.url(f"/api/v1/federation/peers/{peer_id}"), headers=admin(on), json=fields)


async def delete_peer(http: aiohttp.ClientSession, on: MeshHandle, peer_id: str) -> None:
    await call(http, "DELETE", on.url(f"/api/v1/federation/peers/{peer_id}"), headers=admin(on))


async def metric(http: aiohttp.ClientSession, handle: MeshHandle, name: str) -> float:
    async with http.get(f"http://127.0.0.1:{handle.env['DISCOVERY_METRICS_PORT']}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of the process `pid` to `port` on loopback, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for family in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{family}") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


# ------------------------------------------------------------------------------------------- withdrawal


async def test_a_withdrawn_agent_disappears_within_5_s_and_comes_back_without_force_refresh(
    pair: Pair, http: aiohttp.ClientSession
) -> None:
    word = unique_word()
    agent = await register(http, pair.b, f"Withdrawn {word}", "federated")
    assert names(await discover(http, pair.a, include_federated=True, search=word)) == [f"Withdrawn {word}"]
    cached = await discover(http, pair.a, include_federated=True, search=word)
    assert names(cached) == [f"Withdrawn {word}"] and peer_stat(cached, "Partner B")["from_cache"] is True

    await set_sharing(http, pair.b, agent["id"], "private")
    withdrawn_at = time.monotonic()

    async def gone() -> None:
        reply = await discover(http, pair.a, include_federated=True, search=word)
        assert peer_stat(reply, "Partner B")["status"] == "ok"
        assert names(reply) == []

    await eventually(gone, WITHDRAWAL_SECONDS)
    took = time.monotonic() - withdrawn_at
    print(f"withdrawal seen by the peer after {took:.2f} s")
    assert took < WITHDRAWAL_SECONDS
    # The new answer is cached and served from the cache like any other.
    again = await discover(http, pair.a, include_federated=True, search=word)
    assert names(again) == [] and peer_stat(again, "Partner B")["from_cache"] is True

    await set_sharing(http, pair.b, agent["id"], "federated")

    async def back() -> None:
        assert names(await discover(http, pair.a, include_federated=True, search=word)) == [f"Withdrawn {word}"]

    await eventually(back, WITHDRAWAL_SECONDS)

    # Withdrawn while A's discovery is down: what A left in Redis must not come back when it restarts.
    pair.a.mesh.stop_service("discovery")
    try:
        await set_sharing(http, pair.b, agent["id"], "private")
    finally:
        await asyncio.to_thread(pair.a.mesh.start_service, "discovery")
    first = await discover(http, pair.a, include_federated=True, search=word)
    assert peer_stat(first, "Partner B")["status"] == "ok"
    assert names(first) == []


async def test_a_renamed_or_repointed_peer_shows_its_new_name_and_url(pair: Pair, http: aiohttp.ClientSession) -> None:
    word = unique_word()
    await register(http, pair.b, f"Renamed {word}", "federated")

    def origin(reply: dict[str, Any]) -> tuple[str, str]:
        (agent,) = reply["agents"]
        return agent["registry_name"], agent["registry_url"]

    for _ in range(2):  # fresh, then from the cache: the same answer bytes
        assert origin(await discover(http, pair.a, include_federated=True, search=word)) == ("Partner B", pair.b.url())
    other_url = pair.b.url().replace("127.0.0.1", "localhost")
    try:
        await update_peer(http, pair.a, pair.peer_b, name="Partner B renamed")

        async def renamed() -> None:
            reply = await discover(http, pair.a, include_federated=True, search=word)
            assert origin(reply) == ("Partner B renamed", pair.b.url())

        await eventually(renamed)
        await update_peer(http, pair.a, pair.peer_b, registry_url=other_url)

        async def repointed() -> None:
            reply = await discover(http, pair.a, include_federated=True, search=word)
            assert origin(reply) == ("Partner B renamed", other_url)

        await eventually(repointed)
    finally:
        await update_peer(http, pair.a, pair.peer_b, name="Partner B", registry_url=pair.b.url())


# ------------------------------------------------------------------------------------------- hostile peers


class FakePeer:
    """A real gRPC server on loopback speaking FederationService.SearchAgents: what a hostile or broken mesh
    would answer. `answer(request)` gives the reply; None never answers."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.server = grpc.aio.server()
        self.release = asyncio.Event()

        async def search(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            reply = self.answer(fpb.SearchAgentsRequest.FromString(raw))
            if reply is None:
                await self.release.wait()
                return b""
            return bytes(reply.SerializeToString())

        handler = grpc.method_handlers_generic_handler(
            "agentvault.federation.v1.FederationService", {"SearchAgents": grpc.unary_unary_rpc_method_handler(search)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakePeer:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self.server.stop(None)


def large_answer(request: fpb.SearchAgentsRequest) -> fpb.SearchAgentsResponse:
    """About 430 KiB of valid agents, different for every query."""
    word = request.search or "any"
    agents = [
        pb.Agent(
            id=f"{word}-{i}",
            did=f"did:web:hostile.example:{word}-{i}",
            name=f"Hostile {word} {i}",
            description="x" * 4000,
            version="1.0.0",
            agent_type="nlp",
            tags=["nlp"],
            capabilities=[
                pb.Capability(kind=pb.CAPABILITY_KIND_SKILL, name=f"cap{c}", version="1.0.0", description="y" * 1000)
                for c in range(4)
            ],
            endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url=f"https://hostile.example/{word}/{i}")],
        )
        for i in range(50)
    ]
    return fpb.SearchAgentsResponse(agents=agents, registry_name="hostile")


async def add_grpc_peer(http: aiohttp.ClientSession, on: MeshHandle, name: str, endpoint: str) -> str:
    peer_id = await add_peer(
        http, on, name, f"http://{endpoint}", "key-" + name.lower(), protocol="grpc", grpc_endpoint=endpoint
    )
    return peer_id


async def wait_for_peer(http: aiohttp.ClientSession, on: MeshHandle, name: str, present: bool = True) -> None:
    """Until discovery's peer list (re-read every 1.5 s) has (or no longer has) the peer."""

    async def listed() -> None:
        reply = await discover(http, on, include_federated=True, search=unique_word())
        assert any(p["name"] == name for p in reply["federation_stats"]["peers"]) is present

    await eventually(listed)


@pytest.mark.slow
async def test_large_distinct_answers_stay_within_the_memo_budget(pair: Pair, http: aiohttp.ClientSession) -> None:
    """A hostile peer answering every distinct query with ~430 KiB: discovery's memos stay within
    DISCOVERY_MEMO_BYTES, and so does the growth of the process's resident memory (before, 300 such answers
    added 473 MiB)."""
    pid = pair.a.mesh.processes["discovery"].pid
    async with FakePeer(large_answer) as hostile:
        peer_id = await add_grpc_peer(http, pair.a, "Hostile", hostile.endpoint)
        try:
            await wait_for_peer(http, pair.a, "Hostile")
            # Warm up: the first searches allocate what every search needs (pools, buffers, code paths).
            for _ in range(10):
                await discover(http, pair.a, include_federated=True, search=unique_word())
            before = rss_bytes(pid)
            for _ in range(150):
                reply = await discover(http, pair.a, include_federated=True, search=unique_word())
                assert peer_stat(reply, "Hostile")["result_count"] == 50
            charged = await metric(http, pair.a, "discovery_memo_bytes")
            grown = rss_bytes(pid) - before
        finally:
            await delete_peer(http, pair.a, peer_id)
    print(f"RSS grew by {grown / 2**20:.1f} MiB; memos charged {charged / 2**20:.1f} MiB")
    # 150 answers are ~64 MiB on the wire and several times that once parsed, validated, scored and merged; the
    # slack is for what is not a memo (allocator fragmentation, the background writer's queue, gRPC buffers).
    assert grown < MEMO_BUDGET + 32 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert 0 < charged <= MEMO_BUDGET


async def test_a_deleted_peers_channel_is_closed(pair: Pair, http: aiohttp.ClientSession) -> None:
    word = unique_word()
    pid = pair.a.mesh.processes["discovery"].pid
    async with FakePeer(large_answer) as peer:
        peer_id = await add_grpc_peer(http, pair.a, "Short-lived", peer.endpoint)
        await wait_for_peer(http, pair.a, "Short-lived")
        reply = await discover(http, pair.a, include_federated=True, search=word)
        assert peer_stat(reply, "Short-lived")["status"] == "ok"
        open_channels = await metric(http, pair.a, "federation_peer_channels")
        assert connections_to(pid, peer.port) >= 1

        await delete_peer(http, pair.a, peer_id)

        async def closed() -> None:
            await discover(http, pair.a, include_federated=True, search=unique_word())
            assert await metric(http, pair.a, "federation_peer_channels") == open_channels - 1
            assert connections_to(pid, peer.port) == 0

        await eventually(closed)


async def test_one_deadline_covers_the_cache_read_and_the_peers(
    pair: Pair, discovery_a: dpb_grpc.DiscoveryServiceStub, http: aiohttp.ClientSession
) -> None:
    """Redis stalls (CLIENT PAUSE, a real stall of the real server) for most of the deadline, and a peer never
    answers: the search still ends at its one deadline. With a deadline for the cache read and another for the
    peers it took both (1.4 s + 1.5 s)."""
    async with FakePeer(lambda _: None) as silent:
        peer_id = await add_grpc_peer(http, pair.a, "Silent", silent.endpoint)
        try:
            await wait_for_peer(http, pair.a, "Silent")
            deadline = QUERY_TIMEOUT_MS / 1000
            stall_ms = int(QUERY_TIMEOUT_MS * 0.93)
            redis = aioredis.Redis.from_url(pair.a.redis_url)
            try:
                # Anonymous and straight to discovery, so nothing but discovery's cache read waits for Redis.
                request = dpb.SearchAgentsRequest(include_federated=True, search=unique_word())
                await redis.execute_command("CLIENT", "PAUSE", str(stall_ms), "ALL")
                start = time.perf_counter()
                reply = await discovery_a.SearchAgents(request, timeout=30)
                elapsed = time.perf_counter() - start
            finally:
                await redis.execute_command("CLIENT", "UNPAUSE")
                await redis.aclose()
        finally:
            await delete_peer(http, pair.a, peer_id)
    print(f"search with Redis stalled and a silent peer: {elapsed:.2f} s")
    stats = {p.name: p for p in reply.federation_stats.peers}
    assert stats["Silent"].status == dpb.PEER_QUERY_STATUS_TIMEOUT
    assert elapsed < deadline + MARGIN_SECONDS, f"{elapsed:.2f} s for a {deadline} s deadline"


# ------------------------------------------------------------------------------------------- callers


async def member_token(http: aiohttp.ClientSession, on: MeshHandle, name: str) -> str:
    issued = await call(http, "POST", on.url("/api/v1/api-keys"), headers=admin(on), json={"name": name})
    return str(issued["token"])


async def test_peer_errors_are_generic_for_callers_and_detailed_for_admins(
    pair: Pair, http: aiohttp.ClientSession
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: the channel's error names the address
    peer_id = await add_grpc_peer(http, pair.a, "Dead", dead)
    try:
        await wait_for_peer(http, pair.a, "Dead")
        word = unique_word()
        params = {"include_federated": "true", "search": word}
        url = pair.a.url("/api/v1/discovery/agents")
        member = {"Authorization": f"Bearer {await member_token(http, pair.a, 'errors-member')}"}
        for headers in (None, member):
            reply = await call(http, "GET", url, headers=headers, params=params)
            # Only the generic reason: not the gRPC address, not the channel's own words.
            assert peer_stat(reply, "Dead")["error"] in ("unavailable", "timeout"), reply["federation_stats"]
        detailed = peer_stat(await call(http, "GET", url, headers=admin(pair.a), params=params), "Dead")["error"]
        assert detailed.startswith("unavailable: ") and dead in detailed, detailed
    finally:
        await delete_peer(http, pair.a, peer_id)


def seconds_into_the_minute() -> float:
    return time.time() % 60


async def test_force_refresh_needs_a_credential_and_is_rate_limited(
    pair: Pair, http: aiohttp.ClientSession, discovery_a: dpb_grpc.DiscoveryServiceStub
) -> None:
    url = pair.a.url("/api/v1/discovery/agents")
    params = {"include_federated": "true", "search": unique_word(), "force_refresh": "true"}
    body = await call(http, "GET", url, params=params, expect=401)
    assert body["error"]["details"][0]["reason"] == "FORCE_REFRESH_NEEDS_CREDENTIAL"
    # Without the flag the same anonymous search is served.
    await call(http, "GET", url, params={k: v for k, v in params.items() if k != "force_refresh"})

    # The limit counts per minute of the clock: start early in one, so all the calls below share it.
    async def early_in_a_minute() -> None:
        assert seconds_into_the_minute() < 45

    await eventually(early_in_a_minute, 20)
    token = await member_token(http, pair.a, "refresher")
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(FORCE_REFRESH_LIMIT):
        reply = await call(http, "GET", url, headers=headers, params=params)
        assert peer_stat(reply, "Partner B")["from_cache"] is False
    body = await call(http, "GET", url, headers=headers, params=params, expect=429)
    assert body["error"]["status"] == "RESOURCE_EXHAUSTED"
    retry = next(d for d in body["error"]["details"] if d["@type"].endswith("google.rpc.RetryInfo"))
    delay = retry.get("retryDelay", retry.get("retry_delay", ""))
    assert 0 < float(delay.rstrip("s")) <= 61, retry
    # The same hint as the header HTTP clients act on.
    async with http.get(url, headers=headers, params=params) as r:
        assert r.status == 429
        assert 1 <= int(r.headers["Retry-After"]) <= 61
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await discovery_a.SearchAgents(
            dpb.SearchAgentsRequest(include_federated=True, search="x", force_refresh=True),
            metadata=[("authorization", f"Bearer {token}")],
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Another principal has its own allowance; admins are not limited.
    other = {"Authorization": f"Bearer {await member_token(http, pair.a, 'other-refresher')}"}
    await call(http, "GET", url, headers=other, params=params)
    for _ in range(FORCE_REFRESH_LIMIT + 1):
        await call(http, "GET", url, headers=admin(pair.a), params=params)
