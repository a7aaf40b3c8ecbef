"""OAuth client authentication at the token endpoints: secret (basic, post) or private_key_jwt, and rate limits."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import redis.asyncio as aioredis
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from agentvault.common.jwt_auth import JwtValidator
from agentvault.common.oauth import PRIVATE_KEY_JWT, SECRET_BASIC, SECRET_POST, OAuthError
from agentvault.common.ratelimit import MinuteWindow
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault_registry.oauth_keys import SigningKeys
from agentvault_registry.oauth_store import OAuthClientRecord, OAuthStore
from agentvault_registry.settings import OAuthSettings

JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Client assertions are signed by keys the client registered; these are the asymmetric algorithms accepted.
ASSERTION_ALGORITHMS = ["ES256", "ES384", "ES512", "EdDSA"]
ASSERTION_LEEWAY = 30
# An assertion may not claim a longer life than this, so the replay set entry it costs stays short-lived.
MAX_ASSERTION_LIFETIME = 600
MAX_ASSERTION_BYTES = 8192
MAX_FORM_BYTES = 16 * 1024
MAX_CLIENT_ID = 64
MAX_SOURCE = 128
REALM = 'Basic realm="agentvault"'
DUMMY_HASH = b"\0" * 32


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def invalid_client(description: str = "client authentication failed") -> OAuthError:
    # HTTP requires a challenge with every 401; RFC 6749 requires this one when Basic was tried.
    return OAuthError("invalid_client", description, 401, {"WWW-Authenticate": REALM})


def reply(status: int, body: Mapping[str, Any] | None, headers: Mapping[str, str] | None = None) -> ipb.OAuthReply:
    text = json.dumps(body, separators=(",", ":")) if body is not None else ""
    return ipb.OAuthReply(http_status=status, json_body=text, headers=dict(headers or {}))


def error_reply(exc: OAuthError) -> ipb.OAuthReply:
    return reply(exc.status, {"error": exc.error, "error_description": exc.description}, exc.headers)


@dataclass
class Presented:
    """The client credentials a request carries, before they are checked."""

    client_id: str = ""
    method: str = ""
    secret: str = ""
    assertion: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def presented_credentials(form: Mapping[str, str], authorization: str) -> Presented:
    """Which one client authentication method the request uses (RFC 6749 2.3: never more than one)."""
    methods = []
    found = Presented()
    scheme, _, value = authorization.strip().partition(" ")
    if authorization.strip():
        if scheme.lower() != "basic":
            raise invalid_client("only Basic client authentication is accepted in the Authorization header")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise invalid_client("malformed Basic credentials") from None
        raw_id, sep, raw_secret = decoded.partition(":")
        if not sep:
            raise invalid_client("malformed Basic credentials")
        # RFC 6749 2.3.1: both halves are form-urlencoded before they are joined.
        found = Presented(unquote_plus(raw_id), SECRET_BASIC, unquote_plus(raw_secret))
        methods.append(SECRET_BASIC)
    if "client_secret" in form:
        methods.append(SECRET_POST)
        found = Presented(form.get("client_id", ""), SECRET_POST, form["client_secret"])
    if "client_assertion" in form or "client_assertion_type" in form:
        methods.append(PRIVATE_KEY_JWT)
        if form.get("client_assertion_type") != JWT_BEARER_ASSERTION:
            raise OAuthError("invalid_request", f"client_assertion_type must be {JWT_BEARER_ASSERTION}")
        assertion = form.get("client_assertion", "")
        if not assertion or len(assertion) > MAX_ASSERTION_BYTES:
            raise invalid_client("client_assertion must be a JWT of at most 8 KiB")
        found = Presented(_unverified_issuer(assertion), PRIVATE_KEY_JWT, assertion=assertion)
    if len(methods) > 1:
        raise OAuthError("invalid_request", "use exactly one client authentication method")
    if not methods:
        raise invalid_client("client authentication is required")
    if "client_id" in form and form["client_id"] != found.client_id:
        raise OAuthError("invalid_request", "client_id does not match the client's credentials")
    if not found.client_id or len(found.client_id) > MAX_CLIENT_ID:
        raise invalid_client()
    return found


def _unverified_issuer(assertion: str) -> str:
    """The assertion's `iss` before its signature is checked: only to find the client whose keys check it."""
    parts = assertion.split(".")
    if len(parts) != 3:
        raise invalid_client("client_assertion is not a JWT")
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        raise invalid_client("client_assertion is not a JWT") from None
    issuer = payload.get("iss") if isinstance(payload, dict) else None
    if not isinstance(issuer, str):
        raise invalid_client("client_assertion needs iss (the client_id)")
    return issuer


