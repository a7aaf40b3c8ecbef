"""The federated fan-out: the peer list, pooled peer clients, the Redis cache, and a deadline per peer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
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
from prometheus_client import Counter, Histogram
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

log = logging.getLogger("agentvault.discovery.federation")

SEARCH_METHOD = "/agentvault.federation.v1.FederationService/SearchAgents"
REST_AGENTS_PATH = "/api/v1/agents"
MAX_ERROR_TEXT = 300
MAX_CONCURRENT_PEERS = 64
# Cached answers kept in memory with the bytes they were read from, keyed by their Redis key.
DECODED_ENTRIES = 1024
# Validated peer answers kept in memory, keyed by peer and a digest of the bytes the peer sent.
ANSWER_ENTRIES = 256
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

OK, FAILED, TIMEOUT, SKIPPED = "ok", "failed", "timeout", "skipped"


class PeerError(Exception):
    """Why one peer's answer was not used; the text goes into the search's stats, so it is safe to show."""


@dataclass
class PeerOutcome:
    peer: PeerTarget
    status: str
    latency_ms: float = 0.0
    from_cache: bool = False
    agents: list[pb.Agent] = field(default_factory=list)
    error: str = ""
    invalid: int = 0
    # Identifies the exact validated answer (a digest of its serialized form), so work derived from it (scores)
    # can be reused; None when the peer did not answer.
    version: bytes | None = None


@dataclass(frozen=True)
class _Answer:
    """A peer's answer after validation: what is used, what was dropped, and its serialized form for the cache."""

    agents: list[pb.Agent]
    invalid: int
    clean: bytes
    version: bytes


@dataclass(frozen=True)
class _PeerChannel:
    """A pooled channel to a peer and its SearchAgents call, which answers raw bytes (digested before parsing)."""

    channel: grpc.aio.Channel
    search: grpc.aio.UnaryUnaryMultiCallable


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


