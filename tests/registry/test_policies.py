"""PolicyService: policies written over REST and gRPC, validated, explained, watched, and followed by PolicySync."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import grpc
import pytest

from agentvault.common.policy import Outcome, PolicyEngine, agent_target, external_client
from agentvault.common.policy.sync import PolicySync
from agentvault.common.token_source import GrpcTokenSource
from agentvault.devserver.mesh import SERVICES
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault_registry.policy_store import DecisionLogPruner, PolicyStore

if TYPE_CHECKING:
    from agentvault.registry.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub

from ..conftest import MeshFactory, MeshHandle, auth, bearer, eventually
from .oauth_helpers import create_client
from .test_agents_grpc import member_token, violations


def unique(label: str) -> str:
    return f"{label}-{secrets.token_hex(6)}"


@pytest.fixture(scope="module")
async def policies(mesh: MeshHandle) -> AsyncIterator[ppb_grpc.PolicyServiceAsyncStub]:
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        yield ppb_grpc.PolicyServiceStub(channel)


async def create(http: aiohttp.ClientSession, mesh: MeshHandle, text: str, **fields: Any) -> dict[str, Any]:
    body = {"name": unique("policy"), "text": text, "enabled": True, **fields}
    async with http.post(mesh.url("/api/v1/policies"), json=body, headers=auth(mesh.admin_token)) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def explain(http: aiohttp.ClientSession, mesh: MeshHandle, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(mesh.url("/api/v1/policies:explain"), json=body, headers=auth(mesh.admin_token)) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


def read(agent: str, caller: str, trust: str = "untrusted", **extra: Any) -> dict[str, Any]:
    return {
        "caller": {"kind": "client", "id": caller, "trust_level": trust},
        "action": "agent.read",
        "target": {"agent_id": agent},
        **extra,
    }


async def test_crud_over_rest(http: aiohttp.ClientSession, mesh: MeshHandle) -> None:
    agent = unique("agent")
    text = f'permit(principal, action == Action::"agent.read", resource == Target::Agent::"{agent}");'
    created = await create(http, mesh, text, description="readers of one agent")
    assert created["text"] == text and created["enabled"] is True and created["created_by"]
    url = mesh.url(f"/api/v1/policies/{created['id']}")
    async with http.get(url, headers=auth(mesh.admin_token)) as r:
        assert r.status == 200
        assert (await r.json())["name"] == created["name"]
    # Listed, page by page.
    seen: list[str] = []
    token = ""
    for _ in range(1000):
        params = {"page_size": "2", **({"page_token": token} if token else {})}
        async with http.get(mesh.url("/api/v1/policies"), params=params, headers=auth(mesh.admin_token)) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        assert len(page.get("policies", [])) <= 2
        seen += [p["id"] for p in page.get("policies", [])]
        token = page.get("next_page_token", "")
        if not token:
            break
    assert created["id"] in seen and len(seen) == len(set(seen))
    # Only the masked fields change.
    patch = {"name": "ignored", "text": text.replace("permit", "forbid"), "enabled": False}
    async with http.patch(url, params={"update_mask": "text,enabled"}, json=patch, headers=auth(mesh.admin_token)) as r:
        assert r.status == 200, await r.text()
        updated = await r.json()
    assert updated["text"].startswith("forbid") and updated.get("enabled", False) is False
    assert updated["name"] == created["name"] and updated["update_time"] >= created["update_time"]
    async with http.delete(url, headers=auth(mesh.admin_token)) as r:
        assert r.status == 200, await r.text()
    async with http.get(url, headers=auth(mesh.admin_token)) as r:
        assert r.status == 404
        assert (await r.json())["error"]["details"][0]["reason"] == "POLICY_NOT_FOUND"


async def test_crud_over_grpc_and_unique_names(policies: ppb_grpc.PolicyServiceAsyncStub, mesh: MeshHandle) -> None:
    admin = bearer(mesh.admin_token)
    name = unique("grpc")
    text = 'forbid(principal, action == Action::"tool.invoke", resource) when { context.payload_size > 1048576 };'
    made = await policies.CreatePolicy(
        ppb.CreatePolicyRequest(policy=ppb.Policy(name=name, text=text, enabled=True)), metadata=admin
    )
    assert (await policies.GetPolicy(ppb.GetPolicyRequest(id=made.id), metadata=admin)).text == text
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await policies.CreatePolicy(ppb.CreatePolicyRequest(policy=ppb.Policy(name=name, text=text)), metadata=admin)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await policies.DeletePolicy(ppb.DeletePolicyRequest(id=made.id), metadata=admin)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await policies.DeletePolicy(ppb.DeletePolicyRequest(id=made.id), metadata=admin)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_policies_are_refused_with_field_violations(
    policies: ppb_grpc.PolicyServiceAsyncStub, http: aiohttp.ClientSession, mesh: MeshHandle
) -> None:
    bad = 'permit(principal, action == Action::"agent.read", resource) when { principal.karma > 3 };'
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await policies.CreatePolicy(
            ppb.CreatePolicyRequest(policy=ppb.Policy(name=unique("bad"), text=bad)), metadata=bearer(mesh.admin_token)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err.value)
    assert "karma" in found["policy.text"], found
    # Through the edge: a 400 JSON naming the field and the fault, for each fault.
    body = {"name": "", "text": '@decision("maybe") permit(principal, action, resource);'}
    async with http.post(mesh.url("/api/v1/policies"), json=body, headers=auth(mesh.admin_token)) as r:
        assert r.status == 400, await r.text()
        error = (await r.json())["error"]
    fields = {
        v["field"]: v["description"]
        for d in error["details"]
        if d["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        for v in d["field_violations"]
    }
    assert set(fields) == {"policy.name", "policy.text"} and "@decision" in fields["policy.text"], fields
    for text in ("permit(principal, action, resource); permit(principal, action, resource);", "not cedar", ""):
        async with http.post(
            mesh.url("/api/v1/policies"), json={"name": unique("x"), "text": text}, headers=auth(mesh.admin_token)
        ) as r:
            assert r.status == 400, (text, await r.text())
            assert "policy.text" in await r.text()
    # An unknown field of the mask, a malformed id.
    async with http.patch(
        mesh.url(f"/api/v1/policies/{'0' * 8}-0000-0000-0000-{'0' * 12}"),
        params={"update_mask": "created_by"},
        json={"name": "n", "text": "permit(principal, action, resource);"},
        headers=auth(mesh.admin_token),
    ) as r:
        assert r.status == 400 and "update_mask" in await r.text()
    async with http.get(mesh.url("/api/v1/policies/not-a-uuid"), headers=auth(mesh.admin_token)) as r:
        assert r.status == 400


async def test_only_admins_write_and_explain(
    http: aiohttp.ClientSession, mesh: MeshHandle, registry: RegistryServiceAsyncStub
) -> None:
    member = await member_token(registry, mesh.admin_token, unique("member"))
    text = "permit(principal, action, resource);"
    async with http.post(
        mesh.url("/api/v1/policies"), json={"name": unique("m"), "text": text}, headers=auth(member)
    ) as r:
        assert r.status == 403, await r.text()
    async with http.post(mesh.url("/api/v1/policies:explain"), json=read("a", "c"), headers=auth(member)) as r:
        assert r.status == 403, await r.text()
    async with http.get(mesh.url("/api/v1/policies"), headers=auth(member)) as r:
        assert r.status == 403, await r.text()
    async with http.get(mesh.url("/api/v1/policies")) as r:
        assert r.status == 401, await r.text()
    # The policies:admin scope alone is enough (an OAuth client's token), agents:write is not.
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        identity = ipb_grpc.IdentityServiceStub(channel)
        for scope, status in (("policies:admin", 200), ("agents:write", 403)):
            client = await create_client(identity, mesh.admin_token, name=scope, scopes=[scope])
            tokens = GrpcTokenSource(channel, mesh.address("registry"), client.client.client_id, client.client_secret)
            try:
                headers = await tokens.headers()
            finally:
                await tokens.close()
            body = {"name": unique("scoped"), "text": text, "enabled": False}
            async with http.post(mesh.url("/api/v1/policies"), json=body, headers=headers) as r:
                assert r.status == status, (scope, await r.text())


async def test_explain_allow_deny_ask_and_default_deny(http: aiohttp.ClientSession, mesh: MeshHandle) -> None:
    agent, blocked = unique("agent"), unique("bad-client")
    scope = f'resource == Target::Agent::"{agent}"'
    permit = await create(
        http,
        mesh,
        f'@reason("basic readers") permit(principal, action == Action::"agent.read", {scope}) '
        "when { principal.trust_rank >= 2 };",
    )
    forbid = await create(
        http, mesh, f'@reason("blocked") forbid(principal == Caller::Client::"{blocked}", action, {scope});'
    )
    ask = await create(http, mesh, f'@decision("ask") permit(principal, action == Action::"message.send", {scope});')
    business = await create(
        http,
        mesh,
        f'permit(principal, action == Action::"session.handoff", {scope}) '
        "when { context.hour >= 9 && context.hour < 17 };",
    )

    allowed = await explain(http, mesh, read(agent, unique("c"), "basic"))
    assert allowed["decision"] == "allow" and allowed["deciding_policy_ids"] == [permit["id"]], allowed
    assert permit["id"] in allowed["matched_policy_ids"]
    # The same caller untrusted: the permit's condition is false, so nothing applies (default deny), and says so.
    refused = await explain(http, mesh, read(agent, unique("c")))
    assert refused["decision"] == "deny" and not refused.get("deciding_policy_ids"), refused
    why = {n["policy_id"]: n["reason"] for n in refused.get("not_applied", [])}
    assert "condition false" in why[permit["id"]], refused
    # Forbid wins over the permit that also applies.
    denied = await explain(http, mesh, read(agent, blocked, "trusted"))
    assert denied["decision"] == "deny" and denied["deciding_policy_ids"] == [forbid["id"]], denied
    assert set(denied["matched_policy_ids"]) == {permit["id"], forbid["id"]}
    assert any("blocked" in reason for reason in denied["reasons"])
    asked = await explain(http, mesh, {**read(agent, unique("c")), "action": "message.send"})
    assert asked["decision"] == "ask" and asked["deciding_policy_ids"] == [ask["id"]], asked
    # No policy for this action at all: the default deny.
    default = await explain(http, mesh, {**read(agent, unique("c"), "trusted"), "action": "tool.list"})
    assert default["decision"] == "deny" and not default.get("deciding_policy_ids"), default
    # The time override: inside the window allowed, outside denied.
    noon = int(datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp())
    handoff = {**read(agent, unique("c")), "action": "session.handoff"}
    at_noon = await explain(http, mesh, {**handoff, "context": {"time": noon}})
    at_night = await explain(http, mesh, {**handoff, "context": {"time": noon + 10 * 3600}})
    assert at_noon["decision"] == "allow" and at_noon["deciding_policy_ids"] == [business["id"]], at_noon
    assert at_night["decision"] == "deny", at_night
    # A disabled policy decides nothing, and the version moves with every change.
    async with http.patch(
        mesh.url(f"/api/v1/policies/{forbid['id']}"),
        params={"update_mask": "enabled"},
        json={"name": "n", "text": "t", "enabled": False},
        headers=auth(mesh.admin_token),
    ) as r:
        assert r.status == 200, await r.text()
    after = await explain(http, mesh, read(agent, blocked, "trusted"))
    assert after["decision"] == "allow" and int(after["version"]) > int(denied["version"]), after
    # Bad input is a 400 naming the field.
    bad = {**read(agent, "c"), "action": "agent.eat", "context": {"time": -1}}
    async with http.post(mesh.url("/api/v1/policies:explain"), json=bad, headers=auth(mesh.admin_token)) as r:
        assert r.status == 400
        text = await r.text()
    assert "action" in text and "context.time" in text


async def test_watch_sends_the_set_at_once_and_after_each_change(
    policies: ppb_grpc.PolicyServiceAsyncStub, http: aiohttp.ClientSession, mesh: MeshHandle
) -> None:
    call = policies.WatchPolicies(ppb.WatchPoliciesRequest(), metadata=bearer(mesh.admin_token))
    try:
        first = await call.read()
        made = await create(http, mesh, f'permit(principal, action, resource == Target::Agent::"{unique("w")}");')
        # Other tests may change the set meanwhile: read until our policy is in a set.
        for _ in range(100):
            following = await call.read()
            assert following.version > first.version
            if made["id"] in {p.id for p in following.policies}:
                break
        else:
            pytest.fail("the new policy never arrived on the watch")
    finally:
        call.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await policies.WatchPolicies(ppb.WatchPoliciesRequest()).read()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_policy_sync_follows_changes_made_through_another_replica(
    http: aiohttp.ClientSession, mesh: MeshHandle, mesh_factory: MeshFactory
) -> None:
    # A second registry process on the same database and Redis: the writes go through the first (behind the
    # edge), the enforcer follows the second, and its database recheck is off (an hour), so only the Redis
    # announcement can carry the change across.
    # Everything a registry writes at start must match the first's, or the replica would replace, e.g., the mesh
    # services' own client secrets in the shared database.
    shared = (
        "DATABASE_URL",
        "REDIS_URL",
        "FEDERATION_ENCRYPTION_KEYS",
        "AGENTVAULT_ADMIN_TOKEN",
        "SERVICE_CLIENT_SECRETS",
        "FEDERATION_REGISTRY_NAME",
    )
    replica = mesh_factory(
        services=tuple(s for s in SERVICES if s.name == "registry"),
        env={**{k: mesh.env[k] for k in shared}, "POLICY_RECHECK_SECONDS": "3600"},
        name="policyreplica",
    )
    engine = PolicyEngine()
    agent, caller = unique("agent"), unique("client")
    target = agent_target(agent)
    async with grpc.aio.insecure_channel(replica.address("registry")) as channel:
        client = await create_client(
            ipb_grpc.IdentityServiceStub(channel), mesh.admin_token, name="enforcer", scopes=["policies:read"]
        )
        tokens = GrpcTokenSource(channel, replica.address("registry"), client.client.client_id, client.client_secret)
        sync = PolicySync(channel, tokens, engine)
        task = asyncio.create_task(sync.run())
        try:
            await asyncio.wait_for(sync.loaded.wait(), 30)
            assert engine.decide(external_client(caller), "agent.read", target).outcome is Outcome.DENY
            made = await create(http, mesh, f'permit(principal, action, resource == Target::Agent::"{agent}");')

            async def allowed() -> None:
                assert engine.decide(external_client(caller), "agent.read", target).outcome is Outcome.ALLOW

            started = time.monotonic()
            await eventually(allowed, 30)
            print(f"a new policy reached the other replica's enforcer in {time.monotonic() - started:.3f} s")
            seen = sync.version
            async with http.patch(
                mesh.url(f"/api/v1/policies/{made['id']}"),
                params={"update_mask": "text"},
                json={"name": "n", "text": made["text"].replace("permit", "forbid")},
                headers=auth(mesh.admin_token),
            ) as r:
                assert r.status == 200, await r.text()

            async def denied() -> None:
                assert engine.decide(external_client(caller), "agent.read", target).outcome is Outcome.DENY
                assert engine.decide(external_client(caller), "agent.read", target).policies == (made["id"],)

            await eventually(denied, 30)
            assert sync.version is not None and seen is not None and sync.version > seen
            # The registry gone: the last set stays in force.
            replica.mesh.stop()

            async def disconnected() -> None:
                assert not sync.connected

            await eventually(disconnected, 30)
            assert engine.decide(external_client(caller), "agent.read", target).policies == (made["id"],)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await tokens.close()


async def test_decision_log_retention(mesh: MeshHandle) -> None:
    pool = await asyncpg.create_pool(mesh.database_url, min_size=1, max_size=2)
    try:
        marker = unique("caller")
        for age_days in (45, 31, 29, 0):
            await pool.execute(
                """INSERT INTO policy_decisions (decided_at, caller, action, target, outcome)
                   VALUES (now() - make_interval(days => $1), $2, 'agent.read', 't', 'deny')""",
                age_days,
                marker,
            )
        # Approvals and grants of the same age: the old answered approval and the old ended grant go, the rest stays.
        approvals, grants = [], []
        for age_days, status in ((45, "denied"), (45, "pending"), (0, "approved")):
            approval = uuid.uuid4()
            approvals.append(approval)
            await pool.execute(
                """INSERT INTO approvals (id, status, caller, requested_by, action, target, target_agent_id,
                       grant_action, grant_target, grant_duration_seconds, created_at, expires_at)
                   VALUES ($1, $2, $3, 'p', 'capability.request', 't', 'a', 'tool.invoke', 't', 60,
                           now() - make_interval(days => $4), now() - make_interval(days => $4) + interval '1 hour')""",
                approval,
                status,
                marker,
                age_days,
            )
        for age_days, revoked in ((45, True), (45, False), (0, True)):
            grant = uuid.uuid4()
            grants.append(grant)
            await pool.execute(
                """INSERT INTO grants (id, caller, holder, action, target, target_agent_id, expires_at, granted_by,
                       created_at, revoked_at)
                   VALUES ($1, $2, 'p', 'tool.invoke', 't', 'a', now() + interval '1 day', 'policy',
                           now() - make_interval(days => $3), CASE WHEN $4 THEN now() END)""",
                grant,
                marker,
                age_days,
                revoked,
            )
        store = PolicyStore(pool)
        pruner = DecisionLogPruner(store, retention_days=30)
        # The registry's own pruner holds this period's lease: let it lapse, as it does after the hold.
        await pool.execute("UPDATE policy_leases SET next_check_at = now()")
        assert await pruner.run_once() is not None
        rows = await pool.fetch(
            "SELECT (now() - decided_at) < interval '30 days' AS recent FROM policy_decisions WHERE caller = $1",
            marker,
        )
        assert len(rows) == 2 and all(r["recent"] for r in rows)
        # An old pending approval expired long ago (its time ran out): it goes too; a live grant stays however old.
        kept = {r["id"] for r in await pool.fetch("SELECT id FROM approvals WHERE caller = $1", marker)}
        assert kept == {approvals[2]}
        kept = {r["id"] for r in await pool.fetch("SELECT id FROM grants WHERE caller = $1", marker)}
        assert kept == {grants[1], grants[2]}
        # Another replica's turn within the same hold: nothing runs twice.
        assert await DecisionLogPruner(store, retention_days=30).run_once() is None
    finally:
        await pool.close()