def check_form(form: Mapping[str, str], authorization: str) -> None:
    size = len(authorization) + sum(len(k) + len(v) for k, v in form.items())
    if size > MAX_FORM_BYTES:
        raise OAuthError("invalid_request", f"the request is larger than {MAX_FORM_BYTES} bytes")


class ClientAuthentication:
    """Checks the client a request to any of the endpoints comes from; the state the other parts share too."""

    store: OAuthStore
    keys: SigningKeys
    redis: aioredis.Redis
    settings: OAuthSettings
    token_endpoint: str
    validator: JwtValidator

    async def _rate_limit(self, client_id: str, source: str) -> None:
        now = time.time()
        by_client = MinuteWindow.of(f"oauth:rate:client:{client_id}", now)
        by_source = MinuteWindow.of(f"oauth:rate:source:{source[:MAX_SOURCE]}", now)
        async with self.redis.pipeline(transaction=False) as pipe:
            by_client.count(pipe)
            by_source.count(pipe)
            counts = await pipe.execute()
        over = None
        if counts[0] > self.settings.rate_limit_per_client:
            over = by_client
        elif source and counts[2] > self.settings.rate_limit_per_source:
            over = by_source
        if over is not None:
            retry = over.retry_after(now)
            raise OAuthError(
                "temporarily_unavailable",
                f"too many requests; retry in {retry} seconds",
                429,
                {"Retry-After": str(retry)},
            )

    async def _authenticate(self, presented: Presented) -> OAuthClientRecord:
        if presented.method == PRIVATE_KEY_JWT:
            return await self._authenticate_assertion(presented)
        found = await self.store.get_client_secret(presented.client_id)
        # Hash and compare even when the client is unknown, so timing does not tell which client ids exist.
        stored = found[1] if found and found[1] is not None else DUMMY_HASH
        matches = hmac.compare_digest(hash_secret(presented.secret), stored)
        if found is None or found[1] is None or not matches or found[0].disabled:
            raise invalid_client()
        return found[0]

    async def _authenticate_assertion(self, presented: Presented) -> OAuthClientRecord:
        """RFC 7523 2.2 / 3: a JWT signed by one of the client's registered keys, for this server, used once."""
        client = await self.store.get_client(presented.client_id)
        if client is None or client.disabled or not client.jwks or client.token_endpoint_auth_method != PRIVATE_KEY_JWT:
            raise invalid_client()
        try:
            keys = KeySet.import_key_set(json.loads(client.jwks))
            token = jwt.decode(presented.assertion, keys, algorithms=ASSERTION_ALGORITHMS)
        except (JoseError, ValueError, TypeError):
            raise invalid_client("client_assertion does not verify with the client's registered keys") from None
        claims = token.claims
        now = time.time()
        exp = claims.get("exp")
        if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
            raise invalid_client("client_assertion: iss and sub must be the client_id")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if not any(a in (self.token_endpoint, self.settings.issuer) for a in audiences):
            raise invalid_client("client_assertion: aud must be the token endpoint URL or the issuer")
        if not isinstance(exp, int | float) or exp + ASSERTION_LEEWAY < now:
            raise invalid_client("client_assertion has expired (or has no exp)")
        if exp - now > MAX_ASSERTION_LIFETIME:
            raise invalid_client(f"client_assertion may live at most {MAX_ASSERTION_LIFETIME} seconds")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf - ASSERTION_LEEWAY > now:
            raise invalid_client("client_assertion is not valid yet")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise invalid_client("client_assertion needs a jti")
        # RFC 7523 3 item 7: each assertion once. The key lives until the assertion would be refused anyway.
        key = "oauth:assertion:" + hashlib.sha256(f"{client.client_id}\0{jti}".encode()).hexdigest()
        ttl = max(1, int(exp - now + ASSERTION_LEEWAY) + 1)
        if not await self.redis.set(key, b"1", nx=True, ex=ttl):
            raise invalid_client("client_assertion was already used")
        return client
