"""The token, introspection and revocation endpoints (RFC 6749, 7523, 8693, 7662, 7009), answering in their shapes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

from agentvault.common import revocations
from agentvault.common.jwt_auth import JwtValidator
from agentvault.common.oauth import AUTH_METHODS, CLIENT_CREDENTIALS, GRANT_TYPES, KNOWN_SCOPES, REFRESH_TOKEN
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault_registry import metrics
from agentvault_registry.oauth_client_auth import (
    ASSERTION_ALGORITHMS,
    OAuthError,
    check_form,
    error_reply,
    presented_credentials,
    reply,
)
from agentvault_registry.oauth_client_auth import hash_secret as hash_secret  # imported from here by others
from agentvault_registry.oauth_grant_types import TokenGrants
from agentvault_registry.oauth_keys import SigningKeys
from agentvault_registry.oauth_store import OAuthClientRecord, OAuthStore
from agentvault_registry.settings import OAuthSettings

log = logging.getLogger(__name__)


class AuthorizationServer(TokenGrants):
    """The token, introspection and revocation endpoints, and the server metadata."""

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
            check_form(form, authorization)
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
            metrics.token_answered(form.get("grant_type", ""), exc.error)
            return error_reply(exc)
        metrics.token_answered(grant_type, "issued")
        log.info("issued an access token", extra={"client_id": client.client_id, "grant_type": grant_type})
        return reply(200, body)

    async def introspect(self, form: Mapping[str, str], authorization: str, source: str) -> ipb.OAuthReply:
        try:
            client, token = await self._client_and_token(form, authorization, source)
        except OAuthError as exc:
            return error_reply(exc)
        return reply(200, await self._introspect(client, token))

    async def revoke(self, form: Mapping[str, str], authorization: str, source: str) -> ipb.OAuthReply:
        try:
            client, token = await self._client_and_token(form, authorization, source)
        except OAuthError as exc:
            return error_reply(exc)
        await self._revoke(client, token)
        # RFC 7009 2.2: 200 whether or not the token was known, so nothing is learned from the answer.
        return reply(200, None)

    async def _client_and_token(
        self, form: Mapping[str, str], authorization: str, source: str
    ) -> tuple[OAuthClientRecord, str]:
        """What introspection (RFC 7662 2.1) and revocation (RFC 7009 2.1) both take: an authenticated, rate-limited
        client and the `token` it asks about."""
        check_form(form, authorization)
        presented = presented_credentials(form, authorization)
        await self._rate_limit(presented.client_id, source)
        client = await self._authenticate(presented)
        token = form.get("token", "")
        if not token:
            raise OAuthError("invalid_request", "token is required")
        return client, token
