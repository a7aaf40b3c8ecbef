"""Outbound calls to user-supplied URLs never reach metadata or other refused addresses, however they resolve."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from agentvault.common import egress

from ..loopback import serve


@pytest.fixture
async def local_server() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/health", lambda request: web.json_response({"status": "healthy"}))
    async with serve(app) as port:
        yield port


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://0.0.0.0:80/",
        "http://224.0.0.1/",
    ],
)
def test_literal_refused_addresses(url: str) -> None:
    with pytest.raises(egress.EgressRefused):
        egress.check_url(url, block_private=False)


async def test_names_resolving_to_refused_addresses_are_not_connected(local_server: int) -> None:
    # localhost resolves to loopback: allowed by default, refused when private addresses are blocked.
    async with egress.guarded_session(False) as session, session.get(f"http://localhost:{local_server}/health") as r:
        assert r.status == 200
    egress.check_url(f"http://127.0.0.1:{local_server}/health", block_private=False)
    with pytest.raises(egress.EgressRefused):
        egress.check_url(f"http://127.0.0.1:{local_server}/health", block_private=True)
    async with egress.guarded_session(True) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as err:
            await session.get(f"http://localhost:{local_server}/health")
    assert "not allowed" in str(err.value.os_error)


async def test_allowed_addresses_checks_what_a_name_resolves_to_and_literals_as_they_are() -> None:
    """The one check of the httpx-based clients (the A2A transport, the MCP client): addresses, not names."""
    found = await egress.allowed_addresses("localhost", 80, block_private=False)
    assert found and set(found) <= {"127.0.0.1", "::1"}, found
    with pytest.raises(egress.EgressRefused) as refused:
        await egress.allowed_addresses("localhost", 80, block_private=True)
    assert refused.value.reason == "private and loopback addresses are not allowed"
    assert str(refused.value).startswith("localhost: ")
    with pytest.raises(egress.EgressRefused) as metadata:
        await egress.allowed_addresses("169.254.169.254", 80, block_private=False)
    assert "link-local" in metadata.value.reason
    assert await egress.allowed_addresses("10.0.0.7", 443, block_private=False) == ["10.0.0.7"]
    with pytest.raises(socket.gaierror):  # a name that does not resolve is the caller's to report
        await egress.allowed_addresses("no-such-host.invalid", 80, block_private=False)
