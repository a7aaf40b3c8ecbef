"""TokenSource against a real OAuth token endpoint on loopback (aiohttp, tokens signed by jose_keys)."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import grpc
import pytest
from aiohttp import web

from agentvault.common import jose_keys
from agentvault.common.errors import Unavailable
from agentvault.common.jwt_auth import JwtValidator
from agentvault.common.token_source import (
    CLIENT_SECRET_POST,
    BearerInterceptor,
    TokenFetchFailed,
    TokenSource,
    call_credentials,
)

from ..loopback import serve

ISSUER = "http://token-server.test"
AUDIENCE = "agentvault"
# Characters that Basic auth must form-encode before joining (RFC 6749 2.3.1).
CLIENT_ID = "svc:discovery"
CLIENT_SECRET = "s3cret:with%odd+chars/" + secrets.token_urlsafe(8)


class TokenServer:
    """A client credentials token endpoint, as another mesh's authorization server answers it."""

    def __init__(self) -> None:
        self.key = jose_keys.generate_key()
        self.requests = 0
        self.auth_methods: list[str] = []
        self.expires_in = 900
        self.gate: asyncio.Event | None = None
        self.oversize = False
        self.down = False
        self.url = ""
        self.grants: list[str] = []
        # Refresh tokens this server would accept (each once: rotation), when it issues them at all.
        self.issue_refresh = False
        self.refresh_tokens: set[str] = set()

    def client_from(self, request: web.Request, form: Any) -> tuple[str, str]:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            self.auth_methods.append("basic")
            client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            return unquote(client_id), unquote(secret)
        self.auth_methods.append("post")
        return form.get("client_id", ""), form.get("client_secret", "")

    async def token(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        if self.oversize:
            return web.json_response({"access_token": "x" * 100_000, "token_type": "Bearer"})
        if request.content_type != "application/x-www-form-urlencoded":
            return web.json_response({"error": "invalid_request"}, status=400)
        form = await request.post()
        client_id, secret = self.client_from(request, form)
        grant = str(form.get("grant_type"))
        self.grants.append(grant)
        if grant not in ("client_credentials", "refresh_token"):
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if client_id != CLIENT_ID or not secrets.compare_digest(secret, CLIENT_SECRET):
            return web.json_response(
                {"error": "invalid_client", "error_description": "client authentication failed"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="token"'},
            )
        if grant == "refresh_token":
            presented = str(form.get("refresh_token"))
            if presented not in self.refresh_tokens:
                return web.json_response({"error": "invalid_grant"}, status=400)
            self.refresh_tokens.discard(presented)
        scopes = str(form.get("scope", "")).split()
        signed = jose_keys.sign_access_token(
            self.key,
            issuer=ISSUER,
            audience=str(form.get("audience") or AUDIENCE),
            subject=client_id,
            client_id=client_id,
            scopes=scopes,
            ttl=self.expires_in,
            kind="service",
        )
        body: dict[str, Any] = {"access_token": signed.token, "token_type": "Bearer", "expires_in": self.expires_in}
        if self.issue_refresh:
            body["refresh_token"] = "rt-" + secrets.token_urlsafe(8)
            self.refresh_tokens.add(body["refresh_token"])
        return web.json_response(body, headers={"Cache-Control": "no-store"})


@pytest.fixture
async def server() -> AsyncIterator[TokenServer]:
    token_server = TokenServer()
    app = web.Application()
    app.router.add_post("/oauth/token", token_server.token)
    async with serve(app) as port:
        token_server.url = f"http://127.0.0.1:{port}/oauth/token"
        yield token_server
        if token_server.gate is not None:
            token_server.gate.set()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def source(server: TokenServer, **kwargs: Any) -> TokenSource:
    return TokenSource(server.url, CLIENT_ID, CLIENT_SECRET, scopes=["agents:read", "federation:resolve"], **kwargs)


async def test_client_secret_basic_gets_a_token_the_validator_accepts(server: TokenServer) -> None:
    tokens = source(server)
    try:
        token = await tokens.token()
    finally:
        await tokens.close()
    assert server.auth_methods == ["basic"]

    async def jwks() -> dict[str, Any]:
        return jose_keys.jwks([server.key])

    principal = await JwtValidator(ISSUER, AUDIENCE, jwks).validate(token)
    assert principal.client_id == CLIENT_ID and principal.scopes == {"agents:read", "federation:resolve"}


async def test_client_secret_post_and_audience(server: TokenServer) -> None:
    tokens = source(server, auth_method=CLIENT_SECRET_POST, audience="elsewhere")
    try:
        token = await tokens.token()
        assert (await tokens.metadata()) == (("authorization", f"Bearer {token}"),)
    finally:
        await tokens.close()
    assert server.auth_methods == ["post"]

    async def jwks() -> dict[str, Any]:
        return jose_keys.jwks([server.key])

    assert (await JwtValidator(ISSUER, "elsewhere", jwks).validate(token)).subject == CLIENT_ID


async def test_fifty_callers_cause_one_fetch(server: TokenServer) -> None:
    server.gate = asyncio.Event()
    tokens = source(server)
    try:
        callers = [asyncio.create_task(tokens.token()) for _ in range(50)]
        while server.requests == 0:
            await asyncio.sleep(0.01)
        server.gate.set()
        got = await asyncio.gather(*callers)
    finally:
        await tokens.close()
    assert server.requests == 1
    assert len(set(got)) == 1


async def test_a_token_is_reused_then_refreshed_at_80_percent(server: TokenServer) -> None:
    clock = Clock()
    server.expires_in = 100
    tokens = source(server, clock=clock)
    try:
        first = await tokens.token()
        clock.now += 79
        assert await tokens.token() == first
        assert server.requests == 1
        clock.now += 2
        second = await tokens.token()
        assert second != first and server.requests == 2
    finally:
        await tokens.close()


async def test_invalidate_after_a_401_fetches_once(server: TokenServer) -> None:
    tokens = source(server)
    try:
        first = await tokens.token()
        tokens.invalidate(first)
        second = await tokens.token()
        assert second != first and server.requests == 2
        # A late 401 for the token already replaced must not throw the fresh one away.
        tokens.invalidate(first)
        assert await tokens.token() == second and server.requests == 2
    finally:
        await tokens.close()


async def test_a_wrong_secret_names_the_endpoint_and_the_error_never_the_secret(
    server: TokenServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + secrets.token_urlsafe(8)
    tokens = TokenSource(server.url, CLIENT_ID, wrong)
    try:
        with pytest.raises(TokenFetchFailed) as err:
            await tokens.token()
    finally:
        await tokens.close()
    message = err.value.message
    assert server.url in message and "invalid_client" in message and "401" in message
    assert err.value.reason == "TOKEN_FETCH_FAILED" and err.value.metadata["error"] == "invalid_client"
    assert wrong not in message and wrong not in caplog.text and wrong not in repr(tokens)


async def test_an_oversize_answer_is_refused(server: TokenServer) -> None:
    server.oversize = True
    tokens = source(server)
    try:
        with pytest.raises(TokenFetchFailed) as err:
            await tokens.token()
    finally:
        await tokens.close()
    assert "65536 bytes" in err.value.message and server.url in err.value.message


async def test_an_unreachable_endpoint_is_a_clear_error() -> None:
    from agentvault.devserver.embedded import free_port

    url = f"http://127.0.0.1:{free_port()}/oauth/token"
    tokens = TokenSource(url, CLIENT_ID, CLIENT_SECRET, timeout=2)
    try:
        with pytest.raises(TokenFetchFailed) as err:
            await tokens.token()
    finally:
        await tokens.close()
    assert url in err.value.message and "cannot reach" in err.value.message


async def test_a_failed_refresh_keeps_the_token_until_it_expires(server: TokenServer) -> None:
    clock = Clock()
    server.expires_in = 100
    tokens = source(server, clock=clock)
    try:
        first = await tokens.token()
        server.down = True
        clock.now += 90
        assert await tokens.token() == first
        clock.now += 11
        with pytest.raises(TokenFetchFailed) as err:
            await tokens.token()
        assert "temporarily_unavailable" in err.value.message
    finally:
        await tokens.close()


async def test_the_interceptor_retries_once_with_a_fresh_token(server: TokenServer) -> None:
    seen: list[str] = []
    refused: set[str] = set()

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        token = dict(context.invocation_metadata() or ()).get("authorization", "")
        seen.append(token)
        if len(seen) == 1:
            refused.add(token)  # the first token is refused, as a revoked one would be
        if token in refused:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "token revoked")
        return request

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)})
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((handler,))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    tokens = source(server)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=[BearerInterceptor(tokens)]) as channel:
            echo = channel.unary_unary("/test.Echo/Call")
            assert await echo(b"hello", timeout=10) == b"hello"
            assert await echo(b"again", timeout=10) == b"again"
    finally:
        await tokens.close()
        await grpc_server.stop(None)
    assert len(seen) == 3 and seen[0] != seen[1] == seen[2]
    assert all(t.startswith("Bearer ey") for t in seen)
    assert server.requests == 2


