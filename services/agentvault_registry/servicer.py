"""RegistryService over gRPC for this mesh's own callers; a peer's ListAgents goes to the peer listing."""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
from google.protobuf import empty_pb2, struct_pb2

from agentvault.common import agents as agent_rules
from agentvault.common import pagination
from agentvault.common.auth import bearer_token
from agentvault.common.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    invalid,
    store_unavailable,
)
from agentvault.common.principal import (
    AGENTS_CONNECT,
    AGENTS_READ,
    AGENTS_WRITE,
    HEALTH_REPORT,
    TOOLS_SYNC,
    Kind,
    Principal,
    peer,
)
from agentvault.common.remote_auth import check_scope
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from agentvault.registry.v1.registry_service_pb2 import Agent as AgentPb
from agentvault_registry import mcp_tools
from agentvault_registry.agent_cards import card_of, check_request, compatibility
from agentvault_registry.auth import (
    BOOTSTRAP_PRINCIPAL_ID,
    PRINCIPAL_ID_PREFIX,
    Authenticator,
    hash_secret,
    new_principal_id,
    new_token,
)
from agentvault_registry.cache import AgentCache, CachedAgent
from agentvault_registry.card_import import CardImporter, parse_card_text, spec_from_card
from agentvault_registry.convert import (
    HEALTH,
    ROLE,
    SHARING,
    agent_to_proto,
    auth_to_proto,
    key_to_proto,
    number,
    search_filters,
    spec_from_proto,
    to_timestamp,
    word,
)
from agentvault_registry.federation_gate import is_federation_token
from agentvault_registry.federation_servicer import FederationServicer
from agentvault_registry.peer_listing import PeerListing
from agentvault_registry.store import Store

log = logging.getLogger(__name__)


HEALTH_REDIS_TIMEOUT = 2.0
PRINCIPAL_ID = re.compile(rf"{PRINCIPAL_ID_PREFIX}[0-9a-f]{{32}}")
# Who a federation token is counted as by GetHealth: a peer sees shared agents only.
PEER_VIEWER = peer("peer:", "peer")


class CallerKind(enum.Enum):
    """Who a call comes from, by the form of its credential alone (verifying it is each path's business)."""

    ANONYMOUS = "anonymous"
    MEMBER = "member"  # an API key, the bootstrap token or an access token: a caller of this mesh
    PEER = "peer"  # a federation token: another mesh


def caller_kind(metadata: Any) -> CallerKind:
    try:
        token = bearer_token(metadata)
    except ValueError:
        return CallerKind.MEMBER  # malformed: the member path refuses it with MALFORMED_CREDENTIAL
    if token is None:
        return CallerKind.ANONYMOUS
    return CallerKind.PEER if is_federation_token(token) else CallerKind.MEMBER


def may_see(sharing: str, owner: str, viewer: Principal | None) -> bool:
    """Private agents are visible to their owner (by principal id), admins, and the mesh's own services that call
    agents (agents:connect: messaging delivers to them, reads their tools); the rest to every caller."""
    if sharing != "private":
        return True
    if viewer is None:
        return False
    return viewer.is_admin or viewer.owns(owner) or (viewer.kind is Kind.SERVICE and viewer.has_scope(AGENTS_CONNECT))


def may_see_auth(owner: str, viewer: Principal | None) -> bool:
    """How the mesh authenticates to an agent (never its secret) is for its owner, admins and the mesh services
    that call agents (agents:connect); other members and peers do not learn that it has any."""
    return viewer is not None and (viewer.owns(owner) or viewer.has_scope(AGENTS_CONNECT))


def without_auth(proto: AgentPb) -> AgentPb:
    """A copy without `auth` (the cached message is shared and never changed)."""
    copy = AgentPb()
    copy.CopyFrom(proto)
    copy.ClearField("auth")
    return copy


