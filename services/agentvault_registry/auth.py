"""Who calls the registry: an API key (stored hashed), the bootstrap token, or a JWT access token checked locally."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from agentvault.common.auth import (
    BOOTSTRAP_PRINCIPAL_ID,
    BOOTSTRAP_PRINCIPAL_NAME,
    Role,
    acting_principal,
    bearer_token,
)
from agentvault.common.errors import Unauthenticated
from agentvault.common.jwt_auth import JwtValidator, looks_like_jwt
from agentvault.common.principal import ADMIN_SCOPE, Principal, person, require_principal
from agentvault.common.remote_auth import check_scope
from agentvault_registry.store import Store

TOKEN_PREFIX = "avk"  # noqa: S105 - a public prefix, not a secret
PRINCIPAL_ID_PREFIX = "prn_"


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_principal_id() -> str:
    """A principal id: random, so no caller can choose or guess one by picking a name."""
    return PRINCIPAL_ID_PREFIX + secrets.token_hex(16)


def new_token() -> tuple[str, str, str]:
    """(key id, secret, token): the token is `avk_<id>_<secret>`, the id its public, indexed part."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{TOKEN_PREFIX}_{key_id}_{secret}"


class Authenticator:
    """Resolves the bearer credential of a call to a principal."""

    def __init__(self, store: Store, bootstrap_admin_token: str | None, jwt: JwtValidator | None = None) -> None:
        self.store = store
        # Only the hash of the bootstrap token stays in memory, and compare_digest keeps the check constant-time.
        self._bootstrap = hash_secret(bootstrap_admin_token) if bootstrap_admin_token else None
        # None while the authorization server is off (no signing keys): JWTs are then refused like any bad token.
        self.jwt = jwt

    async def principal(self, metadata: Any) -> Principal | None:
        """The caller, or None when the call carries no credential. A bad credential is an error."""
        try:
            token = bearer_token(metadata)
        except ValueError as exc:
            raise Unauthenticated(str(exc), "MALFORMED_CREDENTIAL") from None
        if token is None:
            return None
        if looks_like_jwt(token):
            if self.jwt is None:
                raise Unauthenticated("access tokens are not accepted: the authorization server is off", "TOKEN_OFF")
            return acting_principal(await self.jwt.validate(token))
        if self._bootstrap is not None and hmac.compare_digest(hash_secret(token), self._bootstrap):
            return person(BOOTSTRAP_PRINCIPAL_ID, BOOTSTRAP_PRINCIPAL_NAME, Role.ADMIN, "bootstrap")
        prefix, _, rest = token.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != TOKEN_PREFIX or len(key_id) != 16 or not secret:
            raise Unauthenticated("invalid credential", "INVALID_CREDENTIAL")
        found = await self.store.get_key_secret(key_id)
        # Hash even when the key is unknown, so timing does not reveal which key ids exist.
        presented = hash_secret(secret)
        stored = found[1] if found else b"\0" * 32
        if found is None or not hmac.compare_digest(presented, stored) or found[0].revoked_at is not None:
            raise Unauthenticated("invalid or revoked credential", "INVALID_CREDENTIAL")
        key = found[0]
        return person(key.principal_id, key.name, Role(key.role), key.id)

    async def require(self, metadata: Any) -> Principal:
        return require_principal(await self.principal(metadata))

    async def require_scope(self, metadata: Any, scope: str) -> Principal:
        """The caller when it holds `scope` (`admin` implies every scope); PermissionDenied naming it if not."""
        caller = await self.require(metadata)
        check_scope(caller, scope)
        return caller

    async def require_admin(self, metadata: Any) -> Principal:
        return await self.require_scope(metadata, ADMIN_SCOPE)
