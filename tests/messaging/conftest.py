"""A mesh of real processes for the messaging tests, and local agents with their own OAuth credentials."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from agentvault.devserver.embedded import free_port
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, MeshHandle, bearer, unique_did
from ..registry.oauth_helpers import basic, create_client, token

MESSAGING_ENV = {
    "MESSAGING_RETRY_BASE_SECONDS": "0.05",
    "MESSAGING_RETRY_MAX_SECONDS": "0.2",
    "MESSAGING_MAX_ATTEMPTS": "3",
    "MESSAGING_DELIVERY_TIMEOUT_SECONDS": "2",
    "MESSAGING_POLL_SECONDS": "0.2",
    "MESSAGING_BREAKER_FAILURES": "50",
    "APPROVAL_SWEEP_SECONDS": "0.2",
}


@dataclass
class Net:
    """The mesh and stubs on its registry and messaging services."""

    mesh: MeshHandle
    registry: pb_grpc.RegistryServiceStub
    identity: ipb_grpc.IdentityServiceStub
    policies: ppb_grpc.PolicyServiceStub
    messaging: mpb_grpc.MessagingServiceStub

    @property
    def admin(self) -> list[tuple[str, str]]:
        return bearer(self.mesh.admin_token)


@dataclass
class LocalAgent:
    """A registered agent and an access token of its own OAuth client (kind agent)."""

    id: str
    token: str

    @property
    def md(self) -> list[tuple[str, str]]:
        return bearer(self.token)

    def party(self) -> mpb.Party:
        return mpb.Party(agent_id=self.id)


@pytest.fixture(scope="module")
async def net(mesh_factory: MeshFactory) -> AsyncIterator[Net]:
    edge = free_port()
    # The edge's public URL is the issuer, as in a deployment: agent cards name the mesh's A2A endpoint under it.
    env = {
        "EDGE_PORT": str(edge),
        "OAUTH_ISSUER": f"http://127.0.0.1:{edge}",
        "MESSAGING_METRICS_PORT": str(free_port()),
    }
    mesh = mesh_factory(name="messaging", env={**MESSAGING_ENV, **env})
    async with (
        grpc.aio.insecure_channel(mesh.address("registry")) as reg,
        grpc.aio.insecure_channel(mesh.address("messaging")) as msg,
    ):
        yield Net(
            mesh,
            pb_grpc.RegistryServiceStub(reg),
            ipb_grpc.IdentityServiceStub(reg),
            ppb_grpc.PolicyServiceStub(reg),
            mpb_grpc.MessagingServiceStub(msg),
        )


async def policy(n: Net, text: str) -> str:
    made = await n.policies.CreatePolicy(
        ppb.CreatePolicyRequest(policy=ppb.Policy(name=f"p-{secrets.token_hex(6)}", text=text, enabled=True)),
        metadata=n.admin,
    )
    return str(made.id)


async def local_agent(n: Net, *, endpoints: list[pb.Endpoint] | None = None, **fields: Any) -> LocalAgent:
    """An agent registered by the admin, with a client bound to it holding messages:send."""
    agent = await n.registry.CreateAgent(
        pb.CreateAgentRequest(
            agent=pb.Agent(
                did=unique_did("msg"),
                name=fields.pop("name", "messenger"),
                version="1.0.0",
                endpoints=endpoints or [],
                sharing=fields.pop("sharing", pb.SHARING_LOCAL),
                **fields,
            )
        ),
        metadata=n.admin,
    )
    created = await create_client(
        n.identity, n.mesh.admin_token, scopes=["messages:send", "agents:read"], agent_id=agent.id
    )
    answer = await token(
        n.identity, {"grant_type": "client_credentials"}, basic(created.client.client_id, created.client_secret)
    )
    assert answer.status == 200, answer.body
    return LocalAgent(agent.id, answer.body["access_token"])


def text_message(to: LocalAgent | str, text: str, **fields: Any) -> mpb.Message:
    agent_id = to if isinstance(to, str) else to.id
    return mpb.Message(recipient=mpb.Party(agent_id=agent_id), parts=[mpb.Part(text=text)], **fields)


POLICIES = (
    'permit(principal, action == Action::"message.send", resource) unless { resource.tags.contains("guarded") };',
    '@decision("ask") @reason("guarded agents answer only approved messages")\n'
    'permit(principal, action == Action::"message.send", resource) when { resource.tags.contains("guarded") };',
    '@reason("closed agents take no messages")\n'
    'forbid(principal, action == Action::"message.send", resource) when { resource.tags.contains("closed") };',
)


@pytest.fixture(scope="module")
async def policies(net: Net) -> list[str]:
    """Messages to any agent allowed, except "guarded" ones (ask) and "closed" ones (deny)."""
    return [await policy(net, text) for text in POLICIES]
