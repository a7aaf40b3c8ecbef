"""The catalog follows notifications/tools/list_changed at once, not at its refresh period; with two messaging
replicas, one at a time watches a given MCP server (a lease), and the other takes over when it stops."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest

from agentvault.common.services import ServiceSpec
from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import SERVICES, Mesh
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import tool_service_pb2_grpc as tpb_grpc
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, eventually
from .conftest import TOOLS_ENV, McpServer, ToolNet, register_mcp_agent, tools_of

# Far longer than the test waits: only the notification can bring the new tool in time.
REFRESH_SECONDS = 600


async def _ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(1800):  # generous: a first start on a fresh clone under load compiles the SDK
            if proc.poll() is not None:
                break
            try:
                async with http.get(url) as answer:  # 401 without the token: it is up
                    if answer.status:
                        return
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    raise RuntimeError("the growing MCP test server did not start")


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpServer]:
    port, token = free_port(), secrets.token_urlsafe(16)
    script = Path(__file__).with_name("mcp_server_growing.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port), token], cwd=script.parent)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        asyncio.run(_ready(url, proc))
        yield McpServer(url, token)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
async def tnet(mesh_factory: MeshFactory, mcp_server: McpServer) -> AsyncIterator[ToolNet]:
    env = {**TOOLS_ENV, "TOOLS_CATALOG_REFRESH_SECONDS": str(REFRESH_SECONDS), "TOOLS_CATALOG_LEASE_SECONDS": "3"}
    mesh = mesh_factory(name="toolchanges", services=tuple(s for s in _services() if s.name != "edge"), env=env)
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


def _services() -> tuple[ServiceSpec, ...]:
    return SERVICES


async def test_a_tool_added_at_runtime_is_listed_on_the_servers_notification(tnet: ToolNet) -> None:
    agent = await register_mcp_agent(tnet, name="growing tools")

    async def first() -> None:
        assert set(await tools_of(tnet, agent.id)) == {"base"}

    await eventually(first, 30)
    grow = tnet.server.url.replace("/mcp", "/grow")
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {tnet.server.token}"}) as http,
        http.get(grow, params={"name": "grown"}) as answer,
    ):
        assert answer.status == 200
        # The catalog's session listed the tools, so it is among those told.
        assert (await answer.json())["told"] >= 1

    async def grown() -> None:
        tools = await tools_of(tnet, agent.id)
        assert set(tools) == {"base", "grown"}
        assert tools["grown"].description == "added at runtime as grown"

    # Well within the refresh period (600 s): the notification did it.
    await eventually(grown, 30)


async def seen_sessions(n: ToolNet) -> int:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {n.server.token}"}) as http,
        http.get(n.server.url.replace("/mcp", "/seen")) as answer,
    ):
        return int((await answer.json())["sessions"])


async def lease_holder(n: ToolNet, agent_id: str) -> str:
    conn = await asyncpg.connect(n.mesh.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT claimed_by FROM tool_catalog_leases WHERE subject_kind = 'mcp' AND subject_id = $1 "
            "AND next_check_at > now()",
            agent_id,
        )
    finally:
        await conn.close()
    return row["claimed_by"] if row else ""


async def test_two_replicas_one_session_per_server_and_the_other_takes_over(
    tnet: ToolNet, tmp_path_factory: pytest.TempPathFactory
) -> None:
    first = tnet.mesh.mesh
    second = Mesh(
        dict(first.env, MESSAGING_PORT=str(free_port()), MESSAGING_METRICS_PORT=str(free_port())),
        log_dir=Path(tmp_path_factory.mktemp("messaging2")),
        services=tuple(s for s in _services() if s.name == "messaging"),
    )
    second.start()
    replicas = {"first": first, "second": second}
    try:
        agent = await register_mcp_agent(tnet, name="leased tools")

        async def synced() -> None:
            assert "base" in await tools_of(tnet, agent.id)
            assert await lease_holder(tnet, agent.id)

        await eventually(synced, 30)
        # Both catalogs run (the second started before this registration; each scans every 0.2 s), yet the server
        # has one session per registration: the earlier test's and this one's.
        assert await seen_sessions(tnet) == 2
        holder = await lease_holder(tnet, agent.id)
        pids = {name: m.processes["messaging"].pid for name, m in replicas.items()}
        [holding] = [name for name, pid in pids.items() if f":{pid}:" in holder]
        other = "second" if holding == "first" else "first"

        # The holder stops (its lease released on the way out): the other replica takes the server over.
        replicas[holding].stop_service("messaging")

        async def taken_over() -> None:
            assert f":{pids[other]}:" in await lease_holder(tnet, agent.id)

        await eventually(taken_over, 30)
        # ... and follows its changes: a tool added now reaches the registry through the new holder's session.
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {tnet.server.token}"}) as http,
            http.get(tnet.server.url.replace("/mcp", "/grow"), params={"name": "after_takeover"}) as answer,
        ):
            assert answer.status == 200

        async def followed() -> None:
            assert "after_takeover" in await tools_of(tnet, agent.id)

        await eventually(followed, 30)
    finally:
        second.stop()
