"""Connections and trust, permission requests, approvals (and their watch), grants and the decision log, on a mesh
of real processes with short approval lifetimes and trust rules switched on."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from agentvault.common.policy import Outcome, PolicyEngine, Trust, tool_target
from agentvault.common.policy.enforcer import Enforcer
from agentvault.common.policy.request import Caller
from agentvault.common.policy.sync import load_set
from agentvault.devserver.embedded import free_port
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from agentvault_registry.access import RegistryControlPlane
from agentvault_registry.connection_store import ConnectionStore
from agentvault_registry.grant_store import GrantStore
from agentvault_registry.policy_store import PolicyStore

from ..conftest import MeshFactory, MeshHandle, auth, bearer, eventually, unique_did

APPROVAL_TTL = 6


@dataclass
class Access:
    mesh: MeshHandle
    policies: ppb_grpc.PolicyServiceAsyncStub
    registry: pb_grpc.RegistryServiceAsyncStub

    @property
    def admin(self) -> list[tuple[str, str]]:
        return bearer(self.mesh.admin_token)


@dataclass
class Member:
    token: str
    principal_id: str

    @property
    def md(self) -> list[tuple[str, str]]:
        return bearer(self.token)


@pytest.fixture(scope="module")
async def access(mesh_factory: MeshFactory) -> AsyncIterator[Access]:
    mesh = mesh_factory(
        name="access",
        env={
            "APPROVAL_TTL_SECONDS": str(APPROVAL_TTL),
            "APPROVAL_SWEEP_SECONDS": "0.2",
            "TRUST_VIOLATION_LIMIT": "3",
            "TRUST_PROMOTE_AFTER": "3",
            "TRUST_PROMOTE_UP_TO": "trusted",
            "REGISTRY_METRICS_PORT": str(free_port()),
        },
    )
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        yield Access(mesh, ppb_grpc.PolicyServiceStub(channel), pb_grpc.RegistryServiceStub(channel))


async def member(a: Access, name: str) -> Member:
    key = await a.registry.CreateApiKey(pb.CreateApiKeyRequest(name=f"{name}-{secrets.token_hex(4)}"), metadata=a.admin)
    me = await a.registry.GetCaller(pb.GetCallerRequest(), metadata=bearer(key.token))
    return Member(key.token, me.principal_id)


async def agent_of(a: Access, owner: Member, *caps: tuple[str, str, str]) -> pb.Agent:
    """An agent owned by `owner` offering (kind, name, version) capabilities."""
    kinds = {"tool": pb.CAPABILITY_KIND_TOOL, "skill": pb.CAPABILITY_KIND_SKILL, "model": pb.CAPABILITY_KIND_MODEL}
    agent = pb.Agent(
        did=unique_did("access"),
        name="offerer",
        version="1.0.0",
        endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url="https://offerer.example/a")],
        capabilities=[pb.Capability(kind=kinds[k], name=n, version=v) for k, n, v in caps],
    )
    return await a.registry.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=owner.md)


async def policy(a: Access, text: str) -> str:
    made = await a.policies.CreatePolicy(
        ppb.CreatePolicyRequest(policy=ppb.Policy(name=f"p-{secrets.token_hex(6)}", text=text, enabled=True)),
        metadata=a.admin,
    )
    return made.id


def person(m: Member) -> str:
    return f'Caller::Person::"{m.principal_id}"'


async def request(a: Access, who: Member, agent: pb.Agent, name: str, **fields: Any) -> ppb.CapabilityDecision:
    return await a.policies.RequestCapability(
        ppb.RequestCapabilityRequest(agent_id=agent.id, capability=name, **fields), metadata=who.md
    )


async def connection(a: Access, who: Member, agent: pb.Agent) -> ppb.Connection:
    page = await a.policies.ListConnections(ppb.ListConnectionsRequest(agent_id=agent.id), metadata=a.admin)
    found = [c for c in page.connections if c.caller_id == who.principal_id]
    assert len(found) == 1, page
    return await a.policies.GetConnection(ppb.GetConnectionRequest(id=found[0].id), metadata=a.admin)


async def explain_invoke(a: Access, who: Member, agent: pb.Agent, tool: str) -> ppb.ExplainResponse:
    return await a.policies.Explain(
        ppb.ExplainRequest(
            caller=ppb.ExplainCaller(kind="person", id=who.principal_id, trust_level="basic"),
            action="tool.invoke",
            target=ppb.ExplainTarget(agent_id=agent.id, name=tool),
        ),
        metadata=a.admin,
    )


async def test_allow_makes_a_grant_that_explain_sees_until_revoked(access: Access) -> None:
    owner, asker = await member(access, "owner"), await member(access, "asker")
    agent = await agent_of(access, owner, ("tool", "translate", "1.4.0"), ("tool", "translate-old", "0.9.0"))
    await policy(access, f'permit(principal == {person(asker)}, action == Action::"capability.request", resource);')

    # Compatibility first: a constraint the offered version does not meet is refused with the offered version.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await request(access, asker, agent, "translate", version_constraint=">=2")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "1.4.0" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await request(access, asker, agent, "summarize")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    before = await explain_invoke(access, asker, agent, "translate")
    assert before.decision == "deny"
    answer = await request(
        access, asker, agent, "translate", version_constraint="^1.2", max_calls=5, duration_seconds=600
    )
    assert answer.decision == "allow" and answer.version == "1.4.0" and answer.kind == "tool"
    grant = answer.grant
    assert grant.id and grant.action == "tool.invoke" and grant.uses_left == 5
    assert grant.target == f'Target::Tool::"{agent.id}/translate"' and grant.caller == person(asker)
    assert 590 <= grant.expire_time.seconds - grant.create_time.seconds <= 610

    # The grant is part of the policy set: what would happen if the asker invoked the tool now is allow, by it.
    after = await explain_invoke(access, asker, agent, "translate")
    assert after.decision == "allow" and after.deciding_policy_ids == [f"grant:{grant.id}"]
    assert (await explain_invoke(access, asker, agent, "translate-old")).decision == "deny"
    listed = await access.policies.ListGrants(ppb.ListGrantsRequest(), metadata=asker.md)
    assert [g.id for g in listed.grants] == [grant.id]
    # Another member neither sees nor revokes it.
    other = await member(access, "other")
    assert not (await access.policies.ListGrants(ppb.ListGrantsRequest(), metadata=other.md)).grants
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await access.policies.RevokeGrant(ppb.RevokeGrantRequest(id=grant.id), metadata=other.md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # A private agent is not there for anyone but its owner and admins, capabilities included.
    hidden = await agent_of(access, owner, ("tool", "secret", "1.0.0"))
    hidden.sharing = pb.SHARING_PRIVATE
    await access.registry.UpdateAgent(
        pb.UpdateAgentRequest(agent=hidden, update_mask=field_mask_pb2.FieldMask(paths=["sharing"])), metadata=owner.md
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await request(access, other, hidden, "secret")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "AGENT_NOT_FOUND" in str(err.value.trailing_metadata())

    revoked = await access.policies.RevokeGrant(ppb.RevokeGrantRequest(id=grant.id), metadata=owner.md)
    assert revoked.revoke_time.seconds > 0
    assert (await explain_invoke(access, asker, agent, "translate")).decision == "deny"
    assert not (await access.policies.ListGrants(ppb.ListGrantsRequest(), metadata=asker.md)).grants
    ended = await access.policies.ListGrants(ppb.ListGrantsRequest(include_ended=True), metadata=asker.md)
    assert [g.id for g in ended.grants] == [grant.id]

    # The first contact made connections: the mesh's and the agent's, a person starting at basic.
    seen = await connection(access, asker, agent)
    assert seen.caller_kind == "person" and seen.interactions >= 1


async def test_refusals_drop_trust_and_are_logged(access: Access) -> None:
    owner, asker = await member(access, "owner"), await member(access, "refused")
    agent = await agent_of(access, owner, ("skill", "plan", "2.0.0"))
    answers = [await request(access, asker, agent, "plan") for _ in range(3)]
    assert [a.decision for a in answers] == ["deny"] * 3
    assert "default deny" in answers[0].reasons[0]
    # Three refusals within the window (TRUST_VIOLATION_LIMIT=3) drop the connection one level, with the reason.
    seen = await connection(access, asker, agent)
    assert seen.trust_level == "untrusted" and seen.violations == 0 and seen.interactions == 3
    change = seen.recent_changes[0]
    assert (change.from_level, change.to_level, change.changed_by) == ("basic", "untrusted", "system")
    assert "3 violations" in change.reason and "capability.request" in change.reason
    # A policy that admits basic callers only no longer admits this one.
    await policy(
        access,
        f'permit(principal, action == Action::"capability.request", resource == Target::Capability::"{agent.id}/plan")'
        " when { principal.trust_rank >= 2 };",
    )
    assert (await request(access, asker, agent, "plan")).decision == "deny"
    # Every deny is in the decision log.
    log = await access.policies.ListDecisions(ppb.ListDecisionsRequest(outcome="deny"), metadata=access.admin)
    mine = [d for d in log.decisions if d.caller == person(asker)]
    assert len(mine) == 4 and all(d.action == "capability.request" and d.reason for d in mine)

    # The agent's owner raises it again, by hand; the reason is recorded and the policy admits it.
    raised = await access.policies.SetTrustLevel(
        ppb.SetTrustLevelRequest(id=seen.id, trust_level="basic", reason="known partner"), metadata=owner.md
    )
    assert raised.trust_level == "basic" and raised.recent_changes[0].reason == "known partner"
    assert raised.recent_changes[0].changed_by == owner.principal_id
    assert (await request(access, asker, agent, "plan")).decision == "allow"
    changes = await access.policies.ListTrustChanges(
        ppb.ListTrustChangesRequest(connection_id=seen.id, page_size=1), metadata=owner.md
    )
    assert len(changes.changes) == 1 and changes.next_page_token
    # Someone else's agent's connection is not theirs to see or change.
    stranger = await member(access, "stranger")
    for call in (
        access.policies.GetConnection(ppb.GetConnectionRequest(id=seen.id), metadata=stranger.md),
        access.policies.SetTrustLevel(
            ppb.SetTrustLevelRequest(id=seen.id, trust_level="trusted", reason="me"), metadata=stranger.md
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_trust_rises_by_the_promotion_rule_and_blocked_is_denied(access: Access) -> None:
    owner, asker = await member(access, "owner"), await member(access, "steady")
    agent = await agent_of(access, owner, ("model", "llm", "1.0.0"))
    await policy(access, f'permit(principal == {person(asker)}, action == Action::"capability.request", resource);')
    for _ in range(3):
        assert (await request(access, asker, agent, "llm")).decision == "allow"
    seen = await connection(access, asker, agent)
    # TRUST_PROMOTE_AFTER=3 interactions without a violation, up to trusted.
    assert seen.trust_level == "trusted", seen
    assert "3 interactions without a violation" in seen.recent_changes[0].reason
    # Blocked by an admin: denied whatever the policies say.
    await access.policies.SetTrustLevel(
        ppb.SetTrustLevelRequest(id=seen.id, trust_level="blocked", reason="abuse report"), metadata=access.admin
    )
    answer = await request(access, asker, agent, "llm")
    assert answer.decision == "deny" and "blocked" in answer.reasons[0]


async def test_ask_then_approve_then_grant_then_expiry(access: Access) -> None:
    owner, asker = await member(access, "owner"), await member(access, "asking")
    agent = await agent_of(access, owner, ("tool", "deploy", "3.1.0"))
    await policy(
        access,
        f'@decision("ask") @reason("deploys need the owner\'s yes")\npermit(principal == {person(asker)}, '
        'action == Action::"capability.request", resource);',
    )
    watch = access.policies.WatchApprovals(ppb.WatchApprovalsRequest(include_answered=True), metadata=owner.md)
    try:
        answer = await request(access, asker, agent, "deploy", purpose="release 3.1", max_calls=1)
        assert answer.decision == "ask" and answer.approval.status == "pending"
        assert "deploys need the owner's yes" in answer.approval.reasons[0] and answer.approval.purpose == "release 3.1"
        approval_id = answer.approval.id
        # The owner's watch shows it as it arrives.
        while (event := await asyncio.wait_for(watch.read(), 10)).approval.id != approval_id:
            pass
        assert event.event == "created"
        # The asker can read it; only the owner (or an admin) may answer it.
        got = await access.policies.GetApproval(ppb.GetApprovalRequest(id=approval_id), metadata=asker.md)
        assert got.status == "pending"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await access.policies.ApproveApproval(ppb.ApproveApprovalRequest(id=approval_id), metadata=asker.md)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Approved with a shorter grant than asked: 2 seconds.
        approved = await access.policies.ApproveApproval(
            ppb.ApproveApprovalRequest(id=approval_id, duration_seconds=2, note="go"), metadata=owner.md
        )
        assert approved.status == "approved" and approved.grant_id and approved.decided_by == owner.principal_id
        while (event := await asyncio.wait_for(watch.read(), 10)).approval.id != approval_id:
            pass
        assert event.event == "approved"
    finally:
        watch.cancel()
    # Answered twice: refused.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await access.policies.DenyApproval(ppb.DenyApprovalRequest(id=approval_id), metadata=owner.md)
    assert err.value.code() == grpc.StatusCode.ABORTED
    grants = await access.policies.ListGrants(ppb.ListGrantsRequest(), metadata=asker.md)
    assert [(g.id, g.uses_left, g.approval_id) for g in grants.grants] == [(approved.grant_id, 1, approval_id)]
    assert (await explain_invoke(access, asker, agent, "deploy")).decision == "allow"

    # The grant expires by itself.
    async def expired() -> None:
        assert (await explain_invoke(access, asker, agent, "deploy")).decision == "deny"

    await eventually(expired, 20)


async def test_waiting_for_the_answer_and_denial(access: Access) -> None:
    owner, asker = await member(access, "owner"), await member(access, "waiting")
    agent = await agent_of(access, owner, ("skill", "review", "1.0.0"), ("skill", "merge", "1.0.0"))
    await policy(
        access,
        f'@decision("ask")\npermit(principal == {person(asker)}, action == Action::"capability.request", resource);',
    )

    async def answer_first_pending(approve: bool) -> None:
        async def pending() -> None:
            page = await access.policies.ListApprovals(ppb.ListApprovalsRequest(status="pending"), metadata=owner.md)
            assert page.approvals
            found.append(page.approvals[0].id)

        found: list[str] = []
        await eventually(pending, 10)
        if approve:
            await access.policies.ApproveApproval(ppb.ApproveApprovalRequest(id=found[0]), metadata=owner.md)
        else:
            await access.policies.DenyApproval(ppb.DenyApprovalRequest(id=found[0], note="not now"), metadata=owner.md)

    # The caller waits up to its deadline and gets the answer: a grant.
    answering = asyncio.create_task(answer_first_pending(True))
    answer = await request(access, asker, agent, "review", wait_seconds=30)
    await answering
    assert answer.decision == "allow" and answer.grant.id and answer.approval.status == "approved"
    assert answer.grant.action == "message.send" and answer.grant.target == f'Target::Agent::"{agent.id}"'
    # Denied: a clear refusal with the owner's note.
    answering = asyncio.create_task(answer_first_pending(False))
    answer = await request(access, asker, agent, "merge", wait_seconds=30)
    await answering
    assert answer.decision == "deny" and answer.approval.status == "denied" and "not now" in answer.reasons[0]
    # A watch that asks for answered ones starts with them (the pending ones only, otherwise).
    for include, expected in ((True, [("approved", "review"), ("denied", "merge")]), (False, [])):
        watch = access.policies.WatchApprovals(ppb.WatchApprovalsRequest(include_answered=include), metadata=asker.md)
        try:
            start = []
            # A probe that is pending, so that the start of the stream is known to be over when it arrives.
            probe = await request(access, asker, agent, "review", purpose="probe")
            while (event := await asyncio.wait_for(watch.read(), 10)).approval.id != probe.approval.id:
                start.append((event.event, event.approval.target.rsplit("/", 1)[-1].rstrip('"')))
        finally:
            watch.cancel()
        assert [e for e in start if e[0] != "pending"] == expected


async def test_an_unanswered_approval_expires(access: Access) -> None:
    owner, asker = await member(access, "owner"), await member(access, "late")
    agent = await agent_of(access, owner, ("tool", "slow", "1.0.0"))
    await policy(
        access,
        f'@decision("ask")\npermit(principal == {person(asker)}, action == Action::"capability.request", resource);',
    )
    watch = access.policies.WatchApprovals(ppb.WatchApprovalsRequest(), metadata=asker.md)
    try:
        answer = await request(access, asker, agent, "slow")
        approval_id = answer.approval.id
        events = []
        while not events or events[-1] != ("expired", approval_id):
            event = await asyncio.wait_for(watch.read(), APPROVAL_TTL + 20)
            events.append((event.event, event.approval.id))
        assert ("created", approval_id) in events
    finally:
        watch.cancel()
    got = await access.policies.GetApproval(ppb.GetApprovalRequest(id=approval_id), metadata=asker.md)
    assert got.status == "expired"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await access.policies.ApproveApproval(ppb.ApproveApprovalRequest(id=approval_id), metadata=owner.md)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "expired" in (err.value.details() or "")


async def test_calls_per_window_are_measured_across_requests(access: Access) -> None:
    owner, asker = await member(access, "owner"), await member(access, "busy")
    agent = await agent_of(access, owner, ("tool", "quota", "1.0.0"))
    await policy(
        access,
        f'permit(principal == {person(asker)}, action == Action::"capability.request", resource) '
        "when { context.calls_in_window < 2 };",
    )
    outcomes = [(await request(access, asker, agent, "quota")).decision for _ in range(3)]
    assert outcomes == ["allow", "allow", "deny"]


async def test_approvals_over_rest_and_the_watch_as_sse_and_websocket(
    access: Access, http: aiohttp.ClientSession
) -> None:
    mesh = access.mesh
    owner, asker = await member(access, "owner"), await member(access, "resty")
    agent = await agent_of(access, owner, ("tool", "rest", "1.0.0"))
    await policy(
        access,
        f'@decision("ask")\npermit(principal == {person(asker)}, action == Action::"capability.request", resource);',
    )
    async with (
        http.get(mesh.url("/api/v1/approvals:watch"), headers=auth(owner.token)) as sse,
        http.ws_connect(mesh.url("/api/v1/approvals:watch").replace("http", "ws", 1), headers=auth(owner.token)) as ws,
    ):
        assert sse.status == 200 and sse.headers["Content-Type"].startswith("text/event-stream")
        async with http.post(
            mesh.url(f"/api/v1/agents/{agent.id}/capabilities:request"),
            json={"capability": "rest", "purpose": "over REST"},
            headers=auth(asker.token),
        ) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert answer["decision"] == "ask"
        approval_id = answer["approval"]["id"]
        seen = None
        while seen is None:
            line = (await asyncio.wait_for(sse.content.readline(), 10)).decode()
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event["approval"]["id"] == approval_id:
                    seen = event
        assert seen["event"] == "created" and seen["approval"]["purpose"] == "over REST"
        while True:
            event = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
            if event["approval"]["id"] == approval_id:
                assert event["event"] == "created"
                break
    async with http.post(
        mesh.url(f"/api/v1/approvals/{approval_id}:approve"), json={"uses": 3}, headers=auth(owner.token)
    ) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["status"] == "approved"
    async with http.get(mesh.url("/api/v1/grants"), headers=auth(asker.token)) as r:
        grants = (await r.json())["grants"]
    assert len(grants) == 1 and grants[0]["uses_left"] == 3 and grants[0]["approval_id"] == approval_id
    # Bad input: 400 with field violations, nothing stored.
    async with http.post(
        mesh.url(f"/api/v1/agents/{agent.id}/capabilities:request"),
        json={"capability": "bad name!", "max_calls": -1, "wait_seconds": 999, "version_constraint": ">>1"},
        headers=auth(asker.token),
    ) as r:
        assert r.status == 400
        fields = {
            v["field"]
            for d in (await r.json())["error"]["details"]
            if "field_violations" in d
            for v in d["field_violations"]
        }
    assert fields == {"capability", "max_calls", "wait_seconds", "version_constraint"}
    async with http.get(mesh.url("/api/v1/approvals"), params={"status": "nope"}, headers=auth(owner.token)) as r:
        assert r.status == 400


async def test_the_decision_log_is_admin_only_and_records_asks(access: Access) -> None:
    owner, asker = await member(access, "owner"), await member(access, "logged")
    agent = await agent_of(access, owner, ("tool", "logged", "1.0.0"))
    await policy(
        access,
        f'@decision("ask")\npermit(principal == {person(asker)}, action == Action::"capability.request", resource);',
    )
    assert (await request(access, asker, agent, "logged")).decision == "ask"
    someone = await member(access, "nosy")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await access.policies.ListDecisions(ppb.ListDecisionsRequest(), metadata=someone.md)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    log = await access.policies.ListDecisions(
        ppb.ListDecisionsRequest(outcome="ask", page_size=500), metadata=access.admin
    )
    assert all(d.outcome == Outcome.ASK.value for d in log.decisions)
    mine = [d for d in log.decisions if d.caller == person(asker)]
    assert len(mine) == 1 and mine[0].target == f'Target::Capability::"{agent.id}/logged"' and mine[0].policy_ids


async def test_a_limited_grant_is_spent_exactly_once_across_enforcers(access: Access) -> None:
    # Two enforcers (as two replicas of an enforcing service would be), each with its own engine on the synced
    # set, decide concurrently on one grant of 3 uses: the uses are spent in the database, so 3 calls in all pass.
    owner, asker = await member(access, "owner"), await member(access, "spender")
    agent = await agent_of(access, owner, ("tool", "metered", "1.0.0"))
    await policy(access, f'permit(principal == {person(asker)}, action == Action::"capability.request", resource);')
    granted = await request(access, asker, agent, "metered", max_calls=3)
    assert granted.grant.uses_left == 3
    watch = access.policies.WatchPolicies(ppb.WatchPoliciesRequest(), metadata=access.admin)
    current = await watch.read()
    watch.cancel()
    assert granted.grant.id in {g.id for g in current.grants}
    pool = await asyncpg.create_pool(access.mesh.database_url, min_size=1, max_size=4)
    try:
        announced: list[int] = []

        async def announce(version: int) -> None:
            announced.append(version)

        control = RegistryControlPlane(ConnectionStore(pool), GrantStore(pool), PolicyStore(pool), announce)
        enforcers = []
        for _ in range(2):
            engine = PolicyEngine()
            load_set(engine, current)
            enforcers.append(Enforcer(engine, control))
        who = Caller("Caller::Person", asker.principal_id, Trust.BASIC)
        target = tool_target(agent.id, "metered", "1.0.0")
        verdicts = await asyncio.gather(
            *(enforcers[i % 2].decide(who, "tool.invoke", target, agent_id=agent.id) for i in range(8))
        )
        assert sum(v.outcome is Outcome.ALLOW for v in verdicts) == 3
        assert announced, "the last use ends the grant, which moves the policy set"
    finally:
        await pool.close()
    ended = await access.policies.ListGrants(ppb.ListGrantsRequest(include_ended=True), metadata=asker.md)
    assert [(g.id, g.uses_left) for g in ended.grants] == [(granted.grant.id, 0)]


async def test_decisions_and_approvals_are_counted_in_the_metrics(access: Access, http: aiohttp.ClientSession) -> None:
    owner, asker = await member(access, "owner"), await member(access, "counted")
    agent = await agent_of(access, owner, ("tool", "counted", "1.0.0"))

    async def scrape() -> dict[str, float]:
        async with http.get(f"http://127.0.0.1:{access.mesh.env['REGISTRY_METRICS_PORT']}/metrics") as r:
            text = await r.text()
        found = {}
        for line in text.splitlines():
            if line.startswith(("policy_decisions_total{", "policy_approvals_total{")):
                name, value = line.rsplit(" ", 1)
                found[name] = float(value)
        return found

    deny = 'policy_decisions_total{action="capability.request",outcome="deny"}'
    created = 'policy_approvals_total{event="created"}'
    before = await scrape()
    assert (await request(access, asker, agent, "counted")).decision == "deny"
    await policy(
        access,
        f'@decision("ask")\npermit(principal == {person(asker)}, action == Action::"capability.request", resource);',
    )
    assert (await request(access, asker, agent, "counted")).decision == "ask"
    after = await scrape()
    assert after[deny] == before.get(deny, 0) + 1 and after[created] == before.get(created, 0) + 1
