"""The per-principal limit on force_refresh (who is calling is resolved by agentvault.common.remote_auth)."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2

from agentvault.common.errors import ResourceExhausted, Unauthenticated, Unavailable
from agentvault.common.ratelimit import MinuteWindow
from agentvault.common.remote_auth import CallerResolver, RemoteCaller


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

    def __init__(self, callers: CallerResolver, redis: aioredis.Redis, per_minute: int) -> None:
        self.callers = callers
        self.redis = redis
        self.per_minute = per_minute

    async def admit(self, metadata: Any) -> RemoteCaller:
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
        window = MinuteWindow.of(f"discovery:force_refresh:{caller.principal_id}", now)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                window.count(pipe)
                count, _ = await pipe.execute()
        except Exception as exc:
            # Fails closed: without Redis the limit cannot be enforced, and a search without the flag still works.
            raise Unavailable(
                f"force_refresh is unavailable ({type(exc).__name__}); search without it", "FORCE_REFRESH_UNAVAILABLE"
            ) from None
        if int(count) > self.per_minute:
            retry_after = window.retry_after(now)
            refused = ResourceExhausted(
                f"force_refresh is limited to {self.per_minute} searches per minute; retry in {retry_after} s or "
                "search without it",
                "FORCE_REFRESH_RATE_LIMITED",
            )
            raise RetryLater(refused, retry_after)
        return caller
