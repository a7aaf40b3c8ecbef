"""The health monitor against real peers on loopback: statuses, thresholds, write-back, history, watch, agents."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import aiohttp
import grpc

from agentvault.devserver.mesh import SERVICES
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.healthmonitor.v1 import health_monitor_service_pb2 as pb
from agentvault.healthmonitor.v1 import health_monitor_service_pb2_grpc as hm_grpc

from ..conftest import MeshFactory, bearer, unique_did
from .conftest import (
    DEADLINE,
    THRESHOLD,
    Peers,
    add_peer,
    admin,
    call,
    federation_health,
    peer_entry,
    sse_events,
    until,
)

SEED_PEER_KEYS = {"peer_id", "name", "status", "response_time_ms", "last_check", "error"}


async def test_each_kind_of_peer_gets_its_own_status(peers: Peers, http: aiohttp.ClientSession) -> None:
    expected = {
        peers.healthy: "healthy",
        peers.refused: "unreachable",
        peers.silent: "timeout",
        peers.failing: "unhealthy",
        peers.flapping: "healthy",
    }

    def settled(doc: dict[str, Any]) -> bool:
        got = {p["peer_id"]: p["status"] for p in doc["peers"]}
        return all(got.get(peer) == status for peer, status in expected.items())

    doc = await until(lambda: federation_health(http, peers.a), settled, "every peer's first checks")
    # The seed's document.
    assert doc["overall_status"] == "degraded"
    assert doc["total_peers"] == 5
    assert doc["active_peers"] == 2
    by_id = {p["peer_id"]: p for p in doc["peers"]}
    for entry in by_id.values():
        assert set(entry) >= SEED_PEER_KEYS
        assert entry["last_check"]
    assert by_id[peers.healthy]["name"] == "Mesh B"
    assert by_id[peers.healthy]["response_time_ms"] > 0
    assert by_id[peers.healthy]["error"] == ""
    assert by_id[peers.failing]["error"] == "HTTP 500"
    assert "cannot connect" in by_id[peers.refused]["error"]
    assert by_id[peers.silent]["error"].startswith("no answer within")


async def test_failing_peers_go_down_after_the_threshold_and_the_registry_record_says_so(
    peers: Peers, http: aiohttp.ClientSession
) -> None:
    def down(peer: dict[str, Any]) -> bool:
        return bool(peer["is_down"])

    entry = await until(lambda: peer_entry(http, peers.a, peers.refused), down, "the refused peer to be down")
    assert entry["consecutive_failures"] >= THRESHOLD
    record = await until(
        lambda: call(http, "GET", peers.a.url(f"/api/v1/federation/peers/{peers.refused}"), headers=admin(peers.a)),
        lambda r: r["is_down"] and r["health_status"] == "unreachable",
        "the registry's record of the refused peer",
    )
    assert record["consecutive_failures"] >= THRESHOLD
    assert record["last_health_check"]
    # A healthy peer is never down.
    healthy = await peer_entry(http, peers.a, peers.healthy)
    assert not healthy["is_down"] and healthy["consecutive_failures"] == 0


async def test_a_healthy_mesh_reports_its_agent_count_to_the_registry_record(
    peers: Peers, http: aiohttp.ClientSession
) -> None:
    for _ in range(2):
        await call(
            http,
            "POST",
            peers.b.url("/api/v1/agents"),
            headers=admin(peers.b),
            json={"did": unique_did("shared"), "name": "Shared", "version": "1.0.0", "sharing": "federated"},
        )
    await call(
        http,
        "POST",
        peers.b.url("/api/v1/agents"),
        headers=admin(peers.b),
        json={"did": unique_did("local"), "name": "Local", "version": "1.0.0", "sharing": "local"},
    )
    record = await until(
        lambda: call(http, "GET", peers.a.url(f"/api/v1/federation/peers/{peers.healthy}"), headers=admin(peers.a)),
        lambda r: r["health_status"] == "healthy" and r["agent_count"] == 2,
        "mesh B's agent count on its peer record",
    )
    assert record["protocol"] in ("unspecified", "grpc")
    assert not record["is_down"]


async def _next_event(stream: Any, subject_id: str, deadline: float = DEADLINE) -> pb.WatchHealthResponse:
    end = time.monotonic() + deadline
    while True:
        event = await asyncio.wait_for(stream.read(), max(end - time.monotonic(), 0.01))
        assert event is not grpc.aio.EOF
        if event.subject_id == subject_id:
            return event


async def _open_watch(stub: hm_grpc.HealthMonitorServiceAsyncStub, peers: Peers, token: str, count: int) -> Any:
    stream = stub.WatchHealth(pb.WatchHealthRequest(include_current=True), metadata=bearer(token))
    # The current state comes first, one event per active peer, and only after the change feed is subscribed.
    current: list[Any] = [await asyncio.wait_for(stream.read(), DEADLINE) for _ in range(count)]
    assert len({e.subject_id for e in current}) == count
    assert all(e.previous_status == fed_pb.PEER_STATUS_UNSPECIFIED for e in current)
    return stream


async def test_one_lost_answer_does_not_take_a_peer_down_but_a_run_of_them_does(
    peers: Peers, http: aiohttp.ClientSession, monitor_stub: hm_grpc.HealthMonitorServiceAsyncStub
) -> None:
    await until(lambda: peer_entry(http, peers.a, peers.flapping), lambda p: p["status"] == "healthy", "flapper up")
    total = (await federation_health(http, peers.a))["total_peers"]
    stream = await _open_watch(monitor_stub, peers, peers.a.admin_token, total)
    try:
        # Exactly one failed answer: the status changes twice, and the peer is never down.
        peers.flapper.next_statuses.append(500)
        failed = await _next_event(stream, peers.flapping)
        assert failed.previous_status == fed_pb.PEER_STATUS_HEALTHY
        assert failed.status == fed_pb.PEER_STATUS_UNHEALTHY
        assert failed.error == "HTTP 500"
        assert not failed.is_down
        assert failed.subject_kind == "peer" and failed.name == "Flapping registry"
        recovered = await _next_event(stream, peers.flapping)
        assert recovered.status == fed_pb.PEER_STATUS_HEALTHY and not recovered.is_down

        # Failing for good: unhealthy at once, down only at the threshold.
        peers.flapper.status = 500
        first = await _next_event(stream, peers.flapping)
        assert first.status == fed_pb.PEER_STATUS_UNHEALTHY and not first.is_down
        down = await _next_event(stream, peers.flapping)
        assert down.status == fed_pb.PEER_STATUS_UNHEALTHY and down.is_down
        entry = await peer_entry(http, peers.a, peers.flapping)
        assert entry["is_down"] and entry["consecutive_failures"] >= THRESHOLD

        # One success brings it back.
        peers.flapper.status = 200
        up = await _next_event(stream, peers.flapping)
        assert up.status == fed_pb.PEER_STATUS_HEALTHY and not up.is_down
        record = await until(
            lambda: call(
                http, "GET", peers.a.url(f"/api/v1/federation/peers/{peers.flapping}"), headers=admin(peers.a)
            ),
            lambda r: r["health_status"] == "healthy",
            "the registry's record of the flapper",
        )
        assert not record["is_down"] and record["consecutive_failures"] == 0
    finally:
        peers.flapper.status = 200
        stream.cancel()


async def test_changes_stream_over_http_as_server_sent_events(peers: Peers, http: aiohttp.ClientSession) -> None:
    total = (await federation_health(http, peers.a))["total_peers"]
    url = peers.a.url("/api/v1/federation/health:watch?include_current=true")
    async with http.get(url, headers=admin(peers.a), timeout=aiohttp.ClientTimeout(total=DEADLINE * 2)) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        seen: list[dict[str, Any]] = []

        async def read_until(done: Any) -> dict[str, Any]:
            while True:
                line = await asyncio.wait_for(response.content.readline(), DEADLINE)
                assert line, "the stream ended"
                for event in sse_events(line):
                    seen.append(event)
                    if done(event):
                        return event

        await read_until(lambda e: len(seen) >= total)
        assert {e["subject_id"] for e in seen} >= {peers.healthy, peers.failing}
        failing_now = next(e for e in seen if e["subject_id"] == peers.failing)
        assert failing_now["status"] == "unhealthy"
        peers.failer.status = 200
        try:
            event = await read_until(lambda e: e["subject_id"] == peers.failing and e["status"] == "healthy")
        finally:
            peers.failer.status = 500
        assert event["previous_status"] == "unhealthy"
        assert event["subject_kind"] == "peer" and event["name"] == "Failing registry"
        assert event["time"] and event["response_time_ms"] > 0


async def test_history_newest_first_with_uptime_and_response_time(peers: Peers, http: aiohttp.ClientSession) -> None:
    def history(peer_id: str, query: str = "") -> Any:
        url = peers.a.url(f"/api/v1/federation/health/peers/{peer_id}{query}")
        return call(http, "GET", url, headers=admin(peers.a))

    doc = await until(lambda: history(peers.healthy, "?limit=3"), lambda d: len(d["checks"]) == 3, "3 checks of B")
    times = [c["time"] for c in doc["checks"]]
    assert times == sorted(times, reverse=True)
    assert all(c["status"] == "healthy" for c in doc["checks"])
    summary = doc["summary"]
    assert summary["peer_id"] == peers.healthy and summary["name"] == "Mesh B"
    assert summary["uptime_percent"] == 100.0
    assert summary["avg_response_time_ms"] > 0

    refused = await history(peers.refused, "?window_seconds=3600")
    assert refused["summary"]["uptime_percent"] == 0.0
    assert all(c["status"] == "unreachable" for c in refused["checks"])

    body = await call(
        http,
        "GET",
        peers.a.url("/api/v1/federation/health/peers/00000000-0000-0000-0000-000000000000"),
        headers=admin(peers.a),
        expect=404,
    )
    assert "not found" in str(body).lower()


async def test_agents_with_a_health_check_url_are_checked_and_written_back(
    peers: Peers, http: aiohttp.ClientSession
) -> None:
    agent = await call(
        http,
        "POST",
        peers.a.url("/api/v1/agents"),
        headers=admin(peers.a),
        json={
            "did": unique_did("checked"),
            "name": "Checked agent",
            "version": "1.0.0",
            "health_check_url": peers.agent_server.url + "/agent/health",
        },
    )

    def get() -> Any:
        return call(http, "GET", peers.a.url(f"/api/v1/agents/{agent['id']}"), headers=admin(peers.a))

    await until(get, lambda a: a["health_status"] == "healthy", "the agent to be healthy")
    peers.agent_server.status = 503
    try:
        await until(get, lambda a: a["health_status"] == "unhealthy", "the agent to be unhealthy")
    finally:
        peers.agent_server.status = 200
    await until(get, lambda a: a["health_status"] == "healthy", "the agent to be healthy again")


async def test_health_is_for_admins(peers: Peers, http: aiohttp.ClientSession) -> None:
    url = peers.a.url("/api/v1/federation/health")
    await call(http, "GET", url, headers={}, expect=401)
    key = await call(
        http,
        "POST",
        peers.a.url("/api/v1/api-keys"),
        headers=admin(peers.a),
        json={"name": f"member-{secrets.token_hex(3)}", "role": "member"},
    )
    await call(http, "GET", url, headers={"Authorization": f"Bearer {key['token']}"}, expect=403)


async def test_metrics_export_peer_health_and_check_durations(peers: Peers, http: aiohttp.ClientSession) -> None:
    async def scrape() -> str:
        async with http.get(peers.metrics_url) as response:
            return await response.text()

    text = await until(
        scrape,
        lambda t: (
            'federation_peer_health{peer_name="Mesh B"} 1.0' in t
            and 'federation_peer_health{peer_name="Stopped registry"} 0.0' in t
        ),
        "the peer health gauges",
    )
    assert 'health_check_duration_seconds_count{status="timeout",subject_kind="peer"}' in text
    assert 'health_check_duration_seconds_count{status="healthy",subject_kind="peer"}' in text


async def test_a_real_mesh_that_stops_goes_down_and_comes_back(
    peers: Peers, http: aiohttp.ClientSession, mesh_factory: MeshFactory
) -> None:
    minimal = tuple(s for s in SERVICES if s.name in ("registry", "edge"))
    c = await asyncio.to_thread(mesh_factory, services=minimal, env={"FEDERATION_REGISTRY_NAME": "mesh-c"}, name="hm_c")
    peer_c = await add_peer(http, peers.a, "Mesh C", c.url())
    try:
        await until(lambda: peer_entry(http, peers.a, peer_c), lambda p: p["status"] == "healthy", "C healthy")
        await asyncio.to_thread(c.mesh.stop)
        entry = await until(lambda: peer_entry(http, peers.a, peer_c), lambda p: p["is_down"], "C down")
        assert entry["status"] in ("unreachable", "timeout")
        await asyncio.to_thread(c.mesh.start)
        entry = await until(lambda: peer_entry(http, peers.a, peer_c), lambda p: p["status"] == "healthy", "C up")
        assert not entry["is_down"]
    finally:
        await call(http, "DELETE", peers.a.url(f"/api/v1/federation/peers/{peer_c}"), headers=admin(peers.a))
        await asyncio.to_thread(c.mesh.stop)
    # A deleted peer leaves the federation health document.
    doc = await until(
        lambda: federation_health(http, peers.a),
        lambda d: all(p["peer_id"] != peer_c for p in d["peers"]),
        "C to leave the document",
    )
    assert doc["total_peers"] == 5
