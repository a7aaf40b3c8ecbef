"""Access tokens as credentials in every service: scopes decide, forgeries are refused, revocation reaches all."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey

from agentvault.discovery.v1 import discovery_service_pb2 as dpb
from agentvault.discovery.v1 import discovery_service_pb2_grpc as dpb_grpc
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc
from agentvault.healthmonitor.v1 import health_monitor_service_pb2 as hpb
from agentvault.healthmonitor.v1 import health_monitor_service_pb2_grpc as hpb_grpc
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, MeshHandle, bearer, eventually
from .oauth_helpers import basic, create_client, revoke, token
from .test_agents_grpc import make_agent

# The shortest lifetime the registry allows: the expiry test waits for it, plus the validators' clock skew, which
# this mesh sets to a second (OAUTH_CLOCK_SKEW_SECONDS; 30 by default) so the wait is not a minute.
TOKEN_TTL = 30
LEEWAY = 1


@pytest.fixture(scope="module")
def jwt_mesh(mesh_factory: MeshFactory) -> MeshHandle:
    env = {"OAUTH_ACCESS_TOKEN_TTL": str(TOKEN_TTL), "OAUTH_CLOCK_SKEW_SECONDS": str(LEEWAY)}
    return mesh_factory(name="jwt", env=env)


@pytest.fixture(scope="module")
async def channel(jwt_mesh: MeshHandle) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(jwt_mesh.address("registry")) as channel:
        yield channel


@pytest.fixture(scope="module")
def identity(channel: grpc.aio.Channel) -> ipb_grpc.IdentityServiceStub:
    return ipb_grpc.IdentityServiceStub(channel)


@pytest.fixture(scope="module")
def registry(channel: grpc.aio.Channel) -> pb_grpc.RegistryServiceStub:
    return pb_grpc.RegistryServiceStub(channel)


@pytest.fixture(scope="module")
async def discovery(jwt_mesh: MeshHandle) -> AsyncIterator[dpb_grpc.DiscoveryServiceStub]:
    async with grpc.aio.insecure_channel(jwt_mesh.address("discovery")) as channel:
        yield dpb_grpc.DiscoveryServiceStub(channel)


@pytest.fixture(scope="module")
async def health(jwt_mesh: MeshHandle) -> AsyncIterator[hpb_grpc.HealthMonitorServiceStub]:
    async with grpc.aio.insecure_channel(jwt_mesh.address("health-monitor")) as channel:
        yield hpb_grpc.HealthMonitorServiceStub(channel)


async def access_token(
    identity: ipb_grpc.IdentityServiceStub, admin: str, scopes: list[str], **fields: Any
) -> tuple[str, str, str]:
    """(token, client_id, client_secret) of a new client with `scopes`, by client_credentials."""
    created = await create_client(identity, admin, scopes=scopes, **fields)
    client_id, secret = created.client.client_id, created.client_secret
    answer = await token(identity, {"grant_type": "client_credentials"}, basic(client_id, secret))
    assert answer.status == 200, answer.body
    return answer.body["access_token"], client_id, secret


def reason(exc: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, f"no rich status in {exc.code()} {exc.details()}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason, dict(info.metadata)
    raise AssertionError("no ErrorInfo in the status")


async def refused(call: Any, code: grpc.StatusCode) -> tuple[str, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return reason(caught.value)


async def failure(call: Any) -> grpc.aio.AioRpcError:
    """The error `call` ends with; AssertionError (which `eventually` retries) while it still succeeds."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call still succeeds")


@pytest.fixture(scope="module")
async def early_token(
    jwt_mesh: MeshHandle, identity: ipb_grpc.IdentityServiceStub, registry: pb_grpc.RegistryServiceStub
) -> tuple[str, float]:
    """A token taken when the module starts, so the expiry test at its end waits as little as it can; used once
    at once, so the registry's validator remembers it and its expiry is checked on the remembered path."""
    value, _, _ = await access_token(identity, jwt_mesh.admin_token, ["agents:read"])
    issued = time.time()
    await registry.ListAgents(pb.ListAgentsRequest(), metadata=bearer(value))
    return value, issued