async def test_a_refresh_token_is_used_rotated_and_dropped_when_refused(server: TokenServer) -> None:
    clock = Clock()
    server.expires_in = 100
    server.issue_refresh = True
    tokens = source(server, clock=clock)
    try:
        first = await tokens.token()
        clock.now += 81
        second = await tokens.token()
        clock.now += 81
        third = await tokens.token()
        assert server.grants == ["client_credentials", "refresh_token", "refresh_token"]
        # Revoked on the server (e.g. its family after a reuse): the client's own credentials take over.
        server.refresh_tokens.clear()
        clock.now += 81
        fourth = await tokens.token()
        assert server.grants[3:] == ["refresh_token", "client_credentials"]
        assert len({first, second, third, fourth}) == 4
    finally:
        await tokens.close()


async def test_call_credentials_carry_the_token_on_a_secure_channel(server: TokenServer) -> None:
    seen: list[str] = []

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata() or ()).get("authorization", ""))
        return request

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)})
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((handler,))
    port = grpc_server.add_secure_port("127.0.0.1:0", grpc.local_server_credentials())
    await grpc_server.start()
    tokens = source(server)
    try:
        credentials = grpc.composite_channel_credentials(grpc.local_channel_credentials(), call_credentials(tokens))
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            echo = channel.unary_unary("/test.Echo/Call")
            assert await echo(b"one", timeout=10) == b"one"
            assert await echo(b"two", timeout=10) == b"two"
    finally:
        await tokens.close()
        await grpc_server.stop(None)
    assert seen == [f"Bearer {await tokens.token()}"] * 2
    assert server.requests == 1


async def test_the_interceptor_tells_callers_no_token_endpoint_details(server: TokenServer) -> None:
    # The error a service's caller sees when the service cannot get its own token names neither the token
    # endpoint nor the client: that is in the service's log, for its operator.
    tokens = TokenSource(server.url, CLIENT_ID, "wrong-secret", scopes=["agents:read"])
    try:
        async with grpc.aio.insecure_channel("127.0.0.1:9", interceptors=[BearerInterceptor(tokens)]) as channel:
            with pytest.raises(Unavailable) as err:
                await channel.unary_unary("/test.Echo/Call")(b"hello", timeout=10)
    finally:
        await tokens.close()
    assert err.value.reason == "SERVICE_TOKEN_UNAVAILABLE"
    assert not isinstance(err.value, TokenFetchFailed)
    shown = err.value.message + repr(dict(err.value.metadata))
    assert server.url.split("//")[1] not in shown and CLIENT_ID not in shown
