"""The edge's OpenAPI document: valid OpenAPI 3.1, one template per path, and the same rules as the validators."""

from __future__ import annotations

import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from agentvault.common import agents as rules
from agentvault.common import versions
from agentvault.common.errors import InvalidArgument
from agentvault_edge.openapi import INPUT_SUFFIX, build_openapi, normalized_path
from agentvault_edge.openapi_rules import AGENT_EXAMPLE, SPACES
from agentvault_edge.routes import build_routes, discover_services

AGENT = "agentvault.registry.v1.Agent"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_openapi(build_routes(discover_services()))


def _schema(doc: dict[str, Any], name: str) -> Any:
    return doc["components"]["schemas"][name]


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    # The document as the root, so that the schema's $refs to #/components/... resolve.
    return Draft202012Validator({**schema, "components": doc["components"]})


def test_the_document_is_valid_openapi(doc: dict[str, Any]) -> None:
    validate_openapi(doc)


def test_no_two_path_templates_are_one_path(doc: dict[str, Any]) -> None:
    normalized = [normalized_path(p) for p in doc["paths"]]
    assert len(normalized) == len(set(normalized)), sorted(normalized)
    # GET/DELETE bind {id}, PATCH/PUT {agent.id}: one path, one name.
    assert set(doc["paths"]["/api/v1/agents/{id}"]) == {"get", "delete", "patch", "put"}
    assert set(doc["paths"]["/api/v1/federation/peers/{peer_id}"]) == {"get", "delete", "patch", "put"}
    patch = doc["paths"]["/api/v1/agents/{id}"]["patch"]["parameters"][0]
    assert patch["name"] == "id" and "agent.id" in patch["description"]


def test_constraints_are_the_validators_own(doc: dict[str, Any]) -> None:
    agent = _schema(doc, AGENT + INPUT_SUFFIX)["properties"]
    assert agent["name"]["maxLength"] == rules.MAX_NAME
    assert agent["did"]["maxLength"] == rules.MAX_DID
    assert rules.DID.pattern[1:-1] in agent["did"]["pattern"]
    assert agent["version"]["maxLength"] == rules.MAX_VERSION
    assert versions.SEMVER.pattern[1:-1] in agent["version"]["pattern"]
    assert agent["tags"]["anyOf"][0]["maxItems"] == rules.MAX_TAGS
    assert agent["capabilities"]["anyOf"][0]["maxItems"] == rules.MAX_CAPABILITIES
    assert agent["endpoints"]["anyOf"][0]["maxItems"] == rules.MAX_ENDPOINTS
    assert set(_schema(doc, AGENT + INPUT_SUFFIX)["required"]) == {"did", "name", "version"}
    get = doc["paths"]["/api/v1/agents/{id}"]["get"]["parameters"][0]["schema"]
    assert get == {"type": "string", "format": "uuid"}
    listing = {p["name"]: p["schema"] for p in doc["paths"]["/api/v1/agents"]["get"]["parameters"]}
    assert listing["page_size"]["minimum"] == 0
    assert listing["search"]["maxLength"] == rules.MAX_SEARCH


def test_responses_are_exact_and_requests_may_send_null(doc: dict[str, Any]) -> None:
    # proto3 JSON reads null as "unset" in a request; a response never prints null for a plain field.
    count = _schema(doc, "agentvault.registry.v1.GetHealthResponse")["properties"]["agent_count"]
    assert {k: v for k, v in count.items() if k != "description"} == {"type": "integer", "format": "int64"}
    described = _schema(doc, AGENT + INPUT_SUFFIX)["properties"]["description"]
    assert {"type": "null"} in described["anyOf"]
    assert "anyOf" not in _schema(doc, AGENT + INPUT_SUFFIX)["properties"]["name"]  # required: null is refused


def test_descriptions_are_the_proto_comments(doc: dict[str, Any]) -> None:
    agent = _schema(doc, AGENT)
    assert agent["description"].startswith("Agent is a registered AI agent.")
    assert agent["properties"]["name"]["description"] == "Display name, 1-200 characters."
    # An enum field also says what each word means, from the values' comments.
    sharing = agent["properties"]["sharing"]["description"]
    assert sharing.startswith("Who may see the agent.") and "private: Visible only to its owner" in sharing
    revoke = doc["paths"]["/api/v1/api-keys/{id}:revoke"]["post"]
    assert revoke["description"].startswith("RevokeApiKey revokes a credential at once.")
    assert revoke["parameters"][0]["description"] == "The key id."


