"""The console's serving, sign-in sessions, and the cookie on the REST API (CSRF, origin), over plain HTTP."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from yarl import URL

from agentvault_edge.console import DEFAULT_SIGN_IN_FAILURES_PER_MINUTE

from .conftest import COOKIE, CSRF_HEADER, ConsoleNet, sign_in


@pytest.fixture
async def browser_like() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps cookies like a browser (unsafe=True: the edge is on an IP address)."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        yield session


async def test_the_console_is_served_by_the_edge_with_a_strict_policy(
    console: ConsoleNet, browser_like: aiohttp.ClientSession
) -> None:
    async with browser_like.get(console.url("/console")) as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        page = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
    assert scripts and all('src="/console/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert "http://" not in page and "https://" not in page  # no CDN: every asset comes from the mesh
    for asset, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        async with browser_like.get(console.url(f"/console/static/{asset}")) as resp:
            assert resp.status == 200 and resp.content_type == kind
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    async with browser_like.get(console.url("/console/static/../app.py")) as resp:
        assert resp.status == 404


async def test_a_credential_the_mesh_refuses_signs_nobody_in(
    console: ConsoleNet, browser_like: aiohttp.ClientSession
) -> None:
    async with browser_like.post(console.url("/console/api/session"), json={"credential": "nope-" + "x" * 30}) as resp:
        assert resp.status == 401, await resp.text()
        assert COOKIE not in resp.cookies
    async with browser_like.post(console.url("/console/api/session"), json={"credential": ""}) as resp:
        body = await resp.json()
        assert resp.status == 400 and body["error"]["message"]
    # A form post from anywhere is not JSON: refused before anything is looked at.
    async with browser_like.post(console.url("/console/api/session"), data={"credential": console.admin_token}) as resp:
        assert resp.status == 415
    async with browser_like.get(console.url("/console/api/session")) as resp:
        assert resp.status == 401


async def test_the_session_cookie_is_httponly_strict_and_its_credential_encrypted_at_rest(
    console: ConsoleNet, browser_like: aiohttp.ClientSession
) -> None:
    async with browser_like.post(console.url("/console/api/session"), json={"credential": console.admin_token}) as resp:
        assert resp.status == 200
        body = await resp.json()
        morsel = resp.cookies[COOKIE]
    assert body["role"] == "admin" and len(body["csrf_token"]) >= 32
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
    assert not morsel["secure"]  # plain HTTP here; Secure whenever the edge is reached over TLS
    session_id = morsel.value
    r = aioredis.Redis.from_url(console.net.mesh.redis_url)
    try:
        keys = [k.decode() for k in await r.keys("console:session:*")]
        assert keys and all(session_id not in k for k in keys)  # the key is a hash of the id, not the id
        values = [await r.get(k) for k in keys]
        assert all(console.admin_token.encode() not in v for v in values if v)
        ttls = [await r.ttl(k) for k in keys]
        assert all(0 < ttl <= 8 * 3600 for ttl in ttls)
    finally:
        await r.aclose()


async def test_the_cookie_calls_the_api_and_a_change_needs_the_csrf_header(
    console: ConsoleNet, browser_like: aiohttp.ClientSession
) -> None:
    csrf = await sign_in(browser_like, console.url(), console.admin_token)
    async with browser_like.get(console.url("/api/v1/whoami")) as resp:
        assert resp.status == 200 and (await resp.json())["role"] == "admin"
    name = f"console-{secrets.token_hex(4)}"
    text = 'forbid(principal, action == Action::"message.send", resource) when { resource.tags.contains("nil") };'
    policy = {"name": name, "text": text, "enabled": False}
    for headers in ({}, {CSRF_HEADER: "wrong-" + csrf[6:]}):
        async with browser_like.post(console.url("/api/v1/policies"), json=policy, headers=headers) as resp:
            body = await resp.json()
            assert resp.status == 403 and CSRF_HEADER in body["error"]["message"], body
    async with browser_like.get(console.url("/api/v1/policies?page_size=500")) as resp:
        assert name not in {p["name"] for p in (await resp.json())["policies"]}  # refused before the backend
    async with browser_like.post(console.url("/api/v1/policies"), json=policy, headers={CSRF_HEADER: csrf}) as resp:
        assert resp.status == 200, await resp.text()
    # Another site's page making the request (its Origin) is refused even with the cookie.
    async with browser_like.get(console.url("/api/v1/whoami"), headers={"Origin": "https://evil.example"}) as resp:
        assert resp.status == 403


async def test_a_member_session_sees_what_the_api_shows_a_member(
    console: ConsoleNet, browser_like: aiohttp.ClientSession
) -> None:
    await sign_in(browser_like, console.url(), console.member_token)
    async with browser_like.get(console.url("/api/v1/whoami")) as resp:
        assert (await resp.json())["role"] == "member"
    async with browser_like.get(console.url("/api/v1/deadLetters")) as resp:
        assert resp.status == 403


async def test_sign_out_ends_the_session(console: ConsoleNet, browser_like: aiohttp.ClientSession) -> None:
    csrf = await sign_in(browser_like, console.url(), console.admin_token)
    cookie = browser_like.cookie_jar.filter_cookies(URL(console.url("/")))[COOKIE].value
    async with browser_like.delete(console.url("/console/api/session")) as resp:
        assert resp.status == 403  # signing out is a change too
    async with browser_like.delete(console.url("/console/api/session"), headers={CSRF_HEADER: csrf}) as resp:
        assert resp.status == 200
    # The old cookie, replayed by someone who kept it, is worth nothing now.
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as other,
        other.get(console.url("/api/v1/whoami"), headers={"Cookie": f"{COOKIE}={cookie}"}) as resp,
    ):
        assert resp.status == 401


async def test_refused_sign_ins_from_one_address_are_rate_limited(console: ConsoleNet) -> None:
    """Guessing credentials: after the minute's allowance of refusals an address is refused outright (429),
    even with a good credential, while another address still signs in. Loopback has many addresses."""

    def client(address: str) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(address, 0)), timeout=aiohttp.ClientTimeout(total=30)
        )

    guess = secrets.token_hex(4)
    limit = DEFAULT_SIGN_IN_FAILURES_PER_MINUTE
    async with client(f"127.0.0.{2 + secrets.randbelow(200)}") as guesser:
        statuses: list[int] = []
        retry_after = None
        # A minute's window may turn over mid-way; within two windows' allowance the refusal must come.
        while 429 not in statuses and len(statuses) < 2 * limit + 2:
            async with guesser.post(
                console.url("/console/api/session"), json={"credential": f"guess-{guess}-{len(statuses)}-" + "x" * 20}
            ) as resp:
                statuses.append(resp.status)
                retry_after = resp.headers.get("Retry-After")
        assert statuses[-1] == 429, statuses
        assert set(statuses[:-1]) == {401} and len(statuses) > limit, statuses
        assert retry_after and 1 <= int(retry_after) <= 61
        async with guesser.post(console.url("/console/api/session"), json={"credential": console.admin_token}) as r:
            assert r.status == 429
            assert "too many refused sign-ins" in (await r.json())["error"]["message"]
    async with client("127.0.0.1") as other:
        await sign_in(other, console.url(""), console.admin_token)


async def test_agent_health_history_is_for_admins_and_checks_its_input(console: ConsoleNet) -> None:
    async with aiohttp.ClientSession() as http:
        for token, path, status in (
            (console.admin_token, "/api/v1/agents/not-a-uuid/healthHistory", 400),
            (console.admin_token, "/api/v1/agents/00000000-0000-0000-0000-000000000000/healthHistory?limit=-1", 400),
            # Never checked: an empty history, not an error.
            (console.admin_token, "/api/v1/agents/00000000-0000-0000-0000-000000000000/healthHistory", 200),
            (console.member_token, "/api/v1/agents/00000000-0000-0000-0000-000000000000/healthHistory", 403),
        ):
            async with http.get(console.url(path), headers={"Authorization": f"Bearer {token}"}) as resp:
                body = await resp.json()
                assert resp.status == status, (path, body)
                if status == 200:
                    assert body.get("checks", []) == []
                else:
                    assert body["error"]["message"]
