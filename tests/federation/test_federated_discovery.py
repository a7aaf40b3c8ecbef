"""Federated discovery across three real meshes: results, stats, cache, failures and the signed peer API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest

from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc

from ..conftest import MeshFactory, eventually
from .conftest import QUERY_TIMEOUT_MS, Federation, add_peer, admin, call, discover, register, rename, unique_word

# Time the rest of a search may take on top of the slowest peer's deadline (loopback, loaded CI machine).
MARGIN_SECONDS = 1.0


def by_name(response: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in response["agents"]}


def peer_stat(response: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in response["federation_stats"]["peers"] if p["name"] == name)


async def until_queried(
    http: aiohttp.ClientSession,
    on: Any,
    present: Iterable[str] = (),
    absent: Iterable[str] = (),
    status: dict[str, str] | None = None,
    seconds: float = 30.0,
) -> None:
    """The aggregator re-reads the peer list every 1.5 s: polls federated searches (a new word each, so no memo
    answers) until it asks the `present` peers, no longer asks the `absent` ones, and reports `status` for them."""
    wanted, gone = set(present), set(absent)
    deadline = time.monotonic() + seconds
    while True:
        stats = (await discover(http, on, include_federated=True, search=unique_word()))["federation_stats"]
        seen = {p["name"]: p["status"] for p in stats["peers"]}
        if (
            wanted <= seen.keys()
            and not gone & seen.keys()
            and all(seen.get(k) == v for k, v in (status or {}).items())
        ):
            return
        assert time.monotonic() < deadline, f"the aggregator still asks {seen}; wanted {wanted}, not {gone}"
        await asyncio.sleep(0.1)


async def metric(http: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample, 0 when the series does not exist yet."""
    async with http.get(url) as response:
        text = await response.text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        series, _, value = line.rpartition(" ")
        found = series[len(name) :].strip("{}")
        if all(part in found.split(",") for part in want.split(",") if part):
            total += float(value)
    return total


async def test_shared_agents_are_found_from_a_private_ones_are_not(
    federation: Federation, http: aiohttp.ClientSession
) -> None:
    word = unique_word()
    await register(http, federation.a, f"Local {word}", "local")
    await register(http, federation.b, f"Shared {word} B", "federated")
    await register(http, federation.b, f"Kept {word} B", "local")
    await register(http, federation.b, f"Secret {word} B", "private")
    await register(http, federation.c, f"Shared {word} C", "federated")

    reply = await discover(http, federation.a, include_federated=True, search=word)

    agents = by_name(reply)
    assert set(agents) == {f"Local {word}", f"Shared {word} B", f"Shared {word} C"}
    assert agents[f"Local {word}"]["is_federated"] is False
    assert agents[f"Local {word}"]["registry_name"] == "mesh-a"
    b = agents[f"Shared {word} B"]
    assert b["is_federated"] is True
    assert b["registry_url"] == federation.b.url()
    assert b["registry_name"] == "Partner B"
    assert agents[f"Shared {word} C"]["registry_url"] == federation.c.url()
    stats = reply["federation_stats"]
    assert stats["queried_registries"] == 2
    assert stats["successful_queries"] == 2
    assert stats["failed_queries"] == 0
    assert stats["skipped_registries"] == 0
    assert stats["total_federated_results"] == 2
    assert {p["name"]: p["status"] for p in stats["peers"]} == {"Partner B": "ok", "Partner C": "ok"}
    assert all(p["result_count"] == 1 and p["error"] == "" for p in stats["peers"])
    # The same search without federation stays local and carries no stats.
    local = await discover(http, federation.a, search=word)
    assert [a["name"] for a in local["agents"]] == [f"Local {word}"]
    assert local.get("federation_stats") in (None, {})