def test_a_revoke_needs_no_body(doc: dict[str, Any]) -> None:
    # RevokeApiKeyRequest's only field comes from the path: an empty body is a complete request.
    body = doc["paths"]["/api/v1/api-keys/{id}:revoke"]["post"]["requestBody"]
    assert body["required"] is False
    schema = body["content"]["application/json"]["schema"]
    assert _validator(doc, schema).is_valid({}) and _validator(doc, schema).is_valid(None)
    assert not _validator(doc, schema).is_valid({"id": "x"})  # the path sets it
    # A create needs its agent.
    assert doc["paths"]["/api/v1/agents"]["post"]["requestBody"]["required"] is True


def test_the_example_agent_is_valid_by_both(doc: dict[str, Any]) -> None:
    validator = _validator(doc, {"$ref": f"#/components/schemas/{AGENT}{INPUT_SUFFIX}"})
    assert list(validator.iter_errors(AGENT_EXAMPLE)) == []
    rules.validate_spec(_spec(AGENT_EXAMPLE))


def test_spaces_are_what_strip_removes() -> None:
    control = re.compile(f"[{rules.CONTROL_CHARS}]")
    spaces = re.compile(f"[{SPACES}]")
    for code in range(0x110000):
        ch = chr(code)
        if 0xD800 <= code <= 0xDFFF or control.match(ch):
            continue
        assert bool(spaces.match(ch)) == ch.isspace(), hex(code)


def _spec(data: dict[str, Any]) -> rules.AgentSpec:
    return rules.AgentSpec(
        did=data["did"],
        name=data["name"],
        version=data["version"],
        description=data.get("description", ""),
        agent_type=data.get("agent_type", ""),
        capabilities=tuple(rules.Capability(**c) for c in data.get("capabilities", ())),
        endpoints=tuple(rules.Endpoint(**e) for e in data.get("endpoints", ())),
        tags=tuple(data.get("tags", ())),
        sharing=data.get("sharing", ""),
        health_check_url=data.get("health_check_url", ""),
    )


def _server_accepts(agent: dict[str, Any]) -> bool:
    try:
        rules.validate_spec(_spec(agent))
    except InvalidArgument:
        return False
    return True


# Values on both sides of each rule; the document and the validator must agree on every one.
CASES: list[tuple[str, Any]] = [
    ("name", "NLP Agent"),
    ("name", ""),
    ("name", " \u3000 "),
    ("name", " x "),
    ("name", "x" * rules.MAX_NAME),
    ("name", "x" * (rules.MAX_NAME + 1)),
    ("name", "a\x00b"),
    ("name", "a\x85b"),
    ("name", "caf\u00e9"),
    ("description", "two\nlines\tand tabs"),
    ("description", "bell\x07"),
    ("did", "did:web:example.com:a"),
    ("did", "did:web:example.com:a\n"),
    ("did", "did:WEB:x"),
    ("did", "did:web:" + "a" * 250),
    ("version", "1.2.3"),
    ("version", "1.2.3-beta.1+build.5"),
    ("version", "1.2.3\n"),
    ("version", "1.2"),
    ("version", "01.2.3"),
    ("agent_type", ""),
    ("agent_type", "nlp-2"),
    ("agent_type", "NLP"),
    ("agent_type", "nlp\n"),
    ("tags", ["nlp", "a.b:c-d"]),
    ("tags", ["nlp\n"]),
    ("tags", ["Upper"]),
    ("tags", ["t"] * (rules.MAX_TAGS + 1)),
    ("health_check_url", ""),
    ("health_check_url", "https://example.com:8443/health?x=1"),
    ("health_check_url", "https://example.com:99999/"),
    ("health_check_url", "ftp://example.com/"),
    ("health_check_url", "https://exa mple.com/"),
    ("endpoints", [{"protocol": "grpc", "url": "grpcs://example.com:443"}]),
    ("endpoints", [{"protocol": "http", "url": "grpcs://example.com:443"}]),
    ("endpoints", [{"protocol": "websocket", "url": "wss://example.com/ws"}]),
    ("endpoints", [{"protocol": "mcp", "url": "wss://example.com/mcp"}]),
    ("capabilities", [{"kind": "tool", "name": "a/b:c"}]),
    ("capabilities", [{"kind": "tool", "name": "a b"}]),
    ("capabilities", [{"kind": "tool", "name": "x", "version": "1.0.0\n"}]),
    ("capabilities", [{"kind": "tool", "name": "x", "version": ""}]),
]


