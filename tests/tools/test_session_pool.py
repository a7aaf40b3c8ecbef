"""InvokeTool's MCP sessions: kept open and shared by calls, renewed on a registration change or a server restart."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest

from agentvault.devserver.embedded import free_port
from agentvault.messaging.v1 import tool_service_pb2 as tpb
from agentvault.registry.v1 import registry_service_pb2 as pb

from ..conftest import auth, bearer, eventually
from ..registry.oauth_helpers import basic, create_client, token
from .conftest import McpServer, ToolNet, register_mcp_agent, tools_of
from .test_invoke import args, policy


@dataclass
class RestartableServer(McpServer):
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        script = Path(__file__).with_name("mcp_server.py")
        self.proc = subprocess.Popen([sys.executable, str(script), str(self.port), self.token])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    async def seen(self) -> dict:
        url = self.url.removesuffix("/mcp") + "/seen"
        async with aiohttp.ClientSession() as http:
            # Generous: a first start on a fresh clone under load compiles the SDK (many seconds of CPU).
            for _ in range(1800):
                try:
                    async with http.get(url, headers=auth(self.token)) as resp:
                        assert resp.status == 200
                        return dict(await resp.json())
                except aiohttp.ClientError:  # starting
                    await asyncio.sleep(0.05)
        raise RuntimeError("the MCP test server did not start")


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[RestartableServer]:
    """This module's own MCP test server (the `tnet` fixture registers it), which a test restarts."""
    port = free_port()
    server = RestartableServer(f"http://127.0.0.1:{port}/mcp", secrets.token_urlsafe(16), port)
    server.start()
    try:
        asyncio.run(server.seen())
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def md(tnet: ToolNet) -> list[tuple[str, str]]:
    await policy(tnet, 'permit(principal, action == Action::"tool.list", resource);')
    await policy(tnet, 'permit(principal, action == Action::"tool.invoke", resource);')
    created = await create_client(tnet.identity, tnet.mesh.admin_token, scopes=["agents:read", "tools:invoke"])
    answer = await token(
        tnet.identity, {"grant_type": "client_credentials"}, basic(created.client.client_id, created.client_secret)
    )
    return bearer(answer.body["access_token"])


async def sessions(n: ToolNet, label: str) -> int:
    """Sessions the MCP server saw opened with the agent's token labelled `label` (the catalog's included)."""
    server = n.server
    assert isinstance(server, RestartableServer)
    return int((await server.seen())["sessions"].get(label, 0))


async def agent_with_label(n: ToolNet, label: str) -> pb.Agent:
    """A registration whose token is labelled: its sessions are counted apart. Returns once the catalog has listed
    its tools (the catalog's own session is then open and stays so)."""
    agent = await register_mcp_agent(n, token=f"{n.server.token}.{label}", name=f"pool {label}")

    async def listed() -> None:
        assert "add" in await tools_of(n, agent.id)
        assert await sessions(n, label) >= 1

    await eventually(listed, 30)
    return agent


async def call(
    n: ToolNet, md: list[tuple[str, str]], agent_id: str, tool: str, **values: object
) -> list[tpb.InvokeToolEvent]:
    stream = n.tools.InvokeTool(
        tpb.InvokeToolRequest(agent_id=agent_id, tool=tool, arguments=args(**values)), metadata=md, timeout=30
    )
    return [event async for event in stream]


async def test_consecutive_calls_reuse_one_session(tnet: ToolNet, md: list[tuple[str, str]]) -> None:
    agent = await agent_with_label(tnet, "seq")
    before = await sessions(tnet, "seq")
    for a in range(3):
        events = await call(tnet, md, agent.id, "add", a=a, b=1)
        assert events[-1].result.structured_content["result"] == a + 1
    assert await sessions(tnet, "seq") == before + 1


