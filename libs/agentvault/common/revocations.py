"""Revoked access tokens by jti: a Redis sorted set plus a channel, mirrored in every process within a second."""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from agentvault.common.errors import Unavailable
from agentvault.common.redis import follow_channel

log = logging.getLogger(__name__)

REVOKED_KEY = "oauth:revoked"
CHANNEL = "oauth:revocations"
MAX_JTI_LENGTH = 256
MAX_MESSAGE_BYTES = 1024
# What one jti costs here beyond its characters: the dict slot, the heap entry, the float and the str headers.
ENTRY_OVERHEAD = 160
DEFAULT_BUDGET_BYTES = 16 * 1024 * 1024
LOAD_CHUNK = 1000


async def revoke(
    redis: aioredis.Redis, jti: str, exp: float, *, key: str = REVOKED_KEY, channel: str = CHANNEL
) -> None:
    """Records the revocation (until the token would have expired anyway) and tells every process.

    The sorted set is written before the message is published, so a watcher that loads the set after subscribing
    misses nothing: what it did not read there reaches it on the channel."""
    if not jti or len(jti) > MAX_JTI_LENGTH:
        raise ValueError(f"jti must be 1 to {MAX_JTI_LENGTH} characters")
    now = time.time()
    if exp <= now:
        return  # an expired token is refused anyway
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zadd(key, {jti: exp})
        # The set keeps only what can still be presented.
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.publish(channel, json.dumps({"jti": jti, "exp": exp}, separators=(",", ":")))
        await pipe.execute()


class RevocationWatcher:
    """The revoked jtis in this process, fed by the channel and reloaded from the sorted set at every (re)subscribe.

    Memory is bounded in bytes: expired entries go first; if unexpired ones must go too, the local set is marked
    incomplete and lookups of jtis it does not hold ask Redis until every dropped entry has expired. Before the
    first subscription, and while resubscribing, lookups ask Redis too, so a revocation is never missed.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key: str = REVOKED_KEY,
        channel: str = CHANNEL,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.key = key
        self.channel = channel
        self.budget_bytes = budget_bytes
        self.clock = clock
        # How many times the set was reloaded from Redis (once per subscription confirmed).
        self.loads = 0
        self._revoked: dict[str, float] = {}
        self._by_expiry: list[tuple[float, str]] = []
        self.bytes = 0
        # Until this time the local set may lack unexpired revocations dropped for memory.
        self._incomplete_until = 0.0
        self.synced = asyncio.Event()

    def __len__(self) -> int:
        return len(self._revoked)

    def holds(self, jti: str) -> bool:
        """Whether the local set has this jti (no Redis round trip)."""
        return jti in self._revoked

    async def is_revoked(self, jti: str) -> bool:
        """Whether the token with this jti was revoked; Unavailable when neither the local set nor Redis can say."""
        if jti in self._revoked:
            return True
        if self.synced.is_set() and self.clock() >= self._incomplete_until:
            return False
        try:
            return await self.redis.zscore(self.key, jti) is not None
        except Exception as exc:
            log.warning("cannot check token revocation: %s", exc)
            raise Unavailable(
                "token revocations cannot be checked now; retry later", "REVOCATIONS_UNAVAILABLE"
            ) from None

    def _charge(self, jti: str) -> int:
        return ENTRY_OVERHEAD + len(jti)

    def _add(self, jti: str, exp: float) -> None:
        now = self.clock()
        if exp <= now or not jti or len(jti) > MAX_JTI_LENGTH:
            return
        known = self._revoked.get(jti)
        if known is not None:
            if known >= exp:
                return
            self.bytes -= self._charge(jti)
        self._revoked[jti] = exp
        heapq.heappush(self._by_expiry, (exp, jti))
        self.bytes += self._charge(jti)
        self._prune(now)

    def _prune(self, now: float) -> None:
        """Drops expired entries, then (only over budget) the soonest to expire, remembering the set is partial."""
        heap = self._by_expiry
        while heap and (heap[0][0] <= now or self.bytes > self.budget_bytes):
            exp, jti = heapq.heappop(heap)
            if self._revoked.get(jti) != exp:
                continue  # a stale heap entry: the jti was re-added with a later expiry
            del self._revoked[jti]
            self.bytes -= self._charge(jti)
            if exp > now:
                self._incomplete_until = max(self._incomplete_until, exp)
        # Stale heap entries cost memory too; rebuild when they outnumber the live ones.
        if len(heap) > 2 * len(self._revoked) + 64:
            self._by_expiry = [(exp, jti) for jti, exp in self._revoked.items()]
            heapq.heapify(self._by_expiry)

    def _clear(self) -> None:
        self._revoked.clear()
        self._by_expiry.clear()
        self.bytes = 0
        self._incomplete_until = 0.0

    async def _load(self) -> None:
        """Replaces the local set with what the sorted set holds now, in chunks so no reply is unbounded."""
        self._clear()
        self.loads += 1
        offset = 0
        now = self.clock()
        while True:
            rows: list[Any] = await self.redis.zrangebyscore(
                self.key, now, "+inf", start=offset, num=LOAD_CHUNK, withscores=True
            )
            for member, score in rows:
                self._add(member.decode() if isinstance(member, bytes) else str(member), float(score))
            if len(rows) < LOAD_CHUNK:
                return
            offset += len(rows)

    def _on_message(self, data: Any) -> None:
        if isinstance(data, bytes):
            if len(data) > MAX_MESSAGE_BYTES:
                log.warning("ignoring an oversize revocation message")
                return
            data = data.decode(errors="replace")
        try:
            body = json.loads(data)
            jti, exp = body["jti"], float(body["exp"])
            if not isinstance(jti, str):
                raise TypeError("jti must be a string")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring a malformed revocation message: %s", exc)
            return
        self._add(jti, exp)

    async def run(self) -> None:
        """Listens until cancelled, resubscribing after any Redis failure."""
        await follow_channel(self.redis, self.channel, self, first_delay=0.2, max_delay=5.0)

    # The channel follower's steps (agentvault.common.redis.ChannelListener).

    async def on_subscribe(self) -> None:
        # redis-py resubscribes on its own after a dropped connection; whatever was published in between never
        # reaches us, so every confirmation reloads the set. Messages that arrive while it loads wait in the
        # connection and are applied after it: nothing is lost.
        self.synced.clear()
        await self._load()
        self.synced.set()

    async def on_message(self, data: Any) -> None:
        self._on_message(data)

    async def on_tick(self) -> None:
        self._prune(self.clock())

    async def on_lost(self, exc: Exception) -> None:
        log.warning("revocation channel lost (%s); asking Redis directly until resubscribed", exc)

    async def on_closed(self) -> None:
        self.synced.clear()
