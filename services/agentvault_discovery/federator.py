"""The federated fan-out: the peer list, pooled peer clients, the Redis cache revalidated against each peer's
sharing generation, and one deadline for the whole search."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import grpc
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge, Histogram
from yarl import URL

from agentvault.common import peers, signing
from agentvault.common.lru import Lru
from agentvault.common.peers import PeerTarget
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_discovery import domain
from agentvault_discovery.settings import DiscoverySettings
from agentvault_discovery.store import BackgroundWriter, CacheUpsert, QueryLogRow, expiry

log = logging.getLogger(__name__)

SEARCH_METHOD = "/agentvault.federation.v1.FederationService/SearchAgents"
GENERATION_METHOD = "/agentvault.federation.v1.FederationService/GetSharingGeneration"
REST_AGENTS_PATH = "/api/v1/agents"
MAX_ERROR_TEXT = 300
MAX_CONCURRENT_PEERS = 64
# Cached answers kept in memory with the bytes they were read from, keyed by their Redis key.
DECODED_ENTRIES = 1024
# Validated peer answers kept in memory, keyed by peer and a digest of the bytes the peer sent.
ANSWER_ENTRIES = 256
# (peer, answer) pairs remembered as recently written to federated_agents_cache.
UPSERTED_ENTRIES = 4096
# A validated agent in memory costs about 1.2 times its serialized size (upb, measured); 2 leaves headroom, plus
# a fixed part per agent for the Python objects around it.
MEMORY_PER_WIRE_BYTE = 2
MEMORY_PER_AGENT = 512
# Redis values: this byte, the generation the answer was built at (8 bytes, big-endian), the answer. A first byte
# of 1 is never the start of a protobuf message (field number 0), so values written before are told apart.
CACHE_FORMAT = b"\x01"
_GENERATION = struct.Struct(">Q")
# How long a protocol learned from a peer's discovery document is trusted before it is read again.
DISCOVERY_TTL_SECONDS = 600.0

FEDERATION_QUERY_DURATION = Histogram(
    "federation_query_duration_seconds",
    "Time spent querying federation peer",
    ["peer_name", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FEDERATION_CACHE_HITS = Counter("federation_cache_hits_total", "Number of federation cache hits", ["peer_name"])
FEDERATION_INVALID_AGENTS = Counter(
    "federation_invalid_agents_total", "Agents from peers dropped because they failed validation.", ["peer_name"]
)
FEDERATION_REVALIDATIONS = Counter(
    "federation_cache_revalidations_total",
    "Cached answers checked against a peer's sharing generation, by result.",
    ["result"],
)
PEER_CHANNELS = Gauge("federation_peer_channels", "Open gRPC channels to federation peers.")

OK, FAILED, TIMEOUT, SKIPPED = "ok", "failed", "timeout", "skipped"
# What callers who are not admins see of why a peer failed: never an address or a peer's own words.
REASON_TIMEOUT = "timeout"
REASON_UNAVAILABLE = "unavailable"
REASON_INVALID = "invalid answer"
REASON_REJECTED = "rejected"
REASON_DOWN = "down"
REASON_INTERNAL = "internal error"


class PeerError(Exception):
    """Why one peer's answer was not used: a short generic `reason` anyone may see, and a `detail` (addresses,
    the peer's own error text) for admins and logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class PeerOutcome:
    peer: PeerTarget
    status: str
    latency_ms: float = 0.0
    from_cache: bool = False
    agents: list[pb.Agent] = field(default_factory=list)
    # The generic reason (see REASON_*) and the full story, empty when the peer answered.
    reason: str = ""
    error: str = ""
    invalid: int = 0
    # Identifies the exact validated answer (a digest of its serialized form), so work derived from it (scores)
    # can be reused; None when the peer did not answer.
    version: bytes | None = None
    # What the validated answer costs in memory, for memos built from it.
    weight: int = 0


