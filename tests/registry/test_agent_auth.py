"""How the mesh authenticates to an agent, as stored by the registry: validated, secrets encrypted and never shown,
the configuration only to the owner, admins and the services that call agents, never to peers."""

from __future__ import annotations

import secrets
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from agentvault.common.secretbox import SecretBox
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshHandle, bearer, unique_did
from .test_agents_grpc import make_agent, member_token, violations
from .test_federation_api import signed

TOKEN_URL = "https://login.example.com/oauth2/token"


def oauth(secret: str = "", **overrides: Any) -> pb.AgentAuth:
    fields: dict[str, Any] = {
        "kind": pb.AGENT_AUTH_KIND_OAUTH2_CLIENT_CREDENTIALS,
        "token_url": TOKEN_URL,
        "client_id": "mesh-client",
        "client_secret": secret,
        "scopes": ["agent.read", "agent.call"],
        "audience": "https://agent.example.com",
    }
    fields.update(overrides)
    return pb.AgentAuth(**fields)


async def stored_secret(mesh: MeshHandle, agent_id: str) -> str | None:
    conn = await asyncpg.connect(mesh.database_url)
    try:
        return await conn.fetchval("SELECT auth_secret FROM agents WHERE id = $1::uuid", agent_id)  # type: ignore[no-any-return]
    finally:
        await conn.close()


def box(mesh: MeshHandle) -> SecretBox:
    return SecretBox([k for k in mesh.env["FEDERATION_ENCRYPTION_KEYS"].split(",") if k])


async def test_the_secret_is_encrypted_and_never_returned(
    mesh: MeshHandle, registry: pb_grpc.RegistryServiceStub, http: aiohttp.ClientSession
) -> None:
    owner = await member_token(registry, mesh.admin_token, "auth-owner")
    secret = "s3cret-" + secrets.token_urlsafe(24)
    created = await registry.CreateAgent(
        pb.CreateAgentRequest(agent=make_agent(auth=oauth(secret))), metadata=bearer(owner)
    )
    # The owner sees the configuration, told only that a secret is stored.
    assert created.auth.kind == pb.AGENT_AUTH_KIND_OAUTH2_CLIENT_CREDENTIALS
    assert created.auth.secret_set and created.auth.client_secret == ""
    assert created.auth.token_endpoint_auth_method == "client_secret_basic"  # the default, filled in
    assert secret not in str(created)

    # At rest: a Fernet token under the mesh's key ring, not the plaintext.
    column = await stored_secret(mesh, created.id)
    assert column is not None and secret not in column
    assert box(mesh).decrypt(column) == secret

    for reply in (
        await registry.GetAgent(pb.GetAgentRequest(id=created.id), metadata=bearer(owner)),
        await registry.GetAgent(pb.GetAgentRequest(id=created.id), metadata=bearer(mesh.admin_token)),
    ):
        assert reply.auth.secret_set and reply.auth.client_id == "mesh-client" and secret not in str(reply)
    listed = await registry.ListAgents(pb.ListAgentsRequest(owner=created.owner), metadata=bearer(owner))
    assert [a.auth.secret_set for a in listed.agents] == [True] and secret not in str(listed)

    # Through the edge: the owner's JSON has the configuration and never a secret field.
    headers = {"Authorization": f"Bearer {owner}"}
    async with http.get(mesh.url(f"/api/v1/agents/{created.id}"), headers=headers) as response:
        text = await response.text()
        assert response.status == 200, text
        body = await response.json()
    assert secret not in text and "client_secret" not in body["auth"]
    assert body["auth"]["kind"] == "oauth2_client_credentials" and body["auth"]["secret_set"] is True


