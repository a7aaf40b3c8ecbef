"""API keys: issued once, stored as SHA-256 hashes, found by id in O(1), compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from agentvault.common.auth import BOOTSTRAP_PRINCIPAL_ID, BOOTSTRAP_PRINCIPAL_NAME, Principal, Role, bearer_token
from agentvault.common.errors import PermissionDenied, Unauthenticated
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

    def __init__(self, store: Store, bootstrap_admin_token: str | None) -> None:
        self.store = store
        # Only the hash of the bootstrap token stays in memory, and compare_digest keeps the check constant-time.
        self._bootstrap = hash_secret(bootstrap_admin_token) if bootstrap_admin_token else None

    async def principal(self, metadata: Any) -> Principal | None:
        """The caller, or None when the call carries no credential. A bad credential is an error."""
        try:
            token = bearer_token(metadata)
        except ValueError as exc:
            raise Unauthenticated(str(exc), "MALFORMED_CREDENTIAL") from None
        if token is None:
            return None
        if self._bootstrap is not None and hmac.compare_digest(hash_secret(token), self._bootstrap):
            return Principal(BOOTSTRAP_PRINCIPAL_NAME, Role.ADMIN, "bootstrap", id=BOOTSTRAP_PRINCIPAL_ID)
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
        return Principal(key.name, Role(key.role), key.id, id=key.principal_id)

    async def require(self, metadata: Any) -> Principal:
        principal = await self.principal(metadata)
        if principal is None:
            raise Unauthenticated("this call needs a credential: Authorization: Bearer <token>", "CREDENTIAL_MISSING")
        return principal

    async def require_admin(self, metadata: Any) -> Principal:
        principal = await self.require(metadata)
        if not principal.is_admin:
            raise PermissionDenied("this call needs an admin credential", "ADMIN_REQUIRED")
        return principal
