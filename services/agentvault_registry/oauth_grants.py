"""The token, introspection and revocation endpoints (RFC 6749, 7523, 8693, 7662, 7009), answering in their shapes."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote_plus

import redis.asyncio as aioredis
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from agentvault.common import jose_keys, revocations
from agentvault.common.errors import Unauthenticated
from agentvault.common.jwt_auth import JwtValidator, looks_like_jwt
from agentvault.common.oauth import (
    AUTH_METHODS,
    CLIENT_CREDENTIALS,
    GRANT_TYPES,
    KNOWN_SCOPES,
    PRIVATE_KEY_JWT,
    REFRESH_TOKEN,
    SECRET_BASIC,
    SECRET_POST,
)
from agentvault.common.principal import parse_scopes
from agentvault.common.ratelimit import MinuteWindow
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault_registry.oauth_keys import SigningKeys
from agentvault_registry.oauth_store import OAuthClientRecord, OAuthStore, RefreshRecord
from agentvault_registry.settings import OAuthSettings

log = logging.getLogger(__name__)

JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a token type's name
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 - a token type's name
REFRESH_PREFIX = "avr"
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
# Redis sorted set (member jti, score exp) of the access tokens issued to a client and not yet expired.
ISSUED_KEY = "oauth:issued:"
_DUMMY_HASH = b"\0" * 32


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class OAuthError(Exception):
    """An RFC 6749 5.2 error: the error code, a description safe to show, the HTTP status and extra headers."""

    def __init__(self, error: str, description: str, status: int = 400, headers: Mapping[str, str] | None = None):
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.headers = dict(headers or {})


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


def _scopes(value: str, what: str = "scope") -> frozenset[str]:
    try:
        return parse_scopes(value)
    except ValueError as exc:
        raise OAuthError("invalid_scope", f"{what}: {exc}") from None


def _granted(requested: str | None, allowed: frozenset[str]) -> frozenset[str]:
    """The requested scopes when all are allowed (all allowed ones when none are asked for); else invalid_scope."""
    if requested is None or not requested.strip():
        if not allowed:
            raise OAuthError("invalid_scope", "no scope can be granted")
        return allowed
    asked = _scopes(requested)
    beyond = asked - allowed
    if beyond:
        raise OAuthError("invalid_scope", f"not granted to this client: {' '.join(sorted(beyond))}")
    return asked


class AuthorizationServer:
    def __init__(self, store: OAuthStore, keys: SigningKeys, redis: aioredis.Redis, settings: OAuthSettings) -> None:
        self.store = store
        self.keys = keys
        self.redis = redis
        self.settings = settings
        self.token_endpoint = f"{settings.issuer}/oauth/token"
        self.validator = JwtValidator(settings.issuer, settings.audience, keys.jwks, revoked=self._revoked)

    async def _revoked(self, jti: str) -> bool:
        return await self.redis.zscore(revocations.REVOKED_KEY, jti) is not None

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 authorization server metadata."""
        issuer = self.settings.issuer
        return {
            "issuer": issuer,
            "token_endpoint": self.token_endpoint,
            "jwks_uri": f"{issuer}/.well-known/jwks.json",
            "introspection_endpoint": f"{issuer}/oauth/introspect",
            "revocation_endpoint": f"{issuer}/oauth/revoke",
            "grant_types_supported": list(GRANT_TYPES),
            "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "token_endpoint_auth_signing_alg_values_supported": ASSERTION_ALGORITHMS,
            "introspection_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "scopes_supported": list(KNOWN_SCOPES),
            "response_types_supported": [],
        }

    # Entry points ------------------------------------------------------------------------------------

    async def token(self, form: Mapping[str, str], authorization: str, source: str) -> ipb.OAuthReply:
        try:
            _check_form(form, authorization)
            presented = presented_credentials(form, authorization)
            await self._rate_limit(presented.client_id, source)
            client = await self._authenticate(presented)
            grant_type = form.get("grant_type", "")
            if not grant_type:
                raise OAuthError("invalid_request", "grant_type is required")
            if grant_type not in GRANT_TYPES:
                raise OAuthError("unsupported_grant_type", f"supported: {', '.join(GRANT_TYPES)}")
            if grant_type not in client.grant_types:
                raise OAuthError("unauthorized_client", f"this client is not registered for {grant_type}")
            if grant_type == CLIENT_CREDENTIALS:
                body = await self._client_credentials(client, form)
            elif grant_type == REFRESH_TOKEN:
                body = await self._refresh(client, form)
            else:
                body = await self._exchange(client, form)
        except OAuthError as exc:
            return error_reply(exc)
        log.info("issued an access token", extra={"client_id": client.client_id, "grant_type": grant_type})
        return reply(200, body)

    async def introspect(self, form: Mapping[str, str], authorization: str, source: str) -> ipb.OAuthReply:
        try:
            _check_form(form, authorization)
            presented = presented_credentials(form, authorization)
            await self._rate_limit(presented.client_id, source)
            client = await self._authenticate(presented)
            token = form.get("token", "")
            if not token:
                raise OAuthError("invalid_request", "token is required")
        except OAuthError as exc:
            return error_reply(exc)
        return reply(200, await self._introspect(client, token))

    async def revoke(self, form: Mapping[str, str], authorization: str, source: str) -> ipb.OAuthReply:
        try:
            _check_form(form, authorization)
            presented = presented_credentials(form, authorization)
            await self._rate_limit(presented.client_id, source)
            client = await self._authenticate(presented)
            token = form.get("token", "")
            if not token:
                raise OAuthError("invalid_request", "token is required")
        except OAuthError as exc:
            return error_reply(exc)
        await self._revoke(client, token)
        # RFC 7009 2.2: 200 whether or not the token was known, so nothing is learned from the answer.
        return reply(200, None)

    # Client authentication ---------------------------------------------------------------------------

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
        stored = found[1] if found and found[1] is not None else _DUMMY_HASH
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

    # Grants -----------------------------------------------------------------------------------------

    async def _issue(
        self,
        client: OAuthClientRecord,
        scopes: frozenset[str],
        *,
        subject: str | None = None,
        kind: str | None = None,
        agent_id: str | None = None,
        owner: str | None = None,
        actor: Mapping[str, Any] | None = None,
    ) -> jose_keys.SignedToken:
        signed = jose_keys.sign_access_token(
            await self.keys.active(),
            issuer=self.settings.issuer,
            audience=self.settings.audience,
            subject=subject or client.client_id,
            client_id=client.client_id,
            scopes=scopes,
            ttl=self.settings.access_token_ttl,
            kind=kind or client.kind,
            agent_id=str(client.agent_id or "") if agent_id is None else agent_id,
            owner=client.owner_principal_id if owner is None else owner,
            actor=actor,
        )
        # Each client's live access tokens, so disabling or deleting it can revoke them all. Bounded: entries
        # leave as they expire, and the token endpoint's per-client rate limit caps how many can be live.
        key = ISSUED_KEY + client.client_id
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {signed.jti: signed.expires_at})
            pipe.zremrangebyscore(key, "-inf", time.time())
            pipe.expire(key, self.settings.access_token_ttl + 60)
            await pipe.execute()
        return signed

    def _body(self, signed: jose_keys.SignedToken, scopes: frozenset[str]) -> dict[str, Any]:
        return {
            "access_token": signed.token,
            "token_type": "Bearer",
            "expires_in": self.settings.access_token_ttl,
            "scope": " ".join(sorted(scopes)),
        }

    async def _new_refresh(
        self, client: OAuthClientRecord, scopes: frozenset[str], signed: jose_keys.SignedToken, family_id: str
    ) -> str:
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        await self.store.insert_refresh(
            token_id,
            family_id,
            client.client_id,
            client.client_id,
            sorted(scopes),
            hash_secret(secret),
            signed.jti,
            datetime.fromtimestamp(signed.expires_at, UTC),
            now + timedelta(seconds=self.settings.refresh_token_ttl),
        )
        return f"{REFRESH_PREFIX}_{token_id}_{secret}"

    async def _client_credentials(self, client: OAuthClientRecord, form: Mapping[str, str]) -> dict[str, Any]:
        scopes = _granted(form.get("scope"), frozenset(client.scopes))
        signed = await self._issue(client, scopes)
        body = self._body(signed, scopes)
        if REFRESH_TOKEN in client.grant_types:
            body["refresh_token"] = await self._new_refresh(client, scopes, signed, secrets.token_hex(8))
        return body

    async def _refresh(self, client: OAuthClientRecord, form: Mapping[str, str]) -> dict[str, Any]:
        presented = form.get("refresh_token", "")
        if not presented:
            raise OAuthError("invalid_request", "refresh_token is required")
        record = await self._find_refresh(presented)
        if record is None or record.client_id != client.client_id:
            raise OAuthError("invalid_grant", "the refresh token is invalid, expired or revoked")
        if record.revoked_at is not None or record.expires_at <= datetime.now(UTC):
            raise OAuthError("invalid_grant", "the refresh token is invalid, expired or revoked")
        if record.used_at is not None:
            await self._reused(record.family_id, client.client_id)
        # Never more than the client holds now, even when its scopes were narrowed since the family began. Checked
        # before the token is used up, so a refused request leaves it valid.
        family_scopes = frozenset(record.scopes) & frozenset(client.scopes)
        scopes = _granted(form.get("scope"), family_scopes)
        if not await self.store.use_refresh(record.id):
            await self._reused(record.family_id, client.client_id)  # a concurrent use won the race
        signed = await self._issue(client, scopes)
        body = self._body(signed, scopes)
        # RFC 6749 6: the new refresh token keeps the original scope (less what the client lost).
        body["refresh_token"] = await self._new_refresh(client, family_scopes, signed, record.family_id)
        return body

    async def _reused(self, family_id: str, client_id: str) -> None:
        """Used twice: one of the two holders is not the client. The whole family goes, with the access tokens
        issued from it, so neither holder keeps anything (OAuth 2.0 Security BCP 4.14.2)."""
        await self._revoke_access(await self.store.revoke_family(family_id))
        log.warning("refresh token reuse: family revoked", extra={"client_id": client_id})
        raise OAuthError("invalid_grant", "the refresh token was already used; its family is revoked")

    async def _find_refresh(self, presented: str) -> RefreshRecord | None:
        prefix, _, rest = presented.partition("_")
        token_id, _, secret = rest.partition("_")
        if prefix != REFRESH_PREFIX or len(token_id) != 16 or not secret or len(secret) > 128:
            return None
        record = await self.store.get_refresh(token_id)
        stored = record.secret_hash if record else _DUMMY_HASH
        if not hmac.compare_digest(hash_secret(secret), stored) or record is None:
            return None
        return record

    async def _exchange(self, client: OAuthClientRecord, form: Mapping[str, str]) -> dict[str, Any]:
        """RFC 8693: the client acts for the subject of a token of this mesh, with at most the scopes both hold."""
        subject_token = form.get("subject_token", "")
        if not subject_token or not form.get("subject_token_type"):
            raise OAuthError("invalid_request", "subject_token and subject_token_type are required")
        if form["subject_token_type"] not in (ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE):
            raise OAuthError("invalid_request", f"subject_token_type must be {ACCESS_TOKEN_TYPE}")
        if form.get("requested_token_type", ACCESS_TOKEN_TYPE) != ACCESS_TOKEN_TYPE:
            raise OAuthError("invalid_request", f"only {ACCESS_TOKEN_TYPE} can be issued")
        if form.get("actor_token"):
            raise OAuthError("invalid_request", "actor_token is not supported: the authenticated client is the actor")
        for name in ("audience", "resource"):
            if form.get(name) and form[name] != self.settings.audience:
                raise OAuthError("invalid_target", f"{name} must be {self.settings.audience!r}")
        if not looks_like_jwt(subject_token):
            raise OAuthError("invalid_grant", "subject_token is not an access token of this mesh")
        try:
            claims = await self.validator.claims(subject_token)
        except Unauthenticated:
            raise OAuthError("invalid_grant", "subject_token is not a valid access token of this mesh") from None
        subject_scopes = _scopes(str(claims.get("scope", "")), "subject_token scope")
        scopes = _granted(form.get("scope"), subject_scopes & frozenset(client.scopes))
        actor: dict[str, Any] = {"sub": client.client_id}
        if isinstance(claims.get("act"), dict):
            actor["act"] = claims["act"]  # RFC 8693 4.1: the chain of earlier actors, nested
        signed = await self._issue(
            client,
            scopes,
            subject=str(claims["sub"]),
            kind=str(claims.get("avm_kind") or client.kind),
            agent_id=str(claims.get("avm_agent", "")),
            owner=str(claims.get("avm_owner", "")),
            actor=actor,
        )
        body = self._body(signed, scopes)
        body["issued_token_type"] = ACCESS_TOKEN_TYPE
        return body

    # Introspection and revocation ---------------------------------------------------------------------

    async def _introspect(self, client: OAuthClientRecord, token: str) -> dict[str, Any]:
        inactive = {"active": False}
        if looks_like_jwt(token):
            try:
                claims = await self.validator.claims(token)
            except Unauthenticated:
                return inactive
            return {"active": True, "token_type": "Bearer", **claims}
        record = await self._find_refresh(token)
        # A refresh token is only described to the client it was issued to.
        if (
            record is None
            or record.client_id != client.client_id
            or record.used_at is not None
            or record.revoked_at is not None
            or record.expires_at <= datetime.now(UTC)
        ):
            return inactive
        return {
            "active": True,
            "token_type": "refresh_token",
            "client_id": record.client_id,
            "sub": record.subject,
            "scope": " ".join(sorted(record.scopes)),
            "exp": int(record.expires_at.timestamp()),
        }

    async def _revoke(self, client: OAuthClientRecord, token: str) -> None:
        if looks_like_jwt(token):
            try:
                claims = await self.validator.claims(token)
            except Unauthenticated:
                return  # unknown, expired or already revoked: nothing to do
            # A client revokes only its own tokens; anyone else's stay (and the answer is the same 200).
            if claims.get("client_id") == client.client_id:
                await revocations.revoke(self.redis, str(claims["jti"]), float(claims["exp"]))
                log.info("access token revoked", extra={"client_id": client.client_id})
            return
        record = await self._find_refresh(token)
        if record is not None and record.client_id == client.client_id:
            await self._revoke_access(await self.store.revoke_family(record.family_id))
            log.info("refresh token family revoked", extra={"client_id": client.client_id})

    async def _revoke_access(self, live: list[tuple[str, datetime]]) -> None:
        for jti, exp in live:
            await revocations.revoke(self.redis, jti, exp.timestamp())

    async def revoke_client_tokens(self, client_id: str) -> None:
        """Revokes a client's refresh tokens and every access token issued to it still live (disable, delete)."""
        await self._revoke_access(await self.store.revoke_client_refresh(client_id))
        await self.revoke_issued(client_id)

    async def revoke_live(self, client_id: str, live: list[tuple[str, datetime]]) -> None:
        await self._revoke_access(live)
        await self.revoke_issued(client_id)

    async def revoke_issued(self, client_id: str) -> None:
        key = ISSUED_KEY + client_id
        issued: list[Any] = await self.redis.zrangebyscore(key, time.time(), "+inf", withscores=True)
        for member, exp in issued:
            jti = member.decode() if isinstance(member, bytes) else str(member)
            await revocations.revoke(self.redis, jti, float(exp))
        await self.redis.delete(key)


def _check_form(form: Mapping[str, str], authorization: str) -> None:
    size = len(authorization) + sum(len(k) + len(v) for k, v in form.items())
    if size > MAX_FORM_BYTES:
        raise OAuthError("invalid_request", f"the request is larger than {MAX_FORM_BYTES} bytes")
