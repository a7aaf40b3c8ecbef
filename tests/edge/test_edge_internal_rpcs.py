"""RPCs only the mesh's own services call have no HTTP route, and no HTTP answer can carry a secret field."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor

from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault_edge.routes import TemplateError, build_routes, discover_services, secret_fields
from agentvault_edge.settings import BACKEND_ENV

from .conftest import Backend, Recorder, edge_settings, start_edge

# Called only by discovery and the health monitor (see services/ and libs/agentvault/common/peers.py).
INTERNAL = {
    "/agentvault.federation.v1.PeerService/ResolvePeers",
    "/agentvault.federation.v1.PeerService/ReportPeerHealth",
    "/agentvault.federation.v1.FederationService/GetSharingGeneration",
    "/agentvault.registry.v1.RegistryService/ReportAgentHealth",
}
# The paths these RPCs had before, and how each is answered now (a path a public route's variable matches
# for other methods is a 405 whose Allow list does not include the old method).
FORMER_PATHS = [
    ("GET", "/api/v1/federation/peers:resolve", 404),
    ("POST", "/api/v1/federation/peers/p1:reportHealth", 405),
    ("POST", "/api/v1/agents/a1:reportHealth", 405),
]


@pytest_asyncio.fixture(loop_scope="session")
async def full_edge(backend: Backend) -> AsyncIterator[str]:
    """An edge over every generated API (not just the test ones), every backend the fake one."""
    settings = edge_settings(backend.address, backends={api: backend.address for api in BACKEND_ENV})
    runner, url = await start_edge(settings, discover_services())
    yield url
    await runner.cleanup()


def test_internal_rpcs_have_no_route() -> None:
    table = build_routes(discover_services())
    routed = {route.grpc_path for route in table.routes}
    assert routed, "no routes at all"
    assert not routed & INTERNAL
    for route in table.routes:
        assert secret_fields(route.method.output_type) == [], route.operation_id


def test_the_secret_check_sees_the_peer_token() -> None:
    assert secret_fields(fed_pb.ResolvePeersResponse.DESCRIPTOR) == [
        "agentvault.federation.v1.ResolvedPeer.encrypted_api_key"
    ]


def _leaky_service() -> ServiceDescriptor:
    """An annotated RPC whose response nests an `encrypted_*` field, added to the default pool once."""
    pool = descriptor_pool.Default()
    name = "agentvault.leaktest.v1.LeakService"
    try:
        return pool.FindServiceByName(name)
    except KeyError:
        pass
    f = descriptor_pb2.FileDescriptorProto(
        name="agentvault/leaktest/v1/leaktest_service.proto",
        package="agentvault.leaktest.v1",
        syntax="proto3",
        dependency=["google/api/annotations.proto"],
    )
    field = descriptor_pb2.FieldDescriptorProto
    inner = f.message_type.add(name="Inner")
    inner.field.add(name="encrypted_token", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    outer = f.message_type.add(name="Outer")
    outer.field.add(
        name="inner",
        number=1,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=".agentvault.leaktest.v1.Inner",
    )
    method = f.service.add(name="LeakService").method.add(
        name="Get", input_type=".agentvault.leaktest.v1.Outer", output_type=".agentvault.leaktest.v1.Outer"
    )
    method.options.Extensions[annotations_pb2.http].get = "/api/v1/leak"
    pool.AddSerializedFile(f.SerializeToString())
    return pool.FindServiceByName(name)


def test_an_annotated_rpc_returning_a_secret_is_refused_at_start() -> None:
    with pytest.raises(TemplateError, match=r"LeakService_Get: .*Inner\.encrypted_token"):
        build_routes([_leaky_service()])


@pytest.mark.parametrize(("method", "path", "status"), FORMER_PATHS)
async def test_the_edge_does_not_route_internal_rpcs(
    full_edge: str, recorder: Recorder, method: str, path: str, status: int
) -> None:
    async with aiohttp.ClientSession() as http, http.request(method, full_edge + path, json={}) as resp:
        assert resp.status == status
        assert method not in resp.headers.get("Allow", "")
        text = await resp.text()
    assert "encrypted_api_key" not in text
    assert recorder.calls == []


async def test_the_openapi_document_has_no_internal_rpc(full_edge: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(full_edge + "/api/v1/openapi.json") as resp:
        text = await resp.text()
        document = await resp.json(content_type=None)
    assert "/api/v1/agents" in document["paths"]
    for _, path, _ in FORMER_PATHS:
        assert not any(p.endswith((":resolve", ":reportHealth")) for p in document["paths"]), path
    for name in ("ResolvePeers", "ReportPeerHealth", "ReportAgentHealth", "GetSharingGeneration"):
        assert name not in text
    assert "encrypted_api_key" not in text