@dataclass(frozen=True)
class _Answer:
    """A peer's answer after validation: what is used, what was dropped, and its serialized form for the cache."""

    agents: list[pb.Agent]
    invalid: int
    clean: bytes
    version: bytes
    # The peer's sharing generation the answer was built at; 0 when the peer does not say (REST peers).
    generation: int = 0

    @property
    def weight(self) -> int:
        return len(self.clean) * (1 + MEMORY_PER_WIRE_BYTE) + MEMORY_PER_AGENT * len(self.agents)


@dataclass(frozen=True)
class _PeerChannel:
    """A pooled channel to a peer, its SearchAgents call, which answers raw bytes (digested before parsing), and
    its GetSharingGeneration call."""

    channel: grpc.aio.Channel
    search: grpc.aio.UnaryUnaryMultiCallable
    generation: grpc.aio.UnaryUnaryMultiCallable


@dataclass(frozen=True)
class _Route:
    protocol: int
    grpc_endpoint: str
    mtls: bool
    learned_at: float


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"


class PeerDirectory:
    """The active peers, from the registry's ResolvePeers, kept for a second or two so a search costs no extra hop."""

    def __init__(self, stub: fed_grpc.PeerServiceAsyncStub, settings: DiscoverySettings) -> None:
        self._stub = stub
        self._settings = settings
        self._peers: list[PeerTarget] = []
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self) -> list[PeerTarget]:
        now = time.monotonic()
        if now - self._loaded_at < self._settings.peer_list_ttl_seconds:
            return self._peers
        # One reload at a time: concurrent searches wait for it instead of each calling the registry.
        async with self._lock:
            if time.monotonic() - self._loaded_at < self._settings.peer_list_ttl_seconds:
                return self._peers
            assert self._settings.box is not None
            assert self._settings.admin_token
            try:
                self._peers = await peers.load_peers(self._stub, self._settings.admin_token, self._settings.box)
            except grpc.aio.AioRpcError as exc:
                # A stale list beats no federation while the registry blips; it is retried on the next search.
                log.error("cannot load federation peers from the registry: %s %s", exc.code().name, exc.details())
                self._loaded_at = time.monotonic() - self._settings.peer_list_ttl_seconds + 0.5
                return self._peers
            self._loaded_at = time.monotonic()
            return self._peers

    def invalidate(self) -> None:
        self._loaded_at = float("-inf")

    @property
    def known(self) -> list[PeerTarget]:
        """The list as last loaded, without asking the registry."""
        return self._peers


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
        self.redis = redis
        self.writer = writer
        self.session = session
        self._channels: dict[tuple[str, bool], _PeerChannel] = {}
        self._routes: dict[tuple[str, str], _Route] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client_credentials: grpc.ChannelCredentials | None = None
        budget = settings.memo_budget_bytes
        self._decoded: Lru[str, tuple[bytes, _Answer]] = Lru(
            DECODED_ENTRIES, budget=budget // 8, weigh=lambda v: len(v[0]) + v[1].weight
        )
        # Peers mostly send the same bytes for the same query: those are parsed and validated once.
        self._answers: Lru[tuple[str, bytes], _Answer] = Lru(
            ANSWER_ENTRIES, budget=budget // 4, weigh=lambda a: a.weight
        )
        # When each (peer, answer version) was last queued for federated_agents_cache, to skip rewriting rows
        # that are still fresh.
        self._upserted: Lru[tuple[str, bytes], float] = Lru(UPSERTED_ENTRIES)
        # Each peer's sharing generation as last heard from it, with the monotonic time it was heard; keyed by the
        # peer's addresses too, so a re-pointed peer is asked again.
        self._confirmed: dict[tuple[str, str, str], tuple[int, float]] = {}
        # One generation check per peer at a time, shared by the searches that need it.
        self._checks: dict[str, asyncio.Task[int]] = {}
        # The peer list the channels and routes were last pruned against.
        self._pruned_for: list[PeerTarget] | None = None

    @property
    def memo_bytes(self) -> int:
        """What the federator holds in memory, queued cache upserts included."""
        return self._decoded.bytes + self._answers.bytes + self._upserted.bytes + self.writer.pending_upsert_bytes

    # --------------------------------------------------------------------------------------- fan-out

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
        cached = {} if force_refresh else await self._cache_read(targets, query_hash, deadline)
        fresh: dict[str, bytes] = {}
        outcomes = await peers.gather_bounded(
            MAX_CONCURRENT_PEERS,
            *(self._one(p, query, query_hash, filters, cached.get(p.id), fresh, deadline) for p in targets),
        )
        if fresh and self.settings.cache_ttl_seconds:
            self._spawn(self._cache_put(fresh), f"cache the answers of {len(fresh)} peer(s)")
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
            outcome = PeerOutcome(peer, FAILED, reason=exc.reason, error=_short(exc.detail))
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
                created_at=_now(),
            )
        )

    async def _fetch(
        self, peer: PeerTarget, query: domain.PeerQuery, query_hash: str, cached: bytes | None, fresh: dict[str, bytes]
    ) -> PeerOutcome:
        key = cache_key(peer.id, query_hash)
        route: _Route | None = None
        if cached is not None:
            hit = self._decode_cached(peer, key, cached)
            if hit is not None and hit.generation:
                route = await self._route(peer)
                if not await self._still_current(peer, route, hit.generation):
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
        route = route or await self._route(peer)
        if route.protocol == fed_pb.PEER_PROTOCOL_GRPC:
            answer = self._answer(peer, await self._grpc_search(peer, route, query), _parse_grpc)
            if answer.generation:
                # As good as a check: the peer read its generation just before the agents. (A peer replica answering
                # from memory in the milliseconds before an invalidation reaches it can make this one interval
                # stale: the next check corrects it.)
                self._heard(peer, answer.generation)
        else:
            answer = self._answer(peer, await self._rest_search(peer, query), self._parse_rest)
        if self.settings.cache_ttl_seconds:
            fresh[key] = CACHE_FORMAT + _GENERATION.pack(answer.generation) + answer.clean
            self._upsert(peer, answer)
        return PeerOutcome(
            peer, OK, agents=answer.agents, invalid=answer.invalid, version=answer.version, weight=answer.weight
        )

    # --------------------------------------------------------------------------------------- revalidation

    def _heard(self, peer: PeerTarget, generation: int) -> None:
        self._confirmed[_address(peer)] = (generation, time.monotonic())

    async def _still_current(self, peer: PeerTarget, route: _Route, generation: int) -> bool:
        """Whether an answer built at `generation` may still be served: the peer's generation, heard at most
        FEDERATION_REVALIDATE_INTERVAL ago (asked again otherwise, once for every search waiting), is the same."""
        if route.protocol != fed_pb.PEER_PROTOCOL_GRPC:
            return True
        known = self._confirmed.get(_address(peer))
        if known is None or time.monotonic() - known[1] >= self.settings.revalidate_seconds:
            check = self._checks.get(peer.id)
            if check is None:
                check = asyncio.create_task(self._ask_generation(peer, route))
                self._checks[peer.id] = check
                check.add_done_callback(functools.partial(self._check_done, peer.id))
            # Shielded: a search whose deadline ends does not cancel the check others wait for.
            current = await asyncio.shield(check)
        else:
            current = known[0]
        FEDERATION_REVALIDATIONS.labels("current" if current == generation else "changed").inc()
        return current == generation

    def _check_done(self, peer_id: str, task: asyncio.Task[int]) -> None:
        self._checks.pop(peer_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here: the searches that waited for it may all have given up

    async def _ask_generation(self, peer: PeerTarget, route: _Route) -> int:
        request = fed_pb.GetSharingGenerationRequest()
        call = self._channel(route.grpc_endpoint, route.mtls).generation
        try:
            raw = await call(
                request,
                metadata=self._signed_metadata(peer, GENERATION_METHOD, request),
                timeout=self.settings.query_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # A mesh that predates generations: its cached answers live out FEDERATION_CACHE_TTL as before.
                self._heard(peer, 0)
                return 0
            raise _rpc_error(exc) from None
        try:
            generation = fed_pb.SharingGeneration.FromString(raw).generation
        except DecodeError:
            raise PeerError(REASON_INVALID, "peer answered GetSharingGeneration with an unreadable message") from None
        self._heard(peer, generation)
        return generation

    def _answer(self, peer: PeerTarget, raw: bytes, parse: Callable[[bytes], tuple[list[pb.Agent], int]]) -> _Answer:
        """The peer's answer parsed and validated; the same bytes from the same peer are reused, not re-validated
        (validation is a pure function of them). Raises PeerError when the bytes cannot be parsed."""
        memo_key = (peer.id, hashlib.blake2b(raw, digest_size=16).digest())
        answer = self._answers.get(memo_key)
        if answer is None:
            parsed, generation = parse(raw)
            agents, invalid = self._validate(peer, parsed)
            clean = fed_pb.SearchAgentsResponse(agents=agents).SerializeToString()
            answer = self._answers.put(
                memo_key,
                _Answer(agents, invalid, clean, hashlib.blake2b(clean, digest_size=16).digest(), generation),
            )
        elif answer.invalid:
            FEDERATION_INVALID_AGENTS.labels(peer.name).inc(answer.invalid)
        return answer

    def _upsert(self, peer: PeerTarget, answer: _Answer) -> None:
        """Queues the answer's rows for federated_agents_cache, unless this very answer was queued for the peer
        less than half a TTL ago: its rows are then still there and still fresh."""
        now = time.monotonic()
        ttl = self.settings.cache_ttl_seconds
        marker = (peer.id, answer.version)
        queued = self._upserted.get(marker)
        if queued is not None and now - queued < ttl / 2:
            return
        upsert = CacheUpsert(peer.id, answer.agents, expiry(ttl), answer.weight)
        if self.writer.submit_upsert(upsert, self.settings.memo_budget_bytes // 8):
            self._upserted.put(marker, now)

    def _validate(self, peer: PeerTarget, raw: list[pb.Agent]) -> tuple[list[pb.Agent], int]:
        limit = self.settings.max_results_per_peer
        agents: list[pb.Agent] = []
        seen: set[str] = set()
        invalid = 0
        for agent in raw[: limit * 2]:
            clean = domain.sanitize(agent)
            if clean is None:
                invalid += 1
                continue
            if clean.did in seen:
                continue
            seen.add(clean.did)
            agents.append(clean)
            if len(agents) >= limit:
                break
        if invalid:
            FEDERATION_INVALID_AGENTS.labels(peer.name).inc(invalid)
            log.warning("peer %s sent %d invalid agent(s); ignored", peer.name, invalid)
        if len(raw) > limit:
            log.warning("peer %s sent %d agents, more than the %d asked for; extra ignored", peer.name, len(raw), limit)
        return agents, invalid

    # --------------------------------------------------------------------------------------- cache

    async def _cache_read(self, targets: list[PeerTarget], query_hash: str, deadline: float) -> dict[str, bytes]:
        """Every asked peer's cached answer in one round trip, by peer id; a Redis failure costs the cache, not
        the search, and a slow Redis only what is left of the search's deadline."""
        if not self.settings.cache_ttl_seconds:
            return {}
        asked = [p for p in targets if not p.is_down]
        if not asked:
            return {}
        try:
            async with asyncio.timeout_at(deadline):
                values = await self.redis.mget([cache_key(p.id, query_hash) for p in asked])
        except Exception as exc:
            log.warning("federation cache read failed: %s", exc)
            return {}
        return {
            p.id: (v if isinstance(v, bytes) else v.encode())
            for p, v in zip(asked, values, strict=True)
            if v is not None
        }

    def _decode_cached(self, peer: PeerTarget, key: str, raw: bytes) -> _Answer | None:
        """The cached answer, None when unreadable. Bytes read before under the same key cost a comparison, not
        even a digest; others go through _answer like a peer's answer."""
        known = self._decoded.get(key)
        if known is not None and known[0] == raw:
            return known[1]
        if not raw.startswith(CACHE_FORMAT) or len(raw) < len(CACHE_FORMAT) + _GENERATION.size:
            return None  # written by an older version, without the generation it was built at: refetched
        (generation,) = _GENERATION.unpack_from(raw, len(CACHE_FORMAT))
        start = len(CACHE_FORMAT) + _GENERATION.size
        try:
            # Memoized by the whole value: the same agents cached at another generation are another answer.
            answer = self._answer(peer, raw, lambda b: (_parse_grpc(b[start:])[0], generation))
        except PeerError:
            log.warning("unreadable federation cache entry %s; ignored", key)
            return None
        return self._decoded.put(key, (raw, answer))[1]

    async def _cache_put(self, answers: dict[str, bytes]) -> None:
        """Every fresh answer of one search written in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, value in answers.items():
                pipe.set(key, value, ex=self.settings.cache_ttl_seconds)
            await pipe.execute()

    async def clear_cache(self, peer_id: str) -> int:
        """Deletes every cached answer of the peer; returns how many."""
        self._upserted.drop_if(lambda k: k[0] == peer_id)
        cleared = 0
        batch: list[bytes | str] = []
        async for key in self.redis.scan_iter(match=f"federation:{peer_id}:*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                cleared += await self.redis.delete(*batch)
                batch = []
        if batch:
            cleared += await self.redis.delete(*batch)
        return cleared

    # --------------------------------------------------------------------------------------- routing

    async def _route(self, peer: PeerTarget) -> _Route:
        if peer.protocol == fed_pb.PEER_PROTOCOL_REST:
            return _Route(fed_pb.PEER_PROTOCOL_REST, "", False, 0.0)
        if peer.protocol == fed_pb.PEER_PROTOCOL_GRPC and peer.grpc_endpoint:
            return _Route(fed_pb.PEER_PROTOCOL_GRPC, peer.grpc_endpoint, peer.require_mtls, 0.0)
        key = (peer.id, peer.registry_url)
        cached = self._routes.get(key)
        if cached is not None and time.monotonic() - cached.learned_at < DISCOVERY_TTL_SECONDS:
            return cached
        try:
            found = await peers.discover(self.session, peer.registry_url, self.settings.query_timeout_seconds)
        except aiohttp.ClientError as exc:
            # Not cached: an unreachable peer is down, not a REST peer, and is asked again next time.
            raise PeerError(
                REASON_UNAVAILABLE, f"cannot reach {peer.registry_url}: {exc.__class__.__name__}: {exc}"
            ) from None
        if peer.protocol == fed_pb.PEER_PROTOCOL_GRPC and found.protocol != fed_pb.PEER_PROTOCOL_GRPC:
            raise PeerError(REASON_INVALID, "peer is configured for gRPC federation but publishes no gRPC endpoint")
        route = _Route(found.protocol, found.grpc_endpoint, peer.require_mtls or found.mtls_required, time.monotonic())
        self._routes[key] = route
        return route

    def _channel(self, endpoint: str, mtls: bool) -> _PeerChannel:
        key = (endpoint, mtls)
        known = self._channels.get(key)
        if known is not None:
            return known
        options = [
            # A peer answering more than this is refused by gRPC itself, before the message is built.
            ("grpc.max_receive_message_length", self.settings.max_peer_response_bytes),
            ("grpc.max_send_message_length", 1024 * 1024),
            ("grpc.keepalive_time_ms", 60_000),
            # Fail fast when a peer is down instead of waiting out the deadline in connection backoff.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        if mtls:
            if self.settings.tls is None:
                raise PeerError(
                    REASON_UNAVAILABLE, "peer requires mutual TLS but FEDERATION_TLS_CA/CERT/KEY are not set"
                )
            if self._client_credentials is None:
                self._client_credentials = peers.client_credentials(self.settings.tls)
            channel = grpc.aio.secure_channel(endpoint, self._client_credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(endpoint, options=options)
        search: grpc.aio.UnaryUnaryMultiCallable = channel.unary_unary(
            SEARCH_METHOD, request_serializer=fed_pb.SearchAgentsRequest.SerializeToString
        )
        generation: grpc.aio.UnaryUnaryMultiCallable = channel.unary_unary(
            GENERATION_METHOD, request_serializer=fed_pb.GetSharingGenerationRequest.SerializeToString
        )
        self._channels[key] = _PeerChannel(channel, search, generation)
        PEER_CHANNELS.set(len(self._channels))
        return self._channels[key]

    def _prune(self, targets: list[PeerTarget]) -> None:
        """Forgets what belonged to peers that were deleted, deactivated or re-pointed: routes, generations,
        memoized answers, and the channels no remaining peer uses (closed)."""
        self._pruned_for = targets
        current = {p.id: p for p in targets}
        for key in [k for k in self._routes if current.get(k[0]) is None or current[k[0]].registry_url != k[1]]:
            del self._routes[key]
        in_use: set[tuple[str, bool]] = set()
        for p in targets:
            if p.protocol == fed_pb.PEER_PROTOCOL_GRPC and p.grpc_endpoint:
                in_use.add((p.grpc_endpoint, p.require_mtls))
            route = self._routes.get((p.id, p.registry_url))
            if route is not None and route.grpc_endpoint:
                in_use.add((route.grpc_endpoint, route.mtls))
        for endpoint in [k for k in self._channels if k not in in_use]:
            closing = self._channels.pop(endpoint)
            self._spawn(closing.channel.close(), f"close the channel to {endpoint[0]}")
        PEER_CHANNELS.set(len(self._channels))
        addresses = {_address(p) for p in targets}
        for address in [a for a in self._confirmed if a not in addresses]:
            del self._confirmed[address]
        self._answers.drop_if(lambda k: k[0] not in current)
        self._decoded.drop_if(lambda k: k.split(":", 2)[1] not in current)
        self._upserted.drop_if(lambda k: k[0] not in current)

    def _signed_metadata(self, peer: PeerTarget, method: str, request: Any) -> list[tuple[str, str]]:
        metadata: list[tuple[str, str]] = [(signing.REGISTRY_HEADER, self.settings.registry_name)]
        if peer.api_key:
            nonce = signing.new_nonce()
            body = signing.grpc_body(request.SerializeToString(deterministic=True))
            metadata += [
                ("authorization", f"Bearer {peer.api_key}"),
                (signing.NONCE_HEADER, nonce),
                (signing.SIGNATURE_HEADER, signing.sign(signing.GRPC_METHOD, method, body, peer.api_key, nonce=nonce)),
            ]
        return metadata

    # --------------------------------------------------------------------------------------- gRPC peers

    async def _grpc_search(self, peer: PeerTarget, route: _Route, query: domain.PeerQuery) -> bytes:
        request = fed_pb.SearchAgentsRequest(
            search=query.search,
            agent_type=query.agent_type,
            tag=query.tag,
            capability_kind=query.capability_kind,  # type: ignore[arg-type]
            capability_name=query.capability_name,
            capability_version=query.capability_version,
            page_size=query.limit,
        )
        try:
            reply = await self._channel(route.grpc_endpoint, route.mtls).search(
                request,
                metadata=self._signed_metadata(peer, SEARCH_METHOD, request),
                timeout=self.settings.query_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from None
        if not isinstance(reply, bytes):
            raise PeerError(REASON_INVALID, "peer call failed: no answer")
        return reply

    # --------------------------------------------------------------------------------------- REST peers

    async def _rest_search(self, peer: PeerTarget, query: domain.PeerQuery) -> bytes:
        params = [
            ("search", query.search),
            ("agent_type", query.agent_type),
            ("tag", query.tag),
            ("capability_kind", _KIND_WORDS.get(query.capability_kind, "")),
            ("capability_name", query.capability_name),
            ("capability_version", query.capability_version),
            ("limit", str(query.limit)),
        ]
        base = urlsplit(peer.registry_url)
        # The signature covers the path and query exactly as sent, so the URL is encoded once, here, and
        # handed to aiohttp as already encoded.
        path_and_query = f"{base.path.rstrip('/')}{REST_AGENTS_PATH}?{urlencode([(k, v) for k, v in params if v])}"
        url = URL(f"{base.scheme}://{base.netloc}{path_and_query}", encoded=True)
        headers = {"Accept": "application/json", signing.REGISTRY_HEADER: self.settings.registry_name}
        if peer.api_key:
            nonce = signing.new_nonce()
            headers |= {
                "Authorization": f"Bearer {peer.api_key}",
                signing.NONCE_HEADER: nonce,
                signing.SIGNATURE_HEADER: signing.sign("GET", path_and_query, "", peer.api_key, nonce=nonce),
            }
        limit = self.settings.max_peer_response_bytes
        try:
            async with self.session.get(url, headers=headers, allow_redirects=False) as response:
                if response.status in (401, 403):
                    raise PeerError(REASON_REJECTED, f"authentication rejected by peer (HTTP {response.status})")
                if response.status != 200:
                    raise PeerError(REASON_UNAVAILABLE, f"peer answered HTTP {response.status}")
                if response.content_length is not None and response.content_length > limit:
                    raise PeerError(
                        REASON_INVALID, f"peer answer too large ({response.content_length} bytes, limit {limit})"
                    )
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > limit:
                        raise PeerError(REASON_INVALID, f"peer answer too large (over {limit} bytes)")
        except aiohttp.ClientError as exc:
            raise PeerError(REASON_UNAVAILABLE, f"peer call failed: {exc.__class__.__name__}: {exc}") from None
        return bytes(body)

    def _parse_rest(self, body: bytes) -> tuple[list[pb.Agent], int]:
        """A REST peer's JSON answer as agents, each still to be validated (a REST peer has no generation)."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise PeerError(REASON_INVALID, "peer answered with invalid JSON") from None
        raw_agents = document.get("agents") if isinstance(document, dict) else None
        if not isinstance(raw_agents, list):
            raise PeerError(REASON_INVALID, 'peer answer has no "agents" list')
        agents = []
        for raw in raw_agents[: self.settings.max_results_per_peer * 2]:
            agent = domain.agent_from_json(raw)
            # An entry that is not even an object becomes an empty agent, which validation then rejects.
            agents.append(agent if agent is not None else pb.Agent())
        return agents, 0

    # --------------------------------------------------------------------------------------- plumbing

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
        for check in list(self._checks.values()):
            check.cancel()
        for peer_channel in self._channels.values():
            await peer_channel.channel.close()
        self._channels.clear()
        PEER_CHANNELS.set(0)


_KIND_WORDS: dict[int, str] = {
    pb.CAPABILITY_KIND_TOOL: "tool",
    pb.CAPABILITY_KIND_SKILL: "skill",
    pb.CAPABILITY_KIND_MODEL: "model",
}


def _parse_grpc(raw: bytes) -> tuple[list[pb.Agent], int]:
    try:
        reply = fed_pb.SearchAgentsResponse.FromString(raw)
    except DecodeError:
        raise PeerError(REASON_INVALID, "peer answered with an unreadable message") from None
    return list(reply.agents), reply.generation


def _rpc_error(exc: grpc.aio.AioRpcError) -> Exception:
    """A failed call to a peer as the error its outcome reports; the details may name internal addresses, so they
    go only into the detail."""
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return PeerError(REASON_REJECTED, f"authentication rejected by peer: {code.name}: {exc.details()}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return PeerError(REASON_REJECTED, f"peer answer rejected: {code.name}: {exc.details()}")
    return PeerError(REASON_UNAVAILABLE, f"peer call failed: {code.name}: {exc.details()}")


def _address(peer: PeerTarget) -> tuple[str, str, str]:
    return peer.id, peer.registry_url, peer.grpc_endpoint


def cache_key(peer_id: str, query_hash: str) -> str:
    return f"federation:{peer_id}:{query_hash}"


def _now() -> datetime:
    return datetime.now(UTC)
