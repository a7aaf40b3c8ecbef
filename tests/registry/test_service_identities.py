"""Each mesh service calls the registry with its own OAuth client: it can do what it needs and nothing more."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from agentvault.common.services import (
    SERVICES,
    ServiceCredentials,
    format_service_secrets,
    identities,
    parse_service_secrets,
    service,
)
from agentvault.common.settings import Env, SettingsError
from agentvault.common.token_source import BearerInterceptor, GrpcTokenSource, TokenFetchFailed
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from agentvault_registry.settings import RegistrySettings

from ..conftest import MeshFactory, MeshHandle, bearer
from .oauth_helpers import verify
from .test_agents_grpc import make_agent

EXPECTED_SCOPES = {
    # ResolvePeers only: its searches forward the caller's own credential.
    "discovery": {"federation:resolve"},
    # ResolvePeers, ListAgents (health-check URLs), ReportPeerHealth, ReportAgentHealth, ResolveAgentAuth.
    "health-monitor": {"agents:read", "agents:connect", "federation:resolve", "health:report"},
    "messaging": {
        "agents:read",
        "agents:connect",
        "federation:resolve",
        "policies:read",
        "policies:enforce",
        "tools:sync",
    },
}


def _secrets(handle: MeshHandle) -> dict[str, str]:
    return parse_service_secrets(handle.env["SERVICE_CLIENT_SECRETS"])


class Identity:
    """A service's identity as the service itself uses it: a GrpcTokenSource and a channel adding its token."""

    def __init__(self, address: str, name: str, secret: str) -> None:
        self.plain = grpc.aio.insecure_channel(address)
        self.source = GrpcTokenSource(self.plain, address, service(name).client_id, secret)
        self.channel = grpc.aio.insecure_channel(address, interceptors=[BearerInterceptor(self.source)])
        self.registry = pb_grpc.RegistryServiceStub(self.channel)
        self.peers = fpb_grpc.PeerServiceStub(self.channel)
        self.identity = ipb_grpc.IdentityServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()
        await self.plain.close()


@pytest.fixture
async def identity(mesh: MeshHandle) -> AsyncIterator[Callable[[str], Identity]]:
    made: list[Identity] = []

    def make(name: str) -> Identity:
        made.append(Identity(mesh.address("registry"), name, _secrets(mesh)[name]))
        return made[-1]

    yield make
    for one in made:
        await one.close()


async def _refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def test_the_service_list_names_each_identity_and_its_scopes() -> None:
    assert {s.name: set(s.scopes) for s in identities()} == EXPECTED_SCOPES
    assert {s.name: s.client_id for s in identities()} == {
        "discovery": "svc-discovery",
        "health-monitor": "svc-health-monitor",
        "messaging": "svc-messaging",
    }
    # The edge forwards its callers' credentials; the registry is the authorization server.
    assert [s.name for s in SERVICES if s.authorization_server] == ["registry"]
    assert not service("edge").scopes and not service("edge").client_id


async def test_each_service_gets_a_token_with_exactly_its_scopes(
    mesh: MeshHandle, identity: Callable[[str], Identity]
) -> None:
    for name, scopes in EXPECTED_SCOPES.items():
        me = identity(name)
        token = await me.source.token()
        claims = await verify(ipb_grpc.IdentityServiceStub(me.plain), token)
        assert claims["client_id"] == claims["sub"] == f"svc-{name}"
        assert set(claims["scope"].split()) == scopes, name
        assert claims["avm_kind"] == "service"
        # Listed by the admin like any client, with the scopes of the service list.
        got = await ipb_grpc.IdentityServiceStub(me.plain).GetOAuthClient(
            ipb.GetOAuthClientRequest(client_id=f"svc-{name}"), metadata=bearer(mesh.admin_token)
        )
        assert set(got.scopes) == scopes and not got.disabled