async def test_duplicates_by_did_local_wins_and_ranking_is_shared(
    federation: Federation, http: aiohttp.ClientSession
) -> None:
    word = unique_word()
    did_local = f"did:web:dup.example:{word}-local"
    did_peers = f"did:web:dup.example:{word}-peers"
    await register(http, federation.a, f"Copy {word} in A", "local", did=did_local)
    await register(http, federation.b, f"Copy {word} in B", "federated", did=did_local)
    await register(http, federation.b, f"Twin {word} B", "federated", did=did_peers)
    await register(http, federation.c, f"Twin {word} C", "federated", did=did_peers)
    # Matches the word only in its description: ranks below the agents whose name holds it.
    await register(http, federation.c, "Bystander", "federated", description=f"mentions {word} in passing")

    reply = await discover(http, federation.a, include_federated=True, search=word, force_refresh=True)

    dids = [a["did"] for a in reply["agents"]]
    assert len(dids) == len(set(dids)) == 3
    first = next(a for a in reply["agents"] if a["did"] == did_local)
    assert first["is_federated"] is False and first["name"] == f"Copy {word} in A"
    assert reply["agents"][-1]["name"] == "Bystander"
    scores = [a["score"] for a in reply["agents"]]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > scores[-1] > 0
    # Before deduplication B and C contributed four agents.
    assert reply["federation_stats"]["total_federated_results"] == 4


async def test_paging_over_the_merged_list(federation: Federation, http: aiohttp.ClientSession) -> None:
    word = unique_word()
    for i in range(3):
        await register(http, federation.a, f"Pager {word} A{i}", "local")
        await register(http, federation.b, f"Pager {word} B{i}", "federated")
    full = await discover(http, federation.a, include_federated=True, search=word)
    assert len(full["agents"]) == 6 and full["next_page_token"] == ""

    seen: list[str] = []
    token = ""
    for _ in range(10):
        params: dict[str, Any] = {"include_federated": True, "search": word, "page_size": 4}
        if token:
            params["page_token"] = token
        page = await discover(http, federation.a, **params)
        seen += [a["did"] for a in page["agents"]]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == [a["did"] for a in full["agents"]]
    # A token is bound to its query.
    first = await discover(http, federation.a, include_federated=True, search=word, page_size=2)
    body = await call(
        http,
        "GET",
        federation.a.url("/api/v1/discovery/agents"),
        params={"include_federated": "true", "search": word + "x", "page_token": first["next_page_token"]},
        expect=400,
    )
    assert "page_token" in str(body)


async def test_cache_hit_costs_no_network_and_force_refresh_bypasses_it(
    federation: Federation, http: aiohttp.ClientSession
) -> None:
    word = unique_word()
    await register(http, federation.b, f"Cached {word}", "federated")
    hits_before = await metric(http, federation.discovery_metrics, "federation_cache_hits_total", peer_name="Partner B")
    labels = {"grpc_service": "agentvault.federation.v1.FederationService", "grpc_method": "SearchAgents"}
    calls = federation.registry_b_metrics
    served_before = await metric(http, calls, "grpc_server_handled_total", **labels)

    first = await discover(http, federation.a, include_federated=True, search=word)
    assert peer_stat(first, "Partner B")["from_cache"] is False
    assert await metric(http, calls, "grpc_server_handled_total", **labels) == served_before + 1

    second = await discover(http, federation.a, include_federated=True, search=word)
    b = peer_stat(second, "Partner B")
    assert b["from_cache"] is True and b["status"] == "ok" and b["result_count"] == 1
    assert second["federation_stats"]["cached_queries"] == 2
    assert [a["name"] for a in second["agents"]] == [f"Cached {word}"]
    hits = await metric(http, federation.discovery_metrics, "federation_cache_hits_total", peer_name="Partner B")
    assert hits == hits_before + 1
    # B was not asked again.
    assert await metric(http, calls, "grpc_server_handled_total", **labels) == served_before + 1

    third = await discover(http, federation.a, include_federated=True, search=word, force_refresh=True)
    assert peer_stat(third, "Partner B")["from_cache"] is False
    assert await metric(http, calls, "grpc_server_handled_total", **labels) == served_before + 2
    durations = await metric(
        http,
        federation.discovery_metrics,
        "federation_query_duration_seconds_count",
        peer_name="Partner B",
        status="cached",
    )
    assert durations >= 1

    # The answers reached A's own tables (written in the background) and the seed's troubleshooting SQL works.
    conn = await asyncpg.connect(federation.a.database_url)
    try:
        for _ in range(50):
            cached = await conn.fetchval(
                "SELECT count(*) FROM federated_agents_cache WHERE peer_id = $1 AND agent_data->>'name' = $2",
                federation.peer_b,
                f"Cached {word}",
            )
            if cached:
                break
            await asyncio.sleep(0.1)
        assert cached == 1
        slow = await conn.fetch(
            """SELECT peer_id, COUNT(*) as query_count, AVG(response_time_ms)
               FROM federation_query_log
               WHERE created_at > NOW() - INTERVAL '1 hour'
               GROUP BY peer_id
               ORDER BY AVG(response_time_ms) DESC"""
        )
        assert {str(r["peer_id"]) for r in slow} >= {federation.peer_b, federation.peer_c}
        expected = [(False, "ok"), (True, "ok"), (False, "ok")]
        for _ in range(50):
            logged = await conn.fetch(
                "SELECT from_cache, status FROM federation_query_log WHERE peer_id = $1 ORDER BY id DESC LIMIT 3",
                federation.peer_b,
            )
            if [(r["from_cache"], r["status"]) for r in logged] == expected:
                break
            await asyncio.sleep(0.1)
        assert [(r["from_cache"], r["status"]) for r in logged] == expected
    finally:
        await conn.close()


