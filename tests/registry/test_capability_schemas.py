"""Capabilities' input/output JSON Schemas and permissions through the real edge, the published advertisement
schema, and the compatibility check."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema

from ..conftest import MeshHandle, auth, edge_violations, unique_did

INPUT_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 1000}, "lang": {"enum": ["en", "fr"]}},
    "required": ["text"],
    "additionalProperties": False,
}
OUTPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "score": {"type": "integer"},
        "meta": {"type": "object", "properties": {"words": {"type": "integer"}}, "required": ["words"]},
        "note": {"type": "string"},
    },
    "required": ["summary", "score", "meta"],
}


def agent_body(**cap_overrides: Any) -> dict[str, Any]:
    cap = {
        "kind": "skill",
        "name": "summarize",
        "version": "1.4.2",
        "input_schema": json.dumps(INPUT_SCHEMA),
        "output_schema": json.dumps(OUTPUT_SCHEMA),
        "permissions": ["agents:read", "urn:example:summarize"],
    }
    cap.update(cap_overrides)
    return {
        "did": unique_did("caps"),
        "name": "Summarizer",
        "version": "1.0.0",
        "capabilities": [cap],
        "endpoints": [{"protocol": "a2a", "url": "https://summarizer.example/a2a"}],
    }


async def create(http: aiohttp.ClientSession, mesh: MeshHandle, token: str, body: dict[str, Any]) -> Any:
    async with http.post(mesh.url("/api/v1/agents"), json=body, headers=auth(token)) as r:
        return r.status, await r.json()


async def test_schemas_and_permissions_are_stored_and_returned(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str
) -> None:
    status, created = await create(http, mesh, admin_token, agent_body())
    assert status == 200, created
    async with http.get(mesh.url(f"/api/v1/agents/{created['id']}")) as r:
        assert r.status == 200
        cap = (await r.json())["capabilities"][0]
    assert json.loads(cap["input_schema"]) == INPUT_SCHEMA
    assert json.loads(cap["output_schema"]) == OUTPUT_SCHEMA
    assert cap["permissions"] == ["agents:read", "urn:example:summarize"]


async def test_invalid_schemas_are_refused_with_field_violations(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str
) -> None:
    bad = {
        "input_schema": json.dumps({"type": "no-such-type"}),  # not a valid JSON Schema
        "output_schema": "{not json",
        "permissions": ["has space"],
    }
    status, answer = await create(http, mesh, admin_token, agent_body(**bad))
    assert status == 400, answer
    fields = edge_violations(answer)
    assert "not a valid JSON Schema" in fields["agent.capabilities[0].input_schema"]
    assert "not valid JSON" in fields["agent.capabilities[0].output_schema"]
    assert "agent.capabilities[0].permissions[0]" in fields

    deep = "[" * 40 + "]" * 40
    big = json.dumps({"type": "object", "description": "x" * 17_000})
    remote = json.dumps({"$ref": "https://evil.example/schema.json"})
    for text, words in ((deep, "nest at most"), (big, "at most 16384 bytes"), (remote, "its own definitions")):
        status, answer = await create(http, mesh, admin_token, agent_body(input_schema=text))
        assert status == 400, answer
        assert list(edge_violations(answer)) == ["agent.capabilities[0].input_schema"], answer
        assert words in edge_violations(answer)["agent.capabilities[0].input_schema"]


async def test_advertisement_schema_is_published_and_agrees_with_the_registry(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str
) -> None:
    async with http.get(mesh.url("/schemas/agent-advertisement/v1.json")) as r:
        assert r.status == 200
        assert r.content_type == "application/schema+json"
        document = await r.json()
    jsonschema.Draft202012Validator.check_schema(document)
    validator = jsonschema.Draft202012Validator(document)
    cap_props = document["$defs"]["agentvault.registry.v1.Capability.input"]["properties"]
    assert {"input_schema", "output_schema", "permissions"} <= set(cap_props)
    # Examples the document and the registry must judge alike.
    good = [agent_body(), agent_body(permissions=[]), agent_body(version="")]
    bad = [
        agent_body(permissions=["has space"]),
        agent_body(name="not a name!"),
        agent_body(version="1.x"),
        agent_body(kind="gadget"),
        {**agent_body(), "name": ""},
        {**agent_body(), "did": "not-a-did"},
    ]
    for body in good:
        assert not list(validator.iter_errors(body)), body
        status, answer = await create(http, mesh, admin_token, body)
        assert status == 200, answer
    for body in bad:
        assert list(validator.iter_errors(body)), body
        status, answer = await create(http, mesh, admin_token, body)
        assert status == 400, answer


async def check(
    http: aiohttp.ClientSession, mesh: MeshHandle, agent_id: str, **fields: Any
) -> tuple[int, dict[str, Any]]:
    body = {"kind": "skill", "name": "summarize", **fields}
    async with http.post(mesh.url(f"/api/v1/agents/{agent_id}/capabilities:check"), json=body) as r:
        return r.status, await r.json()


def codes(answer: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r["code"], r["pointer"]) for r in answer["reasons"]]


async def test_compatibility(http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str) -> None:
    status, created = await create(http, mesh, admin_token, agent_body())
    assert status == 200, created
    agent_id = created["id"]
    expected_ok = {
        "type": "object",
        "properties": {"summary": {"type": "string"}, "score": {"type": "number"}},
        "required": ["summary", "score"],
    }

    status, answer = await check(
        http,
        mesh,
        agent_id,
        version_constraint="^1.4",
        input=json.dumps({"text": "hello", "lang": "en"}),
        expected_output_schema=json.dumps(expected_ok),
    )
    assert status == 200, answer
    assert answer["compatible"] is True and answer["reasons"] == [] and answer["version"] == "1.4.2"

    status, answer = await check(http, mesh, agent_id, version_constraint=">=2")
    assert answer["compatible"] is False and codes(answer) == [("VERSION_OUT_OF_RANGE", "")]

    status, answer = await check(http, mesh, agent_id, input=json.dumps({"lang": "de", "extra": 1}))
    assert answer["compatible"] is False
    found = codes(answer)
    assert ("INPUT_INVALID", "/lang") in found  # names the pointer of the bad value
    assert ("INPUT_INVALID", "") in found  # "text" is required; "extra" is not allowed: both at the root
    assert all(code == "INPUT_INVALID" for code, _ in found)

    expected_bad = {
        "type": "object",
        "properties": {
            "summary": {"type": "integer"},
            "meta": {"type": "object", "properties": {"words": {"type": "string"}, "pages": {}}, "required": ["pages"]},
        },
        "required": ["summary", "title", "note"],
    }
    status, answer = await check(http, mesh, agent_id, expected_output_schema=json.dumps(expected_bad))
    assert answer["compatible"] is False
    assert sorted(codes(answer)) == [
        ("OUTPUT_FIELD_MISSING", "/meta/pages"),  # not returned at all
        ("OUTPUT_FIELD_MISSING", "/note"),  # returned, but not always
        ("OUTPUT_FIELD_MISSING", "/title"),
        ("OUTPUT_TYPE_DIFFERS", "/meta/words"),
        ("OUTPUT_TYPE_DIFFERS", "/summary"),
    ]

    status, answer = await check(http, mesh, agent_id, name="translate")
    assert codes(answer) == [("CAPABILITY_NOT_FOUND", "")]


async def test_compatibility_bad_requests_are_4xx(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str
) -> None:
    status, created = await create(http, mesh, admin_token, {**agent_body(), "sharing": "private"})
    agent_id = created["id"]
    status, answer = await check(http, mesh, agent_id, input="{", version_constraint="~~1", name="bad name!")
    assert status == 400, answer
    assert set(edge_violations(answer)) == {"input", "version_constraint", "name"}
    status, answer = await check(http, mesh, agent_id, expected_output_schema=json.dumps({"type": 5}))
    assert status == 400 and list(edge_violations(answer)) == ["expected_output_schema"], answer
    # A private agent is not found by others, exactly as GetAgent answers.
    status, answer = await check(http, mesh, agent_id)
    assert status == 404, answer
    status, answer = await check(http, mesh, "00000000-0000-0000-0000-000000000000")
    assert status == 404, answer


async def test_patterns_cannot_stall_the_registry(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str
) -> None:
    """A pattern that backtracks exponentially in Python's re (^(a+)+$ against 40 a's and a !) is matched in
    linear time; a pattern only a backtracking engine can run is refused when the schema is written."""
    evil = {"type": "object", "properties": {"t": {"type": "string", "pattern": "^(a+)+$"}}}
    status, created = await create(http, mesh, admin_token, agent_body(input_schema=json.dumps(evil)))
    assert status == 200, created
    status, answer = await check(http, mesh, created["id"], input=json.dumps({"t": "a" * 40 + "!"}))
    assert status == 200, answer
    assert codes(answer) == [("INPUT_INVALID", "/t")]

    lookahead = {"type": "string", "pattern": "^(?=a)"}
    status, answer = await create(http, mesh, admin_token, agent_body(input_schema=json.dumps(lookahead)))
    assert status == 400, answer
    assert "cannot be applied" in edge_violations(answer)["agent.capabilities[0].input_schema"]
