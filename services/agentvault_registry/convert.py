"""Conversions between the registry's protobuf messages and its domain records, both ways."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2

from agentvault.common import agents as agent_rules
from agentvault.common.enums import EnumWords, enum_words
from agentvault.common.errors import invalid
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1.registry_service_pb2 import Agent as AgentPb
from agentvault_registry import domain
from agentvault_registry.federation_store import CredentialRecord, PeerRecord

SHARING = enum_words(pb.Sharing.DESCRIPTOR)
KIND = enum_words(pb.CapabilityKind.DESCRIPTOR)
PROTOCOL = enum_words(pb.Protocol.DESCRIPTOR)
HEALTH = enum_words(pb.HealthStatus.DESCRIPTOR)
ROLE = enum_words(pb.Role.DESCRIPTOR)
AUTH_KIND = enum_words(pb.AgentAuthKind.DESCRIPTOR)
PEER_STATUS = enum_words(fpb.PeerStatus.DESCRIPTOR)
# A peer's protocol as stored: the enum's words, except that "not set" is stored as "auto" (probe the peer).
PEER_PROTOCOL: dict[int, str] = {
    n: w if n else "auto" for n, w in enum_words(fpb.PeerProtocol.DESCRIPTOR).to_word.items()
}
PROTOCOL_NUMBER: dict[str, fpb.PeerProtocol.ValueType] = {
    w: fpb.PeerProtocol.ValueType(n) for n, w in PEER_PROTOCOL.items()
}
# An agent parsed in memory costs about 1.2 times its serialized size (measured with upb); 2 leaves headroom.
MEMORY_PER_WIRE_BYTE = 2


def word(enum: EnumWords, number: int, path: str, *, required: bool = False) -> str:
    """The domain word of a request's enum field: "" when unset (or "is required"); unknown numbers are refused."""
    if number == 0:
        if required:
            raise invalid(path, "is required")
        return ""
    found = enum.word(number)
    if not found:
        raise invalid(path, f"unknown value {number}")
    return found


def number(enum: EnumWords, domain_word: str) -> Any:
    """The enum number of a stored word (0 for "" or a word this build does not know). Any: the generated stubs
    type each enum's values as its own ValueType. Stored words are already lowercase: a plain lookup (this runs
    for every enum of every agent answered)."""
    return enum.from_text.get(domain_word, 0)


def to_timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    # Building the message directly is several times cheaper than Timestamp.FromDatetime.
    return timestamp_pb2.Timestamp(seconds=int(value.timestamp()), nanos=value.microsecond * 1000)


def spec_from_proto(agent: AgentPb, prefix: str = "agent") -> agent_rules.AgentSpec:
    """Converts shape only: enum numbers become words (unknown numbers are rejected); values are checked by
    agent_rules.validate_spec, so a partial update can be merged before it is validated."""
    violations = agent_rules.Violations()

    def checked(enum: EnumWords, value: int, path: str) -> str:
        found = enum.word(value)
        if value and not found:
            violations.add(path, f"unknown value {value}")
        return found

    # Lists are cut one past their limit so validation can still say "too many" without copying megabytes.
    spec = agent_rules.AgentSpec(
        did=agent.did,
        name=agent.name,
        description=agent.description,
        version=agent.version,
        agent_type=agent.agent_type,
        capabilities=tuple(
            agent_rules.Capability(
                checked(KIND, c.kind, f"{prefix}.capabilities[{i}].kind"),
                c.name,
                c.version,
                c.description,
                c.input_schema,
                c.output_schema,
                tuple(c.permissions[: agent_rules.MAX_PERMISSIONS + 1]),
                c.title,
                tuple(c.tags[: agent_rules.MAX_CAPABILITY_TAGS + 1]),
                tuple(c.input_modes[: agent_rules.MAX_MODES + 1]),
                tuple(c.output_modes[: agent_rules.MAX_MODES + 1]),
            )
            for i, c in enumerate(agent.capabilities[: agent_rules.MAX_CAPABILITIES + 1])
        ),
        endpoints=tuple(
            agent_rules.Endpoint(checked(PROTOCOL, e.protocol, f"{prefix}.endpoints[{i}].protocol"), e.url)
            for i, e in enumerate(agent.endpoints[: agent_rules.MAX_ENDPOINTS + 1])
        ),
        tags=tuple(agent.tags[: agent_rules.MAX_TAGS + 1]),
        sharing=checked(SHARING, agent.sharing, f"{prefix}.sharing"),
        health_check_url=agent.health_check_url,
        auth=auth_from_proto(agent.auth, f"{prefix}.auth", violations)
        if agent.HasField("auth")
        else agent_rules.AgentAuth(),
    )
    violations.raise_if_any()
    return spec


