"""agentvault.common.agent_auth against a real token server and agent on loopback: one fetch for many callers,
one refresh after a 401 however many callers saw it, per-agent credentials bounded in bytes."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from agentvault.common import agent_auth
from agentvault.common import agents as rules

from ..loopback import serve

CALLERS = 20


@dataclass
class Servers:
    """A token endpoint (client credentials, counting its grants) and an agent accepting only its live tokens."""

    expires_in: int = 900
    grants: int = 0
    # Tokens the endpoint issued and the agent still accepts.
    live: set[str] = field(default_factory=set)
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    port: int = 0
    refuse_all: bool = False
    # Holds each grant a little, so concurrent callers really overlap with the one fetch in flight.
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if request.headers.get("Authorization", "") != "Basic " + base64.b64encode(b"mesh:s3cret").decode():
            return web.json_response({"error": "invalid_client"}, status=401)
        assert form["grant_type"] == "client_credentials" and form["scope"] == "a b" and form["audience"] == "aud"
        self.grants += 1
        await self.release.wait()
        token = secrets.token_urlsafe(16)
        self.live.add(token)
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in})

    async def agent(self, request: web.Request) -> web.Response:
        self.seen_headers.append(dict(request.headers))
        if self.refuse_all:
            return web.json_response({"error": "unauthorized"}, status=401)
        if request.headers.get("Authorization", "").removeprefix("Bearer ") in self.live:
            return web.json_response({"ok": True})
        if request.headers.get("X-Agent-Key") == "the-key":
            return web.json_response({"ok": True})
        return web.json_response({"error": "unauthorized"}, status=401)


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    found = Servers()
    found.release.set()
    app = web.Application()
    app.router.add_post("/token", found.token)
    app.router.add_get("/agent", found.agent)
    async with serve(app) as found.port:
        yield found


def oauth(servers: Servers, **overrides: object) -> rules.AgentAuth:
    fields: dict[str, object] = {
        "kind": rules.AUTH_OAUTH2,
        "token_url": servers.url("/token"),
        "client_id": "mesh",
        "scopes": ("a", "b"),
        "audience": "aud",
        "token_endpoint_auth_method": "client_secret_basic",
    }
    fields.update(overrides)
    return rules.validate_auth(rules.AgentAuth(**fields, client_secret="s3cret"))  # type: ignore[arg-type]


async def test_many_callers_one_fetch_and_one_refresh_after_a_401(servers: Servers) -> None:
    async with aiohttp.ClientSession() as session:
        connector = agent_auth.AgentConnector(session, None)
        prepared = connector.prepare(oauth(servers), "s3cret")
        servers.release.clear()
        calls = [agent_auth.call(session, "GET", servers.url("/agent"), prepared) for _ in range(CALLERS)]
        pending = asyncio.gather(*calls)
        # Every caller is waiting on the one grant in flight before it is answered.
        while servers.grants == 0:
            await asyncio.sleep(0.01)
        servers.release.set()
        answers = await pending
        assert [a.status for a in answers] == [200] * CALLERS
        assert servers.grants == 1

        # The agent stops accepting that token (revoked): every caller gets a 401, the token is fetched once
        # more for all of them, and each call is retried exactly once.
        servers.live.clear()
        servers.seen_headers.clear()
        answers = await asyncio.gather(
            *(agent_auth.call(session, "GET", servers.url("/agent"), prepared) for _ in range(CALLERS))
        )
        assert [a.status for a in answers] == [200] * CALLERS
        assert servers.grants == 2
        assert len(servers.seen_headers) == 2 * CALLERS

        # A fresh token refused too is the agent's answer: exactly one retry, never a loop.
        servers.refuse_all = True
        before = len(servers.seen_headers)
        answer = await agent_auth.call(session, "GET", servers.url("/agent"), prepared)
        assert answer.status == 401 and servers.grants == 3 and len(servers.seen_headers) == before + 2


async def test_an_expiring_token_is_refreshed_once_for_every_waiting_caller(servers: Servers) -> None:
    servers.expires_in = 1
    async with aiohttp.ClientSession() as session:
        prepared = agent_auth.AgentConnector(session, None).prepare(oauth(servers), "s3cret")
        assert (await agent_auth.call(session, "GET", servers.url("/agent"), prepared)).status == 200
        assert servers.grants == 1
        source = prepared.source
        assert source is not None
        # Past 80% of its lifetime the token is due: the next callers share one refresh.
        deadline = time.monotonic() + 0.9
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        answers = await asyncio.gather(
            *(agent_auth.call(session, "GET", servers.url("/agent"), prepared) for _ in range(CALLERS))
        )
        assert [a.status for a in answers] == [200] * CALLERS
        assert servers.grants == 2


async def test_static_kinds_send_their_header(servers: Servers) -> None:
    async with aiohttp.ClientSession() as session:
        connector = agent_auth.AgentConnector(session, None)
        api_key = connector.prepare(
            rules.validate_auth(rules.AgentAuth(kind=rules.AUTH_API_KEY, api_key_header="X-Agent-Key", api_key="k")),
            "the-key",
        )
        assert (await agent_auth.call(session, "GET", servers.url("/agent"), api_key)).status == 200
        assert servers.seen_headers[-1]["X-Agent-Key"] == "the-key"
        # A static credential the agent refuses is not retried: nothing would change.
        wrong = connector.prepare(rules.AgentAuth(kind=rules.AUTH_BEARER, bearer_token="t"), "nope")
        before = len(servers.seen_headers)
        assert (await agent_auth.call(session, "GET", servers.url("/agent"), wrong)).status == 401
        assert len(servers.seen_headers) == before + 1 and servers.seen_headers[-1]["Authorization"] == "Bearer nope"
        none = connector.prepare(rules.AgentAuth(), "")
        assert (await agent_auth.call(session, "GET", servers.url("/agent"), none)).status == 401
        assert "Authorization" not in servers.seen_headers[-1]


async def test_credentials_are_reused_per_version_and_dropped_when_the_config_changes(servers: Servers) -> None:
    async with aiohttp.ClientSession() as session:
        connector = agent_auth.AgentConnector(session, None)
        resolved = 0
        auth = oauth(servers)

        async def resolve() -> tuple[rules.AgentAuth, str]:
            nonlocal resolved
            resolved += 1
            return auth, "s3cret"

        first = await connector.for_agent("agent-1", "v1", resolve)
        assert await connector.for_agent("agent-1", "v1", resolve) is first and resolved == 1
        # A new version whose auth is unchanged (e.g. a renamed agent) keeps the token source and its token.
        assert await connector.for_agent("agent-1", "v2", resolve) is first and resolved == 2
        # A changed configuration gets new credentials; the old ones are gone with it.
        auth = oauth(servers, scopes=("a",))
        second = await connector.for_agent("agent-1", "v3", resolve)
        assert second is not first and second.source is not None and second.source.scopes == ("a",)


async def test_the_cache_is_bounded_in_bytes(servers: Servers) -> None:
    async with aiohttp.ClientSession() as session:
        budget = 10 * agent_auth.PREPARED_OVERHEAD
        connector = agent_auth.AgentConnector(session, None, budget=budget)
        big = "x" * 4000

        async def resolve() -> tuple[rules.AgentAuth, str]:
            return rules.AgentAuth(kind=rules.AUTH_BEARER), big

        for i in range(100):
            await connector.for_agent(f"agent-{i}", "v1", resolve)
            assert connector.bytes <= budget
        assert connector.bytes > budget // 2


async def test_mtls_without_the_mesh_certificate_is_a_clear_error(servers: Servers) -> None:
    async with aiohttp.ClientSession() as session:
        connector = agent_auth.AgentConnector(session, None)
        with pytest.raises(agent_auth.AgentAuthUnavailable, match="FEDERATION_TLS"):
            connector.prepare(rules.AgentAuth(kind=rules.AUTH_MTLS), "")
        # A private token URL is refused where private addresses are.
        strict = agent_auth.AgentConnector(session, None, block_private=True)
        with pytest.raises(agent_auth.AgentAuthUnavailable, match="token URL"):
            strict.prepare(oauth(servers), "s3cret")
