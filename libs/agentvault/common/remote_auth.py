"""Who is calling, in services that do not own credentials: the registry resolves the caller (GetCaller), the
bootstrap token is recognised locally, and answers are cached briefly, keyed by the token's SHA-256."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from agentvault.common.auth import BOOTSTRAP_PRINCIPAL_ID, BOOTSTRAP_PRINCIPAL_NAME, bearer_token
from agentvault.common.errors import PermissionDenied, Unauthenticated, Unavailable
from agentvault.common.lru import Lru
from agentvault.registry.v1 import registry_service_pb2 as reg_pb

log = logging.getLogger(__name__)

# A revoked key keeps working here for at most this long; the cache spares the registry a call per request.
CACHE_SECONDS = 5.0
MAX_CACHED = 10_000
CALL_TIMEOUT = 5.0


@dataclass(frozen=True)
class RemoteCaller:
    """The principal behind a credential, as the registry sees it."""

    principal_id: str
    name: str
    is_admin: bool
    is_peer: bool


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class CallerResolver:
    def __init__(self, registry: Any, bootstrap_token: str | None, cache_seconds: float = CACHE_SECONDS) -> None:
        """`registry` is a RegistryService stub on an aio channel."""
        self.registry = registry
        self.cache_seconds = cache_seconds
        self._bootstrap = _digest(bootstrap_token) if bootstrap_token else None
        # Keyed by the SHA-256 of the token, never the token; fixed-size entries, so the count bounds the bytes.
        self._cache: Lru[bytes, tuple[RemoteCaller, float]] = Lru(MAX_CACHED)

    async def resolve(self, metadata: Any) -> RemoteCaller | None:
        """The caller, None when the call carries no credential; Unauthenticated when it carries a bad one."""
        try:
            token = bearer_token(metadata)
        except ValueError as exc:
            raise Unauthenticated(str(exc), "MALFORMED_CREDENTIAL") from None
        if token is None:
            return None
        digest = _digest(token)
        if self._bootstrap is not None and hmac.compare_digest(digest, self._bootstrap):
            return RemoteCaller(BOOTSTRAP_PRINCIPAL_ID, BOOTSTRAP_PRINCIPAL_NAME, is_admin=True, is_peer=False)
        now = time.monotonic()
        known = self._cache.get(digest)
        if known is not None and known[1] > now:
            return known[0]
        caller = await self._ask_registry(token)
        if self.cache_seconds > 0:
            self._cache.put(digest, (caller, now + self.cache_seconds))
        return caller

    async def require_admin(self, metadata: Any) -> RemoteCaller:
        caller = await self.resolve(metadata)
        if caller is None:
            raise Unauthenticated("this call needs a credential: Authorization: Bearer <token>", "CREDENTIAL_MISSING")
        if not caller.is_admin:
            raise PermissionDenied("this call needs an admin credential", "ADMIN_REQUIRED")
        return caller

    async def _ask_registry(self, token: str) -> RemoteCaller:
        try:
            reply = await self.registry.GetCaller(
                reg_pb.GetCallerRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated("invalid or revoked credential", "INVALID_CREDENTIAL") from None
            log.warning("cannot resolve a caller: %s %s", exc.code().name, exc.details())
            raise Unavailable("the registry cannot check the credential now", "REGISTRY_UNAVAILABLE") from None
        return RemoteCaller(
            principal_id=reply.principal_id,
            name=reply.name,
            is_admin=reply.role == reg_pb.ROLE_ADMIN and not reply.is_peer,
            is_peer=reply.is_peer,
        )


# The name services use where all they need is the admin check.
AdminGate = CallerResolver
