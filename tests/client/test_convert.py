"""Enum words and the REST JSON shape, without a server."""

from __future__ import annotations

import pytest

from agentvault.client import build_agent, enum_number, from_dict, parse_capability, parse_endpoint, to_dict
from agentvault.registry.v1 import registry_service_pb2 as pb

# Capability fields added by issue 11 (schemas, permissions, A2A skill details): printed, like every field, when unset.
UNSET_CAPABILITY_FIELDS = {
    "input_schema": "", "output_schema": "", "permissions": [], "title": "", "tags": [], "input_modes": [],
    "output_modes": [],
}  # fmt: skip


def test_build_agent_takes_enum_words() -> None:
    agent = build_agent(
        did="did:web:example.com:a",
        name="A",
        version="1.0.0",
        capabilities=[{"kind": "skill", "name": "summarize"}, pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name="t")],
        endpoints=[{"protocol": "http", "url": "https://a.example"}],
        sharing="federated",
    )
    assert agent.capabilities[0].kind == pb.CAPABILITY_KIND_SKILL
    assert agent.capabilities[1].kind == pb.CAPABILITY_KIND_TOOL
    assert agent.endpoints[0].protocol == pb.PROTOCOL_HTTP
    assert agent.sharing == pb.SHARING_FEDERATED


def test_bad_words_name_the_field_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"capabilities\[1\]\.kind: must be one of tool, skill, model; got 'skil'"):
        build_agent(capabilities=[{"kind": "tool", "name": "a"}, {"kind": "skil", "name": "b"}])
    with pytest.raises(ValueError, match="sharing: must be one of private, local, federated"):
        build_agent(sharing="public")
    with pytest.raises(ValueError, match="unspecified"):
        enum_number(pb.Sharing.DESCRIPTOR, "unspecified", "sharing")  # "not set" is not a choice


def test_to_dict_is_the_rest_shape_and_from_dict_reads_it_back() -> None:
    agent = pb.Agent(
        did="did:web:example.com:a",
        capabilities=[pb.Capability(kind=pb.CAPABILITY_KIND_MODEL, name="m", version="1.0.0")],
        endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_A2A, url="https://a.example")],
        sharing=pb.SHARING_PRIVATE,
        health_status=pb.HEALTH_STATUS_DEGRADED,
    )
    data = to_dict(agent)
    assert data["capabilities"] == [
        {"kind": "model", "name": "m", "version": "1.0.0", "description": "", **UNSET_CAPABILITY_FIELDS}
    ]
    assert data["endpoints"] == [{"protocol": "a2a", "url": "https://a.example"}]
    assert (data["sharing"], data["health_status"]) == ("private", "degraded")
    assert data["agent_type"] == "" and data["tags"] == [], "fields without presence are printed too"
    assert from_dict(data, pb.Agent) == agent
    assert to_dict(pb.GetHealthResponse(agent_count=3))["agent_count"] == 3


def test_from_dict_accepts_value_names_and_camel_case() -> None:
    agent = from_dict({"healthCheckUrl": "https://a.example/h", "sharing": "SHARING_LOCAL"}, pb.Agent)
    assert agent.health_check_url == "https://a.example/h"
    assert agent.sharing == pb.SHARING_LOCAL
    with pytest.raises(ValueError, match="nmae"):
        from_dict({"nmae": "x"}, pb.Agent)
    with pytest.raises(ValueError, match="expected a JSON object"):
        from_dict([1], pb.Agent)  # type: ignore[arg-type]


def test_command_line_shorthands() -> None:
    assert parse_capability("skill:ns/summarize:v2@1.2.0-rc.1") == pb.Capability(
        kind=pb.CAPABILITY_KIND_SKILL, name="ns/summarize:v2", version="1.2.0-rc.1"
    )
    assert parse_capability("tool:grep") == pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name="grep")
    assert parse_endpoint("mcp=https://a.example/mcp?x=1") == pb.Endpoint(
        protocol=pb.PROTOCOL_MCP, url="https://a.example/mcp?x=1"
    )
    for bad in ("summarize", ":x", "skill:"):
        with pytest.raises(ValueError, match="expected kind:name"):
            parse_capability(bad)
    with pytest.raises(ValueError, match="expected protocol=url"):
        parse_endpoint("https://a.example")
