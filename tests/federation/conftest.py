"""Three real meshes, A, B and C, peered over HTTP through their edges exactly as an operator would do it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from agentvault.common.secretbox import SecretBox
from agentvault.devserver.embedded import free_port

from ..conftest import MeshFactory, MeshHandle

QUERY_TIMEOUT_MS = 1500


@dataclass
class Federation:
    a: MeshHandle
    b: MeshHandle
    c: MeshHandle
    # Tokens B and C issued to A (A stores them as the peers' api_key).
    token_b_for_a: str = ""
    token_c_for_a: str = ""
    peer_b: str = ""
    peer_c: str = ""

    @property
    def discovery_metrics(self) -> str:
        return f"http://127.0.0.1:{self.a.env['DISCOVERY_METRICS_PORT']}/metrics"

    @property
    def registry_b_metrics(self) -> str:
        return f"http://127.0.0.1:{self.b.env['REGISTRY_METRICS_PORT']}/metrics"


def mesh_env(name: str, **extra: str) -> dict[str, str]:
    return {
        **extra,
        "FEDERATION_ENCRYPTION_KEYS": SecretBox.generate_key(),
        "FEDERATION_REGISTRY_NAME": name,
        "FEDERATION_QUERY_TIMEOUT": str(QUERY_TIMEOUT_MS),
        "FEDERATION_CACHE_TTL": "300",
        "DISCOVERY_METRICS_PORT": str(free_port()),
        "REGISTRY_METRICS_PORT": str(free_port()),
    }


@pytest.fixture(scope="module")
def meshes(mesh_factory: MeshFactory) -> Federation:
    # Started from a synchronous fixture: mesh_factory creates each mesh's database with asyncio.run.
    return Federation(
        # A's health monitor checks each peer once, then not for an hour, so the tests decide which peer is down.
        a=mesh_factory(env=mesh_env("mesh-a", FEDERATION_HEALTH_CHECK_INTERVAL="3600"), name="fed_a"),
        b=mesh_factory(env=mesh_env("mesh-b"), name="fed_b"),
        c=mesh_factory(env=mesh_env("mesh-c"), name="fed_c"),
    )


def admin(handle: MeshHandle) -> dict[str, str]:
    return {"Authorization": f"Bearer {handle.admin_token}"}


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    json: Any = None,
    params: Any = None,
    expect: int = 200,
) -> Any:
    async with http.request(method, url, headers=headers, json=json, params=params) as response:
        body = await response.json(content_type=None)
        assert response.status == expect, f"{method} {url} -> {response.status}: {body}"
        return body


async def issue_credential(http: aiohttp.ClientSession, issuer: MeshHandle, name: str) -> str:
    body = await call(
        http, "POST", issuer.url("/api/v1/federation/credentials"), headers=admin(issuer), json={"name": name}
    )
    token = body["token"]
    assert isinstance(token, str) and token
    return token


async def add_peer(
    http: aiohttp.ClientSession, on: MeshHandle, name: str, url: str, api_key: str, **fields: str
) -> str:
    """The seed's request; `fields` adds optional ones (`protocol`, `grpc_endpoint`). Returns the peer's id."""
    body = await call(
        http,
        "POST",
        on.url("/api/v1/federation/peers"),
        headers=admin(on),
        json={"name": name, "registry_url": url, "api_key": api_key, **fields},
    )
    return str(body["id"])


@pytest.fixture(scope="module")
async def federation(meshes: Federation, http: aiohttp.ClientSession) -> Federation:
    meshes.token_b_for_a = await issue_credential(http, meshes.b, "mesh-a")
    meshes.token_c_for_a = await issue_credential(http, meshes.c, "mesh-a")
    meshes.peer_b = await add_peer(http, meshes.a, "Partner B", meshes.b.url(), meshes.token_b_for_a)
    meshes.peer_c = await add_peer(http, meshes.a, "Partner C", meshes.c.url(), meshes.token_c_for_a)
    return meshes


async def register(
    http: aiohttp.ClientSession, on: MeshHandle, name: str, sharing: str, *, did: str | None = None, **extra: Any
) -> dict[str, Any]:
    agent = {
        "did": did or f"did:web:test.example:{name.lower().replace(' ', '-')}-{secrets.token_hex(4)}",
        "name": name,
        "description": f"{name} for the federation tests",
        "version": "1.0.0",
        "agent_type": "nlp",
        "tags": ["nlp"],
        "capabilities": [{"kind": "skill", "name": "summarize", "version": "1.2.0"}],
        "endpoints": [{"protocol": "http", "url": "https://agents.example/" + secrets.token_hex(4)}],
        "sharing": sharing,
        **extra,
    }
    return dict(await call(http, "POST", on.url("/api/v1/agents"), headers=admin(on), json=agent))


async def rename(http: aiohttp.ClientSession, on: MeshHandle, agent_id: str, name: str) -> None:
    """PATCH an agent's name through the mesh's edge, as its admin."""
    await call(http, "PATCH", on.url(f"/api/v1/agents/{agent_id}"), headers=admin(on), json={"name": name})


async def discover(http: aiohttp.ClientSession, on: MeshHandle, **params: Any) -> dict[str, Any]:
    query = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in params.items()}
    return dict(await call(http, "GET", on.url("/api/v1/discovery/agents"), headers=admin(on), params=query))


def unique_word() -> str:
    # Letters only: full-text search splits on anything else, and each test needs words no other test uses.
    return "zq" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))


VALID_PEER_AGENT = {
    "id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
    "did": "did:web:rest-peer.example:valid",
    "name": "Valid mixed agent",
    "description": "the one good agent among bad ones",
    "version": "2.1.0",
    "agent_type": "nlp",
    "tags": ["nlp"],
    "capabilities": [{"kind": "tool", "name": "translate", "version": "1.0.0"}],
    "endpoints": [{"protocol": "http", "url": "https://rest-peer.example/valid"}],
    "health_status": "healthy",
    "owner": "someone@rest-peer.example",
}
INVALID_PEER_AGENTS: list[Any] = [
    {**VALID_PEER_AGENT, "did": "not a did"},
    {**VALID_PEER_AGENT, "did": "did:web:rest-peer.example:badver", "version": "one"},
    {**VALID_PEER_AGENT, "did": "did:web:rest-peer.example:badurl", "endpoints": [{"protocol": "http", "url": "x"}]},
    {**VALID_PEER_AGENT, "did": "did:web:rest-peer.example:longname", "name": "n" * 5000},
    {k: v for k, v in VALID_PEER_AGENT.items() if k != "did"},
    "just a string",
    None,
]


@pytest.fixture(scope="module")
async def bad_peers() -> AsyncIterator[str]:
    """A REST 'registry' on loopback whose base paths misbehave: /hang, /garbage, /huge and /mixed."""
    from aiohttp import web

    release = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await release.wait()  # accepts the request and never answers, until the fixture ends
        return web.Response(status=503)

    async def garbage(request: web.Request) -> web.StreamResponse:
        return web.Response(text='{"agents": [ {"name": oops', content_type="application/json")

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"agents": [')
        chunk = (b'{"name": "' + b"x" * 1000 + b'"},') * 100
        try:
            for _ in range(100):  # about 10 MB
                await response.write(chunk)
            await response.write(b"{}]}")
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should
        return response

    async def mixed(request: web.Request) -> web.StreamResponse:
        return web.json_response({"agents": [VALID_PEER_AGENT, *INVALID_PEER_AGENTS]})

    app = web.Application()
    app.router.add_get("/hang/api/v1/agents", hang)
    app.router.add_get("/garbage/api/v1/agents", garbage)
    app.router.add_get("/huge/api/v1/agents", huge)
    app.router.add_get("/mixed/api/v1/agents", mixed)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        release.set()
        await runner.cleanup()
