"""RegistryClient against a real registry process: CRUD, paging, and the typed errors with their details."""

from __future__ import annotations

import asyncio
import secrets
import uuid

import grpc
import pytest

from agentvault.client import (
    AlreadyExistsError,
    ClientError,
    DiscoveryClient,
    FederationClient,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RegistryClient,
    UnauthenticatedError,
    build_agent,
)
from agentvault.registry.v1 import registry_service_pb2 as pb
from tests.conftest import MeshHandle, unique_did


def sample_agent(label: str = "client", **overrides: object) -> pb.Agent:
    values: dict[str, object] = {
        "did": unique_did(label),
        "name": f"Client test {label}",
        "version": "1.0.0",
        "description": "summarizes documents",
        "agent_type": "assistant",
        "tags": ["client-test"],
        "capabilities": [{"kind": "skill", "name": "summarize", "version": "1.2.0"}],
        "endpoints": [{"protocol": "http", "url": "https://agent.example/api"}],
        "sharing": "federated",
        **overrides,
    }
    return build_agent(**values)  # type: ignore[arg-type]


async def test_crud_round_trip(admin: RegistryClient) -> None:
    created = await admin.create_agent(sample_agent())
    assert created.id
    assert created.owner == "prn_bootstrap_admin"
    assert created.sharing == pb.SHARING_FEDERATED
    assert created.capabilities[0].kind == pb.CAPABILITY_KIND_SKILL
    assert created.endpoints[0].protocol == pb.PROTOCOL_HTTP

    fetched = await admin.get_agent(created.id)
    assert fetched == created

    change = pb.Agent(id=created.id, description="now translates too", tags=["client-test", "translate"])
    updated = await admin.update_agent(change, ["description", "tags"])
    assert updated.description == "now translates too"
    assert list(updated.tags) == ["client-test", "translate"]
    # Fields outside the mask keep their values although `change` left them empty.
    assert updated.name == created.name
    assert updated.capabilities == created.capabilities

    listed = await admin.list_agents(tag="translate", capability_name="summarize", capability_version="^1.0")
    assert created.id in [a.id for a in listed.agents]
    found = await admin.search_agents("translates", sharing="federated")
    assert created.id in [a.id for a in found.agents]

    await admin.delete_agent(created.id)
    with pytest.raises(NotFoundError):
        await admin.get_agent(created.id)


async def test_health(anonymous: RegistryClient) -> None:
    reply = await anonymous.health()
    assert reply.status in (pb.HEALTH_STATUS_HEALTHY, pb.HEALTH_STATUS_DEGRADED)


async def test_iter_agents_follows_every_page(admin: RegistryClient) -> None:
    tag = f"paging-{secrets.token_hex(4)}"
    ids = {(await admin.create_agent(sample_agent("paging", tags=[tag]))).id for _ in range(7)}

    first = await admin.list_agents(tag=tag, page_size=3)
    assert len(first.agents) == 3
    assert first.next_page_token

    seen = [a.id async for a in admin.iter_agents(tag=tag, page_size=3)]
    assert len(seen) == 7, "every page fetched, nothing twice"
    assert set(seen) == ids


async def test_not_found_carries_error_info(admin: RegistryClient) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(NotFoundError) as caught:
        await admin.get_agent(missing)
    err = caught.value
    assert isinstance(err, ClientError)
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.reason == "AGENT_NOT_FOUND"
    assert err.domain == "agentvault.io"
    assert err.metadata.get("id") == missing
    assert len(err.request_id) == 32


async def test_invalid_argument_lists_every_field_violation(admin: RegistryClient) -> None:
    bad = sample_agent(version="not-semver", capabilities=[{"kind": "tool", "name": "x", "version": "one"}])
    with pytest.raises(InvalidArgumentError) as caught:
        await admin.create_agent(bad)
    fields = {v.field for v in caught.value.field_violations}
    assert {"agent.version", "agent.capabilities[0].version"} <= fields
    assert all(v.description for v in caught.value.field_violations)


async def test_duplicate_did_is_already_exists(admin: RegistryClient) -> None:
    agent = sample_agent("dup")
    await admin.create_agent(agent)
    with pytest.raises(AlreadyExistsError) as caught:
        await admin.create_agent(agent)
    assert caught.value.reason == "AGENT_DID_EXISTS"
    assert caught.value.metadata["did"] == agent.did


async def test_missing_and_bad_credentials_are_unauthenticated(
    anonymous: RegistryClient, client_mesh: MeshHandle
) -> None:
    with pytest.raises(UnauthenticatedError) as caught:
        await anonymous.create_agent(sample_agent())
    assert caught.value.reason == "CREDENTIAL_MISSING"

    bogus = "avk_0123456789abcdef_" + secrets.token_urlsafe(16)
    async with RegistryClient(client_mesh.address("registry"), token=bogus) as client:
        with pytest.raises(UnauthenticatedError) as caught:
            await client.list_api_keys()
    assert caught.value.reason == "INVALID_CREDENTIAL"