async def test_secrets_are_stored_hashed_only(mesh: MeshHandle) -> None:
    conn = await asyncpg.connect(mesh.database_url)
    try:
        rows = await conn.fetch("SELECT * FROM oauth_clients WHERE client_id LIKE 'svc-%'")
    finally:
        await conn.close()
    by_id = {row["client_id"]: row for row in rows}
    for name, secret in _secrets(mesh).items():
        row = by_id[f"svc-{name}"]
        assert bytes(row["secret_hash"]) == hashlib.sha256(secret.encode()).digest()
        assert not any(secret in str(value) for value in row.values()), f"svc-{name}'s secret stored in clear"


async def test_discovery_may_resolve_peers_and_nothing_more(
    mesh: MeshHandle, identity: Callable[[str], Identity]
) -> None:
    me = identity("discovery")
    await me.peers.ResolvePeers(fpb.ResolvePeersRequest(), timeout=10)
    # Forbidden: creating an agent or a peer, listing peers with their details.
    err = await _refused(me.registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    peer = fpb.Peer(name="not-allowed", registry_url="https://not-allowed.example")
    err = await _refused(me.peers.CreatePeer(fpb.CreatePeerRequest(peer=peer), timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    # Not the health monitor's job either: reporting health, or reading the credentials with which to call agents.
    err = await _refused(
        me.registry.ResolveAgentAuth(pb.ResolveAgentAuthRequest(agent_id="00000000-0000-0000-0000-000000000000"))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "agents:connect" in (err.details() or "")
    err = await _refused(
        me.registry.ReportAgentHealth(
            pb.ReportAgentHealthRequest(
                id="00000000-0000-0000-0000-000000000000", health_status=pb.HEALTH_STATUS_HEALTHY
            ),
            timeout=10,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()


async def test_the_health_monitor_may_read_and_report_and_nothing_more(
    mesh: MeshHandle, identity: Callable[[str], Identity], registry: pb_grpc.RegistryServiceAsyncStub
) -> None:
    agent = await registry.CreateAgent(
        pb.CreateAgentRequest(agent=make_agent(health_check_url="http://127.0.0.1:9/health")),
        metadata=bearer(mesh.admin_token),
    )
    me = identity("health-monitor")
    await me.peers.ResolvePeers(fpb.ResolvePeersRequest(), timeout=10)
    listed = await me.registry.ListAgents(pb.ListAgentsRequest(has_health_check_url=True, page_size=500), timeout=10)
    assert agent.id in {a.id for a in listed.agents}
    reported = await me.registry.ReportAgentHealth(
        pb.ReportAgentHealthRequest(id=agent.id, health_status=pb.HEALTH_STATUS_UNHEALTHY), timeout=10
    )
    assert reported.health_status == pb.HEALTH_STATUS_UNHEALTHY
    # It reads the credentials with which to call an agent (the secret still encrypted).
    resolved = await me.registry.ResolveAgentAuth(pb.ResolveAgentAuthRequest(agent_id=agent.id), timeout=10)
    assert resolved.auth.kind == pb.AGENT_AUTH_KIND_NONE and resolved.encrypted_secret == ""
    # Forbidden: registering an OAuth client (it would mint itself more scopes), creating or deleting agents.
    err = await _refused(
        me.identity.CreateOAuthClient(
            ipb.CreateOAuthClientRequest(name="escalation", scopes=["admin"], grant_types=["client_credentials"]),
            timeout=10,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    err = await _refused(me.registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    err = await _refused(me.registry.DeleteAgent(pb.DeleteAgentRequest(id=agent.id), timeout=10))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()


async def test_a_wrong_secret_gets_no_token(mesh: MeshHandle) -> None:
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        wrong = GrpcTokenSource(channel, mesh.address("registry"), "svc-discovery", "w" * 43)
        with pytest.raises(TokenFetchFailed) as err:
            await wrong.token()
    assert err.value.metadata["error"] == "invalid_client"
    assert "w" * 43 not in str(err.value)


async def test_a_changed_secret_rotates_at_the_next_start_and_a_removed_one_disables(
    mesh_factory: MeshFactory,
) -> None:
    handle = mesh_factory(services=SERVICES[:1], name="svcid")
    address = handle.address("registry")
    old = _secrets(handle)

    async def fetch(name: str, secret: str) -> str:
        async with grpc.aio.insecure_channel(address) as channel:
            return await GrpcTokenSource(channel, address, f"svc-{name}", secret).token()

    async def restart(secrets: dict[str, str]) -> None:
        handle.env["SERVICE_CLIENT_SECRETS"] = format_service_secrets(secrets)
        await asyncio.to_thread(handle.mesh.stop_service, "registry")
        await asyncio.to_thread(handle.mesh.start_service, "registry")

    assert await fetch("discovery", old["discovery"])
    new = dict(old, discovery="n" * 43)
    await restart(new)
    with pytest.raises(TokenFetchFailed):
        await fetch("discovery", old["discovery"])
    assert await fetch("discovery", new["discovery"])
    assert await fetch("health-monitor", old["health-monitor"])

    # No secret configured for the health monitor any more: its client is disabled, its old secret refused.
    await restart({"discovery": new["discovery"]})
    with pytest.raises(TokenFetchFailed):
        await fetch("health-monitor", old["health-monitor"])
    # Configured again with a new secret: enabled again; an admin's disable is not undone with the same secret.
    await restart(dict(new, **{"health-monitor": "h" * 43}))
    assert await fetch("health-monitor", "h" * 43)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("discovery", "must be <service>=<secret>"),
        ("edge=" + "e" * 40, "unknown service 'edge'"),
        ("mailer=" + "m" * 40, "unknown service 'mailer'"),
        ("discovery=short", "at least 32 characters"),
        ("discovery=" + "a" * 40 + ",discovery=" + "b" * 40, "discovery is given twice"),
        ("discovery=CHANGE-ME-generate-with-openssl-rand-base64-32", "placeholder"),
    ],
)
def test_malformed_service_secrets_are_refused_naming_the_variable(value: str, message: str) -> None:
    env = Env({"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x", "SERVICE_CLIENT_SECRETS": value})
    with pytest.raises(SettingsError, match=message) as err:
        RegistrySettings.load(env)
    assert "SERVICE_CLIENT_SECRETS" in str(err.value)
    if "=" in value and len(value.split("=", 1)[1]) >= 32:
        assert value.split("=", 1)[1].split(",")[0] not in str(err.value), "a secret in an error message"


def test_a_service_reads_only_its_own_secret() -> None:
    secret = "s" * 43
    creds = ServiceCredentials.load("health-monitor", Env({"SERVICE_CLIENT_SECRET": secret}))
    assert (creds.client_id, creds.client_secret) == ("svc-health-monitor", secret)
    assert secret not in repr(creds)
    with pytest.raises(SettingsError, match="SERVICE_CLIENT_SECRET is required"):
        ServiceCredentials.load("health-monitor", Env({"AGENTVAULT_ADMIN_TOKEN": "a" * 43}))
    with pytest.raises(SettingsError, match="at least 32"):
        ServiceCredentials.load("discovery", Env({"SERVICE_CLIENT_SECRET": "short"}))
    settings = RegistrySettings.load(
        Env(
            {
                "DATABASE_URL": "postgresql://x/y",
                "REDIS_URL": "redis://x",
                "SERVICE_CLIENT_SECRETS": f"discovery={secret}",
            }
        )
    )
    assert settings.service_secrets == {"discovery": secret}
    assert secret not in repr(settings)


async def test_the_health_monitor_sees_private_agents_it_must_check(
    mesh: MeshHandle, identity: Callable[[str], Identity], registry: pb_grpc.RegistryServiceAsyncStub
) -> None:
    private = await registry.CreateAgent(
        pb.CreateAgentRequest(
            agent=make_agent(health_check_url="http://127.0.0.1:9/private", sharing=pb.SHARING_PRIVATE)
        ),
        metadata=bearer(mesh.admin_token),
    )
    me = identity("health-monitor")
    listed = await me.registry.ListAgents(pb.ListAgentsRequest(has_health_check_url=True, page_size=500), timeout=10)
    assert private.id in {a.id for a in listed.agents}
    # Only through that query: a plain listing shows it private agents no more than any non-owner.
    listed = await me.registry.ListAgents(pb.ListAgentsRequest(page_size=500), timeout=10)
    assert private.id not in {a.id for a in listed.agents}
    # Discovery (no health:report) never sees them.
    other = identity("discovery")
    err = await _refused(
        other.registry.ListAgents(pb.ListAgentsRequest(has_health_check_url=True, page_size=500), timeout=10)
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()


async def test_the_health_monitor_may_write_a_learned_route_and_no_other_peer_field(
    mesh: MeshHandle, identity: Callable[[str], Identity]
) -> None:
    admin_peers = fpb_grpc.PeerServiceStub(identity("discovery").plain)
    created = await admin_peers.CreatePeer(
        fpb.CreatePeerRequest(
            peer=fpb.Peer(
                name="learned-route", registry_url=f"https://learned-{id(admin_peers)}.example", api_key="avf_test"
            )
        ),
        metadata=bearer(mesh.admin_token),
    )
    me = identity("health-monitor")
    learned = fpb.Peer(id=created.id, protocol=fpb.PEER_PROTOCOL_GRPC, grpc_endpoint="peer.example:443")
    updated = await me.peers.UpdatePeer(
        fpb.UpdatePeerRequest(peer=learned, update_mask=field_mask_pb2.FieldMask(paths=["protocol", "grpc_endpoint"])),
        timeout=10,
    )
    assert updated.grpc_endpoint == "peer.example:443"
    for paths in (["registry_url"], ["protocol", "api_key"], []):
        peer = fpb.Peer(id=created.id, registry_url="https://elsewhere.example", api_key="stolen")
        err = await _refused(
            me.peers.UpdatePeer(
                fpb.UpdatePeerRequest(peer=peer, update_mask=field_mask_pb2.FieldMask(paths=paths)), timeout=10
            )
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (paths, err.details())


async def test_an_admin_cannot_change_a_services_own_client_through_the_api(
    mesh: MeshHandle, identity: Callable[[str], Identity]
) -> None:
    # SERVICE_CLIENT_SECRETS is the truth for these clients: a rotation, disable or delete through the API would
    # cut a service off until the next start undid it. An admin sees them, and changes them in the configuration.
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        admin = ipb_grpc.IdentityServiceStub(channel)
        md = bearer(mesh.admin_token)
        listed = await admin.ListOAuthClients(ipb.ListOAuthClientsRequest(page_size=100), metadata=md, timeout=10)
        assert {"svc-discovery", "svc-health-monitor"} <= {c.client_id for c in listed.clients}
        for call in (
            admin.RotateOAuthClientSecret(ipb.RotateOAuthClientSecretRequest(client_id="svc-discovery"), metadata=md),
            admin.DisableOAuthClient(ipb.DisableOAuthClientRequest(client_id="svc-health-monitor"), metadata=md),
            admin.EnableOAuthClient(ipb.EnableOAuthClientRequest(client_id="svc-health-monitor"), metadata=md),
            admin.DeleteOAuthClient(ipb.DeleteOAuthClientRequest(client_id="svc-discovery"), metadata=md),
        ):
            err = await _refused(call)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "SERVICE_CLIENT_SECRETS" in (err.details() or "")
    # Both services still get their tokens.
    for name in ("discovery", "health-monitor"):
        me = identity(name)
        assert await me.source.token()
