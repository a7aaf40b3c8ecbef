"""RegistryClient: a typed asyncio client for agentvault.registry.v1.RegistryService (agents and API keys)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, TypedDict, Unpack

from google.protobuf import field_mask_pb2

from agentvault.client.base import DEFAULT_TIMEOUT, TOKEN_ENV, GrpcClient, RetryPolicy, pages
from agentvault.client.convert import enum_number
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_TIMEOUT",
    "IDEMPOTENT_METHODS",
    "SERVICE",
    "TOKEN_ENV",
    "AgentFilters",
    "RegistryClient",
    "RetryPolicy",
]

SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name
# Safe to repeat: reading twice has the same effect as reading once.
IDEMPOTENT_METHODS = ("GetAgent", "ListAgents", "GetHealth", "ListApiKeys")


class AgentFilters(TypedDict, total=False):
    """ListAgents filters; enums may be words ("skill", "federated")."""

    agent_type: str
    tag: str
    capability_kind: str | int
    capability_name: str
    capability_version: str
    owner: str
    sharing: str | int


def search_fields(filters: Mapping[str, Any]) -> dict[str, Any]:
    """The filter fields ListAgents and discovery's SearchAgents share, from the words a caller gives."""
    return {
        "agent_type": filters.get("agent_type", ""),
        "tag": filters.get("tag", ""),
        "capability_kind": enum_number(
            pb.CapabilityKind.DESCRIPTOR, filters.get("capability_kind", ""), "capability_kind"
        ),
        "capability_name": filters.get("capability_name", ""),
        "capability_version": filters.get("capability_version", ""),
    }


def _list_request(search: str, page_size: int, page_token: str, filters: AgentFilters) -> pb.ListAgentsRequest:
    return pb.ListAgentsRequest(
        page_size=page_size,
        page_token=page_token,
        search=search,
        **search_fields(filters),
        owner=filters.get("owner", ""),
        sharing=enum_number(pb.Sharing.DESCRIPTOR, filters.get("sharing", ""), "sharing"),  # type: ignore[arg-type]
    )


