"""One MCP session with a registered MCP server, as the mesh (its own credentials for that agent)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore2
import httpx2
import mcp_types as types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from agentvault.common import egress
from agentvault.common.agent_auth import PreparedAuth

# Bounds on what an MCP server can make the mesh hold: one SSE event, and a listing's pages.
MAX_EVENT_BYTES = 1024 * 1024
CONNECT_SECONDS = 10.0
SESSION_HEADER = "mcp-session-id"


class GuardedBackend(httpcore2.AsyncNetworkBackend):
    """Connects only to allowed addresses: the host is resolved here and the connection made to a checked address,
    so a name that resolves elsewhere at connect time (DNS rebinding) is caught too. TLS still verifies the name
    (httpcore sends the URL's host as SNI and checks the certificate against it)."""

    def __init__(self, block_private: bool) -> None:
        self.block_private = block_private
        self._inner = httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        try:
            addresses = await egress.allowed_addresses(host, port, self.block_private)
        except egress.EgressRefused as exc:
            raise httpcore2.ConnectError(str(exc)) from None
        except OSError as exc:
            raise httpcore2.ConnectError(f"{host}: cannot be resolved: {exc}") from None
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except httpcore2.ConnectError as exc:  # the next address, as a resolver's happy path would
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("unix sockets are not reachable from the mesh")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx2.AsyncHTTPTransport):
    """httpx's transport on a connection pool whose connections go through GuardedBackend. No proxy (from the
    environment or otherwise): a proxy would connect for us, unchecked."""

    def __init__(
        self,
        *,
        block_private: bool,
        verify: Any,
        max_connections: int = 10,
        on_connect_error: Callable[[], None] | None = None,
        on_session_unknown: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(verify=verify, trust_env=False)
        self.on_connect_error = on_connect_error
        self.on_session_unknown = on_session_unknown
        # httpx builds its pool without a way to pass a network backend: the same pool, with ours.
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=httpx2.create_ssl_context(verify=verify, trust_env=False),
            max_connections=max_connections,
            network_backend=GuardedBackend(block_private),
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx2.ConnectError:
            # No connection, so nothing of this request reached the server (the pool may send a call again).
            if self.on_connect_error is not None:
                self.on_connect_error()
            raise
        if response.status_code == 404 and SESSION_HEADER in request.headers and self.on_session_unknown is not None:
            # The server no longer knows the session (it restarted, or ended it): the spec has it refuse the request
            # with 404, unprocessed, and the client start a new session.
            self.on_session_unknown()
        return response


@contextlib.asynccontextmanager
async def open_session(
    url: str,
    prepared: PreparedAuth,
    *,
    block_private: bool,
    on_notification: Callable[[Any], Awaitable[None]] | None = None,
    on_connect_error: Callable[[], None] | None = None,
    on_session_unknown: Callable[[], None] | None = None,
) -> AsyncIterator[ClientSession]:
    """An initialized session. Redirects are the SDK's (same origin only). Every connection goes to an allowed
    address (GuardedBackend: link-local, multicast and reserved ones always refused, private and loopback ones too
    when the mesh blocks them), host names resolved and checked; a URL whose host has no allowed address is refused
    here, before any connection, with EgressRefused. `on_connect_error` is told of each request whose connection could
    not be made (so was never sent), `on_session_unknown` of each the server refused for not knowing the session."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        await egress.allowed_addresses(host, port, block_private)  # EgressRefused: refused before any connection
    except OSError as exc:
        raise httpcore2.ConnectError(f"{host}: cannot be resolved: {exc}") from None
    headers, _token = await prepared.request_headers()
    verify: Any = prepared.ssl_context if prepared.ssl_context is not None else True
    transport = GuardedTransport(
        block_private=block_private,
        verify=verify,
        on_connect_error=on_connect_error,
        on_session_unknown=on_session_unknown,
    )

    async def handler(message: Any) -> None:
        if on_notification is not None and not isinstance(message, Exception):
            await on_notification(message)

    async with (
        httpx2.AsyncClient(
            headers=headers, transport=transport, timeout=httpx2.Timeout(CONNECT_SECONDS, read=None)
        ) as http,
        streamable_http_client(url, http_client=http, max_sse_event_size=MAX_EVENT_BYTES) as (read, write),
        ClientSession(read, write, message_handler=handler) as session,
    ):
        await session.initialize()
        yield session


def is_tools_changed(message: Any) -> bool:
    return isinstance(message, types.ToolListChangedNotification) or (
        getattr(message, "root", None) is not None and isinstance(message.root, types.ToolListChangedNotification)
    )