async def test_only_the_owner_admins_and_connecting_services_see_auth(
    mesh: MeshHandle, registry: pb_grpc.RegistryServiceStub
) -> None:
    owner = await member_token(registry, mesh.admin_token, "auth-owner2")
    other = await member_token(registry, mesh.admin_token, "auth-other")
    word = "authvis" + secrets.token_hex(4)
    agent = make_agent(
        name=f"{word} agent",
        sharing=pb.SHARING_FEDERATED,
        auth=pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_API_KEY, api_key="k-" + secrets.token_hex(16)),
    )
    created = await registry.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=bearer(owner))
    assert created.auth.api_key_header == "X-API-Key"

    # Another member and anonymous callers see the agent, not how the mesh reaches it.
    for metadata in (bearer(other), ()):
        got = await registry.GetAgent(pb.GetAgentRequest(id=created.id), metadata=metadata)
        assert got.name == created.name and not got.HasField("auth")
        listed = await registry.ListAgents(pb.ListAgentsRequest(search=word), metadata=metadata)
        assert [a.id for a in listed.agents] == [created.id] and not listed.agents[0].HasField("auth")
    # The cached answer the others got did not lose it for the owner.
    got = await registry.GetAgent(pb.GetAgentRequest(id=created.id), metadata=bearer(owner))
    assert got.auth.kind == pb.AGENT_AUTH_KIND_API_KEY

    # A peer mesh never sees it, whichever way it asks.
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        peers = fpb_grpc.PeerServiceStub(channel)
        federation = fpb_grpc.FederationServiceStub(channel)
        issued = await peers.CreateFederationCredential(
            fpb.CreateFederationCredentialRequest(name="auth-peer-" + secrets.token_hex(3)),
            metadata=bearer(mesh.admin_token),
        )
        search = fpb.SearchAgentsRequest(search=word)
        found = await federation.SearchAgents(search, metadata=signed(issued.token, search))
        assert [a.id for a in found.agents] == [created.id] and not found.agents[0].HasField("auth")
        listing = pb.ListAgentsRequest(search=word)
        path = "/agentvault.registry.v1.RegistryService/ListAgents"
        listed = await registry.ListAgents(listing, metadata=signed(issued.token, listing, method=path))
        assert [a.id for a in listed.agents] == [created.id] and not listed.agents[0].HasField("auth")


async def test_resolve_agent_auth_needs_agents_connect(mesh: MeshHandle, registry: pb_grpc.RegistryServiceStub) -> None:
    owner = await member_token(registry, mesh.admin_token, "auth-resolver")
    secret = "bearer-" + secrets.token_hex(16)
    agent = make_agent(auth=pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_BEARER, bearer_token=secret))
    created = await registry.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=bearer(owner))
    request = pb.ResolveAgentAuthRequest(agent_id=created.id)
    # Not even the owner: an agent's secret leaves the registry only for the services that call agents.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.ResolveAgentAuth(request, metadata=bearer(owner))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "agents:connect" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.ResolveAgentAuth(request)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    resolved = await registry.ResolveAgentAuth(request, metadata=bearer(mesh.admin_token))
    assert resolved.auth.kind == pb.AGENT_AUTH_KIND_BEARER and resolved.auth.bearer_token == ""
    assert secret not in resolved.encrypted_secret and box(mesh).decrypt(resolved.encrypted_secret) == secret
    assert resolved.update_time == created.update_time


async def test_an_update_keeps_or_requires_the_secret(mesh: MeshHandle, registry: pb_grpc.RegistryServiceStub) -> None:
    owner = await member_token(registry, mesh.admin_token, "auth-updater")
    secret = "first-" + secrets.token_hex(16)
    created = await registry.CreateAgent(
        pb.CreateAgentRequest(agent=make_agent(auth=oauth(secret))), metadata=bearer(owner)
    )
    before = await stored_secret(mesh, created.id)
    mask = field_mask_pb2.FieldMask(paths=["auth"])

    async def update(auth: pb.AgentAuth) -> pb.Agent:
        return await registry.UpdateAgent(
            pb.UpdateAgentRequest(agent=pb.Agent(id=created.id, auth=auth), update_mask=mask), metadata=bearer(owner)
        )

    # Same kind, same endpoint and client, no secret sent: the stored one stays.
    kept = await update(oauth(scopes=["agent.read"]))
    assert kept.auth.secret_set and list(kept.auth.scopes) == ["agent.read"]
    assert await stored_secret(mesh, created.id) == before
    # An update of other fields leaves auth alone.
    renamed = await registry.UpdateAgent(
        pb.UpdateAgentRequest(
            agent=pb.Agent(id=created.id, name="Renamed"), update_mask=field_mask_pb2.FieldMask(paths=["name"])
        ),
        metadata=bearer(owner),
    )
    assert renamed.auth.secret_set and await stored_secret(mesh, created.id) == before

    # Another kind that needs a secret, or the stored secret sent to another token endpoint: it must be given.
    for auth, field in (
        (pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_API_KEY), "agent.auth.api_key"),
        (oauth(token_url="https://elsewhere.example.com/token"), "agent.auth.client_secret"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await update(auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in violations(err.value), violations(err.value)
    assert await stored_secret(mesh, created.id) == before

    # A new secret replaces it; a kind without one clears it.
    replaced = await update(oauth("second-" + secrets.token_hex(8)))
    after = await stored_secret(mesh, created.id)
    assert replaced.auth.secret_set and after is not None and after != before
    mtls = await update(pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_MTLS))
    assert mtls.auth.kind == pb.AGENT_AUTH_KIND_MTLS and not mtls.auth.secret_set
    assert await stored_secret(mesh, created.id) is None
    # Kind none (or no auth at all) reads as before: no auth field.
    none = await update(pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_NONE))
    assert not none.HasField("auth")