async def test_clear_peer_cache_is_admin_only(federation: Federation, http: aiohttp.ClientSession) -> None:
    word = unique_word()
    await register(http, federation.b, f"Clearable {word}", "federated")
    await discover(http, federation.a, include_federated=True, search=word)
    url = federation.a.url(f"/api/v1/discovery/cache/{federation.peer_b}")

    await call(http, "DELETE", url, expect=401)
    member = await call(
        http, "POST", federation.a.url("/api/v1/api-keys"), headers=admin(federation.a), json={"name": "plain-user"}
    )
    await call(http, "DELETE", url, headers={"Authorization": f"Bearer {member['token']}"}, expect=403)
    await call(
        http, "DELETE", federation.a.url("/api/v1/discovery/cache/not-a-uuid"), headers=admin(federation.a), expect=400
    )

    cleared = await call(http, "DELETE", url, headers=admin(federation.a))
    assert cleared["cleared_entries"] >= 1
    after = await discover(http, federation.a, include_federated=True, search=word)
    assert peer_stat(after, "Partner B")["from_cache"] is False
    assert peer_stat(after, "Partner C")["from_cache"] is True


async def test_invalid_requests_are_rejected_with_field_violations(
    federation: Federation, http: aiohttp.ClientSession
) -> None:
    url = federation.a.url("/api/v1/discovery/agents")
    cases = {
        "search": {"search": "x" * 300},
        "agent_type": {"agent_type": "Not A Type"},
        "capability_version": {"capability_version": ">=1.0"},
        "page_size": {"page_size": "-1"},
        "page_token": {"page_token": "garbage!"},
    }
    for field, params in cases.items():
        body = await call(http, "GET", url, params=params, expect=400)
        assert field in str(body), (field, body)


async def test_a_stopped_peer_fails_within_its_deadline(federation: Federation, http: aiohttp.ClientSession) -> None:
    word = unique_word()
    await register(http, federation.b, f"Survivor {word}", "federated")
    federation.c.mesh.stop_service("registry")
    try:
        start = time.perf_counter()
        reply = await discover(http, federation.a, include_federated=True, search=word, force_refresh=True)
        elapsed = time.perf_counter() - start
    finally:
        federation.c.mesh.start_service("registry")
    assert elapsed < QUERY_TIMEOUT_MS / 1000 + MARGIN_SECONDS
    stats = reply["federation_stats"]
    assert stats["failed_queries"] == 1
    assert stats["successful_queries"] == 1
    assert peer_stat(reply, "Partner C")["status"] in ("failed", "timeout")
    assert peer_stat(reply, "Partner C")["error"]
    assert [a["name"] for a in reply["agents"]] == [f"Survivor {word}"]


