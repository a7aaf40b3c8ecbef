"""Recently read agents for GetAgent, kept as ready protobuf messages.

Every write invalidates its entry here and, over Redis pub/sub, in every other replica. The cache serves
only while subscribed, so no replica misses an invalidation while it still answers from memory; the TTL
bounds what a message lost in flight could leave stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Counter

from agentvault.registry.v1.registry_service_pb2 import Agent as AgentPb

log = logging.getLogger("agentvault.registry.cache")

CHANNEL = "registry:agents:invalidate"
LOOKUPS = Counter("registry_agent_cache_lookups_total", "GetAgent cache lookups, by result.", ["result"])
_HIT, _MISS = LOOKUPS.labels("hit"), LOOKUPS.labels("miss")


@dataclass(frozen=True)
class Cached:
    agent: AgentPb
    sharing: str
    owner: str
    expires: float


class AgentCache:
    def __init__(self, redis: aioredis.Redis, ttl: float, max_entries: int) -> None:
        self.redis = redis
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Cached] = OrderedDict()
        self._subscribed = False
        # Bumped by every invalidation: a read that started before one must not fill the cache afterwards.
        self.version = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self._subscribed

    def get(self, agent_id: str) -> Cached | None:
        if not self.enabled:
            return None
        entry = self._entries.get(agent_id)
        if entry is not None and entry.expires < time.monotonic():
            self._entries.pop(agent_id, None)
            entry = None
        (_MISS if entry is None else _HIT).inc()
        return entry

    def put(self, agent_id: str, agent: AgentPb, sharing: str, owner: str, version: int) -> None:
        if not self.enabled or version != self.version:
            return
        self._entries[agent_id] = Cached(agent, sharing, owner, time.monotonic() + self.ttl)
        self._entries.move_to_end(agent_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _drop(self, agent_id: str | None) -> None:
        self.version += 1
        if agent_id is None:
            self._entries.clear()
        else:
            self._entries.pop(agent_id, None)

    async def invalidate(self, agent_id: str) -> None:
        self._drop(agent_id)
        try:
            await self.redis.publish(CHANNEL, agent_id)
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
