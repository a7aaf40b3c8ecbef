"""The grants of the token endpoint: client_credentials, refresh_token (rotated, reuse revokes) and token exchange."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from agentvault.common import jose_keys
from agentvault.common.errors import Unauthenticated
from agentvault.common.jwt_auth import looks_like_jwt
from agentvault.common.oauth import REFRESH_TOKEN
from agentvault.common.principal import parse_scopes
from agentvault_registry.oauth_client_auth import OAuthError, hash_secret
from agentvault_registry.oauth_revocation import ISSUED_KEY, REFRESH_PREFIX, TokenRevocation
from agentvault_registry.oauth_store import OAuthClientRecord

log = logging.getLogger(__name__)

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a token type's name
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 - a token type's name


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


class TokenGrants(TokenRevocation):
    """Issues access and refresh tokens for each grant type."""

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
