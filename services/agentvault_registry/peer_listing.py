"""What a peer mesh may list: the `federated` agents only, without owner or health-check address, after the
federation gate admitted its signed call; every answer is logged as an inbound federation query."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from agentvault.common import agents as agent_rules
from agentvault.common.batching import BatchWriter
from agentvault.common.errors import Unavailable, invalid
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_registry.answers import SharedAnswer
from agentvault_registry.cache import AgentCache
from agentvault_registry.convert import search_filters, shareable
from agentvault_registry.federation_gate import FederationGate
from agentvault_registry.federation_store import CredentialRecord, FederationStore, InboundLogRow
from agentvault_registry.settings import FederationSettings
from agentvault_registry.store import Store

SEARCH_METHOD = "/agentvault.federation.v1.FederationService/SearchAgents"
LIST_METHOD = "/agentvault.registry.v1.RegistryService/ListAgents"
GENERATION_METHOD = "/agentvault.federation.v1.FederationService/GetSharingGeneration"
# How long inbound-log rows wait for others to share their database write.
INBOUND_LOG_LINGER_SECONDS = 0.1


class PeerListing:
    """The peer-facing listing, reached by FederationService.SearchAgents and, in the seed's form kept for older
    meshes, by RegistryService.ListAgents called with a federation token. Paging, owners, private and local
    agents do not exist here: a peer gets one page of at most FEDERATION_MAX_RESULTS_PER_PEER federated agents."""

    def __init__(
        self,
        store: Store,
        fed_store: FederationStore,
        gate: FederationGate,
        settings: FederationSettings,
        cache: AgentCache,
    ) -> None:
        self.store = store
        self.gate = gate
        self.settings = settings
        self.cache = cache
        # federation_inbound_log and the credentials' last use are written in batches, off the request path.
        self.inbound_log: BatchWriter[InboundLogRow] = BatchWriter(
            "federation_inbound_log", fed_store.log_inbound, linger=INBOUND_LOG_LINGER_SECONDS
        )

    async def search(self, request: fpb.SearchAgentsRequest, metadata: Any) -> fpb.SearchAgentsResponse:
        cred, registry = await self.gate.admit(metadata, SEARCH_METHOD, request)
        answer = await self._answer(search_filters(request), request.page_size, cred, registry, "SearchAgents")
        return answer.search_reply()

    async def list(self, request: pb.ListAgentsRequest, metadata: Any) -> pb.ListAgentsResponse:
        """ListAgents for a peer: its member filters (owner, sharing, health-check URL, page token) do not apply."""
        cred, registry = await self.gate.admit(metadata, LIST_METHOD, request)
        answer = await self._answer(
            search_filters(request), request.page_size or request.limit, cred, registry, "ListAgents"
        )
        return answer.list_reply()

    async def generation(self) -> int:
        """The sharing generation, which every agent write moves (peers revalidate their cached answers by it)."""
        try:
            return await self.cache.generation()
        except Exception as exc:
            raise Unavailable(
                f"sharing generation unavailable: {type(exc).__name__}", "FEDERATION_REDIS_DOWN"
            ) from None

    async def _answer(
        self, raw_query: dict[str, Any], limit: int, cred: CredentialRecord, peer_registry: str, method: str
    ) -> SharedAnswer:
        """Federated agents matching the query, logged as one inbound federation query.

        Every peer gets the same answer to the same query (they all see exactly the `federated` agents), so
        answers are kept in the answers cache, which any agent write anywhere empties."""
        start = time.perf_counter()
        query = agent_rules.build_query({**raw_query, "sharing": "federated"})
        if limit < 0:
            raise invalid("page_size", "must not be negative")
        size = min(limit or self.settings.max_results_per_peer, self.settings.max_results_per_peer)
        key = f"{query.fingerprint()}\x1f{size}"
        result = self.cache.answers.get(key)
        if result is None:
            version = self.cache.version
            generation = await self.generation()
            agents, _ = await self.store.list_agents(query, None, size, None)
            result = SharedAnswer([shareable(a) for a in agents], self.settings.registry_name, generation)
            self.cache.answers.put(key, result, version)
        self.inbound_log.submit(
            InboundLogRow(
                credential_id=cred.id,
                peer_name=cred.name,
                peer_registry=peer_registry[:255],
                method=method,
                query={k: v for k, v in raw_query.items() if v},
                result_count=len(result.agents),
                response_time_ms=(time.perf_counter() - start) * 1000,
                created_at=datetime.now(UTC),
            )
        )
        return result
