"""Recently read agents for GetAgent and recent answers to peers' federated searches, kept as ready protobuf
messages, and the federation credentials peers present.

Every write invalidates its agent here and, over Redis pub/sub, in every other replica; any write (a creation
included) drops every cached search answer, since any agent may enter or leave any result, and moves the sharing
generation peers revalidate their cached answers against. Revoking a credential drops it the same way. The cache
serves only while subscribed, and every (re)subscription empties it, so no replica keeps what an invalidation
sent while it was not listening would have dropped; the TTL bounds what a message lost in flight could leave
stale. Everything kept is bounded in bytes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from agentvault.common.lru import Lru
from agentvault.registry.v1.registry_service_pb2 import Agent as AgentPb

log = logging.getLogger(__name__)

CHANNEL = "registry:agents:invalidate"
# Invalidation messages for credentials carry this prefix; any other message is an agent id.
CREDENTIAL = "credential:"
LOOKUPS = Counter("registry_agent_cache_lookups_total", "GetAgent cache lookups, by result.", ["result"])
_HIT, _MISS = LOOKUPS.labels("hit"), LOOKUPS.labels("miss")
SEARCH_LOOKUPS = Counter(
    "registry_federated_search_cache_lookups_total", "Cached answers to peers' searches, by result.", ["result"]
)
_SEARCH_HIT, _SEARCH_MISS = SEARCH_LOOKUPS.labels("hit"), SEARCH_LOOKUPS.labels("miss")
CACHE_BYTES = Gauge("registry_cache_bytes", "Bytes charged to the agent, peer-answer and credential caches.")
# Answers to peers' searches kept (each up to FEDERATION_MAX_RESULTS_PER_PEER agents).
SEARCH_ENTRIES = 256
# Default memory for all three caches together (REGISTRY_AGENT_CACHE_BYTES): half for agents, a quarter each for
# search answers and credentials.
DEFAULT_BUDGET_BYTES = 64 * 1024 * 1024
# An agent parsed in memory costs about 1.2 times its serialized size (measured with upb); 2 leaves headroom.
MEMORY_PER_WIRE_BYTE = 2
CREDENTIAL_BYTES = 1024
# Redis key of the sharing generation, which every agent write moves. It starts at a random value so that a
# Redis that lost it cannot hand out again a generation a peer cached an answer under.
GENERATION_KEY = "federation:sharing_generation"
GENERATION_START = 1 << 62


@dataclass(frozen=True)
class Cached:
    agent: AgentPb
    sharing: str
    owner: str


class AgentCache:
    def __init__(
        self, redis: aioredis.Redis, ttl: float, max_entries: int, budget_bytes: int = DEFAULT_BUDGET_BYTES
    ) -> None:
        self.redis = redis
        self.ttl = ttl
        # Each value is kept with the monotonic time it expires at.
        self._entries: Lru[str, tuple[Cached, float]] = Lru(
            max_entries, budget=budget_bytes // 2, weigh=lambda e: MEMORY_PER_WIRE_BYTE * e[0].agent.ByteSize()
        )
        # Search answers are weighed by the caller (put_search), who knows what the answer holds.
        self._searches: Lru[str, tuple[Any, float]] = Lru(SEARCH_ENTRIES, budget=budget_bytes // 4, weigh=_weight)
        self._credentials: Lru[str, tuple[Any, float]] = Lru(
            max_entries, budget=budget_bytes // 4, weigh=lambda _: CREDENTIAL_BYTES
        )
        self._subscribed = False
        # Bumped by every invalidation: a read that started before one must not fill the cache afterwards.
        self.version = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self._subscribed

    def get(self, agent_id: str) -> Cached | None:
        return self._lookup(self._entries, agent_id, _HIT, _MISS)

    def put(self, agent_id: str, agent: AgentPb, sharing: str, owner: str, version: int) -> None:
        self._keep(self._entries, agent_id, Cached(agent, sharing, owner), version)

    def get_search(self, key: str) -> Any:
        """A peer-facing search answer, or None."""
        return self._lookup(self._searches, key, _SEARCH_HIT, _SEARCH_MISS)

    def put_search(self, key: str, answer: Any, version: int) -> None:
        """Keeps an answer read while the cache was at `version`; dropped if anything changed since. The answer
        says what it costs in memory through a `weight` attribute."""
        self._keep(self._searches, key, answer, version)

    @property
    def memory_bytes(self) -> int:
        """What the cached values are charged, all caches together."""
        return self._entries.bytes + self._searches.bytes + self._credentials.bytes

    def get_credential(self, cred_id: str) -> Any:
        return self._lookup(self._credentials, cred_id)

    def put_credential(self, cred_id: str, value: Any, version: int) -> None:
        self._keep(self._credentials, cred_id, value, version)

    def _lookup(self, entries: Lru[str, tuple[Any, float]], key: str, hit: Any = None, miss: Any = None) -> Any:
        """The unexpired value, or None; `hit`/`miss` (counter children) count the lookup when the cache is on."""
        if not self.enabled:
            return None
        entry = entries.get(key)
        if entry is not None and entry[1] < time.monotonic():
            entries.pop(key)
            entry = None
        counter = miss if entry is None else hit
        if counter is not None:
            counter.inc()
        return None if entry is None else entry[0]

    def _keep(self, entries: Lru[str, tuple[Any, float]], key: str, value: Any, version: int) -> None:
        if self.enabled and version == self.version:
            entries.put(key, (value, time.monotonic() + self.ttl))
            CACHE_BYTES.set(self.memory_bytes)

    def _drop(self, key: str | None) -> None:
        self.version += 1
        if key is None:
            self._entries.clear()
            self._searches.clear()
            self._credentials.clear()
        elif key.startswith(CREDENTIAL):
            self._credentials.pop(key.removeprefix(CREDENTIAL))
        else:
            self._entries.pop(key)
            self._searches.clear()

    async def invalidate(self, agent_id: str) -> None:
        """After any write of the agent (its creation included), here and in every replica; the sharing generation
        moves first, so a peer that asks for it after this write has returned sees the change."""
        await self._announce(agent_id, bump_generation=True)

    async def generation(self) -> int:
        """The current sharing generation (read before building an answer, so the answer is at most that new)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(GENERATION_KEY, _generation_start(), nx=True)
            pipe.get(GENERATION_KEY)
            _, value = await pipe.execute()
        return int(value)

    async def invalidate_credential(self, cred_id: str) -> None:
        """After a credential is revoked, here and in every replica."""
        await self._announce(CREDENTIAL + cred_id)

    async def _announce(self, key: str, *, bump_generation: bool = False) -> None:
        self._drop(key)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if bump_generation:
                    pipe.set(GENERATION_KEY, _generation_start(), nx=True)
                    pipe.incr(GENERATION_KEY)
                pipe.publish(CHANNEL, key)
                await pipe.execute()
        except Exception as exc:  # the other replicas' TTL still bounds their staleness
            log.warning("cannot publish cache invalidation: %s", exc)

    async def run(self) -> None:
        """Listens for invalidations until cancelled, resubscribing after any Redis failure."""
        if self.ttl <= 0:
            return
        delay = 0.5
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                async for message in pubsub.listen():
                    kind = message.get("type")
                    if kind == "message":
                        data = message.get("data")
                        self._drop(data.decode() if isinstance(data, bytes) else str(data))
                    elif kind == "subscribe":
                        # Serving starts only once Redis confirms the subscription, and restarts empty at every
                        # confirmation: redis-py reconnects and resubscribes on its own after a dropped connection,
                        # and whatever was published in between never reaches us.
                        self._drop(None)
                        self._subscribed = True
                        delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cache invalidation channel lost (%s); cache off until resubscribed", exc)
            finally:
                self._subscribed = False
                self._drop(None)
                await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def _weight(entry: tuple[Any, float]) -> int:
    return int(getattr(entry[0], "weight", 0))


def _generation_start() -> int:
    return GENERATION_START + secrets.randbelow(GENERATION_START)
