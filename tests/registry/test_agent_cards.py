"""A2A agent cards: a real a2a-sdk agent on loopback registered from its card through the edge, bad cards refused
with field violations, and every registered agent's card served and read by the SDK's own resolver."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
import uvicorn
from a2a.client.card_resolver import A2ACardResolver
from a2a.server.routes.agent_card_routes import create_agent_card_routes
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ..conftest import MeshHandle, auth, edge_violations, eventually, unique_did


def a2a_card(base: str) -> AgentCard:
    return AgentCard(
        name="Summarizer Agent",
        description="Summarizes text, built with a2a-sdk",
        version="2.3",
        supported_interfaces=[AgentInterface(url=f"{base}/a2a", protocol_binding="JSONRPC", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=False),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[
            AgentSkill(
                id="summarize",
                name="Summarize",
                description="Summarizes a text",
                tags=["text", "summary"],
                input_modes=["text/plain", "application/json"],
                output_modes=["text/plain"],
            ),
            AgentSkill(id="translate", name="Translate", description="Translates", tags=["text"]),
        ],
    )


def legacy_card(base: str) -> dict[str, Any]:
    """An A2A 0.3 card (url, preferredTransport, protocolVersion), as 0.3 agents serve at /.well-known/agent.json."""
    return {
        "protocolVersion": "0.3.0",
        "name": "Legacy Agent",
        "description": "An A2A 0.3 agent",
        "url": f"{base}/rpc",
        "preferredTransport": "JSONRPC",
        "version": "1.0.0",
        "capabilities": {"streaming": True},
        "defaultInputModes": ["text"],
        "defaultOutputModes": ["text"],
        "skills": [{"id": "echo", "name": "Echo", "description": "Echoes", "tags": ["test"]}],
    }


class Agents:
    """Two agents on loopback: an a2a-sdk agent (1.0 card, served by the SDK) with a few misbehaving card routes
    beside it, and a 0.3 agent serving only /.well-known/agent.json."""

    def __init__(self) -> None:
        self.sockets = [_listen(), _listen()]
        self.base = f"http://127.0.0.1:{self.sockets[0].getsockname()[1]}"
        self.legacy_base = f"http://127.0.0.1:{self.sockets[1].getsockname()[1]}"
        port = self.sockets[0].getsockname()[1]

        async def big(request: Request) -> Response:
            card = legacy_card(self.base)
            card["description"] = "x" * 70_000  # beyond the registry's 64 KiB
            return JSONResponse(card)

        async def elsewhere(request: Request) -> Response:
            # Same port, other host name: another origin.
            return RedirectResponse(f"http://localhost:{port}/.well-known/agent-card.json", status_code=302)

        async def same_origin(request: Request) -> Response:
            return RedirectResponse("/.well-known/agent-card.json", status_code=302)

        async def wrong_types(request: Request) -> Response:
            return JSONResponse({"name": 5, "version": ["1"], "skills": {"id": "x"}, "supportedInterfaces": "no"})

        async def nameless(request: Request) -> Response:
            card = legacy_card(self.base)
            del card["name"]
            return JSONResponse(card)

        async def legacy(request: Request) -> Response:
            return JSONResponse(legacy_card(self.legacy_base))

        self.app = Starlette(
            routes=[
                *create_agent_card_routes(a2a_card(self.base)),
                Route("/big.json", big),
                Route("/elsewhere.json", elsewhere),
                Route("/moved.json", same_origin),
                Route("/wrong-types.json", wrong_types),
                Route("/nameless.json", nameless),
            ]
        )
        self.legacy_app = Starlette(routes=[Route("/.well-known/agent.json", legacy)])

    async def run(self) -> AsyncIterator[Agents]:
        servers = [
            uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
            for app in (self.app, self.legacy_app)
        ]
        tasks = [asyncio.create_task(s.serve(sockets=[sock])) for s, sock in zip(servers, self.sockets, strict=True)]

        async def started() -> None:
            assert all(s.started for s in servers)

        await eventually(started)
        try:
            yield self
        finally:
            for s in servers:
                s.should_exit = True
            await asyncio.gather(*tasks)


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
async def agents() -> AsyncIterator[Agents]:
    async for running in Agents().run():
        yield running


async def import_card(
    http: aiohttp.ClientSession, mesh: MeshHandle, token: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.post(mesh.url("/api/v1/agents:importCard"), json=body, headers=auth(token)) as r:
        return r.status, await r.json()


async def test_register_a_real_a2a_agent_from_its_card(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str, agents: Agents
) -> None:
    # The SDK's own resolver reads the card the agent serves: what the registry is about to read.
    async with httpx.AsyncClient() as client:
        served = await A2ACardResolver(client, agents.base).get_agent_card()
    assert served.name == "Summarizer Agent"

    did = unique_did("a2a")
    status, agent = await import_card(http, mesh, admin_token, {"card_url": agents.base, "did": did})
    assert status == 200, agent
    assert agent["did"] == did and agent["name"] == "Summarizer Agent"
    assert agent["version"] == "2.3.0"  # "2.3" read as semver
    assert agent["owner"] == "prn_bootstrap_admin" and agent["sharing"] == "local"
    assert agent["endpoints"] == [{"protocol": "a2a", "url": f"{agents.base}/a2a"}]
    skills = {c["name"]: c for c in agent["capabilities"]}
    assert set(skills) == {"summarize", "translate"}
    summarize = skills["summarize"]
    assert summarize["kind"] == "skill" and summarize["title"] == "Summarize"
    assert summarize["description"] == "Summarizes a text" and summarize["tags"] == ["text", "summary"]
    assert summarize["input_modes"] == ["text/plain", "application/json"]
    assert summarize["output_modes"] == ["text/plain"]
    assert skills["translate"]["input_modes"] == ["text/plain"]  # the card's defaults

    # A redirect within the same origin is followed; the did defaults to did:web of the host and name.
    status, moved = await import_card(http, mesh, admin_token, {"card_url": f"{agents.base}/moved.json"})
    assert status == 200, moved
    port = agents.base.rsplit(":", 1)[1]
    assert moved["did"] == f"did:web:127.0.0.1%3A{port}:summarizer-agent"

    # Searchable like any agent, by its skills.
    async with http.get(mesh.url("/api/v1/agents"), params={"capability_name": "translate"}) as r:
        ids = {a["id"] for a in (await r.json())["agents"]}
    assert {agent["id"], moved["id"]} <= ids
    # And by the skills' titles and tags.
    async with http.get(mesh.url("/api/v1/agents"), params={"search": "summary translate"}) as r:
        assert agent["id"] in {a["id"] for a in (await r.json())["agents"]}


async def test_a2a_0_3_cards_are_accepted(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str, agents: Agents
) -> None:
    # By URL: 1.0's /.well-known/agent-card.json is missing, 0.3's /.well-known/agent.json is read.
    status, agent = await import_card(http, mesh, admin_token, {"card_url": agents.legacy_base + "/"})
    assert status == 200, agent
    assert agent["name"] == "Legacy Agent"
    assert agent["endpoints"] == [{"protocol": "a2a", "url": f"{agents.legacy_base}/rpc"}]
    assert [(c["name"], c["input_modes"]) for c in agent["capabilities"]] == [("echo", ["text"])]
    # Given inline.
    card = legacy_card("https://legacy.example")
    status, agent = await import_card(http, mesh, admin_token, {"card": json.dumps(card), "sharing": "private"})
    assert status == 200, agent
    assert agent["did"] == "did:web:legacy.example:legacy-agent" and agent["sharing"] == "private"


@pytest.mark.parametrize(
    ("path", "field", "words"),
    [
        ("/big.json", "card_url", "larger than 65536 bytes"),
        ("/elsewhere.json", "card_url", "redirects to another origin"),
        ("/wrong-types.json", "card.name", "must be a string"),
        ("/nameless.json", "card.name", "is required"),
        ("/no-such-card.json", "card_url", "HTTP 404"),
    ],
)
async def test_bad_cards_are_refused_with_field_violations(
    http: aiohttp.ClientSession,
    mesh: MeshHandle,
    admin_token: str,
    agents: Agents,
    path: str,
    field: str,
    words: str,
) -> None:
    status, answer = await import_card(http, mesh, admin_token, {"card_url": agents.base + path})
    assert status == 400, answer
    found = edge_violations(answer)
    assert words in found.get(field, ""), answer
    if path == "/wrong-types.json":
        assert {"card.version", "card.skills", "card.supportedInterfaces"} <= set(found), found


async def test_bad_inline_cards_and_requests_are_4xx(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str
) -> None:
    bad_skill = legacy_card("https://x.example")
    bad_skill["skills"] = [{"id": "has spaces", "name": "n", "tags": [1]}] + [{"id": f"s{i}"} for i in range(150)]
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "card_url"),
        ({"card": "{}", "card_url": "https://x.example/"}, "card_url"),
        ({"card": "[" * 100 + "]" * 100}, "card"),
        ({"card": "[]"}, "card"),
        ({"card": json.dumps(bad_skill)}, "card.skills"),
        ({"card": json.dumps(legacy_card("https://x.example")), "did": "nope"}, "did"),
        ({"card_url": "http://169.254.169.254/latest/meta-data"}, "card_url"),
        ({"card_url": "ftp://x.example/card.json"}, "card_url"),
    ]
    for body, field in cases:
        status, answer = await import_card(http, mesh, admin_token, body)
        assert status == 400, (body, answer)
        assert field in edge_violations(answer), (body, answer)
    async with http.post(mesh.url("/api/v1/agents:importCard"), json={"card": "{}"}) as r:
        assert r.status == 401


async def test_served_card_parses_with_the_a2a_sdk(
    http: aiohttp.ClientSession, mesh: MeshHandle, admin_token: str
) -> None:
    body = {
        "did": unique_did("card"),
        "name": "Served Agent",
        "description": "Registered directly",
        "version": "1.2.0",
        "capabilities": [
            {"kind": "skill", "name": "summarize", "title": "Summarize", "tags": ["text"], "input_modes": ["text"]},
            {"kind": "tool", "name": "search", "input_schema": json.dumps({"type": "object"})},
        ],
        "endpoints": [
            {"protocol": "a2a", "url": "https://served.example/a2a"},
            {"protocol": "websocket", "url": "wss://served.example/ws"},
        ],
    }
    async with http.post(mesh.url("/api/v1/agents"), json=body, headers=auth(admin_token)) as r:
        assert r.status == 200
        agent = await r.json()
    async with httpx.AsyncClient() as client:
        resolver = A2ACardResolver(client, mesh.url(f"/api/v1/agents/{agent['id']}"), "agent-card.json")
        card = await resolver.get_agent_card()
    assert card.name == "Served Agent" and card.version == "1.2.0" and card.description == "Registered directly"
    # The agent's own endpoint first, then the mesh's A2A endpoint for it (under the mesh's public URL).
    own = card.supported_interfaces[0]
    assert (own.url, own.protocol_binding) == ("https://served.example/a2a", "JSONRPC")
    assert [(i.url.endswith(f"/a2a/agents/{agent['id']}"), i.protocol_version) for i in card.supported_interfaces] == [
        (False, "1.0"),
        (True, "1.0"),
        (True, "0.3"),
    ]
    skills = {s.id: s for s in card.skills}
    assert skills["summarize"].name == "Summarize" and list(skills["summarize"].tags) == ["text"]
    assert list(skills["summarize"].input_modes) == ["text"]
    assert list(skills["search"].tags) == ["tool"] and list(skills["search"].input_modes) == ["application/json"]

    # Private agents' cards are as hidden as the agents.
    body = {**body, "did": unique_did("card"), "sharing": "private"}
    async with http.post(mesh.url("/api/v1/agents"), json=body, headers=auth(admin_token)) as r:
        hidden = await r.json()
    async with http.get(mesh.url(f"/api/v1/agents/{hidden['id']}/agent-card.json")) as r:
        assert r.status == 404
    async with http.get(mesh.url(f"/api/v1/agents/{hidden['id']}/agent-card.json"), headers=auth(admin_token)) as r:
        assert r.status == 200
        assert (await r.json())["name"] == "Served Agent"
