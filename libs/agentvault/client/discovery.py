"""DiscoveryClient: a typed asyncio client for the discovery aggregator (local and federated search)."""

from __future__ import annotations

from typing import TypedDict, Unpack

from agentvault.client.base import GrpcClient
from agentvault.client.registry import search_fields
from agentvault.discovery.v1 import discovery_service_pb2 as dpb
from agentvault.discovery.v1 import discovery_service_pb2_grpc as dpb_grpc

SERVICE = dpb.DESCRIPTOR.services_by_name["DiscoveryService"].full_name
IDEMPOTENT_METHODS = ("SearchAgents",)


class DiscoveryFilters(TypedDict, total=False):
    """SearchAgents filters; capability_kind may be a word ("skill")."""

    agent_type: str
    tag: str
    capability_kind: str | int
    capability_name: str
    capability_version: str


class DiscoveryClient(GrpcClient):
    """Searches a mesh and, on request, its federation peers at once.

    address: default $DISCOVERY_ADDR, else 127.0.0.1:$DISCOVERY_PORT; the other options are GrpcClient's
    (token, timeout, root_certificates, tls, retry, options). The token, when given, is what decides which
    local agents the search may see (an owner sees their private ones)."""

    SERVICE_LABEL = "discovery service"
    ADDRESS_ENV, PORT_ENV = "DISCOVERY_ADDR", "DISCOVERY_PORT"
    IDEMPOTENT = tuple((SERVICE, m) for m in IDEMPOTENT_METHODS)

    @property
    def _stub(self) -> dpb_grpc.DiscoveryServiceAsyncStub:
        return self._stub_of(dpb_grpc.DiscoveryServiceStub)

    async def search_agents(
        self,
        query: str = "",
        *,
        include_federated: bool = False,
        healthy_only: bool = False,
        force_refresh: bool = False,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        **filters: Unpack[DiscoveryFilters],
    ) -> dpb.SearchAgentsResponse:
        """One page of merged, ranked results (unique by DID); with include_federated, every active peer is asked
        in parallel and `federation_stats` says how each one went. force_refresh bypasses the peers' cache."""
        request = dpb.SearchAgentsRequest(
            search=query,
            include_federated=include_federated,
            healthy_only=healthy_only,
            force_refresh=force_refresh,
            page_size=page_size,
            page_token=page_token,
            **search_fields(filters),
        )
        return await self._call(self._stub.SearchAgents, request, timeout)

    async def clear_peer_cache(self, peer_id: str, *, timeout: float | None = None) -> dpb.ClearPeerCacheResponse:
        """Drops the cached answers of one peer (admin only)."""
        return await self._call(self._stub.ClearPeerCache, dpb.ClearPeerCacheRequest(peer_id=peer_id), timeout)