def _reader(viewer: Principal | None) -> Principal | None:
    """The caller when it may read agents: anonymous callers see what is public, and a credential that lacks
    agents:read is refused rather than silently read as anonymous."""
    if viewer is not None:
        check_scope(viewer, AGENTS_READ)
    return viewer


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(
        self,
        store: Store,
        auth: Authenticator,
        ping_redis: Callable[[], Awaitable[Any]],
        cache: AgentCache,
        federation: FederationServicer | None = None,
        card_importer: CardImporter | None = None,
    ) -> None:
        self.store = store
        self.auth = auth
        self.cache = cache
        self._ping_redis = ping_redis
        self.card_importer = card_importer or CardImporter.from_env()
        # What a peer may list: ListAgents called with a federation token (the seed's form, which meshes of
        # older versions still use, over gRPC and HTTP) is answered by it and by nothing else.
        self.peer_listing: PeerListing | None = federation.listing if federation is not None else None

    def _authorize_owner(self, principal: Principal) -> Callable[[agent_rules.Agent], None]:
        def check(agent: agent_rules.Agent) -> None:
            if not may_see(agent.spec.sharing, agent.owner, principal):
                raise NotFound(f"agent {agent.id} not found", "AGENT_NOT_FOUND", id=agent.id)
            if not principal.is_admin and not principal.owns(agent.owner):
                raise PermissionDenied(
                    "only the agent's owner or an admin may change it", "NOT_OWNER", owner=agent.owner
                )

        return check

    async def CreateAgent(self, request: pb.CreateAgentRequest, context: grpc.aio.ServicerContext) -> AgentPb:
        principal = await self.auth.require_scope(context.invocation_metadata(), AGENTS_WRITE)
        if not request.HasField("agent"):
            raise invalid("agent", "is required")
        return await self._create(principal, agent_rules.validate_spec(spec_from_proto(request.agent)), "created")

    async def _create(self, principal: Principal, spec: agent_rules.AgentSpec, how: str) -> AgentPb:
        """Stores a validated agent for `principal` (CreateAgent, ImportAgentCard)."""
        try:
            agent = await self.store.create_agent(principal.id, spec)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"an agent with did {spec.did!r} already exists", "AGENT_DID_EXISTS", did=spec.did
            ) from None
        # Nothing cached holds the new agent, but cached search answers may now be missing it.
        await self.cache.invalidate(agent.id)
        log.info("agent %s", how, extra={"agent_id": agent.id, "owner": principal.id})
        return agent_to_proto(agent)

    async def GetAgent(self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext) -> AgentPb:
        if not request.id:
            raise invalid("id", "is required")
        entry = self.cache.agents.get(request.id)
        if entry is None:
            version = self.cache.version
            agent = await self.store.get_agent(request.id)
            if agent is None:
                raise NotFound(f"agent {request.id} not found", "AGENT_NOT_FOUND", id=request.id)
            proto = agent_to_proto(agent)
            self.cache.agents.put(agent.id, CachedAgent(proto, agent.spec.sharing, agent.owner), version)
            sharing, owner = agent.spec.sharing, agent.owner
        else:
            proto, sharing, owner = entry.agent, entry.sharing, entry.owner
        # A credential is only looked up when the answer depends on it: a private agent, or one with auth.
        if sharing == "private":
            viewer = _reader(await self.auth.principal(context.invocation_metadata()))
            if not may_see(sharing, owner, viewer):
                raise NotFound(f"agent {request.id} not found", "AGENT_NOT_FOUND", id=request.id)
            if proto.HasField("auth") and not may_see_auth(owner, viewer):
                return without_auth(proto)
        elif proto.HasField("auth"):
            try:
                viewer = await self.auth.principal(context.invocation_metadata())
            except Unauthenticated:
                viewer = None  # a public agent is answered whatever the credential; only `auth` depends on it
            if not may_see_auth(owner, viewer):
                return without_auth(proto)
        return proto

    async def ImportAgentCard(self, request: pb.ImportAgentCardRequest, context: grpc.aio.ServicerContext) -> AgentPb:
        principal = await self.auth.require_scope(context.invocation_metadata(), AGENTS_WRITE)
        if bool(request.card_url) == bool(request.card):
            raise invalid("card_url", "exactly one of card_url and card is required")
        sharing = word(SHARING, request.sharing, "sharing")
        if request.did:
            v = agent_rules.Violations()
            agent_rules.check_pattern(v, "did", request.did[:300], agent_rules.DID, "a DID like did:web:example.com:a")
            v.raise_if_any()
        if request.card_url:
            source, card = await self.card_importer.fetch(request.card_url)
        else:
            source, card = "", parse_card_text(request.card)
        spec = agent_rules.validate_spec(spec_from_card(card, source_url=source, did=request.did, sharing=sharing))
        return await self._create(principal, spec, "imported from a card")

    async def GetAgentCard(
        self, request: pb.GetAgentCardRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAgentCardResponse:
        # GetAgent decides who may see the agent: the card is readable exactly where the agent is.
        agent = await self.GetAgent(pb.GetAgentRequest(id=request.id), context)
        card = struct_pb2.Struct()
        card.update(card_of(agent))
        return pb.GetAgentCardResponse(card=card)

    async def CheckCompatibility(
        self, request: pb.CheckCompatibilityRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckCompatibilityResponse:
        # Checked before the agent is read: a malformed request is refused whoever may see the agent.
        parsed = check_request(request)
        agent = await self.GetAgent(pb.GetAgentRequest(id=request.agent_id), context)
        return compatibility(agent, request, parsed)

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        metadata = context.invocation_metadata()
        if caller_kind(metadata) is CallerKind.PEER:
            if self.peer_listing is None:
                raise Unauthenticated("federation tokens are not accepted by this registry", "FEDERATION_DISABLED")
            return await self.peer_listing.list(request, metadata)
        return await self.list_for_member(request, metadata)

    async def list_for_member(self, request: pb.ListAgentsRequest, metadata: Any) -> pb.ListAgentsResponse:
        """ListAgents for this mesh's own callers (anonymous, members, admins): every filter and paging apply, and
        what each may see is decided by its principal (the store's visibility rules), never by peers' rules."""
        viewer = _reader(await self.auth.principal(metadata))
        query = agent_rules.build_query(
            {
                **search_filters(request),
                "owner": request.owner,
                "sharing": word(SHARING, request.sharing, "sharing"),
                "has_health_check_url": request.has_health_check_url,
            }
        )
        size = pagination.page_size(request.page_size or request.limit)
        after = pagination.decode(request.page_token, query.fingerprint())
        agents, position = await self.store.list_agents(query, viewer, size, after)
        protos = [agent_to_proto(a) for a in agents]
        for proto, agent in zip(protos, agents, strict=True):
            if proto.HasField("auth") and not may_see_auth(agent.owner, viewer):
                proto.ClearField("auth")
        return pb.ListAgentsResponse(
            agents=protos,
            next_page_token=pagination.encode(position, query.fingerprint()) if position else "",
        )

    async def UpdateAgent(self, request: pb.UpdateAgentRequest, context: grpc.aio.ServicerContext) -> AgentPb:
        principal = await self.auth.require_scope(context.invocation_metadata(), AGENTS_WRITE)
        if not request.HasField("agent") or not request.agent.id:
            raise invalid("agent.id", "is required")
        paths = agent_rules.validate_update_mask(list(request.update_mask.paths))
        incoming = spec_from_proto(request.agent)

        def apply(current: agent_rules.AgentSpec) -> agent_rules.AgentSpec:
            return agent_rules.validate_spec(current.merged(incoming, paths))

        try:
            agent = await self.store.update_agent(request.agent.id, self._authorize_owner(principal), apply)
            await self.cache.invalidate(agent.id)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"an agent with did {request.agent.did!r} already exists", "AGENT_DID_EXISTS", did=request.agent.did
            ) from None
        return agent_to_proto(agent)

    async def DeleteAgent(self, request: pb.DeleteAgentRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        principal = await self.auth.require_scope(context.invocation_metadata(), AGENTS_WRITE)
        if not request.id:
            raise invalid("id", "is required")
        await self.store.delete_agent(request.id, self._authorize_owner(principal))
        await self.cache.invalidate(request.id)
        log.info("agent deleted", extra={"agent_id": request.id, "by": principal.id})
        return empty_pb2.Empty()

    async def GetHealth(self, request: pb.GetHealthRequest, context: grpc.aio.ServicerContext) -> pb.GetHealthResponse:
        metadata = context.invocation_metadata()
        # A peer presenting its federation token is counted what is shared with it. Its token is not checked:
        # federated agents are a subset of what an anonymous caller is counted, so a forged one gains nothing.
        kind = caller_kind(metadata)
        viewer = PEER_VIEWER if kind is CallerKind.PEER else await self.auth.principal(metadata)
        try:
            count = await self.store.count_agents(viewer)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("health: database check failed: %s", exc)
            raise store_unavailable("postgres") from None
        try:
            # Bounded: a hung Redis must not hang the health check behind its socket timeout and retries.
            async with asyncio.timeout(HEALTH_REDIS_TIMEOUT):
                await self._ping_redis()
        except Exception as exc:  # any Redis failure: writes and peers' calls fail without it
            log.warning("health: redis check failed: %s", exc)
            raise store_unavailable("redis") from None
        return pb.GetHealthResponse(status=pb.HEALTH_STATUS_HEALTHY, agent_count=count)

    async def ReportAgentHealth(
        self, request: pb.ReportAgentHealthRequest, context: grpc.aio.ServicerContext
    ) -> AgentPb:
        await self.auth.require_scope(context.invocation_metadata(), HEALTH_REPORT)
        if not request.id:
            raise invalid("id", "is required")
        status = word(HEALTH, request.health_status, "health_status", required=True)
        agent = await self.store.set_agent_health(request.id, status)
        if agent is None:
            raise NotFound(f"agent {request.id} not found", "AGENT_NOT_FOUND", id=request.id)
        await self.cache.invalidate(agent.id)
        return agent_to_proto(agent)

    async def ResolveAgentAuth(
        self, request: pb.ResolveAgentAuthRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolvedAgentAuth:
        # What the services that call agents need (the health monitor, later messaging), with their own identities:
        # the configuration and the secret still encrypted, as ResolvePeers hands out peers' keys.
        await self.auth.require_scope(context.invocation_metadata(), AGENTS_CONNECT)
        if not request.agent_id:
            raise invalid("agent_id", "is required")
        found = await self.store.get_agent_auth(request.agent_id)
        if found is None:
            raise NotFound(f"agent {request.agent_id} not found", "AGENT_NOT_FOUND", id=request.agent_id)
        agent, secret = found
        return pb.ResolvedAgentAuth(
            auth=auth_to_proto(agent.spec.auth),
            encrypted_secret=secret or "",
            update_time=to_timestamp(agent.updated_at),
        )

    async def ListMcpServers(
        self, request: pb.ListMcpServersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMcpServersResponse:
        await self.auth.require_scope(context.invocation_metadata(), TOOLS_SYNC)
        return await mcp_tools.list_servers(self.store, request)

    async def SyncMcpTools(self, request: pb.SyncMcpToolsRequest, context: grpc.aio.ServicerContext) -> AgentPb:
        # The catalog worker's one write: the agent's MCP-sourced tools, nothing else of it (least privilege).
        await self.auth.require_scope(context.invocation_metadata(), TOOLS_SYNC)
        if not request.agent_id:
            raise invalid("agent_id", "is required")
        tools = mcp_tools.tools_from_proto(request)
        agent = await self.store.update_agent(
            request.agent_id, lambda _: None, lambda current: mcp_tools.merge_tools(current, tools)
        )
        await self.cache.invalidate(agent.id)
        return agent_to_proto(agent)

    async def GetCaller(self, request: pb.GetCallerRequest, context: grpc.aio.ServicerContext) -> pb.Caller:
        if caller_kind(context.invocation_metadata()) is CallerKind.PEER and self.peer_listing is not None:
            # A peer's federation token (the peer-facing services of messaging resolve it so).
            cred = await self.peer_listing.gate.peer_of(context.invocation_metadata())
            return pb.Caller(name=cred.name, is_peer=True, principal_id=cred.id, kind="peer")
        principal = await self.auth.principal(context.invocation_metadata())
        if principal is None:
            return pb.Caller()
        # An access token has no role; one with the admin scope answers as an admin, so older readers of `role`
        # (services resolving callers) decide as before.
        role = principal.role.value if principal.role is not None else ("admin" if principal.is_admin else "member")
        return pb.Caller(
            name=principal.name,
            role=number(ROLE, role),
            is_peer=principal.is_peer,
            principal_id=principal.id,
            kind=principal.kind.value,
            scopes=sorted(principal.scopes),
            client_id=principal.client_id,
            agent_id=principal.agent_id,
        )

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateApiKeyResponse:
        admin = await self.auth.require_admin(context.invocation_metadata())
        violations = agent_rules.Violations()
        if not request.name:
            violations.add("name", "is required")
        else:
            agent_rules.check_pattern(
                violations, "name", request.name, agent_rules.PRINCIPAL_NAME, "1-128 letters, digits and ._@-"
            )
        if request.role and not ROLE.word(request.role):
            violations.add("role", f"unknown value {request.role}")
        if request.principal_id and request.principal_id == BOOTSTRAP_PRINCIPAL_ID:
            violations.add("principal_id", "is the bootstrap admin's, which no API key may act as")
        elif request.principal_id and not PRINCIPAL_ID.fullmatch(request.principal_id):
            violations.add("principal_id", f"must be a principal id ({PRINCIPAL_ID_PREFIX} and 32 hex digits)")
        violations.raise_if_any()
        role = ROLE.word(request.role) or "member"
        key_id, secret, token = new_token()
        key = await self.store.insert_key(
            key_id,
            request.name,
            role,
            hash_secret(secret),
            admin.id,
            request.principal_id or new_principal_id(),
            new=not request.principal_id,
        )
        log.info("api key issued", extra={"key_id": key.id, "key_name": key.name, "role": role, "by": admin.name})
        return pb.CreateApiKeyResponse(api_key=key_to_proto(key), token=token)

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListApiKeysResponse:
        await self.auth.require_admin(context.invocation_metadata())
        size = pagination.page_size(request.page_size)
        keys, position = await self.store.list_keys(size, pagination.decode(request.page_token, "api_keys"))
        return pb.ListApiKeysResponse(
            api_keys=[key_to_proto(k) for k in keys],
            next_page_token=pagination.encode(position, "api_keys") if position else "",
        )

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: grpc.aio.ServicerContext) -> pb.ApiKey:
        admin = await self.auth.require_admin(context.invocation_metadata())
        if not request.id or len(request.id) > 32:
            raise invalid("id", "is required (at most 32 characters)")
        key = await self.store.revoke_key(request.id)
        if key is None:
            raise NotFound(f"api key {request.id} not found", "API_KEY_NOT_FOUND", id=request.id)
        log.info("api key revoked", extra={"key_id": key.id, "by": admin.name})
        return key_to_proto(key)
