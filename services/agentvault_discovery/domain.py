"""Agents as discovery handles them: peers' answers parsed leniently, validated strictly, filtered like local ones."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from agentvault.common import agents, versions
from agentvault.common.enums import EnumWords, enum_words
from agentvault.common.errors import InvalidArgument
from agentvault.registry.v1 import registry_service_pb2 as pb

MAX_AGENT_ID = 128
# Timestamp.FromJsonString and protobuf accept years 1..9999; anything else a peer sends is dropped.
_MAX_SECONDS = 253_402_300_799

KIND_WORDS = enum_words(pb.CapabilityKind.DESCRIPTOR)
PROTOCOL_WORDS = enum_words(pb.Protocol.DESCRIPTOR)
HEALTH_WORDS = enum_words(pb.HealthStatus.DESCRIPTOR)


def _lenient(value: Any, words: EnumWords) -> int:
    """`tool`, `TOOL`, `CAPABILITY_KIND_TOOL` or the number; 0 (not set) for anything else, so one unknown word
    does not make a peer's whole answer unreadable: `sanitize` then decides about the agent."""
    return words.number(value) or 0


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _dicts(value: Any, limit: int) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    # One past the limit, so validation still reports "too many" without copying more.
    return [v for v in value[: limit + 1] if isinstance(v, dict)]


def agent_from_json(raw: Any) -> pb.Agent | None:
    """Builds an Agent from a REST peer's JSON (snake_case, lowercase enum words); None when it is not an object.

    Only the shape is converted here; `sanitize` decides whether the values are acceptable.
    """
    if not isinstance(raw, dict):
        return None
    agent = pb.Agent(
        did=_text(raw.get("did")),
        name=_text(raw.get("name")),
        description=_text(raw.get("description")),
        version=_text(raw.get("version")),
        agent_type=_text(raw.get("agent_type")),
        health_status=_lenient(raw.get("health_status"), HEALTH_WORDS),  # type: ignore[arg-type]
    )
    raw_id = raw.get("id")
    if isinstance(raw_id, str | int) and not isinstance(raw_id, bool):
        agent.id = str(raw_id)
    for cap in _dicts(raw.get("capabilities"), agents.MAX_CAPABILITIES):
        agent.capabilities.add(
            kind=_lenient(cap.get("kind"), KIND_WORDS),
            name=_text(cap.get("name")),
            version=_text(cap.get("version")),
            description=_text(cap.get("description")),
        )
    for ep in _dicts(raw.get("endpoints"), agents.MAX_ENDPOINTS):
        agent.endpoints.add(
            protocol=_lenient(ep.get("protocol"), PROTOCOL_WORDS),
            url=_text(ep.get("url")),
        )
    tags = raw.get("tags")
    if isinstance(tags, list):
        agent.tags.extend(t if isinstance(t, str) else "" for t in tags[: agents.MAX_TAGS + 1])
    updated = raw.get("update_time", raw.get("updated_at"))
    if isinstance(updated, str) and len(updated) <= 64:
        try:
            agent.update_time.FromJsonString(updated)
        except ValueError:
            agent.ClearField("update_time")
    return agent


def sanitize(agent: pb.Agent) -> pb.Agent | None:
    """The agent rebuilt from its shareable fields when every one passes the registry's own rules, else None.

    Peers are untrusted: what they send must be as valid as what a local user may register, and nothing but the
    fields discovery returns is kept (no owner, no sharing level, no health-check URL).
    """
    violations = 0
    capabilities = []
    for cap in agent.capabilities[: agents.MAX_CAPABILITIES + 1]:
        kind = KIND_WORDS.word(cap.kind)
        violations += not kind
        # Every field the answer keeps is checked, the JSON Schemas and A2A skill fields included.
        capabilities.append(
            agents.Capability(
                kind,
                cap.name,
                cap.version,
                cap.description,
                input_schema=cap.input_schema,
                output_schema=cap.output_schema,
                permissions=tuple(cap.permissions[: agents.MAX_PERMISSIONS + 1]),
                title=cap.title,
                tags=tuple(cap.tags[: agents.MAX_CAPABILITY_TAGS + 1]),
                input_modes=tuple(cap.input_modes[: agents.MAX_MODES + 1]),
                output_modes=tuple(cap.output_modes[: agents.MAX_MODES + 1]),
            )
        )
    endpoints = []
    for ep in agent.endpoints[: agents.MAX_ENDPOINTS + 1]:
        protocol = PROTOCOL_WORDS.word(ep.protocol)
        violations += not protocol
        endpoints.append(agents.Endpoint(protocol, ep.url))
    if violations:
        return None
    spec = agents.AgentSpec(
        did=agent.did,
        name=agent.name,
        description=agent.description,
        version=agent.version,
        agent_type=agent.agent_type,
        capabilities=tuple(capabilities),
        endpoints=tuple(endpoints),
        tags=tuple(agent.tags[: agents.MAX_TAGS + 1]),
    )
    try:
        spec = agents.validate_spec(spec, prefix="agent")
    except InvalidArgument:
        return None
    clean = pb.Agent(
        id=agent.id if _valid_id(agent.id) else "",
        did=spec.did,
        name=spec.name,
        description=spec.description,
        version=spec.version,
        agent_type=spec.agent_type,
        capabilities=list(agent.capabilities),
        endpoints=list(agent.endpoints),
        tags=spec.tags,
        health_status=agent.health_status if agent.health_status in HEALTH_WORDS.to_word else 0,  # type: ignore[arg-type]
    )
    if agent.HasField("update_time") and 0 <= agent.update_time.seconds <= _MAX_SECONDS:
        clean.update_time.CopyFrom(agent.update_time)
    return clean


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= MAX_AGENT_ID and value.isascii() and value.isprintable() and " " not in value


@dataclass(frozen=True)
class PeerQuery:
    """The part of a discovery search that is sent to peers, and so the key of their cached answers."""

    search: str = ""
    agent_type: str = ""
    tag: str = ""
    capability_kind: int = 0
    capability_name: str = ""
    capability_version: str = ""
    limit: int = 50

    def cache_hash(self) -> str:
        """SHA-256 over every parameter that changes a peer's answer, the result limit included."""
        canonical = json.dumps(
            [
                "v1",
                self.search,
                self.agent_type,
                self.tag,
                self.capability_kind,
                self.capability_name,
                self.capability_version,
                self.limit,
            ],
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Filters:
    """Filters re-applied to peers' answers, since a peer may ignore or misapply them."""

    agent_type: str = ""
    tag: str = ""
    capability_kind: int = 0
    capability_name: str = ""
    capability_version: versions.Constraint | None = None
    healthy_only: bool = False

    def passes_all(self) -> bool:
        return self == Filters()

    def matches(self, agent: pb.Agent) -> bool:
        if self.agent_type and agent.agent_type != self.agent_type:
            return False
        if self.tag and self.tag not in agent.tags:
            return False
        if self.healthy_only and agent.health_status != pb.HEALTH_STATUS_HEALTHY:
            return False
        if self.capability_kind or self.capability_name:
            return any(self._capability_matches(c) for c in agent.capabilities)
        return True

    def _capability_matches(self, cap: pb.Capability) -> bool:
        if self.capability_kind and cap.kind != self.capability_kind:
            return False
        if self.capability_name and cap.name != self.capability_name:
            return False
        if self.capability_version is not None:
            # An unversioned capability satisfies no constraint, as in the registry's SQL.
            if not cap.version or not versions.is_semver(cap.version):
                return False
            return self.capability_version.matches(cap.version)
        return True
