"""Admin checks in services that do not own credentials: the registry resolves the caller (GetCaller), the
bootstrap token is recognised locally, and answers are cached briefly."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import grpc

from agentvault.common.auth import bearer_token
from agentvault.common.errors import PermissionDenied, Unauthenticated, Unavailable
from agentvault.registry.v1 import registry_service_pb2 as reg_pb

# A revoked key keeps working here for at most this long; the cache spares the registry a call per request.
CACHE_SECONDS = 5.0
MAX_CACHED = 10_000
CALL_TIMEOUT = 5.0


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class AdminGate:
    def __init__(self, registry: Any, bootstrap_token: str | None, cache_seconds: float = CACHE_SECONDS) -> None:
        """`registry` is a RegistryService stub on an aio channel."""
        self.registry = registry
        self.cache_seconds = cache_seconds
        self._bootstrap = _digest(bootstrap_token) if bootstrap_token else None
        self._cache: dict[bytes, tuple[bool, float]] = {}

    async def require_admin(self, metadata: Any) -> None:
        try:
            token = bearer_token(metadata)
        except ValueError as exc:
            raise Unauthenticated(str(exc), "MALFORMED_CREDENTIAL") from None
        if token is None:
            raise Unauthenticated("this call needs a credential: Authorization: Bearer <token>", "CREDENTIAL_MISSING")
        digest = _digest(token)
        if self._bootstrap is not None and hmac.compare_digest(digest, self._bootstrap):
            return
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is None or cached[1] < now:
            cached = (await self._resolve(token), now + self.cache_seconds)
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = cached
        if not cached[0]:
            raise PermissionDenied("this call needs an admin credential", "ADMIN_REQUIRED")

    async def _resolve(self, token: str) -> bool:
        try:
            caller = await self.registry.GetCaller(
                reg_pb.GetCallerRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated("invalid or revoked credential", "INVALID_CREDENTIAL") from None
            raise Unavailable("the registry cannot check the credential now", "REGISTRY_UNAVAILABLE") from None
        return caller.role == reg_pb.ROLE_ADMIN and not caller.is_peer