def auth_from_proto(auth: pb.AgentAuth, path: str, violations: agent_rules.Violations) -> agent_rules.AgentAuth:
    """Shape only, like spec_from_proto; secret_set is output only and never read from a request."""
    kind = AUTH_KIND.word(auth.kind) if auth.kind else agent_rules.AUTH_NONE
    if not kind:
        violations.add(f"{path}.kind", f"unknown value {auth.kind}")
    return agent_rules.AgentAuth(
        kind=kind or agent_rules.AUTH_NONE,
        api_key_header=auth.api_key_header,
        token_url=auth.token_url,
        client_id=auth.client_id,
        scopes=tuple(auth.scopes[: agent_rules.MAX_AUTH_SCOPES + 1]),
        audience=auth.audience,
        token_endpoint_auth_method=auth.token_endpoint_auth_method,
        ca_pem=auth.ca_pem,
        api_key=auth.api_key,
        bearer_token=auth.bearer_token,
        client_secret=auth.client_secret,
    )


def auth_to_proto(auth: agent_rules.AgentAuth) -> pb.AgentAuth:
    """The configuration without any secret: only whether one is stored."""
    return pb.AgentAuth(
        kind=number(AUTH_KIND, auth.kind),
        api_key_header=auth.api_key_header,
        token_url=auth.token_url,
        client_id=auth.client_id,
        scopes=auth.scopes,
        audience=auth.audience,
        token_endpoint_auth_method=auth.token_endpoint_auth_method,
        ca_pem=auth.ca_pem,
        secret_set=auth.secret_set,
    )


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
            pb.Capability(
                kind=number(KIND, c.kind),
                name=c.name,
                version=c.version,
                description=c.description,
                input_schema=c.input_schema,
                output_schema=c.output_schema,
                permissions=c.permissions,
                title=c.title,
                tags=c.tags,
                input_modes=c.input_modes,
                output_modes=c.output_modes,
            )
            for c in s.capabilities
        ],
        endpoints=[pb.Endpoint(protocol=number(PROTOCOL, e.protocol), url=e.url) for e in s.endpoints],
        tags=s.tags,
        owner=agent.owner,
        sharing=number(SHARING, s.sharing),
        health_check_url=s.health_check_url,
        health_status=number(HEALTH, agent.health_status),
        create_time=to_timestamp(agent.created_at),
        update_time=to_timestamp(agent.updated_at),
        # Absent for none: agents without it read exactly as before.
        auth=auth_to_proto(s.auth) if s.auth.kind != agent_rules.AUTH_NONE else None,
    )


def shareable(agent: agent_rules.Agent) -> AgentPb:
    """What a peer may see of an agent: no owner identity, no internal health-check address, no auth."""
    proto = agent_to_proto(agent)
    proto.owner = ""
    proto.health_check_url = ""
    proto.ClearField("auth")
    return proto


def key_to_proto(key: domain.ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        id=key.id,
        name=key.name,
        role=number(ROLE, key.role),
        create_time=to_timestamp(key.created_at),
        revoke_time=to_timestamp(key.revoked_at),
        principal_id=key.principal_id,
    )


def search_filters(request: Any) -> dict[str, Any]:
    """The filters ListAgents and the federation search share, from either request message."""
    return {
        "search": request.search,
        "agent_type": request.agent_type,
        "tag": request.tag,
        "capability_kind": word(KIND, request.capability_kind, "capability_kind"),
        "capability_name": request.capability_name,
        "capability_version": request.capability_version,
    }


# The request fields a peer's HTTP-form search carries in its signed URL.
SIGNED_URL_FIELDS = ("search", "agent_type", "tag", "capability_name", "capability_version")


def peer_to_proto(peer: PeerRecord) -> fpb.Peer:
    return fpb.Peer(
        id=peer.id,
        name=peer.name,
        registry_url=peer.registry_url,
        is_active=peer.is_active,
        health_status=number(PEER_STATUS, peer.health_status),
        agent_count=peer.agent_count,
        last_sync=to_timestamp(peer.last_sync),
        last_health_check=to_timestamp(peer.last_health_check),
        protocol=PROTOCOL_NUMBER.get(peer.protocol, fpb.PEER_PROTOCOL_UNSPECIFIED),
        grpc_endpoint=peer.grpc_endpoint,
        require_mtls=peer.require_mtls,
        metadata=peer.metadata,
        create_time=to_timestamp(peer.created_at),
        update_time=to_timestamp(peer.updated_at),
        consecutive_failures=peer.consecutive_failures,
        is_down=peer.is_down,
    )


def credential_to_proto(cred: CredentialRecord) -> fpb.FederationCredential:
    return fpb.FederationCredential(
        id=cred.id,
        name=cred.name,
        create_time=to_timestamp(cred.created_at),
        revoke_time=to_timestamp(cred.revoked_at),
        last_used_time=to_timestamp(cred.last_used_at),
    )
