"""RegistryService over gRPC: converts protobuf to domain objects and back, and nothing else."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
import grpc
from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor

from agentvault.common import agents as agent_rules
from agentvault.common import pagination
from agentvault.common.auth import Principal, Role
from agentvault.common.errors import AlreadyExists, NotFound, PermissionDenied, invalid, store_unavailable
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from agentvault.registry.v1.registry_service_pb2 import Agent as AgentPb
from agentvault_registry import domain
from agentvault_registry.auth import (
    BOOTSTRAP_PRINCIPAL_ID,
    PRINCIPAL_ID_PREFIX,
    Authenticator,
    hash_secret,
    new_principal_id,
    new_token,
)
from agentvault_registry.cache import AgentCache
from agentvault_registry.store import Store

log = logging.getLogger(__name__)


class EnumWords:
    """Maps a proto enum to the lowercase words the domain and the JSON API use (SHARING_LOCAL <-> local)."""

    def __init__(self, descriptor: EnumDescriptor, prefix: str) -> None:
        self.field = descriptor.name
        self.to_word = {v.number: v.name.removeprefix(prefix).lower() for v in descriptor.values if v.number}
        self.to_number = {w: n for n, w in self.to_word.items()}

    def word(self, number: int, path: str, *, required: bool = False) -> str:
        if number == 0:
            if required:
                raise invalid(path, "is required")
            return ""
        word = self.to_word.get(number)
        if word is None:
            raise invalid(path, f"unknown value {number}")
        return word

    def number(self, word: str) -> Any:
        # Any: the generated stubs type each enum's values as its own ValueType.
        return self.to_number.get(word, 0)


SHARING = EnumWords(pb.Sharing.DESCRIPTOR, "SHARING_")
KIND = EnumWords(pb.CapabilityKind.DESCRIPTOR, "CAPABILITY_KIND_")
PROTOCOL = EnumWords(pb.Protocol.DESCRIPTOR, "PROTOCOL_")
HEALTH = EnumWords(pb.HealthStatus.DESCRIPTOR, "HEALTH_STATUS_")
ROLE = EnumWords(pb.Role.DESCRIPTOR, "ROLE_")


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    # Building the message directly is several times cheaper than Timestamp.FromDatetime.
    return timestamp_pb2.Timestamp(seconds=int(value.timestamp()), nanos=value.microsecond * 1000)


def spec_from_proto(agent: AgentPb, prefix: str = "agent") -> agent_rules.AgentSpec:
    """Converts shape only: enum numbers become words (unknown numbers are rejected); values are checked by
    agent_rules.validate_spec, so a partial update can be merged before it is validated."""
    violations = agent_rules.Violations()

    def word(enum: EnumWords, number: int, path: str) -> str:
        if number and number not in enum.to_word:
            violations.add(path, f"unknown value {number}")
        return enum.to_word.get(number, "")

    # Lists are cut one past their limit so validation can still say "too many" without copying megabytes.
    spec = agent_rules.AgentSpec(
        did=agent.did,
        name=agent.name,
        description=agent.description,
        version=agent.version,
        agent_type=agent.agent_type,
        capabilities=tuple(
            agent_rules.Capability(
                word(KIND, c.kind, f"{prefix}.capabilities[{i}].kind"), c.name, c.version, c.description
            )
            for i, c in enumerate(agent.capabilities[: agent_rules.MAX_CAPABILITIES + 1])
        ),
        endpoints=tuple(
            agent_rules.Endpoint(word(PROTOCOL, e.protocol, f"{prefix}.endpoints[{i}].protocol"), e.url)
            for i, e in enumerate(agent.endpoints[: agent_rules.MAX_ENDPOINTS + 1])
        ),
        tags=tuple(agent.tags[: agent_rules.MAX_TAGS + 1]),
        sharing=word(SHARING, agent.sharing, f"{prefix}.sharing"),
        health_check_url=agent.health_check_url,
    )
    violations.raise_if_any()
    return spec


def agent_to_proto(agent: agent_rules.Agent) -> AgentPb:
    s = agent.spec
    return AgentPb(
        id=agent.id,
        did=s.did,
        name=s.name,
        description=s.description,
        version=s.version,
        agent_type=s.agent_type,
        capabilities=[
            pb.Capability(kind=KIND.number(c.kind), name=c.name, version=c.version, description=c.description)
            for c in s.capabilities
        ],
        endpoints=[pb.Endpoint(protocol=PROTOCOL.number(e.protocol), url=e.url) for e in s.endpoints],
        tags=s.tags,
        owner=agent.owner,
        sharing=SHARING.number(s.sharing),
        health_check_url=s.health_check_url,
        health_status=HEALTH.number(agent.health_status),
        create_time=to_timestamp(agent.created_at),
        update_time=to_timestamp(agent.updated_at),
    )


def key_to_proto(key: domain.ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        id=key.id,
        name=key.name,
        role=ROLE.number(key.role),
        create_time=to_timestamp(key.created_at),
        revoke_time=to_timestamp(key.revoked_at),
        principal_id=key.principal_id,
    )


LIST_METHOD = "/agentvault.registry.v1.RegistryService/ListAgents"
HEALTH_REDIS_TIMEOUT = 2.0
PRINCIPAL_ID = re.compile(rf"{PRINCIPAL_ID_PREFIX}[0-9a-f]{{32}}")
# Who a federation token is counted as by GetHealth: a peer sees shared agents only.
PEER_VIEWER = Principal("peer", Role.MEMBER, "", is_peer=True, id="peer:")


def search_filters(request: Any) -> dict[str, Any]:
    """The filters ListAgents and the federation search share, from either request message."""
    return {
        "search": request.search,
        "agent_type": request.agent_type,
        "tag": request.tag,
        "capability_kind": KIND.word(request.capability_kind, "capability_kind"),
        "capability_name": request.capability_name,
        "capability_version": request.capability_version,
    }


def _carries_federation_token(metadata: Any) -> bool:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            return value.strip()[7:].lstrip().startswith("avf_")
    return False


def may_see(sharing: str, owner: str, viewer: Principal | None) -> bool:
    """Private agents are visible to their owner (by principal id) and admins only; the rest to every caller."""
    return sharing != "private" or (viewer is not None and (viewer.is_admin or viewer.owns(owner)))


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(
        self,
        store: Store,
        auth: Authenticator,
        ping_redis: Callable[[], Awaitable[Any]],
        cache: AgentCache,
        federation: Any = None,
    ) -> None:
        self.store = store
        self.auth = auth
        self.cache = cache
        self._ping_redis = ping_redis
        # The FederationServicer, which answers the seed's HTTP form: ListAgents called with a peer's token.
        self.federation = federation

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
        principal = await self.auth.require(context.invocation_metadata())
        if not request.HasField("agent"):
            raise invalid("agent", "is required")
        spec = agent_rules.validate_spec(spec_from_proto(request.agent))
        try:
            agent = await self.store.create_agent(principal.id, spec)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"an agent with did {spec.did!r} already exists", "AGENT_DID_EXISTS", did=spec.did
            ) from None
        # Nothing cached holds the new agent, but cached search answers may now be missing it.
        await self.cache.invalidate(agent.id)
        log.info("agent created", extra={"agent_id": agent.id, "owner": principal.id})
        return agent_to_proto(agent)

    async def GetAgent(self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext) -> AgentPb:
        if not request.id:
            raise invalid("id", "is required")
        entry = self.cache.get(request.id)
        if entry is None:
            version = self.cache.version
            agent = await self.store.get_agent(request.id)
            if agent is None:
                raise NotFound(f"agent {request.id} not found", "AGENT_NOT_FOUND", id=request.id)
            proto = agent_to_proto(agent)
            self.cache.put(agent.id, proto, agent.spec.sharing, agent.owner, version)
            sharing, owner = agent.spec.sharing, agent.owner
        else:
            proto, sharing, owner = entry.agent, entry.sharing, entry.owner
        # A credential is only looked up when the answer depends on it: a private agent.
        if sharing == "private":
            viewer = await self.auth.principal(context.invocation_metadata())
            if not may_see(sharing, owner, viewer):
                raise NotFound(f"agent {request.id} not found", "AGENT_NOT_FOUND", id=request.id)
        return proto

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        metadata = context.invocation_metadata()
        if self.federation is not None and _carries_federation_token(metadata):
            return await self._list_for_peer(request, metadata)
        viewer = await self.auth.principal(metadata)
        query = agent_rules.build_query(
            {
                **search_filters(request),
                "owner": request.owner,
                "sharing": SHARING.word(request.sharing, "sharing"),
                "has_health_check_url": request.has_health_check_url,
            }
        )
        size = pagination.page_size(request.page_size or request.limit)
        after = pagination.decode(request.page_token, query.fingerprint())
        agents, position = await self.store.list_agents(query, viewer, size, after)
        return pb.ListAgentsResponse(
            agents=[agent_to_proto(a) for a in agents],
            next_page_token=pagination.encode(position, query.fingerprint()) if position else "",
        )

    async def _list_for_peer(self, request: pb.ListAgentsRequest, metadata: Any) -> pb.ListAgentsResponse:
        cred, registry = await self.federation.gate.admit(metadata, LIST_METHOD, request)
        answer = await self.federation.search_shared(
            search_filters(request), request.page_size or request.limit, cred, registry, "ListAgents"
        )
        return answer.list_reply()

    async def UpdateAgent(self, request: pb.UpdateAgentRequest, context: grpc.aio.ServicerContext) -> AgentPb:
        principal = await self.auth.require(context.invocation_metadata())
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
        principal = await self.auth.require(context.invocation_metadata())
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
        viewer = PEER_VIEWER if _carries_federation_token(metadata) else await self.auth.principal(metadata)
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
        await self.auth.require_admin(context.invocation_metadata())
        if not request.id:
            raise invalid("id", "is required")
        status = HEALTH.word(request.health_status, "health_status", required=True)
        agent = await self.store.set_agent_health(request.id, status)
        if agent is None:
            raise NotFound(f"agent {request.id} not found", "AGENT_NOT_FOUND", id=request.id)
        await self.cache.invalidate(agent.id)
        return agent_to_proto(agent)

    async def GetCaller(self, request: pb.GetCallerRequest, context: grpc.aio.ServicerContext) -> pb.Caller:
        principal = await self.auth.principal(context.invocation_metadata())
        if principal is None:
            return pb.Caller()
        return pb.Caller(
            name=principal.name,
            role=ROLE.number(principal.role.value),
            is_peer=principal.is_peer,
            principal_id=principal.id,
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
        if request.role and request.role not in ROLE.to_word:
            violations.add("role", f"unknown value {request.role}")
        if request.principal_id and request.principal_id == BOOTSTRAP_PRINCIPAL_ID:
            violations.add("principal_id", "is the bootstrap admin's, which no API key may act as")
        elif request.principal_id and not PRINCIPAL_ID.fullmatch(request.principal_id):
            violations.add("principal_id", f"must be a principal id ({PRINCIPAL_ID_PREFIX} and 32 hex digits)")
        violations.raise_if_any()
        role = ROLE.to_word.get(request.role, "member")
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
