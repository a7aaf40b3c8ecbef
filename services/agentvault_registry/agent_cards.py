"""A registered agent as an A2A 1.0 AgentCard, and the compatibility check of one of its capabilities."""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from typing import Any

from agentvault.common import agents as agent_rules
from agentvault.common import capability_schemas as schemas
from agentvault.common import versions
from agentvault.common.errors import InvalidArgument
from agentvault.common.settings import Env
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_registry.convert import KIND, PROTOCOL, word

A2A_PROTOCOL_VERSION = "1.0"
# The versions the mesh's own A2A endpoint speaks (the edge's /a2a/agents/{id}: 1.0, and 0.3's JSON-RPC methods).
MESH_A2A_VERSIONS = ("1.0", "0.3")
# The edge's path of that endpoint, under the mesh's public URL (the edge serves it: services do not import each
# other, so the path is spelled there too).
MESH_A2A_PATH = "/a2a/agents/{id}"
# How each endpoint protocol is spoken in A2A's terms (AgentInterface.protocol_binding); others are not listed.
BINDINGS = {"a2a": "JSONRPC", "grpc": "GRPC", "http": "HTTP+JSON"}
DEFAULT_MODES = ["application/json", "text/plain"]
VERSION_OUT_OF_RANGE = "VERSION_OUT_OF_RANGE"
CAPABILITY_NOT_FOUND = "CAPABILITY_NOT_FOUND"


@functools.cache
def mesh_url() -> str:
    """The mesh's public base URL (its edge): OAUTH_ISSUER, as the authorization server reads it."""
    return Env().str("OAUTH_ISSUER", "http://127.0.0.1:8080").rstrip("/")[:500]


def card_of(agent: pb.Agent, base_url: str | None = None) -> dict[str, Any]:
    """The agent's AgentCard (A2A 1.0 JSON: camelCase). Every capability is a skill, tagged with its kind.

    The interfaces are the agent's own endpoints, then the mesh's A2A endpoint for it (at `base_url`, the mesh's
    public URL by default): there a caller reaches the agent with the mesh's credentials, through its policies,
    whether the agent reads an inbox or has an endpoint of its own."""
    skills = []
    for cap in agent.capabilities:
        kind = KIND.word(cap.kind) or "skill"
        skill: dict[str, Any] = {
            "id": cap.name,
            "name": cap.title or cap.name,
            "description": cap.description or cap.title or cap.name,
            # A2A requires tags: a capability without its own is labelled with its kind.
            "tags": list(cap.tags) or [kind],
        }
        inputs = list(cap.input_modes) or (["application/json"] if cap.input_schema else [])
        outputs = list(cap.output_modes) or (["application/json"] if cap.output_schema else [])
        if inputs:
            skill["inputModes"] = inputs
        if outputs:
            skill["outputModes"] = outputs
        skills.append(skill)
    interfaces = [
        {"url": e.url, "protocolBinding": BINDINGS[word], "protocolVersion": A2A_PROTOCOL_VERSION}
        for e in agent.endpoints
        if (word := PROTOCOL.word(e.protocol)) in BINDINGS
    ]
    own = bool(interfaces)
    mesh_endpoint = (base_url or mesh_url()) + MESH_A2A_PATH.format(id=agent.id)
    interfaces += [
        {"url": mesh_endpoint, "protocolBinding": "JSONRPC", "protocolVersion": version}
        for version in MESH_A2A_VERSIONS
    ]
    legacy: dict[str, Any] = {}
    if interfaces:
        # What A2A 0.3 readers look for; 1.0 readers take supportedInterfaces.
        legacy = {"url": interfaces[0]["url"], "preferredTransport": interfaces[0]["protocolBinding"]}
    return {
        **legacy,
        "name": agent.name,
        "description": agent.description or agent.name,
        "version": agent.version,
        "supportedInterfaces": interfaces,
        # The mesh's endpoint streams; an agent's own endpoints may not, and the card has one capabilities field.
        "capabilities": {} if own else {"streaming": True},
        "defaultInputModes": DEFAULT_MODES,
        "defaultOutputModes": DEFAULT_MODES,
        "skills": skills,
    }


@dataclass(frozen=True)
class Needs:
    """What a CheckCompatibilityRequest asks, parsed."""

    kind: str
    constraint: versions.Constraint | None
    instance: Any
    expected: Any


def check_request(request: pb.CheckCompatibilityRequest) -> Needs:
    """The request parsed and bounded; every problem reported at once."""
    v = agent_rules.Violations()
    try:
        uuid.UUID(request.agent_id)
    except ValueError:
        v.add("agent_id", f"must be a UUID (got {request.agent_id[:80]!r})")
    kind = ""
    try:
        kind = word(KIND, request.kind, "kind", required=True)
    except InvalidArgument as exc:  # merged into the other violations
        v.items.extend(exc.violations)
    if not request.name:
        v.add("name", "is required")
    else:
        agent_rules.check_pattern(
            v, "name", request.name, agent_rules.CAPABILITY_NAME, "1-128 letters, digits and ._/:-"
        )
    constraint = None
    if request.version_constraint:
        try:
            constraint = versions.parse_constraint(request.version_constraint)
        except versions.ConstraintError as exc:
            v.add("version_constraint", f"invalid version constraint: {exc}")
    instance: Any = None
    if request.input:
        try:
            instance = schemas.parse_json(request.input, schemas.MAX_INPUT_BYTES)
        except ValueError as exc:
            v.add("input", str(exc))
    expected: Any = None
    if request.expected_output_schema:
        try:
            expected = schemas.load_schema(request.expected_output_schema)
        except ValueError as exc:
            v.add("expected_output_schema", str(exc))
    v.raise_if_any()
    return Needs(kind, constraint, instance, expected)


def compatibility(
    agent: pb.Agent, request: pb.CheckCompatibilityRequest, needs: Needs
) -> pb.CheckCompatibilityResponse:
    kind, constraint, instance, expected = needs.kind, needs.constraint, needs.instance, needs.expected
    cap = next((c for c in agent.capabilities if KIND.word(c.kind) == kind and c.name == request.name), None)
    if cap is None:
        reason = pb.CompatibilityReason(
            code=CAPABILITY_NOT_FOUND, message=f"agent {agent.id} advertises no {kind} {request.name!r}"
        )
        return pb.CheckCompatibilityResponse(compatible=False, reasons=[reason])
    reasons: list[pb.CompatibilityReason] = []
    if constraint is not None:
        if not cap.version:
            reasons.append(pb.CompatibilityReason(code=VERSION_OUT_OF_RANGE, message="the capability is unversioned"))
        elif not constraint.matches(cap.version):
            reasons.append(
                pb.CompatibilityReason(
                    code=VERSION_OUT_OF_RANGE,
                    message=f"version {cap.version} does not satisfy {constraint.text!r}",
                )
            )
    found: list[schemas.Reason] = []
    if request.input and cap.input_schema:
        # Stored schemas passed load_schema when written.
        found += schemas.input_reasons(schemas.load_schema(cap.input_schema), instance)
    if expected is not None:
        advertised = schemas.load_schema(cap.output_schema) if cap.output_schema else {}
        found += schemas.output_reasons(advertised, expected)
    reasons += [pb.CompatibilityReason(code=r.code, pointer=r.pointer, message=r.message) for r in found]
    return pb.CheckCompatibilityResponse(compatible=not reasons, reasons=reasons, version=cap.version)
