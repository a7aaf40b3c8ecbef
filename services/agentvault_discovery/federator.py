"""The federated fan-out: every peer asked at once under one deadline, cached answers served while still current."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram

from agentvault.common import peers
from agentvault.common.lru import Lru
from agentvault.common.peers import PeerTarget
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault_discovery import domain
from agentvault_discovery.answers import Answer, Answers
from agentvault_discovery.cache import AnswerCache, cache_key, encode
from agentvault_discovery.directory import PeerDirectory
from agentvault_discovery.grpc_peers import GrpcPeers, parse_search
from agentvault_discovery.outcomes import (
    FAILED,
    OK,
    REASON_DOWN,
    REASON_INTERNAL,
    REASON_TIMEOUT,
    SKIPPED,
    TIMEOUT,
    PeerError,
    PeerOutcome,
    short,
)
from agentvault_discovery.rest_peers import RestPeers
from agentvault_discovery.revalidation import Generations
from agentvault_discovery.routes import Route, Routes
from agentvault_discovery.settings import DiscoverySettings
from agentvault_discovery.store import BackgroundWriter, CacheUpsert, QueryLogRow, expiry

__all__ = ["Federator", "PeerDirectory"]

log = logging.getLogger(__name__)

MAX_CONCURRENT_PEERS = 64
# (peer, agent) pairs remembered as recently written to federated_agents_cache.
UPSERTED_ENTRIES = 16384

FEDERATION_QUERY_DURATION = Histogram(
    "federation_query_duration_seconds",
    "Time spent querying federation peer",
    ["peer_name", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FEDERATION_CACHE_HITS = Counter("federation_cache_hits_total", "Number of federation cache hits", ["peer_name"])


class Federator:
    """Asks every peer concurrently under one deadline for the whole search, over connections pooled for the
    process; cached answers are served only while their peer confirms (at most every few seconds) that nothing it
    shares changed since they were built."""

    def __init__(
        self,
        settings: DiscoverySettings,
        directory: PeerDirectory,
        redis: aioredis.Redis,
        writer: BackgroundWriter,
        session: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.writer = writer
        self._tasks: set[asyncio.Task[Any]] = set()
        budget = settings.memo_budget_bytes
        self._grpc = GrpcPeers(settings)
        self._rest = RestPeers(settings, session)
        self._routes = Routes(session, settings.query_timeout_seconds)
        self._generations = Generations(self._grpc, settings.revalidate_seconds)
        self._answers = Answers(settings.max_results_per_peer, budget // 4)
        self._cache = AnswerCache(redis, settings.cache_ttl_seconds, self._answers, parse_search, budget // 8)
        # When each (peer, agent digest) was last queued for federated_agents_cache, to skip rewriting rows that
        # are still fresh: its rows are per agent, and the same agent comes back in the answers to many queries.
        self._upserted: Lru[tuple[str, bytes], float] = Lru(UPSERTED_ENTRIES)
        # The peer list the channels and routes were last pruned against.
        self._pruned_for: list[PeerTarget] | None = None

    @property
    def redis(self) -> aioredis.Redis:
        return self._cache.redis

    @property
    def memo_bytes(self) -> int:
        """What the federator holds in memory, queued cache upserts included."""
        return (
            self._cache.memo_bytes + self._answers.memo_bytes + self._upserted.bytes + self.writer.pending_upsert_bytes
        )

    async def search(self, query: domain.PeerQuery, filters: domain.Filters, force_refresh: bool) -> list[PeerOutcome]:
        # One deadline for everything the search does for peers: the cache read, generation checks, discovery
        # documents, the calls and parsing. A peer still busy at the deadline is a timeout.
        deadline = asyncio.get_running_loop().time() + self.settings.query_timeout_seconds
        try:
            async with asyncio.timeout_at(deadline):
                targets = await self.directory.get()
        except TimeoutError:
            # The registry is slow to list the peers: the list known so far, and the peers time out at once.
            targets = self.directory.known
        if targets is not self._pruned_for:
            self._prune(targets)
        query_hash = query.cache_hash()
        cached = {} if force_refresh else await self._cache.read(targets, query_hash, deadline)
        fresh: dict[str, bytes] = {}
        outcomes = await peers.gather_bounded(
            MAX_CONCURRENT_PEERS,
            *(self._one(p, query, query_hash, filters, cached.get(p.id), fresh, deadline) for p in targets),
        )
        if fresh and self.settings.cache_ttl_seconds:
            self._spawn(self._cache.put(fresh), f"cache the answers of {len(fresh)} peer(s)")
        results: list[PeerOutcome] = []
        for peer, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                # _one handles every expected failure; this is a bug, but one peer must still not fail the search.
                log.error("unexpected error querying peer %s", peer.name, exc_info=outcome)
                outcome = PeerOutcome(peer, FAILED, reason=REASON_INTERNAL, error=REASON_INTERNAL)
            results.append(outcome)
        return results

    async def _one(
        self,
        peer: PeerTarget,
        query: domain.PeerQuery,
        query_hash: str,
        filters: domain.Filters,
        cached: bytes | None,
        fresh: dict[str, bytes],
        deadline: float,
    ) -> PeerOutcome:
        if peer.is_down:
            outcome = PeerOutcome(
                peer, SKIPPED, reason=REASON_DOWN, error="peer is down according to the health monitor"
            )
            self._log(outcome, query_hash)
            return outcome
        start = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                outcome = await self._fetch(peer, query, query_hash, cached, fresh)
        except TimeoutError:
            outcome = PeerOutcome(
                peer,
                TIMEOUT,
                reason=REASON_TIMEOUT,
                error=f"no answer within {self.settings.query_timeout_seconds * 1000:.0f} ms",
            )
        except PeerError as exc:
            outcome = PeerOutcome(peer, FAILED, reason=exc.reason, error=short(exc.detail))
        outcome.latency_ms = (time.perf_counter() - start) * 1000
        if outcome.status == OK and not filters.passes_all():
            outcome.agents = [a for a in outcome.agents if filters.matches(a)]
        metric_status = "cached" if outcome.from_cache else outcome.status
        FEDERATION_QUERY_DURATION.labels(peer.name, metric_status).observe(outcome.latency_ms / 1000)
        if outcome.status != OK:
            log.warning(
                "federation query to %s: %s: %s",
                peer.name,
                outcome.status,
                outcome.error,
                extra={"peer_id": peer.id, "latency_ms": round(outcome.latency_ms, 1)},
            )
        self._log(outcome, query_hash)
        return outcome

    def _log(self, outcome: PeerOutcome, query_hash: str) -> None:
        self.writer.submit(
            QueryLogRow(
                peer_id=outcome.peer.id,
                peer_name=outcome.peer.name,
                status=outcome.status,
                response_time_ms=round(outcome.latency_ms, 3),
                result_count=len(outcome.agents),
                from_cache=outcome.from_cache,
                error=outcome.error,
                query_hash=query_hash,
                created_at=datetime.now(UTC),
            )
        )

    async def _fetch(
        self, peer: PeerTarget, query: domain.PeerQuery, query_hash: str, cached: bytes | None, fresh: dict[str, bytes]
    ) -> PeerOutcome:
        key = cache_key(peer.id, query_hash)
        route: Route | None = None
        if cached is not None:
            hit = self._cache.decode(peer, key, cached)
            if hit is not None and hit.generation:
                route = await self._routes.get(peer)
                if not await self._generations.still_current(peer, route, hit.generation):
                    hit = None
            if hit is not None:
                FEDERATION_CACHE_HITS.labels(peer.name).inc()
                return PeerOutcome(
                    peer,
                    OK,
                    from_cache=True,
                    agents=hit.agents,
                    invalid=hit.invalid,
                    version=hit.version,
                    weight=hit.weight,
                )
        route = route or await self._routes.get(peer)
        if route.protocol == fed_pb.PEER_PROTOCOL_GRPC:
            answer = self._answers.answer(peer, await self._grpc.search(peer, route, query), parse_search)
            if answer.generation:
                # As good as a check: the peer read its generation just before the agents. (A peer replica answering
                # from memory in the milliseconds before an invalidation reaches it can make this one interval
                # stale: the next check corrects it.)
                self._generations.heard(peer, answer.generation)
        else:
            answer = self._answers.answer(peer, await self._rest.search(peer, query), self._rest.parse)
        if self.settings.cache_ttl_seconds:
            fresh[key] = encode(answer)
            self._upsert(peer, answer)
        return PeerOutcome(
            peer, OK, agents=answer.agents, invalid=answer.invalid, version=answer.version, weight=answer.weight
        )

    def _upsert(self, peer: PeerTarget, answer: Answer) -> None:
        """Queues the rows of the answer's agents for federated_agents_cache, but not those of agents queued
        (unchanged) for the peer less than half a TTL ago: their rows are still there and still fresh."""
        now = time.monotonic()
        ttl = self.settings.cache_ttl_seconds
        due = []
        for agent, digest in zip(answer.agents, answer.digests, strict=True):
            queued = self._upserted.get((peer.id, digest))
            if queued is None or now - queued >= ttl / 2:
                due.append((agent, digest))
        if not due:
            return
        weight = answer.weight * len(due) // len(answer.agents)
        upsert = CacheUpsert(peer.id, [a for a, _ in due], expiry(ttl), weight)
        if self.writer.submit_upsert(upsert, self.settings.memo_budget_bytes // 8):
            for _, digest in due:
                self._upserted.put((peer.id, digest), now)

    async def clear_cache(self, peer_id: str) -> int:
        """Deletes every cached answer of the peer; returns how many."""
        self._upserted.drop_if(lambda k: k[0] == peer_id)
        return await self._cache.clear(peer_id)

    def _prune(self, targets: list[PeerTarget]) -> None:
        """Forgets what belonged to peers that were deleted, deactivated or re-pointed: routes, generations,
        memoized answers, and the channels no remaining peer uses (closed)."""
        self._pruned_for = targets
        current = {p.id: p for p in targets}
        self._grpc.prune(self._routes.prune(targets), self._spawn)
        self._generations.prune(targets)
        self._answers.forget_peers_but(current)
        self._cache.forget_peers_but(current)
        self._upserted.drop_if(lambda k: k[0] not in current)

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed: %s", what, exc_info=t.exception())

        task.add_done_callback(done)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        self._generations.cancel()
        await self._grpc.close()