async def test_peer_key_is_not_readable_in_the_database(federation: Federation) -> None:
    conn = await asyncpg.connect(federation.a.database_url)
    try:
        rows = await conn.fetch("SELECT * FROM federation_peers")
    finally:
        await conn.close()
    assert len(rows) >= 2
    dump = repr([dict(r) for r in rows])
    for token in (federation.token_b_for_a, federation.token_c_for_a):
        assert token not in dump
        # avf_<id>_<secret>: the secret is url-safe base64 and may itself contain "_".
        assert token.split("_", 2)[2] not in dump


@pytest.fixture
async def garbage_grpc_peer() -> AsyncIterator[str]:
    """A real gRPC server on loopback whose FederationService.SearchAgents answers bytes that are no protobuf."""

    async def search(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"\xff\xff\xff\xff not a message"

    handler = grpc.method_handlers_generic_handler(
        "agentvault.federation.v1.FederationService",
        {"SearchAgents": grpc.unary_unary_rpc_method_handler(search)},  # raw bytes both ways
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.mark.slow
async def test_misbehaving_peers_cost_at_most_their_deadline(
    federation: Federation, http: aiohttp.ClientSession, bad_peers: str, garbage_grpc_peer: str
) -> None:
    word = unique_word()
    await register(http, federation.b, f"Robust {word}", "federated")
    a = federation.a
    ids = {
        "Hanging": await add_peer(http, a, "Hanging", f"{bad_peers}/hang", "key-hang"),
        "Garbage": await add_peer(http, a, "Garbage", f"{bad_peers}/garbage", "key-garbage"),
        "Huge": await add_peer(http, a, "Huge", f"{bad_peers}/huge", "key-huge"),
        "Mixed": await add_peer(http, a, "Mixed", f"{bad_peers}/mixed", "key-mixed"),
        # B again under another spelling of its URL, with a token B never issued.
        "Wrong token": await add_peer(
            http, a, "Wrong token", federation.b.url().replace("127.0.0.1", "localhost"), "avf_0000000000000000_nope"
        ),
    }
    ids["Garbage gRPC"] = await add_peer(
        http,
        a,
        "Garbage gRPC",
        f"http://{garbage_grpc_peer}",
        "key-garbage-grpc",
        protocol="grpc",
        grpc_endpoint=garbage_grpc_peer,
    )
    try:
        await until_queried(http, a, present=set(ids))
        start = time.perf_counter()
        reply = await discover(http, a, include_federated=True, search=word, force_refresh=True)
        elapsed = time.perf_counter() - start
        assert elapsed < QUERY_TIMEOUT_MS / 1000 + MARGIN_SECONDS

        stats = reply["federation_stats"]
        status = {p["name"]: p["status"] for p in stats["peers"]}
        assert status["Hanging"] == "timeout"
        assert status["Garbage"] == "failed"
        assert "json" in peer_stat(reply, "Garbage")["error"].lower()
        assert status["Huge"] == "failed"
        assert "too large" in peer_stat(reply, "Huge")["error"]
        assert status["Garbage gRPC"] == "failed"
        assert "unreadable" in peer_stat(reply, "Garbage gRPC")["error"]
        assert status["Wrong token"] == "failed"
        assert "auth" in peer_stat(reply, "Wrong token")["error"].lower()
        # The mixed peer's one valid agent is kept; the invalid ones are dropped.
        assert status["Mixed"] == "ok"
        assert peer_stat(reply, "Mixed")["result_count"] == 1
        assert status["Partner B"] == status["Partner C"] == "ok"
        assert stats["queried_registries"] == 8
        assert stats["successful_queries"] == 3
        assert stats["failed_queries"] == 5
        names = {x["name"] for x in reply["agents"]}
        assert f"Robust {word}" in names
        assert "Valid mixed agent" in names
        assert peer_stat(reply, "Hanging")["latency_ms"] < QUERY_TIMEOUT_MS + 500

        # A peer the health monitor reports down is skipped: no query, no deadline spent. A's monitor checks a
        # new peer once (then not for an hour): wait for that check, so it cannot overwrite the report below.
        hanging = a.url(f"/api/v1/federation/peers/{ids['Hanging']}")
        for _ in range(100):
            if (await call(http, "GET", hanging, headers=admin(a))).get("last_health_check"):
                break
            await asyncio.sleep(0.25)
        # ReportPeerHealth is internal (gRPC only, no HTTP route): called as the health monitor calls it.
        async with grpc.aio.insecure_channel(a.address("registry")) as channel:
            await fed_grpc.PeerServiceStub(channel).ReportPeerHealth(
                fed_pb.ReportPeerHealthRequest(
                    peer_id=ids["Hanging"], status=fed_pb.PEER_STATUS_TIMEOUT, is_down=True, consecutive_failures=3
                ),
                metadata=[("authorization", f"Bearer {a.admin_token}")],
            )
        await until_queried(http, a, status={"Hanging": "skipped"})
        start = time.perf_counter()
        reply = await discover(http, a, include_federated=True, search=word)
        elapsed = time.perf_counter() - start
        assert peer_stat(reply, "Hanging")["status"] == "skipped", reply["federation_stats"]
        assert elapsed < 1.0, reply["federation_stats"]
        assert reply["federation_stats"]["skipped_registries"] == 1
    finally:
        for peer_id in ids.values():
            await call(http, "DELETE", a.url(f"/api/v1/federation/peers/{peer_id}"), headers=admin(a))
        await until_queried(http, a, absent=set(ids))


async def test_a_changed_peer_answer_replaces_the_remembered_one(
    federation: Federation, http: aiohttp.ClientSession
) -> None:
    """Discovery validates each distinct peer answer once and remembers it; a peer answering differently is seen
    without force_refresh once its generation is checked again, at once with it, and the cache then holds the new
    answer."""
    word = unique_word()
    agent = await register(http, federation.b, f"Before {word}", "federated")
    for refresh in (True, True, False):
        reply = await discover(http, federation.a, include_federated=True, search=word, force_refresh=refresh)
        assert [a["name"] for a in reply["agents"]] == [f"Before {word}"]
        assert peer_stat(reply, "Partner B")["from_cache"] is not refresh

    await rename(http, federation.b, agent["id"], f"After {word}")

    async def revalidated() -> None:
        # The cached answer is dropped once B's sharing generation is checked again (FEDERATION_REVALIDATE_INTERVAL).
        cached = await discover(http, federation.a, include_federated=True, search=word)
        assert [a["name"] for a in cached["agents"]] == [f"After {word}"]

    await eventually(revalidated)
    fresh = await discover(http, federation.a, include_federated=True, search=word, force_refresh=True)
    assert [a["name"] for a in fresh["agents"]] == [f"After {word}"]
    again = await discover(http, federation.a, include_federated=True, search=word)
    assert peer_stat(again, "Partner B")["from_cache"] is True
    assert [a["name"] for a in again["agents"]] == [f"After {word}"]


async def test_local_changes_are_seen_by_the_next_search(federation: Federation, http: aiohttp.ClientSession) -> None:
    """Local answers are scored and merged once per distinct answer; a change makes a new answer at once."""
    word = unique_word()
    agent = await register(http, federation.a, f"Local {word}", "local")
    for _ in range(2):
        reply = await discover(http, federation.a, include_federated=True, search=word)
        assert [(a["name"], a["is_federated"]) for a in reply["agents"]] == [(f"Local {word}", False)]
    await rename(http, federation.a, agent["id"], f"Renamed {word}")
    reply = await discover(http, federation.a, include_federated=True, search=word)
    assert [a["name"] for a in reply["agents"]] == [f"Renamed {word}"]
    await call(http, "DELETE", federation.a.url(f"/api/v1/agents/{agent['id']}"), headers=admin(federation.a))
    reply = await discover(http, federation.a, include_federated=True, search=word)
    assert reply["agents"] == []


def test_federation_disabled_answers_locally(mesh_factory: MeshFactory) -> None:
    handle = mesh_factory(env={"FEDERATION_ENABLED": "false"}, name="fed_off")

    word = unique_word()

    async def search() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            await register(http, handle, f"Only {word}", "federated")
            return await discover(http, handle, include_federated=True, search=word)

    # A synchronous test: mesh_factory runs its own event loop to create the mesh's database.
    reply = asyncio.run(search())
    assert [a["name"] for a in reply["agents"]] == [f"Only {word}"]
    stats = reply["federation_stats"]
    assert stats["queried_registries"] == 0 and stats["peers"] == []


async def test_a_mesh_can_also_be_queried_in_the_seed_rest_form(
    federation: Federation, http: aiohttp.ClientSession
) -> None:
    word = unique_word()
    created = await register(http, federation.b, f"Restful {word}", "federated")
    a = federation.a
    # B once more, under another spelling of its URL, declared as a REST peer: signed GET /api/v1/agents.
    peer_id = await add_peer(
        http,
        a,
        "B over REST",
        federation.b.url().replace("127.0.0.1", "localhost"),
        federation.token_b_for_a,
        protocol="rest",
    )
    try:
        await until_queried(http, a, present={"B over REST"})
        reply = await discover(http, a, include_federated=True, search=word, force_refresh=True)
        rest = peer_stat(reply, "B over REST")
        assert (rest["status"], rest["result_count"], rest["error"]) == ("ok", 1, "")
        # Both copies carry the same DID: one result.
        assert [x["did"] for x in reply["agents"]] == [created["did"]]
    finally:
        await call(http, "DELETE", a.url(f"/api/v1/federation/peers/{peer_id}"), headers=admin(a))
        await until_queried(http, a, absent={"B over REST"})


async def test_cache_rows_are_written_again_only_for_new_or_changed_agents(
    federation: Federation, http: aiohttp.ClientSession
) -> None:
    # federated_agents_cache has one row per (agent, peer): an agent found again by another query is not written
    # again while its row is fresh, a new or changed one is.
    one, two = unique_word(), unique_word()
    both = await register(http, federation.b, f"Both {one} {two}", "federated")
    await discover(http, federation.a, include_federated=True, search=one)
    conn = await asyncpg.connect(federation.a.database_url)

    async def row(did: str) -> asyncpg.Record | None:
        return await conn.fetchrow(
            "SELECT cached_at, agent_data->>'name' AS name FROM federated_agents_cache"
            " WHERE peer_id = $1 AND agent_did = $2",
            federation.peer_b,
            did,
        )

    try:

        async def written(did: str) -> None:
            assert await row(did) is not None

        await eventually(lambda: written(both["did"]))
        first = await row(both["did"])
        assert first is not None
        # Another query whose answer holds the same agent and a new one: only the new one's row is written (the
        # two are queued together, so once the new row is there, the first would have been rewritten too).
        newcomer = await register(http, federation.b, f"Newcomer {two}", "federated")
        reply = await discover(http, federation.a, include_federated=True, search=two)
        assert {a["did"] for a in reply["agents"]} == {both["did"], newcomer["did"]}
        await eventually(lambda: written(newcomer["did"]))
        again = await row(both["did"])
        assert again is not None and again["cached_at"] == first["cached_at"]
        # Changed at B: written again.
        await rename(http, federation.b, both["id"], f"Renamed {one} {two}")

        async def renamed() -> None:
            changed = await row(both["did"])
            assert changed is not None and changed["name"] == f"Renamed {one} {two}"
            assert changed["cached_at"] > first["cached_at"]

        # force_refresh: B's answer to `one` is still cached, and B's generation was heard a moment ago.
        await discover(http, federation.a, include_federated=True, search=one, force_refresh=True)
        await eventually(renamed)
    finally:
        await conn.close()