@pytest.mark.parametrize(("field", "value"), CASES)
def test_the_document_and_the_validator_agree(doc: dict[str, Any], field: str, value: Any) -> None:
    agent = {**AGENT_EXAMPLE, field: value}
    validator = _validator(doc, {"$ref": f"#/components/schemas/{AGENT}{INPUT_SUFFIX}"})
    errors = [e.message for e in validator.iter_errors(agent)]
    assert (not errors) == _server_accepts(agent), errors


def _server_accepts_auth(auth: dict[str, Any]) -> bool:
    # The edge reads JSON words into the enum; the validator sees what convert.auth_from_proto makes of them.
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in auth.items() if v is not None}
    kind = fields.pop("kind", "none")
    try:
        rules.validate_auth(rules.AgentAuth(kind="none" if kind == "unspecified" else kind, **fields))
    except InvalidArgument:
        return False
    return True


# An agent's AgentAuth: the document's per-kind variants and field rules against agents.validate_auth.
AUTH_CASES: list[dict[str, Any]] = [
    {},
    {"kind": "none"},
    {"kind": "unspecified"},
    {"kind": "none", "api_key": "k"},
    {"kind": "api_key", "api_key": "k"},
    {"kind": "api_key", "api_key": "k", "api_key_header": "X-Key"},
    {"kind": "api_key", "api_key": "k", "api_key_header": "host"},
    {"kind": "api_key", "api_key": "k", "api_key_header": "Proxy-Thing"},
    {"kind": "api_key", "api_key": "k", "api_key_header": "X Key"},
    {"kind": "api_key", "api_key": "a b"},
    {"kind": "api_key"},
    {"kind": "api_key", "api_key": "k", "client_id": "c"},
    {"kind": "bearer", "bearer_token": "t"},
    {"kind": "bearer", "bearer_token": "t" * (rules.MAX_SECRET + 1)},
    {"kind": "mtls"},
    {"kind": "mtls", "bearer_token": "t"},
    {"kind": "oauth2_client_credentials", "token_url": "https://idp.example/t", "client_id": "c", "client_secret": "s"},
    {"kind": "oauth2_client_credentials", "token_url": "http://127.0.0.1:9/t", "client_id": "c", "client_secret": "s"},
    {"kind": "oauth2_client_credentials", "token_url": "http://idp.example/t", "client_id": "c", "client_secret": "s"},
    {
        "kind": "oauth2_client_credentials",
        "token_url": "https://idp.example/t#x",
        "client_id": "c",
        "client_secret": "s",
    },
    {"kind": "oauth2_client_credentials", "token_url": "https://idp.example/t", "client_id": "c"},
    {
        "kind": "oauth2_client_credentials",
        "token_url": "https://idp.example/t",
        "client_id": "c",
        "client_secret": "s",
        "scopes": ["a", "b:c"],
        "audience": "https://agent.example",
        "token_endpoint_auth_method": "client_secret_post",
    },
    {
        "kind": "oauth2_client_credentials",
        "token_url": "https://idp.example/t",
        "client_id": "c",
        "client_secret": "s",
        "scopes": ['a"b'],
    },
    {
        "kind": "oauth2_client_credentials",
        "token_url": "https://idp.example/t",
        "client_id": "c",
        "client_secret": "s",
        "token_endpoint_auth_method": "private_key_jwt",
    },
]


@pytest.mark.parametrize("auth", AUTH_CASES, ids=[str(i) for i in range(len(AUTH_CASES))])
def test_the_document_and_the_validator_agree_on_auth(doc: dict[str, Any], auth: dict[str, Any]) -> None:
    validator = _validator(doc, {"$ref": f"#/components/schemas/{AGENT}{INPUT_SUFFIX}"})
    errors = [e.message for e in validator.iter_errors({**AGENT_EXAMPLE, "auth": auth})]
    assert (not errors) == _server_accepts_auth(auth), errors