class Federator:
    """Asks every peer concurrently, each under its own deadline, over connections pooled for the process."""

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
        self._decoded: Lru[str, tuple[bytes, _Answer]] = Lru(DECODED_ENTRIES)
        # Peers mostly send the same bytes for the same query: those are parsed and validated once.
        self._answers: Lru[tuple[str, bytes], _Answer] = Lru(ANSWER_ENTRIES)
        # When each (peer, answer version) was last queued for federated_agents_cache, to skip rewriting rows
        # that are still fresh.
        self._upserted: dict[tuple[str, bytes], float] = {}

    # --------------------------------------------------------------------------------------- fan-out

    async def search(self, query: domain.PeerQuery, filters: domain.Filters, force_refresh: bool) -> list[PeerOutcome]:
        targets = await self.directory.get()
        query_hash = query.cache_hash()
        cached = {} if force_refresh else await self._cache_read(targets, query_hash)
        fresh: dict[str, bytes] = {}
        outcomes = await peers.gather_bounded(
            MAX_CONCURRENT_PEERS,
            *(self._one(p, query, query_hash, filters, cached.get(p.id), fresh) for p in targets),
        )
        if fresh and self.settings.cache_ttl_seconds:
            self._spawn(self._cache_put(fresh), f"cache the answers of {len(fresh)} peer(s)")
        results: list[PeerOutcome] = []
        for peer, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                # _one handles every expected failure; this is a bug, but one peer must still not fail the search.
                log.error("unexpected error querying peer %s", peer.name, exc_info=outcome)
                outcome = PeerOutcome(peer, FAILED, error="internal error")
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
    ) -> PeerOutcome:
        if peer.is_down:
            outcome = PeerOutcome(peer, SKIPPED, error="peer is down according to the health monitor")
            self._log(outcome, query_hash)
            return outcome
        start = time.perf_counter()
        try:
            # The deadline covers everything for this peer: cache read, protocol discovery, the call, parsing.
            async with asyncio.timeout(self.settings.query_timeout_seconds):
                outcome = await self._fetch(peer, query, query_hash, cached, fresh)
        except TimeoutError:
            outcome = PeerOutcome(
                peer, TIMEOUT, error=f"no answer within {self.settings.query_timeout_seconds * 1000:.0f} ms"
            )
        except PeerError as exc:
            outcome = PeerOutcome(peer, FAILED, error=_short(str(exc)))
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
        if cached is not None:
            hit = self._decode_cached(peer, key, cached)
            if hit is not None:
                FEDERATION_CACHE_HITS.labels(peer.name).inc()
                return PeerOutcome(
                    peer, OK, from_cache=True, agents=hit.agents, invalid=hit.invalid, version=hit.version
                )
        route = await self._route(peer)
        if route.protocol == fed_pb.PEER_PROTOCOL_GRPC:
            answer = self._answer(peer, await self._grpc_search(peer, route, query), _parse_grpc)
        else:
            answer = self._answer(peer, await self._rest_search(peer, query), self._parse_rest)
        if self.settings.cache_ttl_seconds:
            fresh[key] = answer.clean
            self._upsert(peer, answer)
        return PeerOutcome(peer, OK, agents=answer.agents, invalid=answer.invalid, version=answer.version)

    def _answer(self, peer: PeerTarget, raw: bytes, parse: Callable[[bytes], list[pb.Agent]]) -> _Answer:
        """The peer's answer parsed and validated; the same bytes from the same peer are reused, not re-validated
        (validation is a pure function of them). Raises PeerError when the bytes cannot be parsed."""
        memo_key = (peer.id, hashlib.blake2b(raw, digest_size=16).digest())
        answer = self._answers.get(memo_key)
        if answer is None:
            agents, invalid = self._validate(peer, parse(raw))
            clean = fed_pb.SearchAgentsResponse(agents=agents).SerializeToString()
            answer = self._answers.put(
                memo_key, _Answer(agents, invalid, clean, hashlib.blake2b(clean, digest_size=16).digest())
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
        if now - self._upserted.get(marker, float("-inf")) < ttl / 2:
            return
        if len(self._upserted) >= 4 * ANSWER_ENTRIES:
            self._upserted = {k: t for k, t in self._upserted.items() if now - t < ttl / 2}
        self._upserted[marker] = now
        self.writer.submit(CacheUpsert(peer.id, answer.agents, expiry(ttl)))

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

    async def _cache_read(self, targets: list[PeerTarget], query_hash: str) -> dict[str, bytes]:
        """Every asked peer's cached answer in one round trip, by peer id; a Redis failure costs the cache, not
        the search, and never more than the query deadline."""
        if not self.settings.cache_ttl_seconds:
            return {}
        asked = [p for p in targets if not p.is_down]
        if not asked:
            return {}
        try:
            async with asyncio.timeout(self.settings.query_timeout_seconds):
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
        try:
            return self._decoded.put(key, (raw, self._answer(peer, raw, _parse_grpc)))[1]
        except PeerError:
            log.warning("unreadable federation cache entry %s; ignored", key)
            return None

    async def _cache_put(self, answers: dict[str, bytes]) -> None:
        """Every fresh answer of one search written in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, value in answers.items():
                pipe.set(key, value, ex=self.settings.cache_ttl_seconds)
            await pipe.execute()

    async def clear_cache(self, peer_id: str) -> int:
        """Deletes every cached answer of the peer; returns how many."""
        self._upserted = {k: t for k, t in self._upserted.items() if k[0] != peer_id}
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
            raise PeerError(f"cannot reach {peer.registry_url}: {exc.__class__.__name__}: {exc}") from None
        if peer.protocol == fed_pb.PEER_PROTOCOL_GRPC and found.protocol != fed_pb.PEER_PROTOCOL_GRPC:
            raise PeerError("peer is configured for gRPC federation but publishes no gRPC endpoint")
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
                raise PeerError("peer requires mutual TLS but FEDERATION_TLS_CA/CERT/KEY are not set")
            if self._client_credentials is None:
                self._client_credentials = peers.client_credentials(self.settings.tls)
            channel = grpc.aio.secure_channel(endpoint, self._client_credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(endpoint, options=options)
        search: grpc.aio.UnaryUnaryMultiCallable = channel.unary_unary(
            SEARCH_METHOD, request_serializer=fed_pb.SearchAgentsRequest.SerializeToString
        )
        self._channels[key] = _PeerChannel(channel, search)
        return self._channels[key]

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
        metadata: list[tuple[str, str]] = [(signing.REGISTRY_HEADER, self.settings.registry_name)]
        if peer.api_key:
            nonce = signing.new_nonce()
            body = signing.grpc_body(request.SerializeToString(deterministic=True))
            metadata += [
                ("authorization", f"Bearer {peer.api_key}"),
                (signing.NONCE_HEADER, nonce),
                (
                    signing.SIGNATURE_HEADER,
                    signing.sign(signing.GRPC_METHOD, SEARCH_METHOD, body, peer.api_key, nonce=nonce),
                ),
            ]
        try:
            reply = await self._channel(route.grpc_endpoint, route.mtls).search(
                request, metadata=metadata, timeout=self.settings.query_timeout_seconds
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError from None
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise PeerError(f"authentication rejected by peer: {code.name}: {exc.details()}") from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise PeerError(f"peer answer rejected: {code.name}: {exc.details()}") from None
            raise PeerError(f"peer call failed: {code.name}: {exc.details()}") from None
        if not isinstance(reply, bytes):
            raise PeerError("peer call failed: no answer")
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
                    raise PeerError(f"authentication rejected by peer (HTTP {response.status})")
                if response.status != 200:
                    raise PeerError(f"peer answered HTTP {response.status}")
                if response.content_length is not None and response.content_length > limit:
                    raise PeerError(f"peer answer too large ({response.content_length} bytes, limit {limit})")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > limit:
                        raise PeerError(f"peer answer too large (over {limit} bytes)")
        except aiohttp.ClientError as exc:
            raise PeerError(f"peer call failed: {exc.__class__.__name__}: {exc}") from None
        return bytes(body)

    def _parse_rest(self, body: bytes) -> list[pb.Agent]:
        """A REST peer's JSON answer as agents, each still to be validated."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise PeerError("peer answered with invalid JSON") from None
        raw_agents = document.get("agents") if isinstance(document, dict) else None
        if not isinstance(raw_agents, list):
            raise PeerError('peer answer has no "agents" list')
        agents = []
        for raw in raw_agents[: self.settings.max_results_per_peer * 2]:
            agent = domain.agent_from_json(raw)
            # An entry that is not even an object becomes an empty agent, which validation then rejects.
            agents.append(agent if agent is not None else pb.Agent())
        return agents

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
        for peer_channel in self._channels.values():
            await peer_channel.channel.close()
        self._channels.clear()


_KIND_WORDS: dict[int, str] = {
    pb.CAPABILITY_KIND_TOOL: "tool",
    pb.CAPABILITY_KIND_SKILL: "skill",
    pb.CAPABILITY_KIND_MODEL: "model",
}


def _parse_grpc(raw: bytes) -> list[pb.Agent]:
    try:
        return list(fed_pb.SearchAgentsResponse.FromString(raw).agents)
    except DecodeError:
        raise PeerError("peer answered with an unreadable message") from None


def cache_key(peer_id: str, query_hash: str) -> str:
    return f"federation:{peer_id}:{query_hash}"


def _now() -> datetime:
    return datetime.now(UTC)