class RegistryClient(GrpcClient):
    """Calls one registry: address default $REGISTRY_ADDR, else 127.0.0.1:$REGISTRY_PORT; the other options are
    GrpcClient's (token, timeout, root_certificates, tls, retry, options)."""

    SERVICE_LABEL = "registry"
    ADDRESS_ENV, PORT_ENV = "REGISTRY_ADDR", "REGISTRY_PORT"
    IDEMPOTENT = tuple((SERVICE, m) for m in IDEMPOTENT_METHODS)

    @property
    def _stub(self) -> pb_grpc.RegistryServiceAsyncStub:
        return self._stub_of(pb_grpc.RegistryServiceStub)

    # ------------------------------------------------------------------------------------------- agents

    async def create_agent(self, agent: pb.Agent, *, timeout: float | None = None) -> pb.Agent:
        """Registers `agent` (build one with `build_agent`) owned by the caller; never retried."""
        return await self._call(self._stub.CreateAgent, pb.CreateAgentRequest(agent=agent), timeout)

    async def get_agent(self, id: str, *, timeout: float | None = None) -> pb.Agent:
        return await self._call(self._stub.GetAgent, pb.GetAgentRequest(id=id), timeout)

    async def list_agents(
        self,
        *,
        search: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        **filters: Unpack[AgentFilters],
    ) -> pb.ListAgentsResponse:
        """One page; page_size 0 means the server's default (50), larger than 500 is coerced to 500."""
        request = _list_request(search, page_size, page_token, filters)
        return await self._call(self._stub.ListAgents, request, timeout)

    async def search_agents(
        self,
        query: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        **filters: Unpack[AgentFilters],
    ) -> pb.ListAgentsResponse:
        """One page of a full-text search, ranked by relevance."""
        return await self.list_agents(
            search=query, page_size=page_size, page_token=page_token, timeout=timeout, **filters
        )

    async def iter_agents(
        self,
        *,
        search: str = "",
        page_size: int = 0,
        timeout: float | None = None,
        **filters: Unpack[AgentFilters],
    ) -> AsyncIterator[pb.Agent]:
        """Every matching agent, fetching the next page as the previous one is consumed; `timeout` is per page."""
        async for page in pages(
            lambda token: self.list_agents(
                search=search, page_size=page_size, page_token=token, timeout=timeout, **filters
            )
        ):
            for agent in page.agents:
                yield agent

    async def update_agent(
        self, agent: pb.Agent, update_mask: Sequence[str] | None = None, *, timeout: float | None = None
    ) -> pb.Agent:
        """Changes the fields of `agent` (its id set) named in `update_mask`; None or [] replaces every writable
        field (PUT semantics), so pass a mask unless `agent` is complete."""
        mask = field_mask_pb2.FieldMask(paths=list(update_mask or ()))
        return await self._call(self._stub.UpdateAgent, pb.UpdateAgentRequest(agent=agent, update_mask=mask), timeout)

    async def delete_agent(self, id: str, *, timeout: float | None = None) -> None:
        await self._call(self._stub.DeleteAgent, pb.DeleteAgentRequest(id=id), timeout)

    async def import_agent_card(
        self,
        *,
        card_url: str = "",
        card: str = "",
        did: str = "",
        sharing: str | int = "",
        timeout: float | None = None,
    ) -> pb.Agent:
        """Registers an agent owned by the caller from its A2A agent card: fetched from `card_url`, or `card` (JSON
        text); exactly one of them. Never retried."""
        request = pb.ImportAgentCardRequest(
            card_url=card_url,
            card=card,
            did=did,
            sharing=enum_number(pb.Sharing.DESCRIPTOR, sharing, "sharing"),  # type: ignore[arg-type]
        )
        return await self._call(self._stub.ImportAgentCard, request, timeout)

    async def get_agent_card(self, id: str, *, timeout: float | None = None) -> pb.GetAgentCardResponse:
        """The agent as an A2A 1.0 AgentCard (the response's `card`)."""
        return await self._call(self._stub.GetAgentCard, pb.GetAgentCardRequest(id=id), timeout)

    async def health(self, *, timeout: float | None = None) -> pb.GetHealthResponse:
        return await self._call(self._stub.GetHealth, pb.GetHealthRequest(), timeout)

    async def caller(self, *, timeout: float | None = None) -> pb.Caller:
        """The principal behind this client's credential (empty without one)."""
        return await self._call(self._stub.GetCaller, pb.GetCallerRequest(), timeout)

    # ----------------------------------------------------------------------------------------- api keys

    async def create_api_key(
        self, name: str, role: str | int = "member", *, principal_id: str = "", timeout: float | None = None
    ) -> pb.CreateApiKeyResponse:
        """Issues a key (admin only); the response's `token` is shown this once and cannot be fetched again.

        The key acts as a new principal, or as `principal_id` (another key for the same owner)."""
        request = pb.CreateApiKeyRequest(
            name=name,
            role=enum_number(pb.Role.DESCRIPTOR, role, "role"),  # type: ignore[arg-type]
            principal_id=principal_id,
        )
        return await self._call(self._stub.CreateApiKey, request, timeout)

    async def list_api_keys(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> pb.ListApiKeysResponse:
        request = pb.ListApiKeysRequest(page_size=page_size, page_token=page_token)
        return await self._call(self._stub.ListApiKeys, request, timeout)

    async def iter_api_keys(self, *, page_size: int = 0, timeout: float | None = None) -> AsyncIterator[pb.ApiKey]:
        async for page in pages(
            lambda token: self.list_api_keys(page_size=page_size, page_token=token, timeout=timeout)
        ):
            for key in page.api_keys:
                yield key

    async def revoke_api_key(self, id: str, *, timeout: float | None = None) -> pb.ApiKey:
        return await self._call(self._stub.RevokeApiKey, pb.RevokeApiKeyRequest(id=id), timeout)
