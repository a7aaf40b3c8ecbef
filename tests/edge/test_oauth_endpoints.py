"""The OAuth 2.0 endpoints through the real edge and registry, driven by clients no one here wrote (Authlib, PyJWT)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt as pyjwt
import pytest
import redis.asyncio as aioredis
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

from agentvault.common.services import service
from agentvault.devserver.embedded import free_port
from agentvault_edge.oauth_routes import MAX_FORM_BYTES
from agentvault_edge.server import DRAIN_KEY

from ..conftest import MeshFactory, MeshHandle, eventually
from .conftest import Backend, edge_settings, start_edge

AUDIENCE = "agentvault"
REGISTRY_AND_EDGE = (service("registry"), service("edge"))


@pytest.fixture(scope="module")
def oauth_mesh(mesh_factory: MeshFactory) -> MeshHandle:
    port = free_port()
    return mesh_factory(
        services=REGISTRY_AND_EDGE,
        name="oauth_http",
        env={
            "EDGE_PORT": str(port),
            "OAUTH_ISSUER": f"http://127.0.0.1:{port}",
            # JSON logs carry every extra field, and DEBUG the edge's access log lines: the check that no secret
            # is logged sees everything either service writes.
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "DEBUG",
        },
    )


@pytest.fixture
async def web(oauth_mesh: MeshHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=oauth_mesh.url(), timeout=10) as client:
        yield client


async def metadata(web: httpx.AsyncClient) -> dict[str, Any]:
    answer = await web.get("/.well-known/oauth-authorization-server")
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = answer.json()
    return document


async def register(
    web: httpx.AsyncClient,
    admin: str,
    *,
    scopes: tuple[str, ...] = ("agents:read", "agents:write"),
    grant_types: tuple[str, ...] = ("client_credentials",),
    method: str = "client_secret_basic",
) -> tuple[str, str]:
    """A client registered through the REST admin API: (client_id, client_secret)."""
    answer = await web.post(
        "/api/v1/oauth/clients",
        headers={"Authorization": f"Bearer {admin}"},
        json={
            "name": "http test client",
            "scopes": list(scopes),
            "grant_types": list(grant_types),
            "token_endpoint_auth_method": method,
        },
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body["client"]["client_id"], body["client_secret"]


def oauth_client(client_id: str, secret: str, method: str = "client_secret_basic", **kw: Any) -> AsyncOAuth2Client:
    return AsyncOAuth2Client(client_id, secret, token_endpoint_auth_method=method, timeout=10, **kw)


async def verify(document: dict[str, Any], access_token: str) -> dict[str, Any]:
    """PyJWT's own JWKS client against the published jwks_uri, ES256 pinned, audience and issuer checked."""
    jwks = pyjwt.PyJWKClient(document["jwks_uri"], cache_keys=False)
    # PyJWKClient is synchronous (urllib): off the event loop.
    key = await asyncio.to_thread(jwks.get_signing_key_from_jwt, access_token)
    claims: dict[str, Any] = pyjwt.decode(
        access_token, key.key, algorithms=["ES256"], audience=AUDIENCE, issuer=document["issuer"]
    )
    return claims


async def get_with_token(client: AsyncOAuth2Client, url: str) -> httpx.Response:
    """A resource request with the client's current token (Authlib refreshes it when due). Test-ready for when the
    API accepts JWTs: `await get_with_token(client, mesh.url("/api/v1/agents"))`."""
    response: httpx.Response = await client.get(url)
    return response


# Discovery ---------------------------------------------------------------------------------------------


