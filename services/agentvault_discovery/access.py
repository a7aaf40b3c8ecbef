"""Who is calling discovery (resolved by the registry, briefly cached) and the per-principal limit on force_refresh."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2

from agentvault.common.auth import bearer_token
from agentvault.common.errors import ResourceExhausted, Unauthenticated, Unavailable
from agentvault.common.lru import Lru
from agentvault.registry.v1 import registry_service_pb2 as pb

log = logging.getLogger(__name__)

# A revoked key keeps its role here for at most this long; the cache spares the registry a call per search.
CALLER_CACHE_SECONDS = 5.0
CALLER_ENTRIES = 10_000
CALL_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Caller:
    """The principal behind a credential; `key` is what per-principal limits count against."""

    key: str
    is_admin: bool


ANONYMOUS: Caller | None = None


class Callers:
    def __init__(self, registry: Any) -> None:
        """`registry` is a RegistryService stub on an aio channel."""
        self.registry = registry
        # Keyed by the SHA-256 of the token, never the token.
        self._cache: Lru[bytes, tuple[Caller | None, float]] = Lru(CALLER_ENTRIES)

    async def resolve(self, metadata: Any) -> Caller | None:
        """The caller, None when the call carries no credential; Unauthenticated when it carries a bad one."""
        try:
            token = bearer_token(metadata)
        except ValueError as exc:
            raise Unauthenticated(str(exc), "MALFORMED_CREDENTIAL") from None
        if token is None:
            return ANONYMOUS
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        known = self._cache.get(digest)
        if known is not None and known[1] > now:
            return known[0]
        try:
            reply = await self.registry.GetCaller(
                pb.GetCallerRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated("invalid or revoked credential", "INVALID_CREDENTIAL") from None
            log.warning("cannot resolve a caller: %s %s", exc.code().name, exc.details())
            raise Unavailable("the registry cannot check the credential now", "REGISTRY_UNAVAILABLE") from None
        caller = None
        if reply.name or reply.principal_id:
            caller = Caller(
                key=reply.principal_id or reply.name,
                is_admin=reply.role == pb.ROLE_ADMIN and not reply.is_peer,
            )
        self._cache.put(digest, (caller, now + CALLER_CACHE_SECONDS))
        return caller


class RetryLater(ResourceExhausted):
    """RESOURCE_EXHAUSTED with a google.rpc.RetryInfo saying when to try again."""

    def __init__(self, refused: ResourceExhausted, retry_after_seconds: int) -> None:
        super().__init__(
            refused.message, refused.reason, **refused.metadata, retry_after_seconds=str(retry_after_seconds)
        )
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[any_pb2.Any]:
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=self.retry_after_seconds)))
        return [*super().details(), packed]


class ForceRefreshGate:
    """force_refresh makes the mesh call every peer: only for authenticated callers, and at most `per_minute`
    times per principal and minute (admins, who may clear peers' caches anyway, are not counted)."""

    def __init__(self, callers: Callers, redis: aioredis.Redis, per_minute: int) -> None:
        self.callers = callers
        self.redis = redis
        self.per_minute = per_minute

    async def admit(self, metadata: Any) -> Caller:
        caller = await self.callers.resolve(metadata)
        if caller is None:
            raise Unauthenticated(
                "force_refresh needs a credential (Authorization: Bearer <token>); anonymous searches are served "
                "from the cache",
                "FORCE_REFRESH_NEEDS_CREDENTIAL",
            )
        if caller.is_admin:
            return caller
        now = time.time()
        window = int(now // 60)
        key = f"discovery:force_refresh:{caller.key}:{window}"
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, 120)
                count, _ = await pipe.execute()
        except Exception as exc:
            # Fails closed: without Redis the limit cannot be enforced, and a search without the flag still works.
            raise Unavailable(
                f"force_refresh is unavailable ({type(exc).__name__}); search without it", "FORCE_REFRESH_UNAVAILABLE"
            ) from None
        if int(count) > self.per_minute:
            retry_after = max(1, int((window + 1) * 60 - now) + 1)
            refused = ResourceExhausted(
                f"force_refresh is limited to {self.per_minute} searches per minute; retry in {retry_after} s or "
                "search without it",
                "FORCE_REFRESH_RATE_LIMITED",
            )
            raise RetryLater(refused, retry_after)
        return caller
