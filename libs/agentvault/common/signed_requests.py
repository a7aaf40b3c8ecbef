"""The inbound check of a request signed with agentvault.common.signing: signature, freshness, replay and rate."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis

from agentvault.common import signing
from agentvault.common.errors import RateLimited, Unauthenticated, Unavailable
from agentvault.common.interceptors import metadata_value
from agentvault.common.ratelimit import MinuteWindow

# Metadata the edge adds when it transcodes an HTTP request (never accepted from a client): the peer then signed
# the HTTP request line and body, not the gRPC call.
HTTP_METHOD_KEY = "x-http-method"
HTTP_PATH_KEY = "x-http-path"
HTTP_BODY_KEY = "x-http-body-bin"


class SignedRequests:
    """Admits a caller's signed request once its secret is known: a valid, fresh HMAC signature (required unless
    `require_signature` is off), seen for the first time, within the caller's requests per minute.

    Redis keys are `<scope>:replay:<signature>` and `<scope>:rate:<caller id>:<minute>`. The error reasons are
    literals, the same for every scope (they are between meshes, and the README's table is read from the code).
    Fails closed without Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        scope: str,
        max_age: int,
        per_minute: int,
        require_signature: bool = True,
    ) -> None:
        self.redis = redis
        self.scope = scope
        self.max_age = max_age
        self.per_minute = per_minute
        self.require_signature = require_signature

    async def admit(
        self,
        metadata: Any,
        grpc_method: str,
        request: Any,
        secret: str,
        caller_id: str,
        *,
        url_fields: tuple[str, ...] = (),
        now: float | None = None,
    ) -> None:
        """Raises Unauthenticated (bad, stale, missing or replayed signature), RateLimited (over the rate, with
        when to retry) or Unavailable (no Redis). `url_fields` are the request fields an HTTP-form request
        carries in its signed URL's query: they must match the request the edge built from it."""
        current = time.time() if now is None else now
        signature = metadata_value(metadata, signing.SIGNATURE_HEADER)
        if signature or self.require_signature:
            if not signature:
                raise Unauthenticated(f"this mesh requires signed {self.scope} requests", "SIGNATURE_MISSING")
            self.check_signature(metadata, signature, secret, grpc_method, request, url_fields, current)
        await self._admit_once(caller_id, signature, current)

    def check_signature(
        self,
        metadata: Any,
        signature: str,
        secret: str,
        grpc_method: str,
        request: Any,
        url_fields: tuple[str, ...],
        now: float,
    ) -> None:
        nonce = metadata_value(metadata, signing.NONCE_HEADER)
        http_method = metadata_value(metadata, HTTP_METHOD_KEY)
        if http_method:
            path = metadata_value(metadata, HTTP_PATH_KEY)
            _require_query_matches(path, request, url_fields)
            method, body = http_method, _body_text(metadata)
        else:
            method, path = signing.GRPC_METHOD, grpc_method
            body = signing.grpc_body(request.SerializeToString(deterministic=True))
        try:
            signing.verify(signature, method, path, body, secret, max_age=self.max_age, nonce=nonce, now=now)
        except signing.SignatureError as exc:
            raise Unauthenticated(f"{self.scope} signature rejected: {exc}", "SIGNATURE_INVALID") from None

    async def _admit_once(self, caller_id: str, signature: str, now: float) -> None:
        """One Redis round trip: the signature (if any) is recorded so it is accepted only once, and the call is
        counted against the caller's rate."""
        rate = MinuteWindow.of(f"{self.scope}:rate:{caller_id}", now)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if signature:
                    # The key lives as long as the signature could still be fresh.
                    ttl = self.max_age + signing.MAX_FUTURE_SKEW_SECONDS
                    pipe.set(f"{self.scope}:replay:{signature}", b"1", nx=True, ex=ttl)
                rate.count(pipe)
                results = await pipe.execute()
        except Exception as exc:
            raise Unavailable(
                f"replay protection and rate limiter unavailable: {type(exc).__name__}",
                "FEDERATION_REDIS_DOWN",
            ) from None
        if signature and not results[0]:
            raise Unauthenticated(f"{self.scope} request replayed", "SIGNATURE_REPLAYED")
        if int(results[-2]) > self.per_minute:
            retry_after = rate.retry_after(now)
            raise RateLimited(
                f"{self.scope} rate limit of {self.per_minute} requests per minute exceeded; retry in {retry_after} s",
                "FEDERATION_RATE_LIMITED",
                retry_after,
            )


def _body_text(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == HTTP_BODY_KEY and isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
    return ""


def _require_query_matches(path: str, request: Any, url_fields: tuple[str, ...]) -> None:
    """In the HTTP form the signature covers the URL, so the request the edge built from it must match it."""
    query = parse_qs(urlsplit(path).query, keep_blank_values=True)
    for field in url_fields:
        if hasattr(request, field) and getattr(request, field) != (query.get(field) or [""])[0]:
            raise Unauthenticated("signed URL does not match the request", "SIGNATURE_INVALID")
