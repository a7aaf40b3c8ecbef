"""ES256 signing keys and RFC 9068 access tokens: the one place signer and validator agree on formats."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey

ALGORITHM = "ES256"
CURVE = "P-256"
TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a secret
# RFC 9068 2.1 allows the full media type too; both name an access token, nothing else does.
TOKEN_TYPES = frozenset({TOKEN_TYPE, "application/at+jwt"})
# An access token stays well under this; the validator refuses anything larger before parsing it.
MAX_TOKEN_BYTES = 4096
_PUBLIC_MEMBERS = ("kty", "crv", "x", "y")


@dataclass(frozen=True)
class SignedToken:
    token: str
    jti: str
    expires_at: int
    claims: dict[str, Any]


def generate_key() -> ECKey:
    """A new P-256 key pair whose `kid` is its RFC 7638 thumbprint."""
    key = ECKey.generate_key(CURVE, private=True)
    return import_key(key.as_dict(private=True))


def key_id(key: ECKey) -> str:
    """The RFC 7638 thumbprint (SHA-256, base64url) of the public key: stable, and derived rather than chosen."""
    return str(key.thumbprint())


def import_key(jwk: Mapping[str, Any]) -> ECKey:
    """A key from its JWK (private or public); only P-256 EC keys are accepted, and `kid` is always the thumbprint."""
    if jwk.get("kty") != "EC" or jwk.get("crv") != CURVE:
        raise ValueError("only EC P-256 keys are used for ES256")
    members = {name: jwk[name] for name in (*_PUBLIC_MEMBERS, "d") if name in jwk}
    key = ECKey.import_key(members)
    return ECKey.import_key({**members, "kid": key_id(key), "alg": ALGORITHM, "use": "sig"})


def public_jwk(key: ECKey) -> dict[str, Any]:
    """The public half as a JWK with `kid`, `alg` and `use`, fit for a JWKS."""
    public = {name: value for name, value in key.as_dict(private=False).items() if name in _PUBLIC_MEMBERS}
    return {**public, "kid": key_id(key), "alg": ALGORITHM, "use": "sig"}


def private_jwk_json(key: ECKey) -> str:
    """The private key as JWK JSON, for the caller to encrypt before it is stored anywhere."""
    return json.dumps(key.as_dict(private=True), separators=(",", ":"), sort_keys=True)


def jwks(keys: Iterable[ECKey]) -> dict[str, Any]:
    """A JWK Set (RFC 7517 5) of the keys' public halves."""
    return {"keys": [public_jwk(key) for key in keys]}


def sign_access_token(
    key: ECKey,
    *,
    issuer: str,
    audience: str,
    subject: str,
    client_id: str,
    scopes: Iterable[str],
    ttl: int,
    kind: str,
    agent_id: str = "",
    owner: str = "",
    actor: Mapping[str, Any] | None = None,
    jti: str | None = None,
    now: int | None = None,
) -> SignedToken:
    """An RFC 9068 access token: header `{alg: ES256, typ: at+jwt, kid}`, the registered claims and ours."""
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    issued = int(time.time()) if now is None else now
    token_id = jti or secrets.token_urlsafe(18)
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "exp": issued + ttl,
        "iat": issued,
        "nbf": issued,
        "jti": token_id,
        "client_id": client_id,
        "scope": " ".join(sorted(set(scopes))),
        "avm_kind": kind,
    }
    if agent_id:
        claims["avm_agent"] = agent_id
    if owner:
        claims["avm_owner"] = owner
    if actor:
        claims["act"] = dict(actor)
    header = {"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": key_id(key)}
    token = jwt.encode(header, claims, key, algorithms=[ALGORITHM])
    return SignedToken(token, token_id, claims["exp"], claims)
