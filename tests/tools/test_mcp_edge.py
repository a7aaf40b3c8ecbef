"""The mesh as an MCP server at the edge's /mcp, read and called with the SDK's own client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from .conftest import ToolNet
from .test_invoke import ALL, Setup, setup  # noqa: F401 - the module fixture


@asynccontextmanager
async def mesh_mcp(n: ToolNet, token: str) -> AsyncIterator[ClientSession]:
    async with (
        # The first /mcp request at an edge loads the SDK (seconds of CPU on a busy machine): more than httpx's 5 s.
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http,
        streamable_http_client(n.mesh.url("/mcp"), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def test_tools_list_shows_what_the_caller_may_use(tnet: ToolNet, setup: Setup) -> None:  # noqa: F811
    token = setup.md[0][1].removeprefix("Bearer ")
    async with mesh_mcp(tnet, token) as session:
        listed = await session.list_tools()
    names = {t.name for t in listed.tools}
    assert {f"{setup.open_id}.{name}" for name in ALL} <= names
    assert {n for n in names if n.startswith(setup.guarded_id)} == {f"{setup.guarded_id}.add"}
    add = next(t for t in listed.tools if t.name == f"{setup.open_id}.add")
    assert add.input_schema["required"] == ["a", "b"]


async def test_tools_call_streams_progress_notifications(tnet: ToolNet, setup: Setup) -> None:  # noqa: F811
    token = setup.md[0][1].removeprefix("Bearer ")
    seen: list[tuple[float, float | None, str | None]] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        seen.append((value, total, message))

    async with mesh_mcp(tnet, token) as session:
        await session.list_tools()
        result = await session.call_tool(f"{setup.open_id}.slow", {"steps": 3}, progress_callback=progress)
        assert not result.is_error and result.structured_content == {"result": "counted to 3"}
        assert [s[0] for s in seen] == [1, 2, 3] and seen[0][2] == "step 1"
        failed = await session.call_tool(f"{setup.open_id}.fail", {"why": "x"})
        assert failed.is_error
        denied = await session.call_tool(f"{setup.guarded_id}.slow", {"steps": 1})
        assert denied.is_error and "TOOL_DENIED" in denied.content[0].text
        bad = await session.call_tool(f"{setup.open_id}.add", {"a": "x", "b": 1})
        assert bad.is_error and "arguments/a" in bad.content[0].text


async def test_tools_list_without_a_valid_credential_is_refused(tnet: ToolNet, setup: Setup) -> None:  # noqa: F811
    import pytest
    from mcp.shared.exceptions import MCPError

    async with mesh_mcp(tnet, "not-a-token") as session:
        with pytest.raises(MCPError):
            await session.list_tools()
