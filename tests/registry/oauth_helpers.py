"""Shared helpers of the OAuth tests: calling the registry's IdentityService as the edge does."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import jwt as pyjwt

from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc

from ..conftest import bearer

ISSUER = "http://127.0.0.1:8080"
AUDIENCE = "agentvault"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def basic(client_id: str, secret: str) -> str:
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def _answer(reply: ipb.OAuthReply) -> Answer:
    return Answer(reply.http_status, json.loads(reply.json_body) if reply.json_body else {}, dict(reply.headers))


async def token(
    stub: ipb_grpc.IdentityServiceStub, form: dict[str, str], authorization: str = "", source: str = "10.0.0.1"
) -> Answer:
    return _answer(await stub.Token(ipb.TokenRequest(form=form, authorization_header=authorization, source=source)))


async def introspect(
    stub: ipb_grpc.IdentityServiceStub, form: dict[str, str], authorization: str = "", source: str = "10.0.0.1"
) -> Answer:
    request = ipb.IntrospectRequest(form=form, authorization_header=authorization, source=source)
    return _answer(await stub.Introspect(request))


async def revoke(
    stub: ipb_grpc.IdentityServiceStub, form: dict[str, str], authorization: str = "", source: str = "10.0.0.1"
) -> Answer:
    return _answer(await stub.Revoke(ipb.RevokeRequest(form=form, authorization_header=authorization, source=source)))


async def create_client(
    stub: ipb_grpc.IdentityServiceStub, admin_token: str, **fields: Any
) -> ipb.CreateOAuthClientResponse:
    fields.setdefault("name", "test client")
    fields.setdefault("scopes", ["agents:read", "agents:write"])
    return await stub.CreateOAuthClient(ipb.CreateOAuthClientRequest(**fields), metadata=bearer(admin_token))


async def verify(stub: ipb_grpc.IdentityServiceStub, access_token: str) -> dict[str, Any]:
    """The token's claims, verified by PyJWT against the JWKS the registry publishes now."""
    jwks = json.loads((await stub.GetJwks(ipb.GetJwksRequest())).json)
    assert all("d" not in key for key in jwks["keys"]), "the JWKS must hold public keys only"
    kid = pyjwt.get_unverified_header(access_token)["kid"]
    key = pyjwt.PyJWKSet.from_dict(jwks)[kid]
    claims: dict[str, Any] = pyjwt.decode(access_token, key.key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER)
    return claims
