"""The registry's federation side over real gRPC: peer admin, issued credentials, and the signed peer API."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentvault.common import signing
from agentvault.devserver.mesh import SERVICES
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from agentvault_registry.servicer import CallerKind, caller_kind

from ..conftest import MeshFactory, MeshHandle, bearer, eventually, unique_did
from .test_agents_grpc import violations

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

SEARCH = "/agentvault.federation.v1.FederationService/SearchAgents"
LIST = "/agentvault.registry.v1.RegistryService/ListAgents"


class Registry:
    def __init__(self, handle: MeshHandle, channel: grpc.aio.Channel) -> None:
        self.handle = handle
        self.agents = pb_grpc.RegistryServiceStub(channel)
        self.peers = fpb_grpc.PeerServiceStub(channel)
        self.federation = fpb_grpc.FederationServiceStub(channel)
        self.channel = channel
        self.admin = bearer(handle.admin_token)


@pytest.fixture(scope="module")
async def reg(mesh_factory: MeshFactory) -> AsyncIterator[Registry]:
    handle = mesh_factory(
        services=SERVICES[:1],
        name="fedapi",
        env={"FEDERATION_RATE_LIMIT_PER_MINUTE": "40", "TRUST_VIOLATION_FLOOR": "blocked"},
    )
    async with grpc.aio.insecure_channel(handle.address("registry")) as channel:
        yield Registry(handle, channel)


def signed(
    token: str,
    request: fpb.SearchAgentsRequest | pb.ListAgentsRequest,
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
    registry: str = "mesh-test",
    method: str = SEARCH,
) -> list[tuple[str, str]]:
    nonce = signing.new_nonce() if nonce is None else nonce
    signature = signing.sign(
        signing.GRPC_METHOD,
        method,
        signing.grpc_body(request.SerializeToString(deterministic=True)),
        token,
        timestamp=timestamp,
        nonce=nonce,
    )
    return [
        ("authorization", f"Bearer {token}"),
        (signing.SIGNATURE_HEADER, signature),
        (signing.NONCE_HEADER, nonce),
        (signing.REGISTRY_HEADER, registry),
    ]


async def issue(reg: Registry, name: str = "mesh-test") -> str:
    reply = await reg.peers.CreateFederationCredential(
        fpb.CreateFederationCredentialRequest(name=name), metadata=reg.admin
    )
    assert reply.token.startswith("avf_") and reply.credential.name == name
    return str(reply.token)


async def add_agent(reg: Registry, word: str, sharing: int) -> pb.Agent:
    agent = pb.Agent(
        did=unique_did(),
        name=f"{word} agent",
        version="1.0.0",
        sharing=sharing,  # type: ignore[arg-type]
        health_check_url="https://internal.example/health",
        capabilities=[pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name="lookup", version="1.2.0")],
    )
    return await reg.agents.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=reg.admin)


async def test_peer_admin_roundtrip_keeps_key_secret(reg: Registry) -> None:
    secret = "their-federation-token-" + unique_did()[-12:]
    peer = await reg.peers.CreatePeer(
        fpb.CreatePeerRequest(
            peer=fpb.Peer(name="Partner Registry", registry_url="https://partner.example/", api_key=secret)
        ),
        metadata=reg.admin,
    )
    assert peer.is_active and peer.registry_url == "https://partner.example" and peer.api_key == ""
    assert peer.health_status == fpb.PEER_STATUS_UNSPECIFIED
    listed = await reg.peers.ListPeers(fpb.ListPeersRequest(), metadata=reg.admin)
    assert peer.id in {p.id for p in listed.peers} and secret not in str(listed)

    conn = await asyncpg.connect(reg.handle.database_url)
    try:
        rows = await conn.fetch("SELECT * FROM federation_peers")
    finally:
        await conn.close()
    assert rows and all(secret not in str(dict(r)) for r in rows)

    # The seed's `PUT {"is_active": false}`: only the fields sent change.
    disabled = await reg.peers.UpdatePeer(
        fpb.UpdatePeerRequest(peer=fpb.Peer(id=peer.id, is_active=False)), metadata=reg.admin
    )
    assert not disabled.is_active and disabled.name == "Partner Registry"
    resolved = await reg.peers.ResolvePeers(fpb.ResolvePeersRequest(), metadata=reg.admin)
    assert peer.id not in {p.peer.id for p in resolved.peers}  # inactive peers are not queried

    enabled = await reg.peers.UpdatePeer(
        fpb.UpdatePeerRequest(peer=fpb.Peer(id=peer.id, is_active=True)), metadata=reg.admin
    )
    resolved = await reg.peers.ResolvePeers(fpb.ResolvePeersRequest(), metadata=reg.admin)
    entry = next(p for p in resolved.peers if p.peer.id == enabled.id)
    assert entry.encrypted_api_key and secret not in entry.encrypted_api_key

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reg.peers.CreatePeer(
            fpb.CreatePeerRequest(peer=fpb.Peer(name="Dup", registry_url="https://partner.example", api_key="k")),
            metadata=reg.admin,
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    await reg.peers.DeletePeer(fpb.DeletePeerRequest(peer_id=peer.id), metadata=reg.admin)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reg.peers.GetPeer(fpb.GetPeerRequest(peer_id=peer.id), metadata=reg.admin)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("peer", "field"),
    [
        (fpb.Peer(name="", registry_url="https://a.example", api_key="k"), "peer.name"),
        (fpb.Peer(name="x", registry_url="ftp://a.example", api_key="k"), "peer.registry_url"),
        (fpb.Peer(name="x", registry_url="https://a.example?q=1", api_key="k"), "peer.registry_url"),
        (fpb.Peer(name="x", registry_url="https://a.example", api_key=""), "peer.api_key"),
        (fpb.Peer(name="x", registry_url="https://a.example", api_key="k" * 600), "peer.api_key"),
        (fpb.Peer(name="x", registry_url="https://a.example", api_key="k", grpc_endpoint="nope"), "peer.grpc_endpoint"),
    ],
)
async def test_peer_input_is_validated(reg: Registry, peer: fpb.Peer, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reg.peers.CreatePeer(fpb.CreatePeerRequest(peer=peer), metadata=reg.admin)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")


async def test_peer_admin_needs_admin(reg: Registry) -> None:
    key = await reg.agents.CreateApiKey(pb.CreateApiKeyRequest(name="member-x"), metadata=reg.admin)
    for call in (
        reg.peers.ListPeers(fpb.ListPeersRequest(), metadata=bearer(key.token)),
        reg.peers.ResolvePeers(fpb.ResolvePeersRequest(), metadata=bearer(key.token)),
        reg.peers.CreateFederationCredential(
            fpb.CreateFederationCredentialRequest(name="x"), metadata=bearer(key.token)
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reg.peers.ListPeers(fpb.ListPeersRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_signed_search_returns_only_shared_fields(reg: Registry) -> None:
    token = await issue(reg, "mesh-share")
    word = "fedshare" + unique_did()[-6:].replace("-", "")
    shared = await add_agent(reg, word, pb.SHARING_FEDERATED)
    await add_agent(reg, word, pb.SHARING_LOCAL)
    await add_agent(reg, word, pb.SHARING_PRIVATE)
    request = fpb.SearchAgentsRequest(search=word)
    reply = await reg.federation.SearchAgents(request, metadata=signed(token, request))
    assert [a.id for a in reply.agents] == [shared.id]
    assert reply.agents[0].owner == "" and reply.agents[0].health_check_url == ""
    assert reply.agents[0].capabilities[0].version == "1.2.0"

    # The inbound log is written in batches, off the request path.
    async def logged() -> None:
        conn = await asyncpg.connect(reg.handle.database_url)
        try:
            row = await conn.fetchrow(
                "SELECT * FROM federation_inbound_log WHERE peer_name = 'mesh-share' ORDER BY id DESC LIMIT 1"
            )
        finally:
            await conn.close()
        assert row is not None and row["result_count"] == 1 and row["peer_registry"] == "mesh-test"
        assert json.loads(row["query"]) == {"search": word} and row["method"] == "SearchAgents"

    await eventually(logged)


async def test_federation_rejects_bad_credentials_and_signatures(reg: Registry) -> None:
    token = await issue(reg, "mesh-sig")
    request = fpb.SearchAgentsRequest(search="anything")

    async def code(metadata: list[tuple[str, str]], req: fpb.SearchAgentsRequest = request) -> tuple[object, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reg.federation.SearchAgents(req, metadata=metadata)
        return err.value.code(), err.value.details() or ""

    assert (await code([]))[0] == grpc.StatusCode.UNAUTHENTICATED
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert (await code(signed(wrong, request)))[0] == grpc.StatusCode.UNAUTHENTICATED
    unsigned = [("authorization", f"Bearer {token}")]
    status, message = await code(unsigned)
    assert status == grpc.StatusCode.UNAUTHENTICATED and "signed" in message
    stale = signed(token, request, timestamp=int(time.time()) - 3600)
    status, message = await code(stale)
    assert status == grpc.StatusCode.UNAUTHENTICATED and "expired" in message
    future = signed(token, request, timestamp=int(time.time()) + 3600)
    status, message = await code(future)
    assert status == grpc.StatusCode.UNAUTHENTICATED and "future" in message
    # A signature over one request does not authorize another.
    tampered = signed(token, request)
    status, message = await code(tampered, fpb.SearchAgentsRequest(search="something else"))
    assert status == grpc.StatusCode.UNAUTHENTICATED and "does not match" in message
    # The same signed request is accepted once.
    once = signed(token, request)
    await reg.federation.SearchAgents(request, metadata=once)
    status, message = await code(once)
    assert status == grpc.StatusCode.UNAUTHENTICATED and "replayed" in message


async def test_revoked_federation_credential_is_refused(reg: Registry) -> None:
    token = await issue(reg, "mesh-revoked")
    request = fpb.SearchAgentsRequest()
    await reg.federation.SearchAgents(request, metadata=signed(token, request))
    cred_id = token.split("_")[1]

    async def used() -> None:
        listed = await reg.peers.ListFederationCredentials(fpb.ListFederationCredentialsRequest(), metadata=reg.admin)
        assert next(c for c in listed.credentials if c.id == cred_id).last_used_time.seconds > 0

    await eventually(used)
    revoked = await reg.peers.RevokeFederationCredential(
        fpb.RevokeFederationCredentialRequest(id=cred_id), metadata=reg.admin
    )
    assert revoked.revoke_time.seconds > 0 and revoked.last_used_time.seconds > 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reg.federation.SearchAgents(request, metadata=signed(token, request))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    listed = await reg.peers.ListFederationCredentials(fpb.ListFederationCredentialsRequest(), metadata=reg.admin)
    assert cred_id in {c.id for c in listed.credentials} and token not in str(listed)


async def test_federation_rate_limit_per_peer(reg: Registry) -> None:
    token = await issue(reg, "mesh-greedy")
    other = await issue(reg, "mesh-polite")
    request = fpb.SearchAgentsRequest()
    codes = []
    for _ in range(45):
        try:
            await reg.federation.SearchAgents(request, metadata=signed(token, request))
            codes.append("OK")
        except grpc.aio.AioRpcError as err:
            codes.append(err.code().name)
    assert "RESOURCE_EXHAUSTED" in codes and codes.count("OK") <= 40
    # The refusal says when to come back: a google.rpc.RetryInfo (the edge's Retry-After) within the minute.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reg.federation.SearchAgents(request, metadata=signed(token, request))
    status = rpc_status.from_call(err.value)
    assert status is not None
    infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.RetryInfo()
    infos[0].Unpack(info)
    assert 1 <= info.retry_delay.seconds <= 61
    # Another peer is not limited by the first one's traffic.
    await reg.federation.SearchAgents(request, metadata=signed(other, request))


async def test_federation_info_and_health_report(reg: Registry) -> None:
    info = await reg.federation.GetFederationInfo(fpb.GetFederationInfoRequest())
    assert info.protocol == "agentvault-grpc/v1" and info.grpc_endpoint.endswith(str(reg.handle.mesh.port("registry")))
    peer = await reg.peers.CreatePeer(
        fpb.CreatePeerRequest(peer=fpb.Peer(name="Health", registry_url="https://health.example", api_key="k")),
        metadata=reg.admin,
    )
    reported = await reg.peers.ReportPeerHealth(
        fpb.ReportPeerHealthRequest(peer_id=peer.id, status=fpb.PEER_STATUS_HEALTHY, agent_count=150),
        metadata=reg.admin,
    )
    assert reported.health_status == fpb.PEER_STATUS_HEALTHY and reported.agent_count == 150
    assert reported.last_sync.seconds > 0 and reported.last_health_check.seconds > 0
    down = await reg.peers.ReportPeerHealth(
        fpb.ReportPeerHealthRequest(
            peer_id=peer.id, status=fpb.PEER_STATUS_TIMEOUT, is_down=True, consecutive_failures=3
        ),
        metadata=reg.admin,
    )
    assert down.is_down and down.agent_count == 150 and down.health_status == fpb.PEER_STATUS_TIMEOUT
    # The status is required, and a number this build does not know is a field violation.
    for status, description in ((0, "is required"), (99, "unknown value 99")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reg.peers.ReportPeerHealth(
                fpb.ReportPeerHealthRequest(peer_id=peer.id, status=status),  # type: ignore[arg-type]
                metadata=reg.admin,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value) == {"status": description}
    for protocol in (fpb.PEER_PROTOCOL_UNSPECIFIED, fpb.PEER_PROTOCOL_GRPC, fpb.PEER_PROTOCOL_REST):
        updated = await reg.peers.UpdatePeer(
            fpb.UpdatePeerRequest(
                peer=fpb.Peer(id=peer.id, protocol=protocol), update_mask=field_mask_pb2.FieldMask(paths=["protocol"])
            ),
            metadata=reg.admin,
        )
        assert updated.protocol == protocol


def test_the_caller_kind_is_read_from_the_credential_form() -> None:
    assert caller_kind([]) is CallerKind.ANONYMOUS
    assert caller_kind(bearer("avf_0123456789abcdef_secret")) is CallerKind.PEER
    assert caller_kind(bearer("avk_0123456789abcdef_secret")) is CallerKind.MEMBER
    assert caller_kind(bearer("bootstrap-admin-token")) is CallerKind.MEMBER
    # Malformed: the member path refuses it (MALFORMED_CREDENTIAL), it never reaches the peer listing.
    assert caller_kind([("authorization", "Basic avf_0123456789abcdef_secret")]) is CallerKind.MEMBER


async def inbound_rows(reg: Registry, peer_name: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(reg.handle.database_url)
    try:
        return await conn.fetch("SELECT * FROM federation_inbound_log WHERE peer_name = $1 ORDER BY id", peer_name)
    finally:
        await conn.close()


async def test_list_agents_answers_a_peer_through_the_peer_listing_only(reg: Registry) -> None:
    """ListAgents with a federation token (the seed's form older meshes use) is the peer listing: federated agents
    only, without owner or health-check address, one page, signed, counted and logged. Members and admins never
    get peers' rules: they see what their principal may, with every field and paging, and are not logged."""
    token = await issue(reg, "mesh-lister")
    word = "fedlist" + unique_did()[-6:].replace("-", "")
    shared = await add_agent(reg, word, pb.SHARING_FEDERATED)
    local = await add_agent(reg, word, pb.SHARING_LOCAL)
    private = await add_agent(reg, word, pb.SHARING_PRIVATE)

    # A peer: its member-only filters (sharing, owner, page token) cannot widen or change what it is shown.
    for request in (
        pb.ListAgentsRequest(search=word),
        pb.ListAgentsRequest(search=word, sharing=pb.SHARING_PRIVATE),
        pb.ListAgentsRequest(search=word, owner=private.owner, page_size=1),
    ):
        reply = await reg.agents.ListAgents(request, metadata=signed(token, request, method=LIST))
        assert [a.id for a in reply.agents] == [shared.id]
        assert reply.agents[0].owner == "" and reply.agents[0].health_check_url == ""
        assert reply.next_page_token == ""
    # The peer path's gate applies: an unsigned peer call is refused, never answered as an anonymous listing.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reg.agents.ListAgents(pb.ListAgentsRequest(search=word), metadata=bearer(token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "signed" in (err.value.details() or "")

    async def logged() -> None:
        rows = await inbound_rows(reg, "mesh-lister")
        assert [(r["method"], r["result_count"]) for r in rows] == [("ListAgents", 1)] * 3

    await eventually(logged)

    # An admin: everything, owners and health-check addresses included, with paging.
    reply = await reg.agents.ListAgents(pb.ListAgentsRequest(search=word), metadata=reg.admin)
    assert {a.id for a in reply.agents} == {shared.id, local.id, private.id}
    assert all(a.owner and a.health_check_url for a in reply.agents)
    first = await reg.agents.ListAgents(pb.ListAgentsRequest(search=word, page_size=1), metadata=reg.admin)
    assert len(first.agents) == 1 and first.next_page_token
    # Anyone: local agents too (peers never see them), with their owner.
    reply = await reg.agents.ListAgents(pb.ListAgentsRequest(search=word))
    assert {a.id for a in reply.agents} == {shared.id, local.id}
    assert all(a.owner for a in reply.agents)
    # Members' and admins' listings are not peers' queries: still the peer's three rows only.
    assert len(await inbound_rows(reg, "mesh-lister")) == 3


async def test_a_peers_violations_drop_its_trust_until_it_is_blocked(reg: Registry) -> None:
    # Bad signatures from a peer holding a valid token count against its connection: at TRUST_VIOLATION_LIMIT (5)
    # within the window its trust drops a level, from untrusted to blocked (this mesh lets the rules block:
    # TRUST_VIOLATION_FLOOR), and a blocked peer is shut out.
    token = await issue(reg, "mesh-abusive")
    request = fpb.SearchAgentsRequest(search="x")
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reg.federation.SearchAgents(request, metadata=[("authorization", f"Bearer {token}")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reg.federation.SearchAgents(request, metadata=signed(token, request))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "blocked" in (err.value.details() or "")
    policies = ppb_grpc.PolicyServiceStub(reg.channel)
    found = await policies.ListConnections(ppb.ListConnectionsRequest(trust_level="blocked"), metadata=reg.admin)
    peer = next(c for c in found.connections if c.caller_kind == "peer" and c.caller_id == "mesh-abusive")
    detail = await policies.GetConnection(ppb.GetConnectionRequest(id=peer.id), metadata=reg.admin)
    assert detail.recent_changes[0].from_level == "untrusted" and "signed" in detail.recent_changes[0].reason
    # An admin lets it back in.
    await policies.SetTrustLevel(
        ppb.SetTrustLevelRequest(id=peer.id, trust_level="untrusted", reason="clock fixed"), metadata=reg.admin
    )

    async def admitted() -> None:
        try:
            await reg.federation.SearchAgents(request, metadata=signed(token, request))
        except grpc.aio.AioRpcError as exc:
            raise AssertionError(exc.details()) from None

    await eventually(admitted, 10)