BAD_AUTH = [
    (oauth("x", token_url="http://login.example.com/token"), "agent.auth.token_url"),
    (oauth("x", token_url="ftp://login.example.com/token"), "agent.auth.token_url"),
    (oauth("x", token_url="https://169.254.169.254/token"), "agent.auth.token_url"),
    (oauth("x", token_url="https://user:pw@login.example.com/token"), "agent.auth.token_url"),
    (oauth("x", client_id=""), "agent.auth.client_id"),
    (oauth("x", scopes=["a b"]), "agent.auth.scopes[0]"),
    (oauth("x", token_endpoint_auth_method="private_key_jwt"), "agent.auth.token_endpoint_auth_method"),
    (oauth("x" * 4097), "agent.auth.client_secret"),
    (oauth(""), "agent.auth.client_secret"),
    (pb.AgentAuth(kind=99), "agent.auth.kind"),  # type: ignore[arg-type]
    (pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_API_KEY), "agent.auth.api_key"),
    (pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_API_KEY, api_key="a\r\nX-Evil: 1"), "agent.auth.api_key"),
    (pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_API_KEY, api_key="k", api_key_header="Host"), "agent.auth.api_key_header"),
    (pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_API_KEY, api_key="k", api_key_header="X Key"), "agent.auth.api_key_header"),
    (pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_BEARER, bearer_token="has space"), "agent.auth.bearer_token"),
    (pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_BEARER, bearer_token="t", client_id="c"), "agent.auth.client_id"),
    (pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_NONE, api_key="k"), "agent.auth.api_key"),
    (pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_MTLS, ca_pem="not a certificate"), "agent.auth.ca_pem"),
    (pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_MTLS, ca_pem="x" * (16 * 1024 + 1)), "agent.auth.ca_pem"),
]


@pytest.mark.parametrize(("auth", "field"), BAD_AUTH, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_AUTH)])
async def test_bad_auth_is_refused_with_field_violations(
    mesh: MeshHandle, registry: pb_grpc.RegistryServiceStub, auth: pb.AgentAuth, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateAgent(
            pb.CreateAgentRequest(agent=make_agent(auth=auth)), metadata=bearer(mesh.admin_token)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(err.value), violations(err.value)


async def test_bad_auth_through_the_edge_is_a_400(mesh: MeshHandle, http: aiohttp.ClientSession) -> None:
    agent = {
        "did": unique_did(),
        "name": "Edge auth",
        "version": "1.0.0",
        "auth": {"kind": "oauth2_client_credentials", "token_url": "http://login.example.com/t", "client_id": "c"},
    }
    headers = {"Authorization": f"Bearer {mesh.admin_token}"}
    async with http.post(mesh.url("/api/v1/agents"), json=agent, headers=headers) as response:
        body = await response.json()
        assert response.status == 400, body
    fields = {
        v["field"]
        for d in body["error"]["details"]
        if d["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        for v in d["field_violations"]
    }
    assert {"agent.auth.token_url", "agent.auth.client_secret"} <= fields, body
    # An unknown kind word is refused too, not read as none.
    agent["auth"] = {"kind": "kerberos"}
    async with http.post(mesh.url("/api/v1/agents"), json=agent, headers=headers) as response:
        assert response.status == 400, await response.text()
