"""The edge over real HTTP in front of a real gRPC server: routing, request building, errors, headers."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from yarl import URL

from agentvault.registry.v1 import registry_service_pb2 as pb

from .conftest import MAX_BODY, Backend, Recorder, edge_settings, start_edge

AGENT = {
    "did": "did:web:example.com:agents:nlp",
    "name": "NLP helper",
    "version": "1.0.0",
    "agent_type": "nlp",
    "sharing": "federated",
    "capabilities": [{"kind": "skill", "name": "summarize", "version": "1.2.0"}],
    "endpoints": [{"protocol": "http", "url": "https://nlp.example.com"}],
    "tags": ["text"],
}


async def _create(http: aiohttp.ClientSession, **changes: Any) -> dict[str, Any]:
    async with http.post("/api/v1/agents", json={**AGENT, **changes}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


def _assert_error(body: dict[str, Any], code: int, status: str) -> dict[str, Any]:
    error = body["error"]
    assert error["code"] == code
    assert error["status"] == status
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], list)
    return error  # type: ignore[no-any-return]


def _violation(error: dict[str, Any]) -> dict[str, Any]:
    bad = [d for d in error["details"] if d["@type"] == "type.googleapis.com/google.rpc.BadRequest"]
    assert bad, error
    return bad[0]["field_violations"][0]  # type: ignore[no-any-return]


async def test_post_maps_the_body_field_and_prints_every_field(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    agent = await _create(http)
    request = recorder.last("CreateAgent").request
    assert request.agent.name == "NLP helper"
    assert request.agent.sharing == pb.SHARING_FEDERATED
    assert request.agent.capabilities[0].kind == pb.CAPABILITY_KIND_SKILL
    assert request.agent.endpoints[0].protocol == pb.PROTOCOL_HTTP
    assert agent["sharing"] == "federated"
    assert agent["capabilities"] == [
        {
            "kind": "skill", "name": "summarize", "version": "1.2.0", "description": "", "input_schema": "",
            "output_schema": "", "permissions": [], "title": "", "tags": [], "input_modes": [], "output_modes": [],
        }
    ]  # fmt: skip
    assert agent["endpoints"][0]["protocol"] == "http"
    assert agent["health_status"] == "unspecified"
    assert agent["description"] == "" and agent["health_check_url"] == ""
    assert agent["create_time"] == "2023-11-14T22:13:20Z"


async def test_get_with_path_variable(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    created = await _create(http)
    async with http.get(f"/api/v1/agents/{created['id']}") as resp:
        assert resp.status == 200
        assert (await resp.json())["did"] == AGENT["did"]
    assert recorder.last("GetAgent").request.id == created["id"]


async def test_get_with_query_parameters(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    await _create(http)
    await _create(http, did="did:web:other", name="Other", agent_type="assistant")
    params = [("search", "NLP"), ("agent_type", "nlp"), ("page_size", "10"), ("sharing", "FEDERATED")]
    async with http.get("/api/v1/agents", params=params) as resp:
        assert resp.status == 200
        body = await resp.json()
    request = recorder.last("ListAgents").request
    assert (request.search, request.agent_type, request.page_size) == ("NLP", "nlp", 10)
    assert request.sharing == pb.SHARING_FEDERATED
    assert [a["name"] for a in body["agents"]] == ["NLP helper"]
    assert body["next_page_token"] == "size=10"


async def test_empty_lists_and_zero_values_are_printed(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.get("/api/v1/agents", params={"search": "nothing-matches"}) as resp:
        assert await resp.json() == {"agents": [], "next_page_token": "size=0"}


async def test_int64_is_a_json_number(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.get("/api/v1/health") as resp:
        text = await resp.text()
    assert '"agent_count":9007199254740993' in text
    assert json.loads(text) == {"status": "healthy", "agent_count": 9007199254740993}


async def test_patch_infers_the_mask_and_put_replaces(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    created = await _create(http, description="old")
    async with http.patch(f"/api/v1/agents/{created['id']}", json={"name": "Renamed", "tags": ["a", "b"]}) as resp:
        assert resp.status == 200, await resp.text()
        patched = await resp.json()
    update = recorder.last("UpdateAgent").request
    assert list(update.update_mask.paths) == ["name", "tags"]
    assert update.agent.id == created["id"]
    assert patched["name"] == "Renamed" and patched["description"] == "old" and patched["tags"] == ["a", "b"]

    async with http.put(f"/api/v1/agents/{created['id']}", json={**AGENT, "name": "Replaced"}) as resp:
        assert resp.status == 200
        replaced = await resp.json()
    assert list(recorder.last("UpdateAgent").request.update_mask.paths) == []
    assert replaced["name"] == "Replaced" and replaced["description"] == ""

    # An explicit ?update_mask wins over inference.
    async with http.patch(
        f"/api/v1/agents/{created['id']}", params={"update_mask": "description"}, json={"description": "d", "name": "x"}
    ) as resp:
        assert resp.status == 200
    assert list(recorder.last("UpdateAgent").request.update_mask.paths) == ["description"]


async def test_verb_route_with_body_star(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.post("/api/v1/api-keys/key-7:revoke", json={}) as resp:
        assert resp.status == 200
        key = await resp.json()
    assert recorder.last("RevokeApiKey").request.id == "key-7"
    assert key["id"] == "key-7" and key["role"] == "admin" and key["revoke_time"] == "2023-11-14T22:15:00Z"


async def test_body_star_maps_top_level_fields(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.post("/api/v1/api-keys", json={"name": "ci", "role": "admin"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    request = recorder.last("CreateApiKey").request
    assert (request.name, request.role) == ("ci", pb.ROLE_ADMIN)
    assert body["token"] == "secret-token" and body["api_key"]["role"] == "admin"


async def test_delete_returns_an_empty_object(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    created = await _create(http)
    async with http.delete(f"/api/v1/agents/{created['id']}") as resp:
        assert resp.status == 200
        assert await resp.json() == {}


async def test_unknown_path_is_404_json(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/nothing-here") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        _assert_error(await resp.json(), 404, "NOT_FOUND")


async def test_wrong_method_is_405_with_allow(http: aiohttp.ClientSession) -> None:
    async with http.put("/api/v1/agents", json={}) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET, POST"
        _assert_error(await resp.json(), 405, "UNIMPLEMENTED")
    async with http.post("/metrics") as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "GET"


async def test_malformed_json_is_400(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.post("/api/v1/agents", data=b'{"name": ', headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        error = _assert_error(await resp.json(), 400, "INVALID_ARGUMENT")
        assert "malformed JSON" in error["message"]
    assert not recorder.calls


async def test_unknown_json_field_is_400_naming_it(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.post("/api/v1/agents", json={**AGENT, "colour": "red"}) as resp:
        assert resp.status == 400
        error = _assert_error(await resp.json(), 400, "INVALID_ARGUMENT")
    assert _violation(error)["field"] == "agent.colour"
    assert "unknown field" in _violation(error)["description"]
    assert not recorder.calls


async def test_wrong_json_type_is_400(http: aiohttp.ClientSession) -> None:
    async with http.post("/api/v1/agents", json={**AGENT, "tags": "text"}) as resp:
        assert resp.status == 400
        assert _violation(_assert_error(await resp.json(), 400, "INVALID_ARGUMENT"))["field"] == "agent.tags"
    async with http.get("/api/v1/agents", params={"page_size": "99999999999"}) as resp:
        assert resp.status == 400
        assert _violation((await resp.json())["error"])["field"] == "page_size"


async def test_bad_enum_is_400_listing_the_words(http: aiohttp.ClientSession) -> None:
    async with http.post("/api/v1/agents", json={**AGENT, "sharing": "public"}) as resp:
        assert resp.status == 400
        violation = _violation(_assert_error(await resp.json(), 400, "INVALID_ARGUMENT"))
    assert violation["field"] == "agent.sharing"
    assert "must be one of private, local, federated;" in violation["description"]
    async with http.get("/api/v1/agents", params={"capability_kind": "weapon"}) as resp:
        assert resp.status == 400
        assert "tool, skill, model" in (await resp.json())["error"]["message"]


async def test_unknown_query_parameter_is_400(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.get("/api/v1/agents", params={"colour": "5"}) as resp:
        assert resp.status == 400
        assert _violation((await resp.json())["error"])["field"] == "colour"
    assert not recorder.calls


async def test_huge_body_is_413(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    big = json.dumps({**AGENT, "description": "x" * (MAX_BODY + 1)}).encode()
    async with http.post("/api/v1/agents", data=big, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        _assert_error(await resp.json(), 413, "RESOURCE_EXHAUSTED")

    async def chunks() -> Any:
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    # Chunked, so no Content-Length to reject up front: the limit holds while reading.
    async with http.post("/api/v1/agents", data=chunks(), headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
    assert not recorder.calls


async def test_non_json_content_type_is_415(http: aiohttp.ClientSession) -> None:
    async with http.post("/api/v1/agents", data=json.dumps(AGENT), headers={"Content-Type": "text/plain"}) as resp:
        assert resp.status == 415
    async with http.post("/api/v1/agents", data=json.dumps(AGENT), headers={"Content-Type": ""}) as resp:
        # Absent (empty) content type is accepted as JSON.
        assert resp.status == 200, await resp.text()


async def test_body_on_a_route_without_body_is_400(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/agents", data=b'{"search": "x"}') as resp:
        assert resp.status == 400
        assert "takes no request body" in (await resp.json())["error"]["message"]


async def test_headers_are_forwarded_as_metadata(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    headers = {
        "Authorization": "Bearer alice-token",
        "X-Request-ID": "req-123",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "X-Federation-Registry": "peer.example.com",
        "X-Not-Forwarded": "nope",
    }
    async with http.get("/api/v1/health", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-ID"] == "req-123"
    metadata = recorder.last("GetHealth").metadata
    assert metadata["authorization"] == ["Bearer alice-token"]
    assert metadata["x-request-id"] == ["req-123"]
    assert metadata["traceparent"] == [headers["traceparent"]]
    assert metadata["x-federation-registry"] == ["peer.example.com"]
    assert "x-not-forwarded" not in metadata
    # Only signed requests carry the method, path and body for the HMAC check.
    assert "x-http-method" not in metadata


async def test_request_id_is_generated_when_absent(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.get("/api/v1/health") as resp:
        rid = resp.headers["X-Request-ID"]
    assert len(rid) == 32 and int(rid, 16) >= 0
    assert recorder.last("GetHealth").metadata["x-request-id"] == [rid]
    async with http.get("/api/v1/nope") as resp:
        assert resp.status == 404 and len(resp.headers["X-Request-ID"]) == 32
    async with http.get("/api/v1/nope", headers={"X-Request-ID": "bad\tid"}) as resp:
        assert resp.headers["X-Request-ID"] != "bad\tid"


async def test_signed_requests_carry_method_path_and_body(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    body = b'{"name":"peer-key"}'
    headers = {
        "Content-Type": "application/json",
        "X-Federation-Signature": "1700000000.abc",
        "X-Federation-Timestamp": "1700000000",
        "X-Federation-Nonce": "n-1",
    }
    async with http.post("/api/v1/api-keys", data=body, headers=headers) as resp:
        assert resp.status == 200
    metadata = recorder.last("CreateApiKey").metadata
    assert metadata["x-federation-signature"] == ["1700000000.abc"]
    assert metadata["x-federation-nonce"] == ["n-1"]
    assert metadata["x-http-method"] == ["POST"]
    assert metadata["x-http-path"] == ["/api/v1/api-keys"]
    assert metadata["x-http-body-bin"] == [body]

    # The path is passed exactly as sent, query string and percent-encoding included.
    async with http.get(URL("/api/v1/agents?search=a%20b&agent_type=x", encoded=True), headers=headers) as resp:
        assert resp.status == 200
    metadata = recorder.last("ListAgents").metadata
    assert metadata["x-http-method"] == ["GET"]
    assert metadata["x-http-path"] == ["/api/v1/agents?search=a%20b&agent_type=x"]
    assert metadata["x-http-body-bin"] == [b""]


async def test_non_ascii_header_is_400_not_500(http: aiohttp.ClientSession) -> None:
    async with http.get(
        "/api/v1/health", headers={"Authorization": "Bearer caf\u00e9".encode().decode("latin-1")}
    ) as resp:
        assert resp.status == 400
        assert _violation((await resp.json())["error"])["field"] == "authorization"


async def test_grpc_errors_map_to_http_with_details(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/agents/missing-id") as resp:
        assert resp.status == 404
        error = _assert_error(await resp.json(), 404, "NOT_FOUND")
    assert error["message"] == "agent not found"
    info = error["details"][0]
    assert info == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "AGENT_NOT_FOUND",
        "domain": "agentvault.io",
        "metadata": {"agent_id": "missing-id"},
    }

    await _create(http)
    async with http.post("/api/v1/agents", json=AGENT) as resp:
        assert resp.status == 409
        assert _assert_error(await resp.json(), 409, "ALREADY_EXISTS")["details"][0]["reason"] == "DID_TAKEN"

    async with http.post("/api/v1/api-keys", json={"name": "forbidden"}) as resp:
        assert resp.status == 403
        _assert_error(await resp.json(), 403, "PERMISSION_DENIED")

    async with http.post("/api/v1/agents", json={**AGENT, "name": "", "did": "did:web:x"}) as resp:
        assert resp.status == 400
        error = _assert_error(await resp.json(), 400, "INVALID_ARGUMENT")
    assert _violation(error) == {
        "field": "agent.name",
        "description": "is required",
        "reason": "",
        "localized_message": None,
    }


@pytest.mark.parametrize(
    ("code", "status"),
    [("CANCELLED", 499), ("FAILED_PRECONDITION", 400), ("RESOURCE_EXHAUSTED", 429), ("UNAVAILABLE", 503)],
)
def test_status_mapping_follows_grpc_gateway(code: str, status: int) -> None:
    import grpc

    from agentvault_edge.errors import HTTP_STATUS

    assert HTTP_STATUS[grpc.StatusCode[code]] == status
    assert len(HTTP_STATUS) == 17


async def test_backend_down_is_503() -> None:
    from agentvault.devserver.embedded import free_port

    dead = f"127.0.0.1:{free_port()}"
    runner, url = await start_edge(edge_settings(dead))
    try:
        async with aiohttp.ClientSession(base_url=url) as http:
            async with http.get("/api/v1/health") as resp:
                assert resp.status == 503
                error = _assert_error(await resp.json(), 503, "UNAVAILABLE")
                assert dead not in error["message"]  # internal addresses stay in the logs
            async with http.get("/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["backends"][dead]["status"] == "UNAVAILABLE"
    finally:
        await runner.cleanup()


async def test_slow_backend_hits_the_deadline_as_504(backend: Backend, recorder: Recorder) -> None:
    runner, url = await start_edge(edge_settings(backend.address, call_timeout=0.2))
    try:
        async with (
            aiohttp.ClientSession(base_url=url) as http,
            http.get("/api/v1/agents", params={"page_token": "slow"}) as resp,
        ):
            assert resp.status == 504
            _assert_error(await resp.json(), 504, "DEADLINE_EXCEEDED")
    finally:
        await runner.cleanup()


async def test_healthz_and_readyz(http: aiohttp.ClientSession, backend: Backend) -> None:
    async with http.get("/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    async with http.get("/readyz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "ready"
    assert body["backends"][backend.address]["status"] == "SERVING"


async def test_metrics_count_requests_by_route_template(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.get("/api/v1/agents/some-id-1"):
        pass
    async with http.get("/api/v1/agents/some-id-2"):
        pass
    async with http.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("http_requests_total{") and 'route="/api/v1/agents/{id}"' in ln and 'code="404"' in ln
    )
    assert float(line.rsplit(" ", 1)[1]) >= 2
    assert "some-id-1" not in text  # raw paths never become labels
    assert 'http_request_duration_seconds_bucket{le="0.001",method="GET",route="/api/v1/agents/{id}"}' in text


async def test_openapi_document(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/openapi.json") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    agents = doc["paths"]["/api/v1/agents"]
    assert set(agents) == {"get", "post"}
    query = {p["name"]: p for p in agents["get"]["parameters"]}
    assert query["sharing"]["schema"]["enum"] == ["private", "local", "federated", "unspecified"]
    assert query["page_size"]["in"] == "query"
    # One template per path: PATCH and PUT bind {agent.id} but are documented under the same {id} as GET.
    assert set(doc["paths"]["/api/v1/agents/{id}"]) == {"get", "patch", "put", "delete"}
    assert doc["paths"]["/api/v1/agents/{id}"]["get"]["parameters"][0] == {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
        "description": "The agent's UUID.",  # the proto comment
    }
    assert "/api/v1/api-keys/{id}:revoke" in doc["paths"]
    agent = doc["components"]["schemas"]["agentvault.registry.v1.Agent"]
    sharing = agent["properties"]["sharing"]  # nullable in responses: the enum is the first of anyOf
    assert sharing.get("enum", sharing.get("anyOf", [{}])[0].get("enum")) == [
        "private",
        "local",
        "federated",
        "unspecified",
    ]
    assert agent["properties"]["id"]["readOnly"] is True
    assert "name" in agent["required"]
    health = doc["components"]["schemas"]["agentvault.registry.v1.GetHealthResponse"]
    assert health["properties"]["agent_count"] == {
        "type": "integer",
        "format": "int64",
        "description": "Number of agents registered.",
    }
    body = doc["paths"]["/api/v1/agents"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    # The request form of Agent (optional fields may be null); the body is required, so not null itself.
    assert body == {"$ref": "#/components/schemas/agentvault.registry.v1.Agent.input"}
