"""Introspection (RFC 7662) and revocation (RFC 7009) of the tokens the authorization server issued."""

from __future__ import annotations

import hmac
import logging
import time
from datetime import UTC, datetime
from typing import Any

from agentvault.common import revocations
from agentvault.common.errors import Unauthenticated
from agentvault.common.jwt_auth import looks_like_jwt
from agentvault_registry.oauth_client_auth import DUMMY_HASH, ClientAuthentication, hash_secret
from agentvault_registry.oauth_store import OAuthClientRecord, RefreshRecord

log = logging.getLogger(__name__)

REFRESH_PREFIX = "avr"
# Redis sorted set (member jti, score exp) of the access tokens issued to a client and not yet expired.
ISSUED_KEY = "oauth:issued:"


class TokenRevocation(ClientAuthentication):
    """Describes and revokes access tokens and refresh token families, and finds a presented refresh token."""

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

    async def _find_refresh(self, presented: str) -> RefreshRecord | None:
        prefix, _, rest = presented.partition("_")
        token_id, _, secret = rest.partition("_")
        if prefix != REFRESH_PREFIX or len(token_id) != 16 or not secret or len(secret) > 128:
            return None
        record = await self.store.get_refresh(token_id)
        stored = record.secret_hash if record else DUMMY_HASH
        if not hmac.compare_digest(hash_secret(secret), stored) or record is None:
            return None
        return record
