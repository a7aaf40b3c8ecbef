"""The registry through the real HTTP edge: JSON as the seeds write it, errors as JSON, bad input as 4xx."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from ..conftest import MeshHandle, auth, unique_did


def seed_agent(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "did": unique_did("http"),
        "name": "Partner NLP Agent",
        "description": "Named-entity recognition and summarization",
        "version": "2.1.0",
        "agent_type": "nlp",
        "capabilities": [
            {"kind": "skill", "name": "ner", "version": "1.4.0", "description": "entities"},
            {"kind": "model", "name": "bert-base", "version": "1.0.0"},
        ],
        "endpoints": [{"protocol": "http", "url": "https://nlp.example/agent"}],
        "tags": ["nlp"],
        "sharing": "federated",
    }
    body.update(overrides)
    return body


async def health_count(http: aiohttp.ClientSession, mesh: MeshHandle) -> int:
    async with http.get(mesh.url("/api/v1/health")) as r:
        assert r.status == 200
        body = await r.json()
    assert body["status"] == "healthy"
    assert isinstance(body["agent_count"], int)
    return int(body["agent_count"])


async def test_crud_over_http(http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str) -> None:
    before = await health_count(http, mesh)
    async with http.post(mesh.url("/api/v1/agents"), json=seed_agent(), headers=auth(admin_token)) as r:
        assert r.status == 200, await r.text()
        created = await r.json()
    assert created["sharing"] == "federated"
    assert created["capabilities"][0]["kind"] == "skill"
    assert created["endpoints"][0]["protocol"] == "http"
    assert created["owner"] == "prn_bootstrap_admin" and created["id"]
    assert await health_count(http, mesh) == before + 1

    url = mesh.url(f"/api/v1/agents/{created['id']}")
    async with http.get(url) as r:
        assert r.status == 200
        assert (await r.json())["did"] == created["did"]

    # PATCH changes only the fields sent (the mask is inferred from the body).
    async with http.patch(url, json={"description": "Now with sentiment"}, headers=auth(admin_token)) as r:
        assert r.status == 200, await r.text()
        patched = await r.json()
    assert patched["description"] == "Now with sentiment" and patched["name"] == created["name"]
    assert len(patched["capabilities"]) == 2

    # PUT replaces: what is not sent is cleared.
    replacement = seed_agent(did=created["did"], name="Replaced", capabilities=[], tags=[])
    async with http.put(url, json=replacement, headers=auth(admin_token)) as r:
        assert r.status == 200, await r.text()
        replaced = await r.json()
    assert replaced["name"] == "Replaced" and replaced["capabilities"] == [] and replaced["tags"] == []

    async with http.delete(url, headers=auth(admin_token)) as r:
        assert r.status == 200
        assert await r.json() == {}
    async with http.get(url) as r:
        assert r.status == 404
        error = (await r.json())["error"]
    assert error["status"] == "NOT_FOUND" and error["code"] == 404
    assert any(d.get("reason") == "AGENT_NOT_FOUND" for d in error["details"])


async def test_search_filters_and_pages_over_http(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str
) -> None:
    word = "httpsearch" + unique_did()[-6:].replace("-", "")
    ids = set()
    for i in range(5):
        body = seed_agent(name=f"{word} {i}", agent_type="vision" if i == 0 else "nlp")
        async with http.post(mesh.url("/api/v1/agents"), json=body, headers=auth(admin_token)) as r:
            assert r.status == 200, await r.text()
            ids.add((await r.json())["id"])
    async with http.get(mesh.url("/api/v1/agents"), params={"search": word, "agent_type": "vision"}) as r:
        assert r.status == 200
        vision = (await r.json())["agents"]
    assert len(vision) == 1 and vision[0]["agent_type"] == "vision"
    seen: list[str] = []
    params = {"search": word, "page_size": "2"}
    while True:
        async with http.get(mesh.url("/api/v1/agents"), params=params) as r:
            assert r.status == 200
            page = await r.json()
        seen.extend(a["id"] for a in page["agents"])
        if not page["next_page_token"]:
            break
        params["page_token"] = page["next_page_token"]
    assert set(seen) == ids and len(seen) == 5
    query = {"capability_name": "ner", "capability_version": "^1.4", "capability_kind": "skill", "search": word}
    async with http.get(mesh.url("/api/v1/agents"), params=query) as r:
        assert r.status == 200
        assert len((await r.json())["agents"]) == 5
    query["capability_version"] = ">=2"
    async with http.get(mesh.url("/api/v1/agents"), params=query) as r:
        assert (await r.json())["agents"] == []


async def test_auth_over_http(http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str) -> None:
    async with http.post(mesh.url("/api/v1/agents"), json=seed_agent()) as r:
        assert r.status == 401
        assert (await r.json())["error"]["status"] == "UNAUTHENTICATED"
    async with http.post(mesh.url("/api/v1/api-keys"), json={"name": "httpuser"}, headers=auth(admin_token)) as r:
        assert r.status == 200
        member = (await r.json())["token"]
    async with http.post(mesh.url("/api/v1/agents"), json=seed_agent(), headers=auth(admin_token)) as r:
        agent = await r.json()
    async with http.patch(
        mesh.url(f"/api/v1/agents/{agent['id']}"), json={"name": "Mine now"}, headers=auth(member)
    ) as r:
        assert r.status == 403
        assert (await r.json())["error"]["status"] == "PERMISSION_DENIED"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "version": "1.0.0"}, "agent.did"),
        (seed_agent(version="1.0"), "agent.version"),
        (seed_agent(endpoints=[{"protocol": "http", "url": "nota url"}]), "agent.endpoints[0].url"),
        (seed_agent(name="n" * 300), "agent.name"),
        (seed_agent(sharing="everyone"), "sharing"),
        (seed_agent(capabilities=[{"kind": "weapon", "name": "x"}]), "kind"),
        (seed_agent(unknown_field=1), "unknown_field"),
        (seed_agent(tags="nlp"), "tags"),
    ],
)
async def test_bad_json_fields_are_400(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str, body: dict[str, Any], field: str
) -> None:
    before = await health_count(http, mesh)
    async with http.post(mesh.url("/api/v1/agents"), json=body, headers=auth(admin_token)) as r:
        assert r.status == 400, await r.text()
        error = (await r.json())["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert field in json.dumps(error), error
    assert await health_count(http, mesh) == before


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"{not json", 400),
        (b"[]", 400),
        (b'{"did": "did:web:x:y", "name": "\\u0000"}', 400),
        (b"{" + b'"description": "' + b"x" * (2 * 1024 * 1024) + b'"}', 413),
    ],
)
async def test_malformed_and_huge_bodies(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str, raw: bytes, status: int
) -> None:
    before = await health_count(http, mesh)
    headers = {**auth(admin_token), "Content-Type": "application/json"}
    async with http.post(mesh.url("/api/v1/agents"), data=raw, headers=headers) as r:
        assert r.status == status, await r.text()
        assert "error" in await r.json()
    assert await health_count(http, mesh) == before


async def test_bad_query_parameters_are_400(http: aiohttp.ClientSession, mesh: MeshHandle) -> None:
    for params in (
        {"page_size": "many"},
        {"no_such_param": "1"},
        {"capability_version": ">>1", "capability_name": "x"},
    ):
        async with http.get(mesh.url("/api/v1/agents"), params=params) as r:
            assert r.status == 400, (params, await r.text())
            assert (await r.json())["error"]["status"] == "INVALID_ARGUMENT"
    async with http.get(mesh.url("/api/v1/agents/not-a-uuid")) as r:
        assert r.status == 400


async def test_openapi_and_metrics(http: aiohttp.ClientSession, mesh: MeshHandle) -> None:
    async with http.get(mesh.url("/api/v1/openapi.json")) as r:
        assert r.status == 200
        doc = await r.json()
    assert "/api/v1/agents" in doc["paths"] and "/api/v1/federation/peers" in doc["paths"]
    assert "federated" in json.dumps(doc["components"])
    async with http.get(mesh.url("/metrics")) as r:
        assert r.status == 200
        text = await r.text()
    assert "http_requests_total" in text


async def test_restart_of_registry_loses_nothing(http: aiohttp.ClientSession, mesh_factory: Any) -> None:
    handle = mesh_factory(name="restart")
    body = seed_agent()
    async with http.post(handle.url("/api/v1/agents"), json=body, headers=auth(handle.admin_token)) as r:
        assert r.status == 200
        created = await r.json()
    async with http.post(
        handle.url("/api/v1/api-keys"), json={"name": "keeper"}, headers=auth(handle.admin_token)
    ) as r:
        token = (await r.json())["token"]
    code = handle.mesh.stop_service("registry")
    assert code == 0, "SIGTERM must shut the registry down cleanly"
    async with http.get(handle.url(f"/api/v1/agents/{created['id']}")) as r:
        assert r.status == 503
    handle.mesh.start_service("registry")
    # The edge reconnects on its own; a client retrying for a few seconds sees the same agent again.
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        async with http.get(handle.url(f"/api/v1/agents/{created['id']}")) as r:
            if r.status == 503 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.2)
                continue
            assert r.status == 200
            assert await r.json() == created
            break
    async with http.post(handle.url("/api/v1/agents"), json=seed_agent(), headers=auth(token)) as r:
        assert r.status == 200, "an API key issued before the restart still works"
