"""Path templates (google/api/http.proto grammar), route discovery and route matching."""

from __future__ import annotations

import pytest

from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_edge.routes import (
    RouteMatch,
    TemplateError,
    build_routes,
    discover_services,
    parse_template,
)

from .testproto import test_service


def _split(path: str) -> list[str]:
    return path[1:].split("/")


def test_literal_template_matches_only_itself() -> None:
    t = parse_template("/api/v1/agents")
    assert [s.kind for s in t.segments] == ["literal"] * 3
    assert t.match(_split("/api/v1/agents")) == {}
    assert t.match(_split("/api/v1/agent")) is None
    assert t.match(_split("/api/v1/agents/x")) is None
    assert t.match(_split("/api/v1/agents/")) is None


def test_simple_variable_binds_one_decoded_segment() -> None:
    t = parse_template("/api/v1/agents/{id}")
    assert t.match(_split("/api/v1/agents/abc")) == {"id": "abc"}
    assert t.match(_split("/api/v1/agents/a%20b%2Fc")) == {"id": "a b/c"}
    # A DID is a legal id even though it contains ':'; without a verb in the template it stays in the value.
    assert t.match(_split("/api/v1/agents/did:web:example.com")) == {"id": "did:web:example.com"}
    assert t.match(_split("/api/v1/agents/")) is None
    assert t.match(_split("/api/v1/agents/a/b")) is None


def test_nested_field_path_variable() -> None:
    t = parse_template("/api/v1/agents/{agent.id}")
    assert t.variables[0].field_path == "agent.id"
    assert t.match(_split("/api/v1/agents/42")) == {"agent.id": "42"}


def test_variable_with_segments_and_double_star() -> None:
    t = parse_template("/v1/{name=shelves/*/books/*}")
    assert t.match(_split("/v1/shelves/s1/books/b2")) == {"name": "shelves/s1/books/b2"}
    assert t.match(_split("/v1/shelves/s1/cds/b2")) is None

    rest = parse_template("/v1/files/{path=**}")
    assert rest.match(_split("/v1/files/a/b/c")) == {"path": "a/b/c"}
    assert rest.match(_split("/v1/files")) == {"path": ""}
    # %2F inside a multi-segment variable stays encoded, distinguishable from a separator.
    assert rest.match(_split("/v1/files/a%2Fb/c%20d")) == {"path": "a%2Fb/c d"}

    star = parse_template("/v1/*/x/**")
    assert star.match(_split("/v1/anything/x/1/2")) == {}
    assert star.match(_split("/v1/anything/y/1")) is None


def test_verb_is_split_from_the_last_segment() -> None:
    t = parse_template("/api/v1/api-keys/{id}:revoke")
    assert t.verb == "revoke"
    assert t.match(_split("/api/v1/api-keys/k1:revoke")) == {"id": "k1"}
    assert t.match(_split("/api/v1/api-keys/k1")) is None
    assert t.match(_split("/api/v1/api-keys/:revoke")) is None
    search = parse_template("/api/v1/agents:search")
    assert search.match(_split("/api/v1/agents:search")) == {}
    assert search.match(_split("/api/v1/agents")) is None
    assert search.openapi_path == "/api/v1/agents:search"


@pytest.mark.parametrize(
    "source",
    [
        "api/v1/agents",
        "/api/{id",
        "/api/id}",
        "/api/{a{b}}",
        "/api/{1bad}",
        "/api/**/x",
        "/api/{id}/{id}",
        "/api/x{id}",
        "/api/a:b:c",
        "/api//x",
    ],
)
def test_invalid_templates_are_rejected(source: str) -> None:
    with pytest.raises(TemplateError):
        parse_template(source)


def test_discovery_finds_the_registry_routes_from_annotations() -> None:
    services = discover_services()
    assert "agentvault.registry.v1.RegistryService" in {s.full_name for s in services}
    table = build_routes(services)
    routes = {(r.http_method, r.template.source): r for r in table.routes}
    assert routes[("POST", "/api/v1/agents")].body == "agent"
    assert routes[("POST", "/api/v1/api-keys")].body == "*"
    # additional_bindings: PUT beside PATCH for UpdateAgent.
    assert routes[("PATCH", "/api/v1/agents/{agent.id}")].method.name == "UpdateAgent"
    assert routes[("PUT", "/api/v1/agents/{agent.id}")].method.name == "UpdateAgent"
    assert routes[("POST", "/api/v1/api-keys/{id}:revoke")].grpc_path == (
        "/agentvault.registry.v1.RegistryService/RevokeApiKey"
    )
    assert {r.api for r in table.routes if r.service.full_name.startswith("agentvault.registry.")} == {"registry"}


def test_literal_beats_variable_and_verb_routes_are_separate() -> None:
    table = build_routes([test_service()])

    def method_for(path: str) -> str:
        found = table.match("GET", path)
        assert isinstance(found, RouteMatch), path
        return str(found.route.method.name)

    assert method_for("/api/v1/test/things/special") == "Special"
    assert method_for("/api/v1/test/things/other") == "GetThing"
    assert method_for("/api/v1/test/things:search") == "SearchThings"
    assert method_for("/api/v1/test/files/a/b") == "Files"


def test_unknown_path_and_wrong_method() -> None:
    table = build_routes([pb.DESCRIPTOR.services_by_name["RegistryService"]])
    assert table.match("GET", "/api/v1/nothing") is None
    assert table.match("PUT", "/api/v1/agents") == ["GET", "POST"]
    assert table.match("POST", "/api/v1/agents/x") == ["DELETE", "GET", "PATCH", "PUT"]
    found = table.match("DELETE", "/api/v1/agents/x")
    assert isinstance(found, RouteMatch) and found.route.method.name == "DeleteAgent"


def test_bad_annotations_fail_at_start() -> None:
    from google.api import annotations_pb2
    from google.protobuf import descriptor_pb2, descriptor_pool

    f = descriptor_pb2.FileDescriptorProto(
        name="agentvault/edgebad/v1/bad.proto",
        package="agentvault.edgebad.v1",
        syntax="proto3",
        dependency=["google/api/annotations.proto"],
    )
    msg = f.message_type.add(name="Req")
    msg.field.add(name="id", number=1, type=9, label=1)
    svc = f.service.add(name="BadService")
    m = svc.method.add(name="Get", input_type=".agentvault.edgebad.v1.Req", output_type=".agentvault.edgebad.v1.Req")
    m.options.Extensions[annotations_pb2.http].get = "/api/v1/bad/{missing}"
    pool = descriptor_pool.Default()
    try:
        service = pool.FindServiceByName("agentvault.edgebad.v1.BadService")
    except KeyError:
        pool.AddSerializedFile(f.SerializeToString())
        service = pool.FindServiceByName("agentvault.edgebad.v1.BadService")
    with pytest.raises(TemplateError, match="missing"):
        build_routes([service])