async def test_concurrent_calls_share_the_session_and_get_their_own_progress(
    tnet: ToolNet, md: list[tuple[str, str]]
) -> None:
    agent = await agent_with_label(tnet, "conc")
    await call(tnet, md, agent.id, "add", a=1, b=1)  # the pooled session is open
    before = await sessions(tnet, "conc")
    steps = [2, 3, 4, 5]
    answers = await asyncio.gather(*(call(tnet, md, agent.id, "slow", steps=s) for s in steps))
    for s, events in zip(steps, answers, strict=True):
        progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
        # Each call sees only its own progress (the per-request callback), however the calls interleave.
        assert [p.total for p in progress] == [s] * len(progress) and len(progress) == s
        assert events[-1].result.content[0]["text"] == f"counted to {s}"
    assert await sessions(tnet, "conc") == before


async def test_a_cancelled_call_leaves_the_session_usable(tnet: ToolNet, md: list[tuple[str, str]]) -> None:
    agent = await agent_with_label(tnet, "cancel")
    server = tnet.server
    assert isinstance(server, RestartableServer)
    before, seen = await sessions(tnet, "cancel"), await server.seen()
    stream = tnet.tools.InvokeTool(tpb.InvokeToolRequest(agent_id=agent.id, tool="hang"), metadata=md, timeout=30)

    async def started() -> None:
        assert (await server.seen())["hang_started"] > seen["hang_started"]

    await eventually(started, 10)
    stream.cancel()

    async def cancelled() -> None:
        assert (await server.seen())["hang_cancelled"] > seen["hang_cancelled"]

    await eventually(cancelled, 10)
    events = await call(tnet, md, agent.id, "add", a=2, b=3)
    assert events[-1].result.structured_content["result"] == 5
    assert await sessions(tnet, "cancel") == before + 1


async def test_new_credentials_get_a_new_session(tnet: ToolNet, md: list[tuple[str, str]]) -> None:
    agent = await agent_with_label(tnet, "old")
    await call(tnet, md, agent.id, "add", a=1, b=2)
    await tnet.registry.UpdateAgent(
        pb.UpdateAgentRequest(
            agent=pb.Agent(
                id=agent.id, auth=pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_BEARER, bearer_token=f"{tnet.server.token}.new")
            ),
            update_mask={"paths": ["auth"]},
        ),
        metadata=tnet.admin,
    )
    old = await sessions(tnet, "old")
    # At once (not after a cache's lifetime): the call made right after the update uses the new credentials.
    events = await call(tnet, md, agent.id, "add", a=2, b=2)
    assert events[-1].result.structured_content["result"] == 4
    opened = await sessions(tnet, "new")
    assert opened >= 1
    await call(tnet, md, agent.id, "add", a=3, b=2)
    assert await sessions(tnet, "new") == opened  # then reused
    assert await sessions(tnet, "old") == old


async def test_after_a_server_restart_the_next_call_works_on_a_fresh_session(
    tnet: ToolNet, md: list[tuple[str, str]]
) -> None:
    agent = await agent_with_label(tnet, "restart")
    await call(tnet, md, agent.id, "add", a=1, b=1)
    server = tnet.server
    assert isinstance(server, RestartableServer)
    server.stop()
    server.start()
    await server.seen()  # up again, knowing none of the sessions opened before
    events = await call(tnet, md, agent.id, "add", a=20, b=22)
    assert events[-1].result.structured_content["result"] == 42
    assert await sessions(tnet, "restart") >= 1  # counted by the new process: the call opened a fresh session


async def test_a_server_down_is_unavailable_then_back(tnet: ToolNet, md: list[tuple[str, str]]) -> None:
    agent = await agent_with_label(tnet, "down")
    await call(tnet, md, agent.id, "add", a=1, b=1)
    server = tnet.server
    assert isinstance(server, RestartableServer)
    server.stop()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(tnet, md, agent.id, "add", a=1, b=1)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.start()
        await server.seen()
    events = await call(tnet, md, agent.id, "add", a=2, b=1)
    assert events[-1].result.structured_content["result"] == 3
