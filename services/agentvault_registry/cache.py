"""The registry's in-memory caches (agents, peers' answers, federation credentials) and the channel keeping them
coherent across replicas.

Every write invalidates its agent here and, over Redis pub/sub, in every other replica; any write (a creation
included) drops every cached peer answer, since any agent may enter or leave any result, and moves the sharing
generation peers revalidate their cached answers against. Revoking a credential drops it the same way. The caches
serve only while subscribed, and every (re)subscription empties them, so no replica keeps what an invalidation
sent while it was not listening would have dropped; each cache's TTL bounds what a message lost in flight could
leave stale. Everything kept is bounded in bytes.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from agentvault.common.lru import Lru
from agentvault.common.redis import follow_channel
from agentvault.registry.v1.registry_service_pb2 import Agent as AgentPb
from agentvault_registry.answers import SharedAnswer
from agentvault_registry.convert import MEMORY_PER_WIRE_BYTE
from agentvault_registry.federation_store import CredentialRecord

log = logging.getLogger(__name__)

V = TypeVar("V")

CHANNEL = "registry:agents:invalidate"
# Invalidation messages for credentials carry this prefix; any other message is an agent id.
CREDENTIAL = "credential:"
AGENT_LOOKUPS = Counter("registry_agent_cache_lookups_total", "GetAgent cache lookups, by result.", ["result"])
ANSWER_LOOKUPS = Counter(
    "registry_federated_search_cache_lookups_total", "Cached answers to peers' searches, by result.", ["result"]
)
CREDENTIAL_LOOKUPS = Counter(
    "registry_federation_credential_cache_lookups_total",
    "Federation credential lookups by peers' calls, by result (a miss reads the database).",
    ["result"],
)
CACHE_BYTES = Gauge("registry_cache_bytes", "Bytes charged to the agent, peer-answer and credential caches.")
# Answers to peers' searches kept (each up to FEDERATION_MAX_RESULTS_PER_PEER agents).
SEARCH_ENTRIES = 256
# Default memory for all three caches together (REGISTRY_AGENT_CACHE_BYTES): half for agents, a quarter each for
# peers' answers and credentials.
DEFAULT_BUDGET_BYTES = 64 * 1024 * 1024
CREDENTIAL_BYTES = 1024
# Redis key of the sharing generation, which every agent write moves. It starts at a random value so that a
# Redis that lost it cannot hand out again a generation a peer cached an answer under.
GENERATION_KEY = "federation:sharing_generation"
GENERATION_START = 1 << 62


@dataclass(frozen=True)
class CachedAgent:
    """GetAgent's ready answer, with what deciding who may see it needs."""

    agent: AgentPb
    sharing: str
    owner: str


@dataclass(frozen=True)
class KnownCredential:
    """A federation credential with the SHA-256 of its token (never the token itself)."""

    record: CredentialRecord
    token_sha256: bytes


class TtlCache(Generic[V]):
    """One kind of value with its own TTL and byte budget, served only while `channel` is subscribed."""

    def __init__(
        self,
        channel: AgentCache,
        ttl: float,
        max_entries: int,
        budget_bytes: int,
        weigh: Callable[[V], int],
        lookups: Counter,
    ) -> None:
        self.channel = channel
        self.ttl = ttl
        # Each value is kept with the monotonic time it expires at.
        self._entries: Lru[str, tuple[V, float]] = Lru(max_entries, budget=budget_bytes, weigh=lambda e: weigh(e[0]))
        self._hit, self._miss = lookups.labels("hit"), lookups.labels("miss")

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.channel.subscribed

    @property
    def bytes(self) -> int:
        return self._entries.bytes

    def get(self, key: str) -> V | None:
        """The unexpired value, or None; the lookup is counted (hit or miss) while the cache is on."""
        if not self.enabled:
            return None
        entry = self._entries.get(key)
        if entry is not None and entry[1] < time.monotonic():
            self._entries.pop(key)
            entry = None
        if entry is None:
            self._miss.inc()
            return None
        self._hit.inc()
        return entry[0]

    def put(self, key: str, value: V, version: int) -> None:
        """Keeps a value read while the channel was at `version`; dropped if anything was invalidated since."""
        if self.enabled and version == self.channel.version:
            self._entries.put(key, (value, time.monotonic() + self.ttl))
            CACHE_BYTES.set(self.channel.memory_bytes)

    def pop(self, key: str) -> None:
        self._entries.pop(key)

    def clear(self) -> None:
        self._entries.clear()