async def test_metadata_and_jwks_are_published(web: httpx.AsyncClient, oauth_mesh: MeshHandle) -> None:
    document = await metadata(web)
    assert document["issuer"] == oauth_mesh.url()
    assert document["token_endpoint"] == oauth_mesh.url("/oauth/token")
    assert document["jwks_uri"] == oauth_mesh.url("/.well-known/jwks.json")
    assert "client_credentials" in document["grant_types_supported"]
    jwks = await web.get("/.well-known/jwks.json")
    assert jwks.status_code == 200 and jwks.headers["content-type"].startswith("application/json")
    assert "max-age=60" in jwks.headers["cache-control"]
    keys = jwks.json()["keys"]
    assert keys and all(k["kty"] == "EC" and "kid" in k and "d" not in k for k in keys)
    refused = await web.post("/.well-known/jwks.json")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET"
    assert refused.json()["error"] == "invalid_request"


# Grants with Authlib -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_client_credentials_with_authlib(web: httpx.AsyncClient, oauth_mesh: MeshHandle, method: str) -> None:
    document = await metadata(web)
    assert method in document["token_endpoint_auth_methods_supported"]
    client_id, secret = await register(web, oauth_mesh.admin_token, method=method)
    async with oauth_client(client_id, secret, method, scope="agents:read") as client:
        token = await client.fetch_token(document["token_endpoint"], grant_type="client_credentials")
    assert token["token_type"] == "Bearer" and token["scope"] == "agents:read" and "refresh_token" not in token
    claims = await verify(document, token["access_token"])
    assert claims["client_id"] == client_id and claims["sub"] == client_id and claims["scope"] == "agents:read"
    assert pyjwt.get_unverified_header(token["access_token"])["typ"] == "at+jwt"


async def test_token_answers_are_never_cached_and_carry_the_source(
    web: httpx.AsyncClient, oauth_mesh: MeshHandle
) -> None:
    client_id, secret = await register(web, oauth_mesh.admin_token)
    answer = await web.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers["cache-control"] == "no-store" and answer.headers["pragma"] == "no-cache"
    # The peer address reached the registry as `source`: its per-source rate-limit window counts it.
    async with aioredis.from_url(oauth_mesh.redis_url) as store:
        windows = [key async for key in store.scan_iter(match="oauth:rate:source:127.0.0.1:*")]
    assert windows, "the registry saw no request from source 127.0.0.1"


async def test_refresh_rotates_and_a_reused_refresh_token_is_refused(
    web: httpx.AsyncClient, oauth_mesh: MeshHandle
) -> None:
    # The registry issues a refresh token with client_credentials to clients registered for refresh_token.
    document = await metadata(web)
    client_id, secret = await register(web, oauth_mesh.admin_token, grant_types=("client_credentials", "refresh_token"))
    async with oauth_client(client_id, secret) as client:
        first = dict(await client.fetch_token(document["token_endpoint"], grant_type="client_credentials"))
        assert first["refresh_token"].startswith("avr_")
        second = dict(await client.refresh_token(document["token_endpoint"], refresh_token=first["refresh_token"]))
        assert second["refresh_token"] != first["refresh_token"]
        assert second["access_token"] != first["access_token"]
        claims = await verify(document, second["access_token"])
        assert claims["client_id"] == client_id
        with pytest.raises(OAuthError) as reused:
            await client.refresh_token(document["token_endpoint"], refresh_token=first["refresh_token"])
        assert reused.value.error == "invalid_grant"
        # Reuse revoked the family: the rotated token is refused too, and its access token is inactive.
        with pytest.raises(OAuthError) as family:
            await client.refresh_token(document["token_endpoint"], refresh_token=second["refresh_token"])
        assert family.value.error == "invalid_grant"
        inactive = await client.introspect_token(document["introspection_endpoint"], token=second["access_token"])
        assert inactive.status_code == 200 and inactive.json() == {"active": False}