async def test_client_credentials_token_reads_agents_over_grpc_and_the_edge(
    jwt_mesh: MeshHandle,
    registry: pb_grpc.RegistryServiceStub,
    identity: ipb_grpc.IdentityServiceStub,
    early_token: tuple[str, float],
) -> None:
    admin = jwt_mesh.admin_token
    agent = await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(admin))
    reader, client_id, _ = await access_token(identity, admin, ["agents:read"])
    assert len(reader) > 512, "an access token is longer than the old bearer limit"
    listed = await registry.ListAgents(pb.ListAgentsRequest(page_size=100), metadata=bearer(reader))
    assert agent.id in {a.id for a in listed.agents}
    got = await registry.GetAgent(pb.GetAgentRequest(id=agent.id), metadata=bearer(reader))
    assert got.did == agent.did
    caller = await registry.GetCaller(pb.GetCallerRequest(), metadata=bearer(reader))
    assert (caller.kind, list(caller.scopes), caller.client_id, caller.principal_id) == (
        "service",
        ["agents:read"],
        client_id,
        "prn_bootstrap_admin",
    )
    assert caller.role == pb.ROLE_MEMBER
    # An API key answers with its role's scopes, as before.
    admin_caller = await registry.GetCaller(pb.GetCallerRequest(), metadata=bearer(admin))
    assert (admin_caller.kind, list(admin_caller.scopes), admin_caller.role) == ("person", ["admin"], pb.ROLE_ADMIN)

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {reader}"}) as http:
        async with http.get(jwt_mesh.url(f"/api/v1/agents/{agent.id}")) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["did"] == agent.did
        async with http.get(jwt_mesh.url("/api/v1/whoami")) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            assert body["kind"] == "service" and body["scopes"] == ["agents:read"], body
        async with http.post(jwt_mesh.url("/api/v1/agents"), json={"did": "did:web:x.example:y"}) as resp:
            assert resp.status == 403, await resp.text()
            details = (await resp.json())["error"]["details"][0]
            assert details["reason"] == "SCOPE_REQUIRED" and details["metadata"]["scope"] == "agents:write"


