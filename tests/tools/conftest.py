"""A mesh of real processes and a real MCP server (the SDK's, under uvicorn on loopback) registered as an agent."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest

from agentvault.devserver.embedded import free_port
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import tool_service_pb2_grpc as tpb_grpc
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, MeshHandle, bearer, unique_did

TOOLS_ENV = {"TOOLS_CATALOG_SCAN_SECONDS": "0.2", "TOOLS_CATALOG_REFRESH_SECONDS": "1", "APPROVAL_SWEEP_SECONDS": "0.2"}


@dataclass
class McpServer:
    url: str
    token: str


@dataclass
class ToolNet:
    mesh: MeshHandle
    registry: pb_grpc.RegistryServiceStub
    identity: ipb_grpc.IdentityServiceStub
    policies: ppb_grpc.PolicyServiceStub
    tools: tpb_grpc.ToolServiceStub
    server: McpServer

    @property
    def admin(self) -> list[tuple[str, str]]:
        return bearer(self.mesh.admin_token)


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpServer]:
    port, token = free_port(), secrets.token_urlsafe(16)
    script = Path(__file__).with_name("mcp_server.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port), token])
    url = f"http://127.0.0.1:{port}/mcp"

    async def ready() -> None:
        # Generous: on a fresh clone under load the server's first start compiles the SDK (many seconds of CPU).
        deadline = time.monotonic() + 90
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    async with http.get(url) as answer:  # 401 without the token: it is up
                        if answer.status:
                            return
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        raise RuntimeError(f"the MCP test server did not start (exit code {proc.poll()})")

    try:
        asyncio.run(ready())
        yield McpServer(url, token)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
async def tnet(mesh_factory: MeshFactory, mcp_server: McpServer) -> AsyncIterator[ToolNet]:
    edge = free_port()
    env = {**TOOLS_ENV, "EDGE_PORT": str(edge), "OAUTH_ISSUER": f"http://127.0.0.1:{edge}"}
    mesh = mesh_factory(name="tools", env=env)
    async with (
        grpc.aio.insecure_channel(mesh.address("registry")) as reg,
        grpc.aio.insecure_channel(mesh.address("messaging")) as msg,
    ):
        yield ToolNet(
            mesh,
            pb_grpc.RegistryServiceStub(reg),
            ipb_grpc.IdentityServiceStub(reg),
            ppb_grpc.PolicyServiceStub(reg),
            tpb_grpc.ToolServiceStub(msg),
            mcp_server,
        )


async def register_mcp_agent(n: ToolNet, *, token: str | None = None, **fields: object) -> pb.Agent:
    """The MCP test server registered as an agent, with the bearer token the mesh must present to it."""
    return await n.registry.CreateAgent(
        pb.CreateAgentRequest(
            agent=pb.Agent(
                did=unique_did("mcp"),
                name=fields.pop("name", "mcp tools"),  # type: ignore[arg-type]
                version="1.0.0",
                endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_MCP, url=n.server.url)],
                auth=pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_BEARER, bearer_token=token or n.server.token),
                sharing=fields.pop("sharing", pb.SHARING_LOCAL),  # type: ignore[arg-type]
                **fields,  # type: ignore[arg-type]
            )
        ),
        metadata=n.admin,
    )


async def tools_of(n: ToolNet, agent_id: str) -> dict[str, pb.Capability]:
    agent = await n.registry.GetAgent(pb.GetAgentRequest(id=agent_id), metadata=n.admin)
    return {c.name: c for c in agent.capabilities if c.kind == pb.CAPABILITY_KIND_TOOL}