async def test_introspect_and_revoke_with_authlib(web: httpx.AsyncClient, oauth_mesh: MeshHandle) -> None:
    document = await metadata(web)
    client_id, secret = await register(web, oauth_mesh.admin_token, grant_types=("client_credentials", "refresh_token"))
    async with oauth_client(client_id, secret) as client:
        token = await client.fetch_token(document["token_endpoint"], grant_type="client_credentials")
        access, refresh = token["access_token"], token["refresh_token"]
        active = await client.introspect_token(document["introspection_endpoint"], token=access)
        assert active.status_code == 200 and active.headers["cache-control"] == "no-store"
        assert active.json()["active"] is True and active.json()["client_id"] == client_id
        refresh_info = await client.introspect_token(
            document["introspection_endpoint"], token=refresh, token_type_hint="refresh_token"
        )
        assert refresh_info.json()["active"] is True and refresh_info.json()["token_type"] == "refresh_token"

        revoked = await client.revoke_token(document["revocation_endpoint"], token=access)
        assert revoked.status_code == 200
        after = await client.introspect_token(document["introspection_endpoint"], token=access)
        assert after.json() == {"active": False}

        await client.revoke_token(document["revocation_endpoint"], token=refresh, token_type_hint="refresh_token")
        gone = await client.introspect_token(document["introspection_endpoint"], token=refresh)
        assert gone.json() == {"active": False}
        with pytest.raises(OAuthError) as refused:
            await client.refresh_token(document["token_endpoint"], refresh_token=refresh)
        assert refused.value.error == "invalid_grant"


# RFC 6749 5.2 errors -----------------------------------------------------------------------------------


def assert_oauth_error(answer: httpx.Response, status: int, error: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    # The RFC shape, not the edge's generic {"error": {"code", "status", ...}}.
    assert body["error"] == error and isinstance(body.get("error_description"), str), body
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers["cache-control"] == "no-store"


async def test_wrong_secret_is_invalid_client_with_a_challenge(web: httpx.AsyncClient, oauth_mesh: MeshHandle) -> None:
    client_id, secret = await register(web, oauth_mesh.admin_token)
    answer = await web.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret + "x"))
    assert_oauth_error(answer, 401, "invalid_client")
    assert answer.headers["www-authenticate"].startswith("Basic")
    async with oauth_client(client_id, "wrong") as client:
        with pytest.raises(OAuthError) as refused:
            await client.fetch_token(oauth_mesh.url("/oauth/token"), grant_type="client_credentials")
    assert refused.value.error == "invalid_client"


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({"grant_type": "password", "username": "u", "password": "p"}, 400, "unsupported_grant_type"),
        ({"grant_type": "client_credentials", "scope": "agents:read admin"}, 400, "invalid_scope"),
        ({"scope": "agents:read"}, 400, "invalid_request"),
    ],
)
async def test_grant_errors(
    web: httpx.AsyncClient, oauth_mesh: MeshHandle, form: dict[str, str], status: int, error: str
) -> None:
    client_id, secret = await register(web, oauth_mesh.admin_token)
    answer = await web.post("/oauth/token", data=form, auth=(client_id, secret))
    assert_oauth_error(answer, status, error)


async def test_malformed_requests_are_refused_in_the_rfc_shape(web: httpx.AsyncClient, oauth_mesh: MeshHandle) -> None:
    client_id, secret = await register(web, oauth_mesh.admin_token)
    auth = (client_id, secret)
    as_json = await web.post("/oauth/token", json={"grant_type": "client_credentials"}, auth=auth)
    assert_oauth_error(as_json, 400, "invalid_request")
    assert "x-www-form-urlencoded" in as_json.json()["error_description"]
    duplicate = await web.post(
        "/oauth/token",
        content=b"grant_type=client_credentials&scope=agents:read&scope=agents:write",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        auth=auth,
    )
    assert_oauth_error(duplicate, 400, "invalid_request")
    assert "scope" in duplicate.json()["error_description"]
    oversize = await web.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "pad": "x" * MAX_FORM_BYTES},
        auth=auth,
    )
    assert_oauth_error(oversize, 413, "invalid_request")
    in_query = await web.post(
        f"/oauth/token?client_id={client_id}&client_secret={secret}", data={"grant_type": "client_credentials"}
    )
    assert_oauth_error(in_query, 400, "invalid_request")
    not_utf8 = await web.post(
        "/oauth/token",
        content=b"grant_type=client_credentials&scope=%ff",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        auth=auth,
    )
    assert_oauth_error(not_utf8, 400, "invalid_request")
    for path in ("/oauth/token", "/oauth/introspect", "/oauth/revoke"):
        wrong_method = await web.get(path)
        assert_oauth_error(wrong_method, 405, "invalid_request")
        assert wrong_method.headers["allow"] == "POST"
    # Introspection and revocation authenticate the client too.
    for path in ("/oauth/introspect", "/oauth/revoke"):
        anonymous = await web.post(path, data={"token": "x.y.z"})
        assert_oauth_error(anonymous, 401, "invalid_client")


