"""DiscoveryService over gRPC: validates requests, gathers local and federated results, converts them to protobuf."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from typing import Any

import grpc
import redis.asyncio as aioredis
from prometheus_client import Gauge

from agentvault.common import agents, pagination
from agentvault.common.errors import (
    AgentVaultError,
    FieldViolation,
    InvalidArgument,
    Unavailable,
    invalid,
)
from agentvault.common.interceptors import caller_metadata
from agentvault.common.jwt_auth import JwtValidator
from agentvault.common.lru import Lru
from agentvault.common.remote_auth import AdminGate, CallerResolver
from agentvault.discovery.v1 import discovery_service_pb2 as dpb
from agentvault.discovery.v1 import discovery_service_pb2_grpc as dpb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from agentvault_discovery import domain, ranking
from agentvault_discovery.access import ForceRefreshGate
from agentvault_discovery.answers import MEMORY_PER_WIRE_BYTE
from agentvault_discovery.federator import Federator
from agentvault_discovery.outcomes import FAILED, OK, SKIPPED, TIMEOUT, PeerOutcome
from agentvault_discovery.settings import DiscoverySettings
from agentvault_discovery.store import Store

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
REGISTRY_TIMEOUT_SECONDS = 10.0
# Scored candidate lists of cached peer answers kept in memory (one per peer, answer and query).
SCORED_ENTRIES = 1024
# Merged result lists kept in memory (one per set of answers and query), each with up to MERGED_PAGES pages built
# from it: at most 128 x 4 pages of 200 agents.
MERGED_ENTRIES = 128
MERGED_PAGES = 4
# Scored local answers kept in memory (one per distinct answer of the registry and query).
LOCAL_ENTRIES = 256
# What a scored candidate costs beyond its agent (the Candidate and its fields).
CANDIDATE_BYTES = 256
MEMO_BYTES = Gauge("discovery_memo_bytes", "Bytes charged to discovery's in-process memos (DISCOVERY_MEMO_BYTES).")
LIST_AGENTS = "/agentvault.registry.v1.RegistryService/ListAgents"
_STATUS = {
    OK: dpb.PEER_QUERY_STATUS_OK,
    FAILED: dpb.PEER_QUERY_STATUS_FAILED,
    TIMEOUT: dpb.PEER_QUERY_STATUS_TIMEOUT,
    SKIPPED: dpb.PEER_QUERY_STATUS_SKIPPED,
}
_PASSED_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _registry_error(exc: grpc.aio.AioRpcError, what: str) -> AgentVaultError:
    """The registry's refusal of the caller is the caller's error; anything else means the registry is unwell."""
    code = exc.code()
    if code in _PASSED_THROUGH:
        return AgentVaultError(exc.details() or code.name, code.name, {"upstream": "registry"}, code)
    log.error("registry call %s failed: %s %s", what, code.name, exc.details())
    return Unavailable(f"the registry is unavailable ({code.name})", "REGISTRY_UNAVAILABLE")


def _valid_position(position: list[Any] | None) -> list[Any] | None:
    if position is None:
        return None
    types_ok = (
        len(position) == 5
        and isinstance(position[0], int | float)
        and not isinstance(position[0], bool)
        and all(isinstance(p, int) and not isinstance(p, bool) for p in position[1:3])
        and all(isinstance(p, str) for p in position[3:])
    )
    if not types_ok:
        raise invalid("page_token", "is not a valid page token")
    return [float(position[0]), *position[1:]]


class Search:
    """A validated SearchAgentsRequest."""

    def __init__(self, request: dpb.SearchAgentsRequest, max_results_per_peer: int) -> None:
        violations: list[FieldViolation] = []
        query = agents.AgentQuery()
        try:
            query = agents.build_query(
                {
                    "search": request.search,
                    "agent_type": request.agent_type,
                    "tag": request.tag,
                    "capability_name": request.capability_name,
                    "capability_version": request.capability_version,
                }
            )
        except InvalidArgument as exc:
            violations.extend(exc.violations)
        if request.capability_kind and request.capability_kind not in pb.CapabilityKind.values():
            violations.append(FieldViolation("capability_kind", f"unknown value {request.capability_kind}"))
        if request.page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative"))
        if violations:
            raise InvalidArgument(violations)
        self.request = request
        self.query = query
        self.size = pagination.page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        self.terms = ranking.query_terms(query.search)
        self.peer_query = domain.PeerQuery(
            search=query.search,
            agent_type=query.agent_type,
            tag=query.tag,
            capability_kind=request.capability_kind,
            capability_name=query.capability_name,
            capability_version=request.capability_version.strip(),
            limit=max_results_per_peer,
        )
        self.filters = domain.Filters(
            agent_type=query.agent_type,
            tag=query.tag,
            capability_kind=request.capability_kind,
            capability_name=query.capability_name,
            capability_version=query.capability_version,
            healthy_only=request.healthy_only,
        )
        # force_refresh is left out on purpose: it changes where answers come from, not which answers match.
        self.fingerprint = "\x1f".join(
            (
                "discovery",
                query.fingerprint(),
                str(request.capability_kind),
                str(request.include_federated),
                str(request.healthy_only),
            )
        )
        self.after = _valid_position(pagination.decode(request.page_token, self.fingerprint))


class Merged:
    """Local and federated candidates merged and sorted for one search, and the pages served from them."""

    __slots__ = ("candidates", "pages")

    def __init__(self, candidates: list[ranking.Candidate]) -> None:
        self.candidates = candidates
        self.pages: dict[tuple[Any, ...], tuple[list[dpb.DiscoveredAgent], list[Any] | None]] = {}

    def page(self, after: list[Any] | None, size: int) -> tuple[list[dpb.DiscoveredAgent], list[Any] | None]:
        key = (tuple(after) if after is not None else None, size)
        found = self.pages.get(key)
        if found is None:
            items, position = ranking.page(self.candidates, after, size)
            found = ([_discovered(c) for c in items], position)
            if len(self.pages) < MERGED_PAGES:
                self.pages[key] = found
        return found


class DiscoveryServicer(dpb_grpc.DiscoveryServiceServicer):
    def __init__(
        self,
        settings: DiscoverySettings,
        registry: pb_grpc.RegistryServiceAsyncStub,
        federator: Federator | None,
        store: Store,
        registry_channel: grpc.aio.Channel,
        redis: aioredis.Redis,
        jwt: JwtValidator | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.federator = federator
        self.store = store
        # ListAgents answering raw bytes: the same answer is parsed and scored once (keyed by its digest).
        self._list_agents: grpc.aio.UnaryUnaryMultiCallable = registry_channel.unary_unary(
            LIST_AGENTS, request_serializer=pb.ListAgentsRequest.SerializeToString
        )
        # Each memo is charged the agents it keeps alive (shared ones counted in each: an upper bound); together
        # with the federator's (3/8 of it, and 1/8 for queued cache upserts) they stay within DISCOVERY_MEMO_BYTES.
        budget = settings.memo_budget_bytes
        self._scored: Lru[tuple[Any, ...], list[ranking.Candidate]] = Lru(SCORED_ENTRIES, budget=budget // 8)
        self._local_scored: Lru[tuple[Any, ...], tuple[list[ranking.Candidate], int]] = Lru(
            LOCAL_ENTRIES, budget=budget // 8
        )
        self._merged: Lru[tuple[Any, ...], Merged] = Lru(MERGED_ENTRIES, budget=budget // 4)
        # Clearing a peer's cache is rare: no caching of the answer, so a revoked admin key stops at once.
        # No bootstrap token here (it is for people, and only the registry knows it): the registry resolves it.
        self.admin_gate = AdminGate(registry, None, cache_seconds=0, jwt=jwt)
        self.callers = CallerResolver(registry, None, jwt=jwt)
        self.force_refresh = ForceRefreshGate(self.callers, redis, settings.force_refresh_per_minute)

    @property
    def memo_bytes(self) -> int:
        """What every memo of the process is charged, the federator's included."""
        own = self._scored.bytes + self._local_scored.bytes + self._merged.bytes
        return own + (self.federator.memo_bytes if self.federator is not None else 0)

    async def SearchAgents(
        self, request: dpb.SearchAgentsRequest, context: grpc.aio.ServicerContext
    ) -> dpb.SearchAgentsResponse:
        search = Search(request, self.settings.max_results_per_peer)
        metadata = context.invocation_metadata()
        if request.force_refresh and request.include_federated and self.federator is not None:
            await self.force_refresh.admit(metadata)
        federated_task: asyncio.Task[list[PeerOutcome]] | None = None
        if request.include_federated and self.federator is not None:
            federated_task = asyncio.create_task(
                self.federator.search(search.peer_query, search.filters, request.force_refresh)
            )
        try:
            local_version, local, local_weight = await self._local(search, context)
        except BaseException:
            if federated_task is not None:
                federated_task.cancel()
            raise
        outcomes = await federated_task if federated_task is not None else []

        answered = [o for o in outcomes if o.status == OK]
        merged = self._merge(search, local_version, local, local_weight, answered)
        MEMO_BYTES.set(self.memo_bytes)
        agents, position = merged.page(search.after, search.size)
        response = dpb.SearchAgentsResponse(
            agents=agents, next_page_token=pagination.encode(position, search.fingerprint) if position else ""
        )
        if request.include_federated:
            detailed = any(o.error for o in outcomes) and await self._is_admin(metadata)
            response.federation_stats.CopyFrom(_stats(outcomes, detailed))
        return response

    async def _is_admin(self, metadata: Any) -> bool:
        """Whether the caller may see why peers failed in full (their addresses, their own error text)."""
        try:
            caller = await self.callers.resolve(metadata)
        except AgentVaultError:
            return False
        return caller is not None and caller.is_admin

    def _merge(
        self,
        search: Search,
        local_version: bytes,
        local: list[ranking.Candidate],
        local_weight: int,
        answered: list[PeerOutcome],
    ) -> Merged:
        """The merged, sorted candidates; the same answers to the same search are merged once."""
        key = (
            local_version,
            tuple((o.peer.id, o.peer.name, o.peer.registry_url, o.version) for o in answered),
            search.terms,
            search.filters,
        )
        known = self._merged.get(key)
        if known is not None:
            return known
        candidates = ranking.merge(local, [self._candidates(o, search) for o in answered])
        # The inputs' agents, and as much again for the pages built from them (copies).
        inputs = sum(o.weight for o in answered) + local_weight
        return self._merged.put(key, Merged(candidates), 2 * inputs + CANDIDATE_BYTES * len(candidates))

    def _candidates(self, outcome: PeerOutcome, search: Search) -> list[ranking.Candidate]:
        """A peer's agents scored for this search, computed once per (peer as named now, answer, query): a peer
        renamed or re-pointed shows its new name and URL at once."""
        peer = outcome.peer
        key = (peer.id, peer.name, peer.registry_url, outcome.version, search.terms, search.filters)
        known = self._scored.get(key)
        if known is not None:
            return known
        return self._scored.put(
            key,
            [
                ranking.Candidate(a, True, peer.registry_url, peer.name, ranking.score(a, search.terms))
                for a in outcome.agents
            ],
            outcome.weight + CANDIDATE_BYTES * len(outcome.agents),
        )

    async def _local(
        self, search: Search, context: grpc.aio.ServicerContext
    ) -> tuple[bytes, list[ranking.Candidate], int]:
        """The caller's own registry's matching agents, scored, a digest identifying that answer, and what the
        scored list costs in memory."""
        r = search.request
        try:
            raw = await self._list_agents(
                pb.ListAgentsRequest(
                    page_size=self.settings.max_local_results,
                    search=search.query.search,
                    agent_type=search.query.agent_type,
                    tag=search.query.tag,
                    capability_kind=r.capability_kind,
                    capability_name=search.query.capability_name,
                    capability_version=r.capability_version,
                ),
                metadata=caller_metadata(context),
                timeout=REGISTRY_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as exc:
            raise _registry_error(exc, "ListAgents") from None
        if not isinstance(raw, bytes):
            raise Unavailable("the registry gave no answer", "REGISTRY_UNAVAILABLE")
        version = hashlib.blake2b(raw, digest_size=16).digest()
        key = (version, search.terms, search.filters.healthy_only)
        known = self._local_scored.get(key)
        if known is not None:
            return version, *known
        reply = pb.ListAgentsResponse.FromString(raw)
        scored = [
            ranking.Candidate(
                a, False, self.settings.public_url, self.settings.registry_name, ranking.score(a, search.terms)
            )
            for a in reply.agents
            if not search.filters.healthy_only or a.health_status == pb.HEALTH_STATUS_HEALTHY
        ]
        weight = MEMORY_PER_WIRE_BYTE * len(raw) + CANDIDATE_BYTES * len(scored)
        self._local_scored.put(key, (scored, weight), weight)
        return version, scored, weight

    async def ClearPeerCache(
        self, request: dpb.ClearPeerCacheRequest, context: grpc.aio.ServicerContext
    ) -> dpb.ClearPeerCacheResponse:
        await self._require_admin(context)
        try:
            peer_id = str(uuid.UUID(request.peer_id))
        except ValueError:
            raise invalid("peer_id", f"must be a UUID (got {request.peer_id[:80]!r})") from None
        cleared = 0
        if self.federator is not None:
            cleared = await self.federator.clear_cache(peer_id)
        rows = await self.store.delete_peer_cache(peer_id)
        log.info("peer cache cleared", extra={"peer_id": peer_id, "redis_keys": cleared, "rows": rows})
        return dpb.ClearPeerCacheResponse(cleared_entries=cleared)

    async def _require_admin(self, context: grpc.aio.ServicerContext) -> None:
        await self.admin_gate.require_admin(context.invocation_metadata())


def _discovered(c: ranking.Candidate) -> dpb.DiscoveredAgent:
    a = c.agent
    out = dpb.DiscoveredAgent(
        id=a.id,
        did=a.did,
        name=a.name,
        description=a.description,
        version=a.version,
        agent_type=a.agent_type,
        capabilities=a.capabilities,
        endpoints=a.endpoints,
        tags=a.tags,
        health_status=a.health_status,
        is_federated=c.is_federated,
        registry_url=c.registry_url,
        registry_name=c.registry_name,
        score=c.score,
    )
    if a.HasField("update_time"):
        out.update_time.CopyFrom(a.update_time)
    return out


def _stats(outcomes: list[PeerOutcome], detailed: bool) -> dpb.FederationStats:
    """The per-peer report; why a peer failed is a short generic reason, in full (addresses, the peer's own
    words) only for admins (`detailed`). Logs always get it in full."""
    stats = dpb.FederationStats()
    for o in outcomes:
        stats.peers.add(
            peer_id=o.peer.id,
            name=o.peer.name,
            registry_url=o.peer.registry_url,
            status=_STATUS[o.status],
            latency_ms=round(o.latency_ms, 3),
            from_cache=o.from_cache,
            result_count=len(o.agents),
            error=(f"{o.reason}: {o.error}" if detailed else o.reason) if o.error else "",
        )
        if o.status == SKIPPED:
            stats.skipped_registries += 1
            continue
        stats.queried_registries += 1
        if o.status == OK:
            stats.successful_queries += 1
            stats.total_federated_results += len(o.agents)
            stats.cached_queries += int(o.from_cache)
        else:
            stats.failed_queries += 1
    return stats
