"""FederationService: the signed API other meshes call (their searches, the sharing generation, this mesh's info)."""

from __future__ import annotations

import grpc

from agentvault.common.batching import BatchWriter
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc
from agentvault_registry.cache import AgentCache
from agentvault_registry.federation_gate import FederationGate
from agentvault_registry.federation_store import FederationStore, InboundLogRow
from agentvault_registry.invitations import Invitations, source_of
from agentvault_registry.peer_listing import GENERATION_METHOD, PeerListing
from agentvault_registry.settings import FederationSettings
from agentvault_registry.store import Store


class FederationServicer(fpb_grpc.FederationServiceServicer):
    def __init__(
        self,
        store: Store,
        fed_store: FederationStore,
        gate: FederationGate,
        settings: FederationSettings,
        cache: AgentCache,
    ) -> None:
        self.fed_store = fed_store
        self.gate = gate
        self.settings = settings
        # What peers may list; RegistryService.ListAgents hands peers' calls to the same listing.
        self.listing = PeerListing(store, fed_store, gate, settings, cache)
        self.invitations = Invitations(fed_store, gate.box, settings, gate.requests.redis)

    @property
    def inbound_log(self) -> BatchWriter[InboundLogRow]:
        """The batched log of peers' queries, started and stopped with the server."""
        return self.listing.inbound_log

    async def SearchAgents(
        self, request: fpb.SearchAgentsRequest, context: grpc.aio.ServicerContext
    ) -> fpb.SearchAgentsResponse:
        return await self.listing.search(request, context.invocation_metadata())

    async def GetSharingGeneration(
        self, request: fpb.GetSharingGenerationRequest, context: grpc.aio.ServicerContext
    ) -> fpb.SharingGeneration:
        await self.gate.admit(context.invocation_metadata(), GENERATION_METHOD, request)
        return fpb.SharingGeneration(generation=await self.listing.generation())

    async def GetFederationInfo(
        self, request: fpb.GetFederationInfoRequest, context: grpc.aio.ServicerContext
    ) -> fpb.FederationInfo:
        return fpb.FederationInfo(
            registry_name=self.settings.registry_name,
            protocol="agentvault-grpc/v1",
            grpc_endpoint=self.settings.public_grpc_endpoint,
            mtls_required=self.settings.tls is not None and self.settings.mtls_required,
            agent_count=await self.fed_store.count_shared_agents(),
        )

    async def RedeemFederationInvitation(
        self, request: fpb.RedeemFederationInvitationRequest, context: grpc.aio.ServicerContext
    ) -> fpb.RedeemFederationInvitationResponse:
        # No credential: the proof, keyed with the invitation's one-time secret, authenticates the call.
        return await self.invitations.redeem(request, source_of(context))
