"""The signed peer API on B's registry, called directly over gRPC the way A's discovery service calls it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from agentvault.common import signing
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault.registry.v1 import registry_service_pb2_grpc as reg_grpc

from .conftest import Federation, call, register, unique_word

METHOD = "/agentvault.federation.v1.FederationService/SearchAgents"


def signed(token: str, request: fed_pb.SearchAgentsRequest, *, timestamp: int | None = None) -> list[tuple[str, str]]:
    nonce = signing.new_nonce()
    body = signing.grpc_body(request.SerializeToString(deterministic=True))
    return [
        ("authorization", f"Bearer {token}"),
        (signing.REGISTRY_HEADER, "mesh-a"),
        (signing.NONCE_HEADER, nonce),
        (signing.SIGNATURE_HEADER, signing.sign("GRPC", METHOD, body, token, timestamp=timestamp, nonce=nonce)),
    ]


@pytest.fixture
async def peer_api(federation: Federation) -> AsyncIterator[fed_grpc.FederationServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(federation.b.address("registry"))
    try:
        yield fed_grpc.FederationServiceStub(channel)
    finally:
        await channel.close()


async def unauthenticated(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value
    return str(caught.value.details())


async def test_a_signed_request_is_answered_once_and_a_replay_is_refused(
    federation: Federation, peer_api: fed_grpc.FederationServiceAsyncStub
) -> None:
    request = fed_pb.SearchAgentsRequest(search="anything", page_size=5)
    metadata = signed(federation.token_b_for_a, request)
    reply = await peer_api.SearchAgents(request, metadata=metadata, timeout=5)
    assert reply.registry_name == "mesh-b"
    assert all(not a.owner for a in reply.agents)
    await unauthenticated(peer_api.SearchAgents(request, metadata=metadata, timeout=5))


async def test_a_stale_or_forged_signature_is_refused(
    federation: Federation, peer_api: fed_grpc.FederationServiceAsyncStub
) -> None:
    request = fed_pb.SearchAgentsRequest(search="anything")
    token = federation.token_b_for_a
    stale = signed(token, request, timestamp=int(time.time()) - 3600)
    assert "expired" in await unauthenticated(peer_api.SearchAgents(request, metadata=stale, timeout=5))
    future = signed(token, request, timestamp=int(time.time()) + 3600)
    await unauthenticated(peer_api.SearchAgents(request, metadata=future, timeout=5))
    # Signed for one request, sent with another: the body is covered by the signature.
    other = fed_pb.SearchAgentsRequest(search="something else")
    await unauthenticated(peer_api.SearchAgents(other, metadata=signed(token, request), timeout=5))
    # Signed with a different key than the token presented.
    forged = signed(token + "x", request)
    forged[0] = ("authorization", f"Bearer {token}")
    await unauthenticated(peer_api.SearchAgents(request, metadata=forged, timeout=5))
    # No credential at all.
    await unauthenticated(peer_api.SearchAgents(request, timeout=5))


LIST_METHOD = "/agentvault.registry.v1.RegistryService/ListAgents"


async def test_older_meshes_list_agents_with_their_token_over_grpc_and_http(
    federation: Federation, http: aiohttp.ClientSession
) -> None:
    """The seed's form, which meshes of older versions still use: RegistryService.ListAgents (GET /api/v1/agents)
    called with a federation token and signed. It is answered by B's peer listing: federated agents only, no
    owner, and the signature is checked (a replay is refused) on both transports."""
    word = unique_word()
    shared = await register(http, federation.b, f"{word} shared", "federated")
    await register(http, federation.b, f"{word} local", "local")
    token = federation.token_b_for_a

    request = reg_pb.ListAgentsRequest(search=word)
    nonce = signing.new_nonce()
    body = signing.grpc_body(request.SerializeToString(deterministic=True))
    metadata = [
        ("authorization", f"Bearer {token}"),
        (signing.NONCE_HEADER, nonce),
        (signing.SIGNATURE_HEADER, signing.sign("GRPC", LIST_METHOD, body, token, nonce=nonce)),
    ]
    async with grpc.aio.insecure_channel(federation.b.address("registry")) as channel:
        registry = reg_grpc.RegistryServiceStub(channel)
        reply = await registry.ListAgents(request, metadata=metadata, timeout=5)
        assert [(a.id, a.owner) for a in reply.agents] == [(shared["id"], "")]
        await unauthenticated(registry.ListAgents(request, metadata=metadata, timeout=5))

    path = f"/api/v1/agents?search={word}"
    nonce = signing.new_nonce()
    headers = {
        "Authorization": f"Bearer {token}",
        signing.NONCE_HEADER: nonce,
        signing.SIGNATURE_HEADER: signing.sign("GET", path, "", token, nonce=nonce),
    }
    listed = await call(http, "GET", federation.b.url(path), headers=headers)
    assert [(a["id"], a.get("owner", "")) for a in listed["agents"]] == [(shared["id"], "")]
    await call(http, "GET", federation.b.url(path), headers=headers, expect=401)  # the same signature, replayed