class AgentCache:
    """The registry's caches: `agents` (GetAgent) and `answers` (peers' searches), which agent writes invalidate,
    and the credential cache the federation gate asks for; plus the pub/sub channel that invalidates all of them
    in every replica."""

    def __init__(
        self, redis: aioredis.Redis, ttl: float, max_entries: int, budget_bytes: int = DEFAULT_BUDGET_BYTES
    ) -> None:
        self.redis = redis
        self.budget_bytes = budget_bytes
        self.max_entries = max_entries
        self.agents: TtlCache[CachedAgent] = TtlCache(
            self,
            ttl,
            max_entries,
            budget_bytes // 2,
            lambda e: MEMORY_PER_WIRE_BYTE * e.agent.ByteSize(),
            AGENT_LOOKUPS,
        )
        # Peers' answers follow the agents they hold, so they share the agents' TTL.
        self.answers: TtlCache[SharedAnswer] = TtlCache(
            self, ttl, SEARCH_ENTRIES, budget_bytes // 4, lambda a: a.weight, ANSWER_LOOKUPS
        )
        self._credentials: list[TtlCache[KnownCredential]] = []
        self.subscribed = False
        # Bumped by every invalidation: a read that started before one must not fill a cache afterwards.
        self.version = 0

    def credential_cache(self, ttl: float) -> TtlCache[KnownCredential]:
        """A cache of federation credentials with its own TTL, which revocations on any replica invalidate."""
        cache: TtlCache[KnownCredential] = TtlCache(
            self, ttl, self.max_entries, self.budget_bytes // 4, lambda _: CREDENTIAL_BYTES, CREDENTIAL_LOOKUPS
        )
        self._credentials.append(cache)
        return cache

    @property
    def memory_bytes(self) -> int:
        """What the cached values are charged, all caches together."""
        return self.agents.bytes + self.answers.bytes + sum(c.bytes for c in self._credentials)

    def _drop(self, key: str | None) -> None:
        self.version += 1
        if key is None:
            caches: list[TtlCache[Any]] = [self.agents, self.answers, *self._credentials]
            for cache in caches:
                cache.clear()
        elif key.startswith(CREDENTIAL):
            for credentials in self._credentials:
                credentials.pop(key.removeprefix(CREDENTIAL))
        else:
            self.agents.pop(key)
            self.answers.clear()

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
        await follow_channel(self.redis, CHANNEL, self, first_delay=0.5, max_delay=10.0)

    # The channel follower's steps (agentvault.common.redis.ChannelListener).

    async def on_subscribe(self) -> None:
        # Serving starts only once Redis confirms the subscription, and restarts empty at every confirmation:
        # redis-py reconnects and resubscribes on its own after a dropped connection, and whatever was published
        # in between never reaches us.
        self._drop(None)
        self.subscribed = True

    async def on_message(self, data: Any) -> None:
        self._drop(data.decode() if isinstance(data, bytes) else str(data))

    async def on_tick(self) -> None:
        pass

    async def on_lost(self, exc: Exception) -> None:
        log.warning("cache invalidation channel lost (%s); caches off until resubscribed", exc)

    async def on_closed(self) -> None:
        self.subscribed = False
        self._drop(None)


def _generation_start() -> int:
    return GENERATION_START + secrets.randbelow(GENERATION_START)