async def test_scopes_decide_what_a_token_may_do(
    jwt_mesh: MeshHandle, registry: pb_grpc.RegistryServiceStub, identity: ipb_grpc.IdentityServiceStub
) -> None:
    admin = jwt_mesh.admin_token
    reader, _, _ = await access_token(identity, admin, ["agents:read"])
    why, meta = await refused(
        registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(reader)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert (why, meta.get("scope")) == ("SCOPE_REQUIRED", "agents:write")
    sender, _, _ = await access_token(identity, admin, ["messages:send"])
    why, meta = await refused(
        registry.ListAgents(pb.ListAgentsRequest(), metadata=bearer(sender)), grpc.StatusCode.PERMISSION_DENIED
    )
    assert (why, meta.get("scope")) == ("SCOPE_REQUIRED", "agents:read")
    writer, writer_id, _ = await access_token(identity, admin, ["agents:read", "agents:write"])
    created = await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(writer))
    assert created.owner == "prn_bootstrap_admin", "a client acts for the principal that registered it"
    caller = await registry.GetCaller(pb.GetCallerRequest(), metadata=bearer(writer))
    assert caller.client_id == writer_id and caller.name == writer_id
    why, meta = await refused(
        registry.CreateApiKey(pb.CreateApiKeyRequest(name="nope"), metadata=bearer(writer)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert (why, meta.get("scope")) == ("SCOPE_REQUIRED", "admin")
    why, meta = await refused(
        identity.ListOAuthClients(ipb.ListOAuthClientsRequest(), metadata=bearer(writer)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert (why, meta.get("scope")) == ("SCOPE_REQUIRED", "admin")


async def test_peer_admin_needs_federation_admin_and_an_agent_client_acts_for_its_owner(
    jwt_mesh: MeshHandle, channel: grpc.aio.Channel, identity: ipb_grpc.IdentityServiceStub
) -> None:
    admin = jwt_mesh.admin_token
    registry = pb_grpc.RegistryServiceStub(channel)
    peers = fpb_grpc.PeerServiceStub(channel)
    writer, _, _ = await access_token(identity, admin, ["agents:write"])
    why, meta = await refused(
        peers.ListPeers(fpb.ListPeersRequest(), metadata=bearer(writer)), grpc.StatusCode.PERMISSION_DENIED
    )
    assert (why, meta.get("scope")) == ("SCOPE_REQUIRED", "federation:admin")
    fed_admin, _, _ = await access_token(identity, admin, ["federation:admin"])
    await peers.ListPeers(fpb.ListPeersRequest(), metadata=bearer(fed_admin))

    # An agent-bound client registered by the admin acts for the admin: what it creates is the admin's, and it
    # may change the admin's private agents, within its scopes.
    own = await registry.CreateAgent(
        pb.CreateAgentRequest(agent=make_agent(sharing=pb.SHARING_PRIVATE)), metadata=bearer(admin)
    )
    agent_token, _, _ = await access_token(identity, admin, ["agents:read", "agents:write"], agent_id=own.id)
    caller = await registry.GetCaller(pb.GetCallerRequest(), metadata=bearer(agent_token))
    assert (caller.kind, caller.agent_id, caller.principal_id) == ("agent", own.id, own.owner)
    made = await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(agent_token))
    assert made.owner == own.owner == "prn_bootstrap_admin"
    seen = await registry.GetAgent(pb.GetAgentRequest(id=own.id), metadata=bearer(agent_token))
    assert seen.id == own.id


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def forgeries(real: str, public_jwk: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Hand-made bad tokens from a real one: name -> (token, the reason the validator must give)."""
    head, body, sig = real.split(".")
    header = json.loads(_unb64(head))
    claims = json.loads(_unb64(body))

    def with_claims(**changes: Any) -> str:
        return f"{head}.{_b64(json.dumps({**claims, **changes}).encode())}.{sig}"

    def with_header(new_header: dict[str, Any], signature: str) -> str:
        return f"{_b64(json.dumps(new_header).encode())}.{body}.{signature}"

    signing_input = f"{_b64(json.dumps({**header, 'alg': 'HS256'}).encode())}.{body}"
    hs_key = json.dumps(public_jwk, separators=(",", ":"), sort_keys=True).encode()
    hs256 = _b64(hmac.new(hs_key, signing_input.encode(), hashlib.sha256).digest())
    stranger = ECKey.generate_key("P-256", private=True)
    stranger_signed = jose_jwt.encode({**header, "kid": "not-one-of-ours"}, claims, stranger, algorithms=["ES256"])
    # Signed by another key that claims the registry's kid: only the signature can tell.
    impostor = jose_jwt.encode(
        header, {**claims, "aud": "elsewhere", "iss": "https://evil.example"}, stranger, algorithms=["ES256"]
    )
    return {
        # The signature covers the payload: an edited audience, issuer or scope is caught there first.
        "wrong audience": (with_claims(aud="elsewhere"), "TOKEN_SIGNATURE"),
        "wrong issuer": (with_claims(iss="https://evil.example"), "TOKEN_SIGNATURE"),
        "tampered payload": (with_claims(scope="admin agents:read agents:write"), "TOKEN_SIGNATURE"),
        "other key, our kid": (impostor, "TOKEN_SIGNATURE"),
        "alg none": (with_header({**header, "alg": "none"}, ""), "TOKEN_ALGORITHM"),
        "HS256 with the public key": (f"{signing_input}.{hs256}", "TOKEN_ALGORITHM"),
        "unknown kid": (stranger_signed, "TOKEN_KEY_UNKNOWN"),
        "not a JWT": ("a.b.c", "TOKEN_MALFORMED"),
    }


async def test_forged_tokens_are_refused_by_every_service_with_their_reason(
    jwt_mesh: MeshHandle,
    registry: pb_grpc.RegistryServiceStub,
    identity: ipb_grpc.IdentityServiceStub,
    health: hpb_grpc.HealthMonitorServiceStub,
    discovery: dpb_grpc.DiscoveryServiceStub,
) -> None:
    real, _, _ = await access_token(identity, jwt_mesh.admin_token, ["admin"])
    kid = json.loads(_unb64(real.split(".")[0]))["kid"]
    jwks = json.loads((await identity.GetJwks(ipb.GetJwksRequest())).json)
    public = next(k for k in jwks["keys"] if k["kid"] == kid)
    # The real one passes everywhere first, so each refusal below is the forgery's doing.
    await registry.ListApiKeys(pb.ListApiKeysRequest(), metadata=bearer(real))
    await health.GetFederationHealth(hpb.GetFederationHealthRequest(), metadata=bearer(real))
    await discovery.ClearPeerCache(
        dpb.ClearPeerCacheRequest(peer_id="00000000-0000-4000-8000-000000000000"), metadata=bearer(real)
    )
    async with aiohttp.ClientSession() as http:
        for name, (forged, expected) in forgeries(real, public).items():
            why, _ = await refused(
                registry.ListApiKeys(pb.ListApiKeysRequest(), metadata=bearer(forged)), grpc.StatusCode.UNAUTHENTICATED
            )
            assert why == expected, name
            why, _ = await refused(
                health.GetFederationHealth(hpb.GetFederationHealthRequest(), metadata=bearer(forged)),
                grpc.StatusCode.UNAUTHENTICATED,
            )
            assert why == expected, f"health monitor: {name}"
            async with http.get(jwt_mesh.url("/api/v1/whoami"), headers={"Authorization": f"Bearer {forged}"}) as resp:
                assert resp.status == 401, name
                assert (await resp.json())["error"]["details"][0]["reason"] == expected, name
        for name, (forged, expected) in forgeries(real, public).items():
            why, _ = await refused(
                discovery.ClearPeerCache(
                    dpb.ClearPeerCacheRequest(peer_id="00000000-0000-4000-8000-000000000000"),
                    metadata=bearer(forged),
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
            assert why == expected, f"discovery: {name}"


async def test_a_revoked_token_is_refused_by_the_registry_discovery_and_the_health_monitor(
    jwt_mesh: MeshHandle,
    registry: pb_grpc.RegistryServiceStub,
    identity: ipb_grpc.IdentityServiceStub,
    discovery: dpb_grpc.DiscoveryServiceStub,
    health: hpb_grpc.HealthMonitorServiceStub,
) -> None:
    value, client_id, secret = await access_token(identity, jwt_mesh.admin_token, ["admin"])
    clear = dpb.ClearPeerCacheRequest(peer_id="00000000-0000-4000-8000-000000000000")
    await registry.ListApiKeys(pb.ListApiKeysRequest(), metadata=bearer(value))
    await discovery.ClearPeerCache(clear, metadata=bearer(value))
    await health.GetFederationHealth(hpb.GetFederationHealthRequest(), metadata=bearer(value))

    started = time.monotonic()
    answer = await revoke(identity, {"token": value, "token_type_hint": "access_token"}, basic(client_id, secret))
    assert answer.status == 200, answer.body
    delays: dict[str, float] = {}

    def refusal(name: str, call: Any) -> Any:
        async def check() -> None:
            if name in delays:
                return
            error = await failure(call())
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and reason(error)[0] == "TOKEN_REVOKED"
            delays[name] = time.monotonic() - started

        return check

    checks = [
        refusal("registry", lambda: registry.ListApiKeys(pb.ListApiKeysRequest(), metadata=bearer(value))),
        refusal("discovery", lambda: discovery.ClearPeerCache(clear, metadata=bearer(value))),
        refusal(
            "health-monitor",
            lambda: health.GetFederationHealth(hpb.GetFederationHealthRequest(), metadata=bearer(value)),
        ),
    ]

    async def all_refuse() -> None:
        for check in checks:
            await check()

    await eventually(all_refuse, seconds=10)
    print("revoked token refused after: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in delays.items()))


@pytest.mark.slow  # waits out the shortest token lifetime (30 s) plus the mesh's 1 s of clock skew
async def test_an_expired_token_is_refused(
    registry: pb_grpc.RegistryServiceStub, early_token: tuple[str, float]
) -> None:
    value, issued = early_token
    # The token was good when issued; it must stop working once its lifetime and the allowed skew have passed.
    wait = issued + TOKEN_TTL + LEEWAY + 15 - time.time()

    async def check() -> None:
        error = await failure(registry.ListAgents(pb.ListAgentsRequest(), metadata=bearer(value)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and reason(error)[0] == "TOKEN_EXPIRED"

    await eventually(check, seconds=max(wait, 1.0))
    assert time.time() >= issued + TOKEN_TTL - 1
