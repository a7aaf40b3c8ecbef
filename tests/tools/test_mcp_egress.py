"""MCP URLs with MESSAGING_BLOCK_PRIVATE_AGENT_URLS: host names are resolved and private addresses refused before
any connection, and every connection the MCP client makes goes to a checked address."""

from __future__ import annotations

import asyncio

import httpx2
import pytest

from agentvault.common.agent_auth import NO_AUTH, PreparedAuth
from agentvault.common.egress import EgressRefused
from agentvault_messaging.tools.catalog import list_tools
from agentvault_messaging.tools.mcp_client import GuardedTransport, open_session

from .conftest import McpServer


def by_name(server: McpServer) -> str:
    """The test server's URL with the host name `localhost` (loopback) instead of its literal address."""
    return server.url.replace("127.0.0.1", "localhost")


def bearer_auth(server: McpServer) -> PreparedAuth:
    return PreparedAuth("bearer", "x", headers={"Authorization": f"Bearer {server.token}"})


async def test_a_host_name_of_a_private_address_is_refused_when_blocked(mcp_server: McpServer) -> None:
    with pytest.raises(EgressRefused, match="localhost: private and loopback"):
        async with open_session(by_name(mcp_server), bearer_auth(mcp_server), block_private=True):
            pass
    # Not blocked: the same name reaches the server through the guarded transport.
    async with open_session(by_name(mcp_server), bearer_auth(mcp_server), block_private=False) as session:
        assert {"add", "slow"} <= {t.name for t in await list_tools(session)}


async def test_link_local_is_refused_even_when_private_addresses_are_allowed() -> None:
    with pytest.raises(EgressRefused, match="link-local"):
        async with open_session("http://169.254.169.254/mcp", NO_AUTH, block_private=False):
            pass


async def test_the_transport_checks_the_address_it_connects_to() -> None:
    """Past the check before the session (a name that resolves elsewhere by connect time), the connection itself
    is refused: nothing reaches the listener."""
    accepted = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    listener = await asyncio.start_server(count, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with httpx2.AsyncClient(transport=GuardedTransport(block_private=True, verify=True)) as http:
            with pytest.raises(httpx2.ConnectError, match="private and loopback"):
                await http.get(f"http://localhost:{port}/mcp")
            with pytest.raises(httpx2.ConnectError, match="private and loopback"):
                await http.get(f"http://127.0.0.1:{port}/mcp")
        assert accepted == 0
        async with httpx2.AsyncClient(transport=GuardedTransport(block_private=False, verify=True)) as http:
            with pytest.raises(httpx2.HTTPError):  # the listener hangs up without an answer
                await http.get(f"http://localhost:{port}/mcp")
        assert accepted == 1
    finally:
        listener.close()
        await listener.wait_closed()