async def test_an_unreachable_registry_is_temporarily_unavailable() -> None:
    # An edge whose registry address has nothing listening: the RFC shape, never the edge's generic one.
    runner, url = await start_edge(edge_settings(f"127.0.0.1:{free_port()}", call_timeout=2.0))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as web:
            for answer in (
                await web.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=("a", "b")),
                await web.post("/oauth/introspect", data={"token": "t"}, auth=("a", "b")),
                await web.get("/.well-known/jwks.json"),
                await web.get("/.well-known/oauth-authorization-server"),
            ):
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"] == "temporarily_unavailable"
                assert "retry-after" in answer.headers
    finally:
        await runner.cleanup()


async def test_edge_wide_refusals_use_the_rfc_shape_on_oauth_paths(backend: Backend) -> None:
    # Refused by the middleware before any handler (here: shutting down), yet still RFC 6749's shape.
    runner, url = await start_edge(edge_settings(backend.address))
    try:
        runner.app[DRAIN_KEY].begin()
        async with httpx.AsyncClient(base_url=url, timeout=10) as web:
            oauth = await web.post("/oauth/token", data={"grant_type": "client_credentials"})
            assert_oauth_error(oauth, 503, "temporarily_unavailable")
            generic = await web.get("/api/v1/health")
            assert generic.status_code == 503 and generic.json()["error"]["status"] == "UNAVAILABLE"
    finally:
        await runner.cleanup()


# Secrets stay out of the logs ----------------------------------------------------------------------------


async def test_no_secret_or_token_is_logged(web: httpx.AsyncClient, oauth_mesh: MeshHandle) -> None:
    document = await metadata(web)
    client_id, secret = await register(
        web, oauth_mesh.admin_token, grant_types=("client_credentials", "refresh_token"), method="client_secret_post"
    )
    marker = "marker-" + secrets.token_hex(8)
    async with oauth_client(client_id, secret, "client_secret_post") as client:
        token = await client.fetch_token(document["token_endpoint"], grant_type="client_credentials")
        await client.introspect_token(document["introspection_endpoint"], token=token["access_token"])
        await client.revoke_token(document["revocation_endpoint"], token=token["refresh_token"])
    # A refused request whose body and header hold a recognisable value.
    await web.post("/oauth/token", data={"grant_type": "client_credentials", "pad": marker}, auth=(client_id, marker))
    log_dir = oauth_mesh.mesh.log_dir
    assert log_dir is not None
    secret_values = [secret, token["access_token"], token["refresh_token"], marker]
    # A refresh token is <prefix>_<id>_<secret>, and the secret (urlsafe base64) may itself hold "_": split from
    # the left, or a one-letter tail of the secret would be "found" in any log.
    secret_values += [token["refresh_token"].split("_", 2)[2], token["access_token"].rsplit(".", 1)[1]]

    async def logged_without_secrets() -> None:
        edge_log = (log_dir / "edge.log").read_text(errors="replace")
        # The access log has a line for each request, so its silence on secrets means something.
        lines = [json.loads(line) for line in edge_log.splitlines() if line.startswith("{")]
        assert any(line.get("msg") == "POST /oauth/revoke 200" for line in lines)
        for name in ("edge.log", "registry.log"):
            text = (log_dir / name).read_text(errors="replace")
            for value in secret_values:
                assert value not in text, f"a secret is in {name}"

    await eventually(logged_without_secrets)
