"""The metrics added for the authorization server and tool calls, read from the processes' own /metrics."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from agentvault.devserver.embedded import free_port
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import tool_service_pb2 as tpb
from agentvault.messaging.v1 import tool_service_pb2_grpc as tpb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, bearer, eventually
from ..registry.oauth_helpers import basic, create_client, token
from ..tools.conftest import TOOLS_ENV, McpServer, ToolNet, mcp_server, register_mcp_agent, tools_of

__all__ = ["mcp_server"]  # the MCP test server's fixture, used here as in tests/tools


@dataclass
class Scrape:
    http: aiohttp.ClientSession
    url: str

    async def value(self, name: str, **labels: str) -> float:
        async with self.http.get(self.url) as answer:
            text = await answer.text()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


@pytest.fixture(scope="module")
async def tnet(mesh_factory: MeshFactory, mcp_server: McpServer) -> AsyncIterator[ToolNet]:
    edge = free_port()
    env = {
        **TOOLS_ENV,
        "EDGE_PORT": str(edge),
        "OAUTH_ISSUER": f"http://127.0.0.1:{edge}",
        "REGISTRY_METRICS_PORT": str(free_port()),
        "MESSAGING_METRICS_PORT": str(free_port()),
    }
    mesh = mesh_factory(name="metrics", env=env)
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


def scrape(http: aiohttp.ClientSession, tnet: ToolNet, service: str) -> Scrape:
    return Scrape(http, f"http://127.0.0.1:{tnet.mesh.env[service.upper() + '_METRICS_PORT']}/metrics")


async def test_token_issuance_and_refusals_are_counted(tnet: ToolNet, http: aiohttp.ClientSession) -> None:
    registry = scrape(http, tnet, "registry")
    issued = {"grant_type": "client_credentials", "result": "issued"}
    refused = {"grant_type": "client_credentials", "result": "invalid_client"}
    issued_before = await registry.value("oauth_tokens_total", **issued)
    refused_before = await registry.value("oauth_tokens_total", **refused)
    created = await create_client(tnet.identity, tnet.mesh.admin_token, scopes=["agents:read"])
    good = basic(created.client.client_id, created.client_secret)
    assert (await token(tnet.identity, {"grant_type": "client_credentials"}, good)).status == 200
    bad = basic(created.client.client_id, "not-" + created.client_secret)
    assert (await token(tnet.identity, {"grant_type": "client_credentials"}, bad)).status == 401
    # Unknown grant types share one label: a client cannot make new series.
    other_before = await registry.value("oauth_tokens_total", grant_type="other")
    assert (await token(tnet.identity, {"grant_type": "x-" + secrets.token_hex(4)}, good)).status == 400
    # Internal services fetch tokens of their own meanwhile: at least, not exactly, one more.
    assert await registry.value("oauth_tokens_total", **issued) >= issued_before + 1
    assert await registry.value("oauth_tokens_total", **refused) == refused_before + 1
    assert await registry.value("oauth_tokens_total", grant_type="other") == other_before + 1


async def test_tool_calls_are_counted_by_outcome(tnet: ToolNet, http: aiohttp.ClientSession) -> None:
    agent = await register_mcp_agent(tnet, name="metered tools")
    await tnet.policies.CreatePolicy(
        ppb.CreatePolicyRequest(
            policy=ppb.Policy(
                name=f"p-{secrets.token_hex(6)}",
                text=f'permit(principal, action == Action::"tool.invoke", resource) '
                f'when {{ resource.agent == "{agent.id}" }};',
                enabled=True,
            )
        ),
        metadata=tnet.admin,
    )
    created = await create_client(tnet.identity, tnet.mesh.admin_token, scopes=["agents:read", "tools:invoke"])
    answer = await token(
        tnet.identity, {"grant_type": "client_credentials"}, basic(created.client.client_id, created.client_secret)
    )
    md = bearer(answer.body["access_token"])

    async def listed() -> None:
        assert {"add", "fail"} <= set(await tools_of(tnet, agent.id))

    await eventually(listed, 30)
    messaging = scrape(http, tnet, "messaging")
    completed = await messaging.value("tool_calls_total", outcome="completed")
    tool_errors = await messaging.value("tool_calls_total", outcome="tool_error")

    async def invoke(tool: str, **values: object) -> None:
        arguments = struct_pb2.Struct()
        arguments.update(values)
        call = tnet.tools.InvokeTool(
            tpb.InvokeToolRequest(agent_id=agent.id, tool=tool, arguments=arguments), metadata=md
        )
        assert [event async for event in call]

    await invoke("add", a=1, b=2)
    assert await messaging.value("tool_calls_total", outcome="completed") == completed + 1
    await invoke("fail", why="counted")
    assert await messaging.value("tool_calls_total", outcome="tool_error") == tool_errors + 1
