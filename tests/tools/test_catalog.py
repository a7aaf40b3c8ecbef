"""The MCP tool catalog: a registered MCP server's tools/list becomes the agent's tool capabilities, searchable."""

from __future__ import annotations

import json

import grpc
import pytest

from agentvault.registry.v1 import registry_service_pb2 as pb

from ..conftest import eventually
from ..registry.oauth_helpers import basic, create_client, token
from .conftest import ToolNet, register_mcp_agent, tools_of


async def test_mcp_tools_become_capabilities_with_schemas(tnet: ToolNet) -> None:
    own = pb.Capability(kind=pb.CAPABILITY_KIND_SKILL, name="summarize", description="the owner's own")
    agent = await register_mcp_agent(tnet, capabilities=[own])

    async def listed() -> None:
        assert set(await tools_of(tnet, agent.id)) == {"add", "slow", "fail", "hang"}

    await eventually(listed, 20)
    tools = await tools_of(tnet, agent.id)
    assert json.loads(tools["add"].input_schema)["required"] == ["a", "b"]
    assert json.loads(tools["add"].output_schema)["properties"]["result"]["type"] == "integer"
    assert tools["slow"].description.startswith("Count to steps")
    assert "mcp" in tools["add"].tags
    # The owner's own capability is kept beside them.
    agent = await tnet.registry.GetAgent(pb.GetAgentRequest(id=agent.id), metadata=tnet.admin)
    assert [c.name for c in agent.capabilities if c.kind == pb.CAPABILITY_KIND_SKILL] == ["summarize"]

    # The registry's own search and filters find them.
    found = await tnet.registry.ListAgents(
        pb.ListAgentsRequest(capability_kind=pb.CAPABILITY_KIND_TOOL, capability_name="slow"), metadata=tnet.admin
    )
    assert agent.id in {a.id for a in found.agents}
    found = await tnet.registry.ListAgents(pb.ListAgentsRequest(search="progress steps"), metadata=tnet.admin)
    assert agent.id in {a.id for a in found.agents}


async def test_catalog_uses_the_mesh_credentials_for_the_agent(tnet: ToolNet) -> None:
    """With a wrong stored token the MCP server refuses the mesh, and no tools appear; fixing the registration's
    auth brings them."""
    agent = await register_mcp_agent(tnet, token="not-the-token")
    mcp_agent_with_right_token = await register_mcp_agent(tnet)

    async def listed() -> None:
        assert set(await tools_of(tnet, mcp_agent_with_right_token.id)) == {"add", "slow", "fail", "hang"}

    await eventually(listed, 20)
    assert await tools_of(tnet, agent.id) == {}
    await tnet.registry.UpdateAgent(
        pb.UpdateAgentRequest(
            agent=pb.Agent(
                id=agent.id, auth=pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_BEARER, bearer_token=tnet.server.token)
            ),
            update_mask={"paths": ["auth"]},
        ),
        metadata=tnet.admin,
    )

    async def fixed() -> None:
        assert "add" in await tools_of(tnet, agent.id)

    await eventually(fixed, 20)


async def test_sync_needs_tools_sync_and_replaces_only_mcp_tools(tnet: ToolNet) -> None:
    agent = await register_mcp_agent(
        tnet, capabilities=[pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name="add", description="owner's add")]
    )
    # A member (even the admin-created client with every member scope) may not write the catalog.
    created = await create_client(tnet.identity, tnet.mesh.admin_token, scopes=["agents:read", "agents:write"])
    answer = await token(
        tnet.identity, {"grant_type": "client_credentials"}, basic(created.client.client_id, created.client_secret)
    )
    member = [("authorization", f"Bearer {answer.body['access_token']}")]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await tnet.registry.SyncMcpTools(pb.SyncMcpToolsRequest(agent_id=agent.id, tools=[]), metadata=member)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    async def listed() -> None:
        assert "slow" in await tools_of(tnet, agent.id)

    await eventually(listed, 20)
    tools = await tools_of(tnet, agent.id)
    # The owner's tool of the same name stays the owner's: the MCP one is left out, not merged over it.
    assert tools["add"].description == "owner's add" and "mcp" not in tools["add"].tags


async def test_sync_refuses_an_agent_without_mcp_endpoint(tnet: ToolNet) -> None:
    from ..conftest import unique_did

    plain = await tnet.registry.CreateAgent(
        pb.CreateAgentRequest(agent=pb.Agent(did=unique_did("plain"), name="plain", version="1.0.0")),
        metadata=tnet.admin,
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await tnet.registry.SyncMcpTools(pb.SyncMcpToolsRequest(agent_id=plain.id), metadata=tnet.admin)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
