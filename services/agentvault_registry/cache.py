"""Recently read agents for GetAgent and recent answers to peers' federated searches, kept as ready protobuf
messages, and the federation credentials peers present.

Every write invalidates its agent here and, over Redis pub/sub, in every other replica; any write (a creation
included) drops every cached search answer, since any agent may enter or leave any result. Revoking a
credential drops it the same way. The cache serves
only while subscribed, so no replica misses an invalidation while it still answers from memory; the TTL
bounds what a message lost in flight could leave stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter

from agentvault.common.lru import Lru
from agentvault.registry.v1.registry_service_pb2 import Agent as AgentPb

log = logging.getLogger("agentvault.registry.cache")

CHANNEL = "registry:agents:invalidate"
# Invalidation messages for credentials carry this prefix; any other message is an agent id.
CREDENTIAL = "credential:"
LOOKUPS = Counter("registry_agent_cache_lookups_total", "GetAgent cache lookups, by result.", ["result"])
_HIT, _MISS = LOOKUPS.labels("hit"), LOOKUPS.labels("miss")
SEARCH_LOOKUPS = Counter(
    "registry_federated_search_cache_lookups_total", "Cached answers to peers' searches, by result.", ["result"]
)
_SEARCH_HIT, _SEARCH_MISS = SEARCH_LOOKUPS.labels("hit"), SEARCH_LOOKUPS.labels("miss")
# Answers to peers' searches kept (each up to FEDERATION_MAX_RESULTS_PER_PEER agents).
SEARCH_ENTRIES = 256


@dataclass(frozen=True)
class Cached:
    agent: AgentPb
    sharing: str
    owner: str


class AgentCache:
    def __init__(self, redis: aioredis.Redis, ttl: float, max_entries: int) -> None:
        self.redis = redis
        self.ttl = ttl
        # Each value is kept with the monotonic time it expires at.
        self._entries: Lru[str, tuple[Cached, float]] = Lru(max_entries)
        self._searches: Lru[str, tuple[Any, float]] = Lru(SEARCH_ENTRIES)
        self._credentials: Lru[str, tuple[Any, float]] = Lru(max_entries)
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
        """Keeps an answer read while the cache was at `version`; dropped if anything changed since."""
        self._keep(self._searches, key, answer, version)

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
        """After any write of the agent (its creation included), here and in every replica."""
        await self._announce(agent_id)

    async def invalidate_credential(self, cred_id: str) -> None:
        """After a credential is revoked, here and in every replica."""
        await self._announce(CREDENTIAL + cred_id)

    async def _announce(self, key: str) -> None:
        self._drop(key)
        try:
            await self.redis.publish(CHANNEL, key)
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
                # Whatever changed while unsubscribed is unknown: start empty.
                self._drop(None)
                self._subscribed = True
                delay = 0.5
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        data = message.get("data")
                        self._drop(data.decode() if isinstance(data, bytes) else str(data))
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
