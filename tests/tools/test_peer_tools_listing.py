"""Tools of peer meshes listed: ListTools with include_federated, and /mcp's tools/list and tools/call at A's edge."""

from __future__ import annotations

import aiohttp
import grpc
import pytest

from agentvault.devserver.embedded import free_port
from agentvault.messaging.v1 import tool_service_pb2 as tpb

from ..conftest import eventually
from ..federation.conftest import add_peer
from .test_mcp_edge import mesh_mcp
from .test_tools_across_meshes import (  # noqa: F401 - the module fixtures
    ALL,
    Across,
    _policy,
    across,
    two_meshes,
)


async def listed(x: Across) -> tpb.ListToolsResponse:
    reply: tpb.ListToolsResponse = await x.a.tools.ListTools(
        tpb.ListToolsRequest(include_federated=True), metadata=x.md, timeout=30
    )
    return reply


def of(reply: tpb.ListToolsResponse, agent_id: str) -> dict[str, tpb.Tool]:
    return {t.name: t for t in reply.tools if t.agent_id == agent_id}


async def test_list_tools_shows_a_peers_tools_marked_with_its_mesh(
    across: Across,  # noqa: F811
    http: aiohttp.ClientSession,
) -> None:
    async def found() -> None:
        reply = await listed(across)
        tools = of(reply, across.open_id)
        assert set(tools) == ALL, reply
        slow = tools["slow"]
        assert slow.mesh == "mesh-b" and slow.agent_name == f"open {across.word}"
        assert '"steps"' in slow.input_schema
        # A's policy forbids the tools of `closed`; B keeps `kept` to itself: neither is listed.
        assert of(reply, across.closed_id) == {} and of(reply, across.local_id) == {}
        assert list(reply.notes) == []

    await eventually(found, 30)
    # Without the option, only this mesh's tools: none of B's.
    plain = await across.a.tools.ListTools(tpb.ListToolsRequest(), metadata=across.md, timeout=30)
    assert all(t.mesh == "" for t in plain.tools) and of(plain, across.open_id) == {}
    # The same over REST at A's edge.
    async with http.get(
        across.a.mesh.url("/api/v1/tools"), params={"include_federated": "true"}, headers=dict(across.md)
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    rest = {t["name"]: t for t in body["tools"] if t["agent_id"] == across.open_id}
    assert set(rest) == ALL and rest["slow"]["mesh"] == "mesh-b"


async def test_with_an_agent_id_include_federated_adds_nothing(across: Across) -> None:  # noqa: F811
    """agent_id names one agent of this mesh: a peer's agent is not found here, even with include_federated."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await across.a.tools.ListTools(
            tpb.ListToolsRequest(agent_id=across.open_id, include_federated=True), metadata=across.md, timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_mcp_tools_list_shows_a_peers_tool_and_tools_call_runs_it_with_progress(
    across: Across,  # noqa: F811
) -> None:
    token = across.md[0][1].removeprefix("Bearer ")
    name = f"mesh-b.{across.open_id}.slow"

    async def listed_at_mcp() -> None:
        async with mesh_mcp(across.a, token) as session:
            tools = {t.name: t for t in (await session.list_tools()).tools}
        assert name in tools, sorted(tools)
        assert tools[name].input_schema["required"] == ["steps"]
        assert "peer mesh mesh-b" in (tools[name].description or "")
        assert not any(across.closed_id in n for n in tools)

    await eventually(listed_at_mcp, 30)
    seen: list[tuple[float, float | None, str | None]] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        seen.append((value, total, message))

    async with mesh_mcp(across.a, token) as session:
        result = await session.call_tool(name, {"steps": 3}, progress_callback=progress)
        assert not result.is_error, result
        assert result.structured_content == {"result": "counted to 3"}
        assert [s[0] for s in seen] == [1, 2, 3] and seen[0][2] == "step 1"
        # B's policy refuses `add` to mesh-a: a tool error the model can read, through the same route.
        denied = await session.call_tool(f"mesh-b.{across.open_id}.add", {"a": 1, "b": 2})
        assert denied.is_error and "adding is closed to peer meshes" in denied.content[0].text


async def test_a_failing_peer_degrades_the_listing_with_a_note(
    across: Across,  # noqa: F811
    http: aiohttp.ClientSession,
) -> None:
    await add_peer(http, across.a.mesh, "mesh-unreachable", f"http://127.0.0.1:{free_port()}", "avf_0123456789abcdef_x")

    async def noted() -> None:
        reply = await listed(across)
        assert any(n.startswith("peer mesh mesh-unreachable: left out") for n in reply.notes), reply.notes
        # The peer that answers is still there.
        assert set(of(reply, across.open_id)) == ALL

    await eventually(noted, 30)


# Last: it closes every tool of mesh-b for the module's caller.
async def test_a_policy_at_a_forbidding_mesh_bs_tools_hides_them(across: Across) -> None:  # noqa: F811
    assert of(await listed(across), across.open_id)  # before: listed
    await _policy(
        across.a, 'forbid(principal, action == Action::"tool.invoke", resource) when { resource.mesh == "mesh-b" };'
    )
    token = across.md[0][1].removeprefix("Bearer ")

    async def hidden() -> None:
        assert of(await listed(across), across.open_id) == {}
        async with mesh_mcp(across.a, token) as session:
            names = {t.name for t in (await session.list_tools()).tools}
        assert not any(n.startswith("mesh-b.") for n in names), sorted(names)

    await eventually(hidden, 30)
