"""The registry as an OAuth 2.0 authorization server over real gRPC: clients, grants, errors, revocation."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey

from agentvault.devserver.mesh import SERVICES
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, MeshHandle, bearer, eventually
from .oauth_helpers import (
    ACCESS_TOKEN_TYPE,
    EXCHANGE,
    ISSUER,
    basic,
    create_client,
    introspect,
    revoke,
    token,
    verify,
)
from .test_agents_grpc import make_agent

PER_CLIENT_LIMIT = 25


@pytest.fixture(scope="module")
def oauth_mesh(mesh_factory: MeshFactory) -> MeshHandle:
    return mesh_factory(
        services=SERVICES[:1],
        name="oauth",
        env={
            "OAUTH_ACCESS_TOKEN_TTL": "120",
            "OAUTH_TOKEN_RATE_LIMIT_PER_CLIENT": str(PER_CLIENT_LIMIT),
            # JSON logs carry every extra field, so the check that no token is logged sees everything.
            "LOG_FORMAT": "json",
        },
    )


@pytest.fixture
async def stub(oauth_mesh: MeshHandle) -> AsyncIterator[ipb_grpc.IdentityServiceStub]:
    async with grpc.aio.insecure_channel(oauth_mesh.address("registry")) as channel:
        yield ipb_grpc.IdentityServiceStub(channel)


@pytest.fixture
def admin(oauth_mesh: MeshHandle) -> str:
    return oauth_mesh.admin_token


def source() -> str:
    """A source address of its own per test, so the per-source limit never couples tests."""
    return f"10.1.{secrets.randbelow(250)}.{secrets.randbelow(250)}"


# Client management -------------------------------------------------------------------------------------


async def test_admin_manages_clients_and_a_member_is_refused(
    stub: ipb_grpc.IdentityServiceStub, admin: str, oauth_mesh: MeshHandle
) -> None:
    created = await create_client(stub, admin, name="billing bot", grant_types=["client_credentials"])
    assert created.client.client_id.startswith("avc_") and len(created.client_secret) >= 40
    assert created.client.owner_principal_id == "prn_bootstrap_admin"
    got = await stub.GetOAuthClient(
        ipb.GetOAuthClientRequest(client_id=created.client.client_id), metadata=bearer(admin)
    )
    assert got.name == "billing bot" and list(got.scopes) == ["agents:read", "agents:write"]
    listed = await stub.ListOAuthClients(ipb.ListOAuthClientsRequest(page_size=500), metadata=bearer(admin))
    assert created.client.client_id in {c.client_id for c in listed.clients}
    # The secret is never returned again.
    assert created.client_secret not in str(got) and created.client_secret not in str(listed)

    async with grpc.aio.insecure_channel(oauth_mesh.address("registry")) as channel:
        member = await pb_grpc.RegistryServiceStub(channel).CreateApiKey(
            pb.CreateApiKeyRequest(name="member"), metadata=bearer(admin)
        )
    for call in (
        stub.CreateOAuthClient(
            ipb.CreateOAuthClientRequest(name="x", scopes=["agents:read"]), metadata=bearer(member.token)
        ),
        stub.ListOAuthClients(ipb.ListOAuthClientsRequest(), metadata=bearer(member.token)),
        stub.RotateOAuthClientSecret(
            ipb.RotateOAuthClientSecretRequest(client_id=created.client.client_id), metadata=bearer(member.token)
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"scopes": ["agents:read", "root"]}, "scopes[1]"),
        ({"scopes": []}, "scopes"),
        ({"grant_types": ["password"]}, "grant_types[0]"),
        ({"token_endpoint_auth_method": "none"}, "token_endpoint_auth_method"),
        ({"token_endpoint_auth_method": "private_key_jwt"}, "jwks"),
        ({"jwks": "{not json"}, "jwks"),
        ({"jwks": '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'}, "jwks.keys[0]"),
        ({"jwks": '{"keys": [' + ",".join(['{"kty":"EC"}'] * 11) + "]}"}, "jwks"),
        ({"jwks": "x" * 9000}, "jwks"),
        ({"agent_id": "not-a-uuid"}, "agent_id"),
    ],
)
async def test_client_fields_are_bounded(
    stub: ipb_grpc.IdentityServiceStub, admin: str, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_client(stub, admin, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "") or field in str(err.value.trailing_metadata()), err.value.details()


async def test_a_private_key_is_refused_in_jwks(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    key = ECKey.generate_key("P-256", private=True)
    private = '{"keys": [' + __import__("json").dumps(key.as_dict(private=True)) + "]}"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_client(stub, admin, jwks=private, token_endpoint_auth_method="private_key_jwt")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_agent_binding_needs_an_existing_agent(
    stub: ipb_grpc.IdentityServiceStub, admin: str, oauth_mesh: MeshHandle
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_client(stub, admin, agent_id="00000000-0000-4000-8000-000000000000")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    async with grpc.aio.insecure_channel(oauth_mesh.address("registry")) as channel:
        agent = await pb_grpc.RegistryServiceStub(channel).CreateAgent(
            pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(admin)
        )
    bound = await create_client(stub, admin, agent_id=agent.id)
    answer = await token(
        stub, {"grant_type": "client_credentials"}, basic(bound.client.client_id, bound.client_secret), source()
    )
    claims = await verify(stub, answer.body["access_token"])
    assert claims["avm_agent"] == agent.id and claims["avm_kind"] == "agent"


# client_credentials ---------------------------------------------------------------------------------------


async def test_client_credentials_with_basic_and_post(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    created = await create_client(stub, admin)
    cid, secret = created.client.client_id, created.client_secret
    answer = await token(stub, {"grant_type": "client_credentials"}, basic(cid, secret), source())
    assert answer.status == 200, answer.body
    assert answer.body["token_type"] == "Bearer" and answer.body["expires_in"] == 120
    assert answer.body["scope"] == "agents:read agents:write"
    assert "refresh_token" not in answer.body  # not registered for the refresh_token grant
    claims = await verify(stub, answer.body["access_token"])
    assert claims["sub"] == cid and claims["client_id"] == cid and claims["iss"] == ISSUER
    assert claims["scope"] == "agents:read agents:write" and claims["jti"] and claims["exp"] - claims["iat"] == 120
    assert claims["avm_owner"] == "prn_bootstrap_admin" and claims["avm_kind"] == "service"

    form = {"grant_type": "client_credentials", "client_id": cid, "client_secret": secret, "scope": "agents:read"}
    posted = await token(stub, form, source=source())
    assert posted.status == 200 and posted.body["scope"] == "agents:read"
    assert (await verify(stub, posted.body["access_token"]))["scope"] == "agents:read"


async def test_token_errors_follow_rfc_6749(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    created = await create_client(stub, admin)
    cid, secret = created.client.client_id, created.client_secret
    auth = basic(cid, secret)

    wrong = await token(stub, {"grant_type": "client_credentials"}, basic(cid, secret + "x"), source())
    assert wrong.status == 401 and wrong.body["error"] == "invalid_client"
    assert wrong.headers["WWW-Authenticate"].startswith("Basic realm=")
    unknown = await token(stub, {"grant_type": "client_credentials"}, basic("avc_" + "0" * 32, secret), source())
    assert unknown.status == 401 and unknown.body["error"] == "invalid_client"
    none = await token(stub, {"grant_type": "client_credentials"}, source=source())
    assert none.status == 401 and none.body["error"] == "invalid_client"
    both = await token(stub, {"grant_type": "client_credentials", "client_id": cid, "client_secret": secret}, auth)
    assert both.status == 400 and both.body["error"] == "invalid_request"

    missing = await token(stub, {}, auth, source())
    assert missing.status == 400 and missing.body["error"] == "invalid_request"
    password = await token(stub, {"grant_type": "password"}, auth, source())
    assert password.status == 400 and password.body["error"] == "unsupported_grant_type"
    refresh = await token(stub, {"grant_type": "refresh_token", "refresh_token": "x"}, auth, source())
    assert refresh.status == 400 and refresh.body["error"] == "unauthorized_client"
    wider = await token(stub, {"grant_type": "client_credentials", "scope": "agents:read admin"}, auth, source())
    assert wider.status == 400 and wider.body["error"] == "invalid_scope"
    assert "admin" in wider.body["error_description"]
    malformed = await token(stub, {"grant_type": "client_credentials", "scope": 'a"b'}, auth, source())
    assert malformed.status == 400 and malformed.body["error"] == "invalid_scope"
    # Nothing beyond the RFC's two members, and never the secret.
    for answer in (wrong, both, missing, password, wider):
        assert set(answer.body) == {"error", "error_description"}
        assert secret not in answer.body["error_description"]


async def test_token_endpoint_is_rate_limited_per_client(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    created = await create_client(stub, admin)
    auth = basic(created.client.client_id, "wrong secret")
    statuses = []
    for _ in range(PER_CLIENT_LIMIT + 1):
        # A different source each time: the client's own limit applies however many addresses it comes from.
        answer = await token(stub, {"grant_type": "client_credentials"}, auth, source())
        statuses.append(answer.status)
    assert statuses[:PER_CLIENT_LIMIT] == [401] * PER_CLIENT_LIMIT
    assert answer.status == 429, statuses
    assert 1 <= int(answer.headers["Retry-After"]) <= 61
    # Even the right secret waits now: guessing and using share the client's budget.
    right = await token(
        stub, {"grant_type": "client_credentials"}, basic(created.client.client_id, created.client_secret), source()
    )
    assert right.status == 429


# Client lifecycle ----------------------------------------------------------------------------------------


async def test_rotate_disable_enable_delete(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    created = await create_client(stub, admin, grant_types=["client_credentials", "refresh_token"])
    cid, old = created.client.client_id, created.client_secret
    form = {"grant_type": "client_credentials"}
    first = await token(stub, form, basic(cid, old), source())
    assert first.status == 200

    rotated = await stub.RotateOAuthClientSecret(
        ipb.RotateOAuthClientSecretRequest(client_id=cid), metadata=bearer(admin)
    )
    assert rotated.client_secret and rotated.client_secret != old
    assert (await token(stub, form, basic(cid, old), source())).status == 401
    second = await token(stub, form, basic(cid, rotated.client_secret), source())
    assert second.status == 200

    disabled = await stub.DisableOAuthClient(ipb.DisableOAuthClientRequest(client_id=cid), metadata=bearer(admin))
    assert disabled.disabled
    refused = await token(stub, form, basic(cid, rotated.client_secret), source())
    assert refused.status == 401 and refused.body["error"] == "invalid_client"
    # Every access token it held is revoked, those from client_credentials alone too.
    other = await create_client(stub, admin)
    other_auth = basic(other.client.client_id, other.client_secret)
    for held in (first, second):
        assert (await introspect(stub, {"token": held.body["access_token"]}, other_auth, source())).body == {
            "active": False
        }
    await stub.EnableOAuthClient(ipb.EnableOAuthClientRequest(client_id=cid), metadata=bearer(admin))
    # Disabling revoked the refresh token issued before it (and the access token issued with it).
    auth = basic(cid, rotated.client_secret)
    reused = await token(stub, {"grant_type": "refresh_token", "refresh_token": second.body["refresh_token"]}, auth)
    assert reused.status == 400 and reused.body["error"] == "invalid_grant"
    gone = await introspect(stub, {"token": second.body["access_token"]}, auth, source())
    assert gone.body == {"active": False}
    assert (await token(stub, form, auth, source())).status == 200

    live = await token(stub, form, auth, source())
    await stub.DeleteOAuthClient(ipb.DeleteOAuthClientRequest(client_id=cid), metadata=bearer(admin))
    gone_too = await introspect(stub, {"token": live.body["access_token"]}, other_auth, source())
    assert gone_too.body == {"active": False}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetOAuthClient(ipb.GetOAuthClientRequest(client_id=cid), metadata=bearer(admin))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await token(stub, form, auth, source())).status == 401


# refresh_token -------------------------------------------------------------------------------------------


async def test_refresh_rotates_and_reuse_revokes_the_family(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    created = await create_client(stub, admin, grant_types=["client_credentials", "refresh_token"])
    auth = basic(created.client.client_id, created.client_secret)
    first = await token(stub, {"grant_type": "client_credentials"}, auth, source())
    assert first.status == 200 and first.body["refresh_token"].startswith("avr_")

    second = await token(stub, {"grant_type": "refresh_token", "refresh_token": first.body["refresh_token"]}, auth)
    assert second.status == 200, second.body
    assert second.body["refresh_token"] != first.body["refresh_token"]
    assert (await verify(stub, second.body["access_token"]))["scope"] == "agents:read agents:write"
    third = await token(stub, {"grant_type": "refresh_token", "refresh_token": second.body["refresh_token"]}, auth)
    assert third.status == 200

    # The first refresh token again: someone holds a copy. The whole family goes, with its access tokens.
    reuse = await token(stub, {"grant_type": "refresh_token", "refresh_token": first.body["refresh_token"]}, auth)
    assert reuse.status == 400 and reuse.body["error"] == "invalid_grant"
    latest = await token(stub, {"grant_type": "refresh_token", "refresh_token": third.body["refresh_token"]}, auth)
    assert latest.status == 400 and latest.body["error"] == "invalid_grant"
    for answer in (first, second, third):
        seen = await introspect(stub, {"token": answer.body["access_token"]}, auth, source())
        assert seen.body == {"active": False}


async def test_refresh_never_widens_and_belongs_to_its_client(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    created = await create_client(
        stub, admin, grant_types=["client_credentials", "refresh_token"], scopes=["agents:read", "agents:write"]
    )
    auth = basic(created.client.client_id, created.client_secret)
    first = await token(stub, {"grant_type": "client_credentials", "scope": "agents:read"}, auth, source())
    refresh = first.body["refresh_token"]
    wider = await token(stub, {"grant_type": "refresh_token", "refresh_token": refresh, "scope": "agents:write"}, auth)
    assert wider.status == 400 and wider.body["error"] == "invalid_scope"

    other = await create_client(stub, admin, grant_types=["client_credentials", "refresh_token"])
    stolen = await token(
        stub,
        {"grant_type": "refresh_token", "refresh_token": refresh},
        basic(other.client.client_id, other.client_secret),
    )
    assert stolen.status == 400 and stolen.body["error"] == "invalid_grant"
    forged = await token(stub, {"grant_type": "refresh_token", "refresh_token": refresh[:-2] + "xx"}, auth)
    assert forged.status == 400 and forged.body["error"] == "invalid_grant"
    # Neither refusal used the token up: its own client still refreshes with it.
    ok = await token(stub, {"grant_type": "refresh_token", "refresh_token": refresh}, auth)
    assert ok.status == 200 and ok.body["scope"] == "agents:read"


# Introspection and revocation -------------------------------------------------------------------------------


async def test_introspection_and_revocation(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    created = await create_client(stub, admin, grant_types=["client_credentials", "refresh_token"])
    auth = basic(created.client.client_id, created.client_secret)
    issued = await token(stub, {"grant_type": "client_credentials"}, auth, source())
    access, refresh = issued.body["access_token"], issued.body["refresh_token"]

    anonymous = await introspect(stub, {"token": access}, source=source())
    assert anonymous.status == 401 and anonymous.body["error"] == "invalid_client"
    active = await introspect(stub, {"token": access}, auth, source())
    assert active.status == 200 and active.body["active"] is True
    assert active.body["client_id"] == created.client.client_id and active.body["scope"] == "agents:read agents:write"
    for junk in ("nonsense", "a.b.c", access[:-4] + "AAAA", "avr_0123456789abcdef_nope"):
        assert (await introspect(stub, {"token": junk}, auth, source())).body == {"active": False}
    described = await introspect(stub, {"token": refresh}, auth, source())
    assert described.body["active"] is True and described.body["token_type"] == "refresh_token"

    # Unknown tokens: 200 all the same (RFC 7009 2.2).
    assert (await revoke(stub, {"token": "nonsense"}, auth, source())).status == 200
    assert (await revoke(stub, {"token": access}, source=source())).status == 401
    done = await revoke(stub, {"token": access}, auth, source())
    assert done.status == 200
    assert (await introspect(stub, {"token": access}, auth, source())).body == {"active": False}

    assert (await revoke(stub, {"token": refresh, "token_type_hint": "refresh_token"}, auth, source())).status == 200
    after = await token(stub, {"grant_type": "refresh_token", "refresh_token": refresh}, auth)
    assert after.status == 400 and after.body["error"] == "invalid_grant"


async def test_a_client_cannot_revoke_another_clients_token(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    owner = await create_client(stub, admin)
    other = await create_client(stub, admin)
    owner_auth = basic(owner.client.client_id, owner.client_secret)
    issued = await token(stub, {"grant_type": "client_credentials"}, owner_auth, source())
    other_auth = basic(other.client.client_id, other.client_secret)
    assert (await revoke(stub, {"token": issued.body["access_token"]}, other_auth, source())).status == 200
    still = await introspect(stub, {"token": issued.body["access_token"]}, owner_auth, source())
    assert still.body["active"] is True


# private_key_jwt (RFC 7523) ----------------------------------------------------------------------------------


def assertion(key: ECKey, client_id: str, audience: str, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": now,
        "exp": now + 60,
        "jti": secrets.token_hex(8),
        **overrides,
    }
    return jose_jwt.encode({"alg": "ES256", "kid": key.kid}, claims, key, algorithms=["ES256"])


async def test_private_key_jwt(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    import json

    key = ECKey.generate_key("P-256", private=True, auto_kid=True)
    jwks = json.dumps({"keys": [key.as_dict(private=False)]})
    created = await create_client(stub, admin, jwks=jwks, token_endpoint_auth_method="private_key_jwt")
    cid = created.client.client_id
    assert created.client_secret == ""  # it proves itself with its key; no secret to leak
    kind = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

    def form(signed: str) -> dict[str, str]:
        return {"grant_type": "client_credentials", "client_assertion_type": kind, "client_assertion": signed}

    signed = assertion(key, cid, f"{ISSUER}/oauth/token")
    ok = await token(stub, form(signed), source=source())
    assert ok.status == 200, ok.body
    assert (await verify(stub, ok.body["access_token"]))["sub"] == cid
    replay = await token(stub, form(signed), source=source())
    assert replay.status == 401 and replay.body["error"] == "invalid_client"
    assert (await token(stub, form(assertion(key, cid, ISSUER)), source=source())).status == 200

    stranger = ECKey.generate_key("P-256", private=True, auto_kid=True)
    refused = [
        assertion(stranger, cid, ISSUER),
        assertion(key, cid, "https://elsewhere.example/oauth/token"),
        assertion(key, cid, ISSUER, exp=int(time.time()) - 120),
        assertion(key, cid, ISSUER, exp=int(time.time()) + 3600),
        assertion(key, cid, ISSUER, sub="someone-else"),
    ]
    for bad in refused:
        answer = await token(stub, form(bad), source=source())
        assert answer.status == 401 and answer.body["error"] == "invalid_client", answer.body
    # Its (absent) secret cannot be used instead.
    guessed = await token(stub, {"grant_type": "client_credentials"}, basic(cid, ""), source())
    assert guessed.status == 401


# Token exchange (RFC 8693) ------------------------------------------------------------------------------------


async def test_token_exchange_narrows_and_names_the_actor(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    caller = await create_client(stub, admin, scopes=["agents:read", "agents:write"])
    service = await create_client(
        stub, admin, scopes=["agents:read", "agents:write", "messages:send"], grant_types=[EXCHANGE]
    )
    subject = await token(
        stub, {"grant_type": "client_credentials"}, basic(caller.client.client_id, caller.client_secret), source()
    )
    auth = basic(service.client.client_id, service.client_secret)
    form = {
        "grant_type": EXCHANGE,
        "subject_token": subject.body["access_token"],
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "scope": "agents:read",
    }
    exchanged = await token(stub, form, auth, source())
    assert exchanged.status == 200, exchanged.body
    assert exchanged.body["issued_token_type"] == ACCESS_TOKEN_TYPE and "refresh_token" not in exchanged.body
    claims = await verify(stub, exchanged.body["access_token"])
    assert claims["sub"] == caller.client.client_id
    assert claims["act"] == {"sub": service.client.client_id}
    assert claims["client_id"] == service.client.client_id and claims["scope"] == "agents:read"

    # messages:send: the service holds it, the caller does not, so acting for the caller cannot get it.
    wider = await token(stub, {**form, "scope": "agents:read messages:send"}, auth, source())
    assert wider.status == 400 and wider.body["error"] == "invalid_scope"
    default = await token(stub, {k: v for k, v in form.items() if k != "scope"}, auth, source())
    assert default.body["scope"] == "agents:read agents:write"

    # The caller's client is not registered for exchange; a revoked or foreign subject token is no grant.
    caller_auth = basic(caller.client.client_id, caller.client_secret)
    assert (await token(stub, form, caller_auth, source())).body["error"] == "unauthorized_client"
    junk = await token(stub, {**form, "subject_token": "a.b.c"}, auth, source())
    assert junk.status == 400 and junk.body["error"] == "invalid_grant"
    await revoke(stub, {"token": subject.body["access_token"]}, caller_auth, source())
    revoked = await token(stub, form, auth, source())
    assert revoked.status == 400 and revoked.body["error"] == "invalid_grant"


async def test_metadata_and_jwks(stub: ipb_grpc.IdentityServiceStub) -> None:
    import json

    metadata = json.loads((await stub.GetServerMetadata(ipb.GetServerMetadataRequest())).json)
    assert metadata["issuer"] == ISSUER and metadata["token_endpoint"] == f"{ISSUER}/oauth/token"
    assert "private_key_jwt" in metadata["token_endpoint_auth_methods_supported"]
    assert EXCHANGE in metadata["grant_types_supported"]
    jwks = json.loads((await stub.GetJwks(ipb.GetJwksRequest())).json)
    assert jwks["keys"] and all(set(k) == {"kty", "crv", "x", "y", "kid", "alg", "use"} for k in jwks["keys"])


# The CLI ----------------------------------------------------------------------------------------------------


def test_cli_manages_clients(oauth_mesh: MeshHandle, tmp_path: Any) -> None:
    import json
    import os
    import subprocess
    import sys

    def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "REGISTRY_ADDR": oauth_mesh.address("registry"),
            "AGENTVAULT_TOKEN": oauth_mesh.admin_token if token is None else token,
        }
        command = [sys.executable, "-m", "agentvault.client.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)

    def ok(result: subprocess.CompletedProcess[str]) -> Any:
        assert result.returncode == 0 and result.stderr == "", result.stderr
        return json.loads(result.stdout)

    created = ok(cli("oauth", "clients", "create", "cli bot", "--scope", "agents:read",
                     "--grant-type", "client_credentials", "--grant-type", "refresh_token"))  # fmt: skip
    client_id, secret = created["client"]["client_id"], created["client_secret"]
    assert secret and created["client"]["grant_types"] == ["client_credentials", "refresh_token"]
    got = ok(cli("oauth", "clients", "get", client_id))
    assert got["name"] == "cli bot" and secret not in json.dumps(got)
    assert client_id in [c["client_id"] for c in ok(cli("oauth", "clients", "list"))["clients"]]
    rotated = ok(cli("oauth", "clients", "rotate-secret", client_id))
    assert rotated["client_secret"] not in ("", secret)
    assert ok(cli("oauth", "clients", "disable", client_id))["disabled"] is True
    assert ok(cli("oauth", "clients", "enable", client_id)).get("disabled", False) is False
    key = ECKey.generate_key("P-256", private=True, auto_kid=True)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    keyed = ok(cli("oauth", "clients", "create", "keyed", "--scope", "agents:read",
                   "--auth-method", "private_key_jwt", "--jwks-file", str(jwks)))  # fmt: skip
    assert keyed["client"]["token_endpoint_auth_method"] == "private_key_jwt"
    bad = cli("oauth", "clients", "create", "bad", "--scope", "root")
    assert bad.returncode == 2 and "scopes[0]" in bad.stderr and "Traceback" not in bad.stderr
    assert ok(cli("oauth", "clients", "delete", client_id)) == {}
    missing = cli("oauth", "clients", "get", client_id)
    assert missing.returncode == 1 and "not found" in missing.stderr


async def test_no_secret_or_token_is_logged(
    stub: ipb_grpc.IdentityServiceStub, admin: str, oauth_mesh: MeshHandle
) -> None:
    created = await create_client(stub, admin, grant_types=["client_credentials", "refresh_token"])
    auth = basic(created.client.client_id, created.client_secret)
    issued = await token(stub, {"grant_type": "client_credentials"}, auth, source())
    refreshed = await token(stub, {"grant_type": "refresh_token", "refresh_token": issued.body["refresh_token"]}, auth)
    # Reuse and a wrong secret both log a warning or an error path; neither may carry what was presented.
    await token(stub, {"grant_type": "refresh_token", "refresh_token": issued.body["refresh_token"]}, auth)
    await token(stub, {"grant_type": "client_credentials"}, basic(created.client.client_id, "guess-" + "x" * 20))
    log_file = oauth_mesh.mesh.log_dir / "registry.log"  # type: ignore[operator]

    async def logged() -> None:
        assert "refresh token reuse" in log_file.read_text()

    await eventually(logged)
    text = log_file.read_text()
    for secret in (
        created.client_secret,
        issued.body["access_token"],
        issued.body["refresh_token"],
        refreshed.body["access_token"],
        refreshed.body["refresh_token"],
        "guess-" + "x" * 20,
    ):
        assert secret not in text
    assert created.client.client_id in text  # the log does name the client


async def test_disable_and_delete_revoke_plain_access_tokens(stub: ipb_grpc.IdentityServiceStub, admin: str) -> None:
    """Tokens from client_credentials without a refresh token are not in any refresh family; they go too."""
    observer = await create_client(stub, admin)
    observer_auth = basic(observer.client.client_id, observer.client_secret)
    for remove in ("disable", "delete"):
        created = await create_client(stub, admin)
        auth = basic(created.client.client_id, created.client_secret)
        held = (await token(stub, {"grant_type": "client_credentials"}, auth, source())).body["access_token"]
        assert (await introspect(stub, {"token": held}, observer_auth, source())).body["active"] is True
        if remove == "disable":
            await stub.DisableOAuthClient(
                ipb.DisableOAuthClientRequest(client_id=created.client.client_id), metadata=bearer(admin)
            )
        else:
            await stub.DeleteOAuthClient(
                ipb.DeleteOAuthClientRequest(client_id=created.client.client_id), metadata=bearer(admin)
            )
        assert (await introspect(stub, {"token": held}, observer_auth, source())).body == {"active": False}, remove
