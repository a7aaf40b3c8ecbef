"""A peer's record and the federation health agree with what happened: real meshes, real queries, real checks."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiohttp

from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import SERVICES

from ..conftest import MeshFactory, MeshHandle
from .conftest import Peers, add_peer, admin, call, federation_health, monitor_env, until


async def peer_record(http: aiohttp.ClientSession, a: MeshHandle, peer_id: str) -> dict[str, Any]:
    return dict(await call(http, "GET", a.url(f"/api/v1/federation/peers/{peer_id}"), headers=admin(a)))


async def test_a_queried_and_checked_peer_shows_what_was_learned(peers: Peers, http: aiohttp.ClientSession) -> None:
    a, b = peers.a, peers.b
    token = (
        await call(http, "POST", b.url("/api/v1/federation/credentials"), headers=admin(b), json={"name": "mesh-a"})
    )["token"]
    word = "zq" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))
    await call(
        http,
        "POST",
        b.url("/api/v1/agents"),
        headers=admin(b),
        json={
            "did": f"did:web:test.example:{word}",
            "name": f"Shared {word}",
            "description": "shared with peers",
            "version": "1.0.0",
            "agent_type": "nlp",
            "endpoints": [{"protocol": "http", "url": f"https://agents.example/{word}"}],
            "sharing": "federated",
        },
    )
    info = await call(http, "GET", b.url("/.well-known/agentvault-federation"), headers={})
    # Mesh B was added the way an operator does: URL and key only; protocol and endpoint are left for discovery
    # to find. Its key is replaced by one B really issued, so that A's federated searches of B succeed.
    peer_id = peers.healthy
    await call(
        http,
        "PATCH",
        a.url(f"/api/v1/federation/peers/{peer_id}"),
        headers=admin(a),
        json={"api_key": token},
    )
    found = await call(
        http, "GET", a.url(f"/api/v1/discovery/agents?include_federated=true&search={word}"), headers=admin(a)
    )
    assert [x["name"] for x in found["agents"]] == [f"Shared {word}"], found

    record = await until(
        lambda: peer_record(http, a, peer_id),
        # Checked after the search, so the count it holds is the one B reports now (the record keeps the count
        # of the last check, which may predate agents other tests shared on B).
        lambda r: (
            r.get("health_status") == "healthy"
            and r.get("protocol") == "grpc"
            and int(r.get("agent_count", 0)) == int(info["agent_count"])
        ),
        "the checked peer's record",
    )
    assert record["grpc_endpoint"] == info["grpc_endpoint"], record
    assert int(record["agent_count"]) == int(info["agent_count"]) >= 1, (record, info)
    assert not record.get("is_down", False), record
    health = await federation_health(http, a)
    entry = next(p for p in health["peers"] if p["peer_id"] == peer_id)
    assert entry["status"] == "healthy" and not entry.get("is_down", False), entry


async def test_overall_status_agrees_with_the_peers_it_summarises(peers: Peers, http: aiohttp.ClientSession) -> None:
    # The refused, silent and failing peers go down after the threshold; mesh B stays up.
    doc = await until(
        lambda: federation_health(http, peers.a),
        lambda d: any(p.get("is_down") for p in d["peers"]) and any(p["status"] == "healthy" for p in d["peers"]),
        "some peers down and one healthy",
    )
    assert_overall_agrees(doc)
    assert doc["overall_status"] == "degraded"


async def test_failures_below_the_threshold_are_not_down(
    http: aiohttp.ClientSession, mesh_factory: MeshFactory
) -> None:
    # A mesh of its own whose one peer refuses connections, with a threshold no test waits for: every check
    # fails, no peer is down, so the federation is degraded, not down.
    minimal = tuple(s for s in SERVICES if s.name in ("registry", "health-monitor", "edge"))
    env = {**monitor_env(), "FEDERATION_UNHEALTHY_THRESHOLD": "1000", "FEDERATION_REGISTRY_NAME": "mesh-d"}
    d = await asyncio.to_thread(mesh_factory, services=minimal, env=env, name="hm_d")
    try:
        refused = await add_peer(http, d, "Stopped registry", f"http://127.0.0.1:{free_port()}")
        doc = await until(
            lambda: federation_health(http, d),
            lambda doc: any(p["peer_id"] == refused and p["status"] == "unreachable" for p in doc["peers"]),
            "the refused peer checked",
        )
        assert not any(p.get("is_down") for p in doc["peers"]), doc
        assert doc["overall_status"] == "degraded", doc
        assert_overall_agrees(doc)
    finally:
        await asyncio.to_thread(d.mesh.stop)


def assert_overall_agrees(doc: dict[str, Any]) -> None:
    entries = doc["peers"]
    overall = doc.get("overall_status", "unspecified")
    if overall == "down":
        assert entries and all(p.get("is_down") for p in entries), doc
    elif overall == "healthy":
        assert entries and all(p["status"] == "healthy" and not p.get("is_down") for p in entries), doc
    elif overall == "degraded":
        assert any(not p.get("is_down") for p in entries) and any(p["status"] != "healthy" for p in entries), doc
    else:
        assert not entries, doc
