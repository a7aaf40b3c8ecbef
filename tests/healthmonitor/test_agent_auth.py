"""The health monitor authenticates to agents as their registrations say: an OAuth 2.0 client of another mesh's
authorization server (one token for many checks, one new token after a 401), an API key, a bearer token."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from aiohttp import web

from ..conftest import MeshHandle, unique_did
from ..loopback import serve
from .conftest import Peers, admin, call, until

API_KEY = "agent-key-" + secrets.token_hex(8)
BEARER = "agent-bearer-" + secrets.token_hex(8)


@dataclass
class ProtectedAgent:
    """An agent on loopback whose health endpoints need credentials: /oauth/health a JWT from mesh B's
    authorization server (checked with PyJWT against B's JWKS), /key/health an API key, /bearer/health a token."""

    issuer: str
    jwks: pyjwt.PyJWKSet
    port: int = 0
    # Every accepted token's jti, in order of the requests.
    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    # Tokens the agent refuses (as if revoked), by jti.
    reject: set[str] = field(default_factory=set)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _claims(self, request: web.Request) -> dict[str, Any] | None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            kid = pyjwt.get_unverified_header(token)["kid"]
            claims: dict[str, Any] = pyjwt.decode(
                token, self.jwks[kid].key, algorithms=["ES256"], audience="agentvault", issuer=self.issuer
            )
        except (pyjwt.PyJWTError, KeyError):
            return None
        return claims if claims["jti"] not in self.reject else None

    async def oauth(self, request: web.Request) -> web.Response:
        claims = self._claims(request)
        if claims is None:
            self.refused += 1
            return web.json_response({"error": "invalid_token"}, status=401)
        self.accepted.append(claims["jti"])
        return web.json_response({"status": "ok"})

    async def key(self, request: web.Request) -> web.Response:
        ok = request.headers.get("X-Agent-Key") == API_KEY
        return web.json_response({"status": "ok" if ok else "unauthorized"}, status=200 if ok else 401)

    async def bearer(self, request: web.Request) -> web.Response:
        ok = request.headers.get("Authorization") == f"Bearer {BEARER}"
        return web.json_response({"status": "ok" if ok else "unauthorized"}, status=200 if ok else 401)


@pytest.fixture
async def agent(peers: Peers, http: aiohttp.ClientSession) -> AsyncIterator[ProtectedAgent]:
    metadata = await call(http, "GET", peers.b.url("/.well-known/oauth-authorization-server"), headers={})
    jwks = await call(http, "GET", peers.b.url("/.well-known/jwks.json"), headers={})
    found = ProtectedAgent(metadata["issuer"], pyjwt.PyJWKSet.from_dict(jwks))
    app = web.Application()
    app.router.add_get("/oauth/health", found.oauth)
    app.router.add_get("/key/health", found.key)
    app.router.add_get("/bearer/health", found.bearer)
    async with serve(app) as found.port:
        yield found


async def register(http: aiohttp.ClientSession, on: MeshHandle, url: str, auth: dict[str, Any] | None) -> str:
    agent: dict[str, Any] = {
        "did": unique_did(),
        "name": "Protected agent",
        "version": "1.0.0",
        "health_check_url": url,
    }
    if auth is not None:
        agent["auth"] = auth
    body = await call(http, "POST", on.url("/api/v1/agents"), headers=admin(on), json=agent)
    return str(body["id"])


def health(http: aiohttp.ClientSession, on: MeshHandle, agent_id: str) -> Any:
    async def fetch() -> str:
        body = await call(http, "GET", on.url(f"/api/v1/agents/{agent_id}"), headers=admin(on))
        return str(body["health_status"])

    return fetch


async def test_an_oauth_agent_is_checked_with_a_token_from_another_mesh(
    peers: Peers, agent: ProtectedAgent, http: aiohttp.ClientSession
) -> None:
    # Mesh B's admin registers the OAuth client with which mesh A calls B's agent.
    client = await call(
        http,
        "POST",
        peers.b.url("/api/v1/oauth/clients"),
        headers=admin(peers.b),
        json={"name": "mesh-a-health", "scopes": ["agents:read"], "grant_types": ["client_credentials"]},
    )
    auth = {
        "kind": "oauth2_client_credentials",
        "token_url": peers.b.url("/oauth/token"),
        "client_id": client["client"]["client_id"],
        "client_secret": client["client_secret"],
        "scopes": ["agents:read"],
    }
    agent_id = await register(http, peers.a, agent.url("/oauth/health"), auth)
    await until(health(http, peers.a, agent_id), lambda s: s == "healthy", "the OAuth agent to be healthy")

    # Many checks, one token: every accepted request carried the same jti.
    await until(lambda: _value(len(agent.accepted)), lambda n: n >= 3, "three authenticated checks")
    assert len(set(agent.accepted)) == 1 and agent.refused == 0

    # The agent refuses that token from now on: the next check is refused once, gets a new token, and passes.
    first = agent.accepted[-1]
    agent.reject.add(first)
    await until(lambda: _value(set(agent.accepted)), lambda s: len(s) == 2, "a check with a new token")
    count = len(agent.accepted)
    await until(lambda: _value(len(agent.accepted)), lambda n: n >= count + 2, "two more checks")
    assert len(set(agent.accepted)) == 2 and agent.refused == 1
    assert await health(http, peers.a, agent_id)() == "healthy"

    # Without credentials the same endpoint is refused: the agent is reported unhealthy.
    bare = await register(http, peers.a, agent.url("/oauth/health"), None)
    await until(health(http, peers.a, bare), lambda s: s == "unhealthy", "the bare agent to be unhealthy")


async def test_api_key_and_bearer_agents(peers: Peers, agent: ProtectedAgent, http: aiohttp.ClientSession) -> None:
    keyed = await register(
        http,
        peers.a,
        agent.url("/key/health"),
        {"kind": "api_key", "api_key_header": "X-Agent-Key", "api_key": API_KEY},
    )
    bearer = await register(http, peers.a, agent.url("/bearer/health"), {"kind": "bearer", "bearer_token": BEARER})
    wrong = await register(http, peers.a, agent.url("/key/health"), {"kind": "api_key", "api_key": API_KEY})
    bare = await register(http, peers.a, agent.url("/bearer/health"), None)
    for agent_id in (keyed, bearer):
        await until(health(http, peers.a, agent_id), lambda s: s == "healthy", "a keyed agent to be healthy")
    # The key in the default header (X-API-Key), or no credential at all: HTTP 401, reported unhealthy.
    for agent_id in (wrong, bare):
        await until(health(http, peers.a, agent_id), lambda s: s == "unhealthy", "an agent to be unhealthy")


async def _value(value: Any) -> Any:
    return value
