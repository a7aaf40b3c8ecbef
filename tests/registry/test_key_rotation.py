"""Rotating FEDERATION_ENCRYPTION_KEYS: new key first, restart, old key removed, restart; nothing is lost."""

from __future__ import annotations

import grpc
import pytest

from agentvault.common.secretbox import DecryptionError, SecretBox
from agentvault.devserver.mesh import SERVICES
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, bearer, unique_did


async def resolved_keys(address: str, token: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await fpb_grpc.PeerServiceStub(channel).ResolvePeers(fpb.ResolvePeersRequest(), metadata=bearer(token))
    return [p.encrypted_api_key for p in reply.peers]


async def test_rotation_moves_every_secret_to_the_new_key(mesh_factory: MeshFactory) -> None:
    old, new = SecretBox.generate_key(), SecretBox.generate_key()
    handle = mesh_factory(services=SERVICES[:1], name="rotation", env={"FEDERATION_ENCRYPTION_KEYS": old})
    address, admin = handle.address("registry"), bearer(handle.admin_token)
    async with grpc.aio.insecure_channel(address) as channel:
        peers = fpb_grpc.PeerServiceStub(channel)
        await peers.CreatePeer(
            fpb.CreatePeerRequest(peer=fpb.Peer(name="P", registry_url="https://p.example", api_key="peer-secret")),
            metadata=admin,
        )
        issued = await peers.CreateFederationCredential(fpb.CreateFederationCredentialRequest(name="q"), metadata=admin)
        # An agent's secret (how the mesh authenticates to it) is under the same key ring.
        agent = pb.Agent(
            did=unique_did(),
            name="Keyed",
            version="1.0.0",
            auth=pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_BEARER, bearer_token="agent-secret"),
        )
        created = await pb_grpc.RegistryServiceStub(channel).CreateAgent(
            pb.CreateAgentRequest(agent=agent), metadata=admin
        )
    [before] = await resolved_keys(address, handle.admin_token)
    assert SecretBox([old]).decrypt(before) == "peer-secret"

    # Step 1: the new key goes first; a restart re-encrypts everything under it.
    handle.mesh.env["FEDERATION_ENCRYPTION_KEYS"] = f"{new},{old}"
    handle.mesh.stop_service("registry")
    handle.mesh.start_service("registry")
    [during] = await resolved_keys(address, handle.admin_token)
    assert SecretBox([new]).decrypt(during) == "peer-secret"

    # Step 2: the old key is removed; peer keys and issued federation tokens still work.
    handle.mesh.env["FEDERATION_ENCRYPTION_KEYS"] = new
    handle.mesh.stop_service("registry")
    handle.mesh.start_service("registry")
    [after] = await resolved_keys(address, handle.admin_token)
    assert SecretBox([new]).decrypt(after) == "peer-secret"
    with pytest.raises(DecryptionError):
        SecretBox([old]).decrypt(after)
    async with grpc.aio.insecure_channel(address) as channel:
        federation = fpb_grpc.FederationServiceStub(channel)
        # Unsigned on purpose: the credential is found and decrypted, then the missing signature is reported.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await federation.SearchAgents(fpb.SearchAgentsRequest(), metadata=bearer(issued.token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "signed" in (err.value.details() or ""), err.value.details()
    async with grpc.aio.insecure_channel(address) as channel:
        resolved = await pb_grpc.RegistryServiceStub(channel).ResolveAgentAuth(
            pb.ResolveAgentAuthRequest(agent_id=created.id), metadata=admin
        )
    assert SecretBox([new]).decrypt(resolved.encrypted_secret) == "agent-secret"