async def test_member_cannot_change_another_members_agent(admin: RegistryClient, client_mesh: MeshHandle) -> None:
    address = client_mesh.address("registry")
    alice = await admin.create_api_key(f"alice-{secrets.token_hex(3)}", "member")
    bob = await admin.create_api_key(f"bob-{secrets.token_hex(3)}")
    assert bob.api_key.role == pb.ROLE_MEMBER, "member is the default role"

    async with (
        RegistryClient(address, token=alice.token) as as_alice,
        RegistryClient(address, token=bob.token) as as_bob,
    ):
        agent = await as_alice.create_agent(sample_agent("alice"))
        assert agent.owner == alice.api_key.principal_id == (await as_alice.caller()).principal_id
        with pytest.raises(PermissionDeniedError) as caught:
            await as_bob.update_agent(pb.Agent(id=agent.id, name="stolen"), ["name"])
        assert caught.value.reason == "NOT_OWNER"
        with pytest.raises(PermissionDeniedError):
            await as_bob.delete_agent(agent.id)
        with pytest.raises(PermissionDeniedError) as caught:
            await as_bob.list_api_keys()
        assert caught.value.reason == "ADMIN_REQUIRED"
        # The owner still can.
        renamed = await as_alice.update_agent(pb.Agent(id=agent.id, name="renamed"), ["name"])
        assert renamed.name == "renamed"


async def test_api_key_lifecycle(admin: RegistryClient, client_mesh: MeshHandle) -> None:
    created = await admin.create_api_key(f"ci-{secrets.token_hex(3)}", "admin")
    assert created.token.startswith(f"avk_{created.api_key.id}_")
    assert created.api_key.role == pb.ROLE_ADMIN

    listed = [k async for k in admin.iter_api_keys(page_size=2)]
    assert created.api_key.id in [k.id for k in listed]

    revoked = await admin.revoke_api_key(created.api_key.id)
    assert revoked.HasField("revoke_time")
    async with RegistryClient(client_mesh.address("registry"), token=created.token) as client:
        with pytest.raises(UnauthenticatedError):
            await client.list_api_keys()


def test_defaults_come_from_the_environment(client_mesh: MeshHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_ADDR", client_mesh.address("registry"))
    monkeypatch.setenv("AGENTVAULT_TOKEN", client_mesh.admin_token)
    # Built before any event loop runs: the channel opens on first use, inside the loop that uses it.
    client = RegistryClient()
    assert client.address == client_mesh.address("registry")

    async def use() -> pb.Agent:
        async with client:
            return await client.create_agent(sample_agent("env"))

    assert asyncio.run(use()).owner == "prn_bootstrap_admin", "the token came from AGENTVAULT_TOKEN"

    monkeypatch.delenv("REGISTRY_ADDR")
    monkeypatch.setenv("REGISTRY_PORT", "6123")
    assert RegistryClient().address == "127.0.0.1:6123"


def test_each_client_reads_its_own_address_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGISTRY_ADDR", raising=False)
    monkeypatch.delenv("DISCOVERY_ADDR", raising=False)
    monkeypatch.setenv("REGISTRY_PORT", "6123")
    monkeypatch.setenv("DISCOVERY_PORT", "6124")
    assert FederationClient().address == "127.0.0.1:6123", "the registry serves the federation admin API"
    assert DiscoveryClient().address == "127.0.0.1:6124"
    monkeypatch.setenv("DISCOVERY_ADDR", "discovery:50052")
    assert DiscoveryClient().address == "discovery:50052"
    assert RegistryClient().address == "127.0.0.1:6123"


async def test_federation_and_discovery_clients(admin: RegistryClient, client_mesh: MeshHandle) -> None:
    async with (
        FederationClient(client_mesh.address("registry"), token=client_mesh.admin_token) as federation,
        DiscoveryClient(client_mesh.address("discovery"), token="") as discovery,
    ):
        issued = await federation.create_credential(f"typed-{secrets.token_hex(3)}")
        assert issued.credential.id in [c.id async for c in federation.iter_credentials(page_size=1)]
        assert (await federation.revoke_credential(issued.credential.id)).HasField("revoke_time")
        with pytest.raises(NotFoundError) as caught:
            await federation.get_peer(str(uuid.uuid4()))
        assert caught.value.reason == "PEER_NOT_FOUND"

        word = f"typed{secrets.token_hex(4)}"
        created = await admin.create_agent(sample_agent(word, name=f"Typed {word}", sharing="local"))
        found = await discovery.search_agents(word, capability_kind="skill", capability_name="summarize")
        assert [a.did for a in found.agents] == [created.did]
        assert not found.agents[0].is_federated
        with pytest.raises(InvalidArgumentError) as invalid:
            await discovery.search_agents(word, page_size=-1)
        assert invalid.value.field_violations
