"""An enforcer outside the registry: RemoteControlPlane over PolicyService's internal RPCs, on a real mesh."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from agentvault.common.policy import Outcome, PolicyEngine, Trust, agent_target, external_client, tool_target
from agentvault.common.policy.enforcer import AuditEntry, Enforcer
from agentvault.common.policy.remote import MAX_BATCH, RemoteControlPlane
from agentvault.common.policy.request import Caller
from agentvault.common.policy.sync import load_set
from agentvault.common.token_source import BearerInterceptor, GrpcTokenSource
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshHandle, bearer, unique_did
from .oauth_helpers import basic, create_client, revoke
from .test_agents_grpc import violations


@dataclass
class Plane:
    mesh: MeshHandle
    channel: grpc.aio.Channel
    policies: ppb_grpc.PolicyServiceAsyncStub
    registry: pb_grpc.RegistryServiceAsyncStub
    tokens: GrpcTokenSource  # a client with policies:read and policies:enforce, as an enforcing service has
    enforcing: grpc.aio.Channel  # to the registry with that client's BearerInterceptor, as the service's channel

    @property
    def admin(self) -> list[tuple[str, str]]:
        return bearer(self.mesh.admin_token)

    async def enforcer(self, **options: bool) -> Enforcer:
        """An enforcer as another service would have: the synced set (read once), the registry's control plane."""
        watch = self.policies.WatchPolicies(ppb.WatchPoliciesRequest(), metadata=await self.tokens.metadata())
        current = await watch.read()
        watch.cancel()
        engine = PolicyEngine()
        load_set(engine, current)
        return Enforcer(engine, RemoteControlPlane(self.enforcing), **options)


@dataclass
class Member:
    token: str
    principal_id: str

    @property
    def md(self) -> list[tuple[str, str]]:
        return bearer(self.token)


async def tokens_for(mesh: MeshHandle, channel: grpc.aio.Channel, *scopes: str) -> GrpcTokenSource:
    made = await create_client(
        ipb_grpc.IdentityServiceStub(channel), mesh.admin_token, name="enforcing", scopes=list(scopes)
    )
    return GrpcTokenSource(channel, mesh.address("registry"), made.client.client_id, made.client_secret)


@pytest.fixture(scope="module")
async def plane(mesh: MeshHandle) -> AsyncIterator[Plane]:
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        tokens = await tokens_for(mesh, channel, "policies:read", "policies:enforce")
        enforcing = grpc.aio.insecure_channel(mesh.address("registry"), interceptors=[BearerInterceptor(tokens)])
        try:
            yield Plane(
                mesh,
                channel,
                ppb_grpc.PolicyServiceStub(channel),
                pb_grpc.RegistryServiceStub(channel),
                tokens,
                enforcing,
            )
        finally:
            await enforcing.close()
            await tokens.close()


async def member(p: Plane, name: str) -> Member:
    key = await p.registry.CreateApiKey(pb.CreateApiKeyRequest(name=f"{name}-{secrets.token_hex(4)}"), metadata=p.admin)
    me = await p.registry.GetCaller(pb.GetCallerRequest(), metadata=bearer(key.token))
    return Member(key.token, me.principal_id)


async def agent_of(p: Plane, owner: Member, tool: str = "") -> pb.Agent:
    agent = pb.Agent(
        did=unique_did("remote"),
        name="enforced",
        version="1.0.0",
        endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url="https://enforced.example/a")],
        capabilities=[pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name=tool, version="1.0.0")] if tool else [],
    )
    return await p.registry.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=owner.md)


async def policy(p: Plane, text: str) -> None:
    await p.policies.CreatePolicy(
        ppb.CreatePolicyRequest(policy=ppb.Policy(name=f"p-{secrets.token_hex(6)}", text=text, enabled=True)),
        metadata=p.admin,
    )


async def connections_of(p: Plane, caller_id: str, agent_id: str) -> list[ppb.Connection]:
    page = await p.policies.ListConnections(
        ppb.ListConnectionsRequest(agent_id=agent_id, page_size=500), metadata=p.admin
    )
    return [c for c in page.connections if c.caller_id == caller_id]


async def test_decide_makes_connections_at_the_default_trust_and_denies_count(plane: Plane) -> None:
    owner, person = await member(plane, "owner"), await member(plane, "reader")
    agent = await agent_of(plane, owner)
    await policy(
        plane,
        f'permit(principal == Caller::Person::"{person.principal_id}", action == Action::"agent.read", '
        f'resource == Target::Agent::"{agent.id}");',
    )
    enforcer = await plane.enforcer()
    outsider = f"outsider-{secrets.token_hex(4)}"
    target = agent_target(agent.id)

    refused = await enforcer.decide(external_client(outsider), "agent.read", target, agent_id=agent.id)
    allowed = await enforcer.decide(
        Caller("Caller::Person", person.principal_id), "agent.read", target, agent_id=agent.id
    )
    assert (refused.outcome, allowed.outcome) == (Outcome.DENY, Outcome.ALLOW)
    assert (refused.caller.trust, allowed.caller.trust) == (Trust.UNTRUSTED, Trust.BASIC)

    [client] = await connections_of(plane, outsider, agent.id)
    assert (client.caller_kind, client.trust_level, client.interactions, client.violations) == (
        "client",
        "untrusted",
        1,
        1,
    )
    [mesh_wide] = await connections_of(plane, outsider, "-")  # the mesh's own connection, created first
    assert mesh_wide.trust_level == "untrusted"
    [reader] = await connections_of(plane, person.principal_id, agent.id)
    assert (reader.caller_kind, reader.trust_level, reader.interactions, reader.violations) == ("person", "basic", 1, 0)

    # A mesh service is trusted by identity: no connection, locally or in the registry.
    answer = await plane.policies.ResolveTrust(
        ppb.ResolveTrustRequest(caller_type="Caller::Service", caller_id="messaging", agent_id=agent.id),
        metadata=await plane.tokens.metadata(),
    )
    assert answer.trust_level == "trusted"
    assert await connections_of(plane, "messaging", agent.id) == []


async def test_a_batch_of_interactions_applies_the_trust_rules_in_order_per_connection(plane: Plane) -> None:
    """One RecordInteractions of several connections, interleaved: each counted in order as one call per
    interaction would be (the registry takes each connection's share in one transaction)."""
    owner, first, second = await member(plane, "owner"), await member(plane, "first"), await member(plane, "second")
    agent = await agent_of(plane, owner)
    md = await plane.tokens.metadata()
    for who in (first, second):  # first contact: a person's connection starts at basic
        await plane.policies.ResolveTrust(
            ppb.ResolveTrustRequest(caller_type="Caller::Person", caller_id=who.principal_id, agent_id=agent.id),
            metadata=md,
        )
    items = []
    for i in range(7):  # the default limit is 5 violations an hour: the fifth drops `first` to untrusted
        items.append(ppb.Interaction(caller_type="Caller::Person", caller_id=first.principal_id, agent_id=agent.id,
                                     violation=f"refused {i}"))  # fmt: skip
        if i < 3:
            items.append(ppb.Interaction(caller_type="Caller::Person", caller_id=second.principal_id,
                                         agent_id=agent.id))  # fmt: skip
    items += [ppb.Interaction(caller_type="Caller::Person", caller_id=first.principal_id, agent_id=agent.id)] * 2
    await plane.policies.RecordInteractions(ppb.RecordInteractionsRequest(interactions=items), metadata=md)

    [one] = await connections_of(plane, first.principal_id, agent.id)
    # Dropped at the fifth violation (its counters reset), then two more violations and two clean interactions.
    assert (one.trust_level, one.interactions, one.violations) == ("untrusted", 9, 2)
    [two] = await connections_of(plane, second.principal_id, agent.id)
    assert (two.trust_level, two.interactions, two.violations) == ("basic", 3, 0)


async def test_a_grant_of_two_uses_is_spent_twice_across_two_remote_enforcers(plane: Plane) -> None:
    owner, asker = await member(plane, "owner"), await member(plane, "spender")
    agent = await agent_of(plane, owner, "metered")
    await policy(
        plane,
        f'permit(principal == Caller::Person::"{asker.principal_id}", action == Action::"capability.request", '
        "resource);",
    )
    granted = await plane.policies.RequestCapability(
        ppb.RequestCapabilityRequest(agent_id=agent.id, capability="metered", max_calls=2), metadata=asker.md
    )
    assert granted.decision == "allow" and granted.grant.uses_left == 2
    first, second = await plane.enforcer(), await plane.enforcer()
    assert granted.grant.id in {g.id for g in first.engine.grants()}
    who = Caller("Caller::Person", asker.principal_id)
    target = tool_target(agent.id, "metered", "1.0.0")
    verdicts = await asyncio.gather(
        *((first, second)[i % 2].decide(who, "tool.invoke", target, agent_id=agent.id) for i in range(8))
    )
    assert sum(v.outcome is Outcome.ALLOW for v in verdicts) == 2
    ended = await plane.policies.ListGrants(ppb.ListGrantsRequest(include_ended=True), metadata=asker.md)
    assert [(g.id, g.uses_left) for g in ended.grants] == [(granted.grant.id, 0)]


async def test_preview_spends_no_grant_and_leaves_no_trace(plane: Plane) -> None:
    owner, asker = await member(plane, "owner"), await member(plane, "previewer")
    agent = await agent_of(plane, owner, "previewed")
    await policy(
        plane,
        f'permit(principal == Caller::Person::"{asker.principal_id}", action == Action::"capability.request", '
        "resource);",
    )
    granted = await plane.policies.RequestCapability(
        ppb.RequestCapabilityRequest(agent_id=agent.id, capability="previewed", max_calls=1), metadata=asker.md
    )
    assert granted.decision == "allow" and granted.grant.uses_left == 1
    # Allows are logged too here, so a decision would leave a line.
    enforcer = await plane.enforcer(log_allows=True)
    who = Caller("Caller::Person", asker.principal_id, Trust.BASIC)
    target = tool_target(agent.id, "previewed", "1.0.0")
    # RequestCapability was the connection's first interaction.
    [before] = await connections_of(plane, asker.principal_id, agent.id)
    assert [enforcer.preview(who, "tool.invoke", target).outcome for _ in range(3)] == [Outcome.ALLOW] * 3
    assert granted.grant.id in {g.id for g in enforcer.engine.grants()}
    listed = await plane.policies.ListGrants(ppb.ListGrantsRequest(), metadata=asker.md)
    assert [(g.id, g.uses_left) for g in listed.grants] == [(granted.grant.id, 1)]
    log = await plane.policies.ListDecisions(ppb.ListDecisionsRequest(page_size=500), metadata=plane.admin)
    assert [d for d in log.decisions if d.target == target.uid] == []
    [after] = await connections_of(plane, asker.principal_id, agent.id)
    assert after.interactions == before.interactions

    # The decision itself spends the use, logs its line and records the interaction.
    assert (await enforcer.decide(who, "tool.invoke", target, agent_id=agent.id)).outcome is Outcome.ALLOW
    assert enforcer.preview(who, "tool.invoke", target).outcome is Outcome.DENY
    log = await plane.policies.ListDecisions(ppb.ListDecisionsRequest(page_size=500), metadata=plane.admin)
    assert [(d.action, d.outcome) for d in log.decisions if d.target == target.uid] == [("tool.invoke", "allow")]
    [decided] = await connections_of(plane, asker.principal_id, agent.id)
    assert decided.interactions == before.interactions + 1


async def test_decisions_reach_the_decision_log_in_batches(plane: Plane) -> None:
    enforcer = await plane.enforcer()
    outsider = f"logged-{secrets.token_hex(4)}"
    target = agent_target(f"nowhere-{secrets.token_hex(4)}")
    verdict = await enforcer.decide(external_client(outsider), "agent.read", target)
    assert verdict.outcome is Outcome.DENY
    log = await plane.policies.ListDecisions(ppb.ListDecisionsRequest(outcome="deny"), metadata=plane.admin)
    mine = [d for d in log.decisions if d.caller == f'Caller::Client::"{outsider}"']
    assert [(d.action, d.target) for d in mine] == [("agent.read", target.uid)]

    # More than one call's worth goes in batches of MAX_BATCH; one call of more is refused.
    caller = f'Caller::Client::"bulk-{secrets.token_hex(4)}"'
    entries = [AuditEntry(caller, "agent.read", target.uid, "deny", (), f"n{i}") for i in range(MAX_BATCH + 1)]
    await RemoteControlPlane(plane.enforcing).audit(entries)
    seen: set[str] = set()
    token = ""
    for _ in range(3):
        page = await plane.policies.ListDecisions(
            ppb.ListDecisionsRequest(page_size=500, page_token=token), metadata=plane.admin
        )
        seen |= {d.reason for d in page.decisions if d.caller == caller}
        token = page.next_page_token
        if not token or len(seen) == len(entries):
            break
    assert seen == {e.reason for e in entries}


async def test_create_approval_is_pending_for_the_targets_owner(plane: Plane) -> None:
    owner, asker, other = await member(plane, "owner"), await member(plane, "asker"), await member(plane, "other")
    agent = await agent_of(plane, owner, "careful")
    control = RemoteControlPlane(plane.enforcing)
    made = await control.create_approval(
        caller=f'Caller::Person::"{asker.principal_id}"',
        requested_by=asker.principal_id,
        action="tool.invoke",
        target=tool_target(agent.id, "careful", "1.0.0").uid,
        target_agent_id=agent.id,
        purpose="a nightly report",
        reasons=["invoking careful needs its owner's yes"],
        policy_ids=["p-1"],
        grant_action="tool.invoke",
        grant_target=tool_target(agent.id, "careful", "1.0.0").uid,
        grant_duration_seconds=600,
        grant_uses=3,
    )
    assert made.status == "pending" and made.target_agent_id == agent.id and made.grant_uses == 3
    owners = await plane.policies.ListApprovals(ppb.ListApprovalsRequest(status="pending"), metadata=owner.md)
    assert made.id in {a.id for a in owners.approvals}
    seen = await plane.policies.GetApproval(ppb.GetApprovalRequest(id=made.id), metadata=asker.md)
    assert seen.purpose == "a nightly report"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await plane.policies.GetApproval(ppb.GetApprovalRequest(id=made.id), metadata=other.md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    answered = await plane.policies.ApproveApproval(ppb.ApproveApprovalRequest(id=made.id), metadata=owner.md)
    assert answered.status == "approved" and answered.grant_id

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await plane.policies.CreateApproval(
            ppb.CreateApprovalRequest(
                caller='Caller::Person::"x"',
                requested_by="x",
                action="tool.invoke",
                target='Target::Tool::"x"',
                target_agent_id="00000000-0000-0000-0000-000000000000",
                grant_action="tool.invoke",
                grant_target='Target::Tool::"x"',
            ),
            metadata=await plane.tokens.metadata(),
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_internal_rpcs_need_policies_enforce_and_valid_input(plane: Plane) -> None:
    reader = await tokens_for(plane.mesh, plane.channel, "policies:read")
    someone = await member(plane, "someone")
    stub = plane.policies
    calls = {
        "ResolveTrust": (stub.ResolveTrust, ppb.ResolveTrustRequest(caller_type="Caller::Client", caller_id="c")),
        "RecordInteractions": (stub.RecordInteractions, ppb.RecordInteractionsRequest()),
        "ConsumeGrant": (stub.ConsumeGrant, ppb.ConsumeGrantRequest(grant_id=str(secrets.token_hex(16)))),
        "LogDecisions": (stub.LogDecisions, ppb.LogDecisionsRequest()),
        "CreateApproval": (stub.CreateApproval, ppb.CreateApprovalRequest()),
    }
    try:
        for name, (method, request) in calls.items():
            for md in (await reader.metadata(), someone.md):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await method(request, metadata=md)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await method(request)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    finally:
        await reader.close()

    md = await plane.tokens.metadata()

    async def bad(method: object, request: object) -> dict[str, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await method(request, metadata=md)  # type: ignore[operator]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return violations(err.value)

    found = await bad(
        stub.ResolveTrust, ppb.ResolveTrustRequest(caller_type="Caller::Nobody", caller_id="", agent_id="a" * 65)
    )
    assert set(found) == {"caller_type", "caller_id", "agent_id"}
    found = await bad(
        stub.RecordInteractions,
        ppb.RecordInteractionsRequest(
            interactions=[
                ppb.Interaction(caller_type="Caller::Client", caller_id="ok"),
                ppb.Interaction(caller_type="Caller::Client", caller_id="x" * 501, violation="v" * 501),
            ]
        ),
    )
    assert set(found) == {"interactions[1].caller_id", "interactions[1].violation"}
    many = [ppb.Interaction(caller_type="Caller::Client", caller_id="c")] * (MAX_BATCH + 1)
    assert set(await bad(stub.RecordInteractions, ppb.RecordInteractionsRequest(interactions=many))) == {"interactions"}
    assert set(await bad(stub.ConsumeGrant, ppb.ConsumeGrantRequest(grant_id="not-a-uuid"))) == {"grant_id"}
    found = await bad(
        stub.LogDecisions,
        ppb.LogDecisionsRequest(
            decisions=[
                ppb.Decision(
                    caller="Person::x", action="fly", target='Target::Agent::"a"', outcome="maybe", reason="r" * 4001
                )
            ]
        ),
    )
    assert set(found) == {
        "decisions[0].caller",
        "decisions[0].action",
        "decisions[0].outcome",
        "decisions[0].reason",
    }
    many_decisions = [
        ppb.Decision(caller='Caller::Client::"c"', action="agent.read", target='Target::Agent::"a"', outcome="deny")
    ]
    found = await bad(stub.LogDecisions, ppb.LogDecisionsRequest(decisions=many_decisions * (MAX_BATCH + 1)))
    assert set(found) == {"decisions"}
    found = await bad(
        stub.CreateApproval,
        ppb.CreateApprovalRequest(
            caller="nobody",
            action="tool.invoke",
            target='Target::Tool::"t"',
            target_agent_id="agent",
            purpose="p" * 2001,
            reasons=["r"] * 65,
            grant_action="",
            grant_target='Target::Tool::"t"',
            grant_duration_seconds=-1,
            grant_uses=2_000_000,
        ),
    )
    assert set(found) == {
        "caller",
        "requested_by",
        "target_agent_id",
        "purpose",
        "reasons",
        "grant_action",
        "grant_duration_seconds",
        "grant_uses",
    }
    # A uid that would add Cedar text to the grant an approval makes, and an action that does not fit its target.
    found = await bad(
        stub.CreateApproval,
        ppb.CreateApprovalRequest(
            caller='Caller::Person::"a", action, resource) when { true }; //"',
            requested_by="p",
            action="tool.invoke",
            target='Target::Tool::"t"',
            target_agent_id=str(uuid.uuid4()),
            grant_action="message.send",
            grant_target='Target::Tool::"t"',
        ),
    )
    assert set(found) == {"caller", "grant_action"}


async def test_a_revoked_token_is_dropped_and_the_call_retried_with_a_new_one(plane: Plane) -> None:
    identity = ipb_grpc.IdentityServiceStub(plane.channel)
    made = await create_client(identity, plane.mesh.admin_token, name="revoked", scopes=["policies:enforce"])
    client_id, secret = made.client.client_id, made.client_secret
    tokens = GrpcTokenSource(plane.channel, plane.mesh.address("registry"), client_id, secret)
    channel = grpc.aio.insecure_channel(plane.mesh.address("registry"), interceptors=[BearerInterceptor(tokens)])
    try:
        control = RemoteControlPlane(channel)
        assert await control.trust(external_client(f"retry-{secrets.token_hex(4)}"), "") is Trust.UNTRUSTED
        first = await tokens.token()
        assert (await revoke(identity, {"token": first}, basic(client_id, secret))).status == 200
        # Refused as UNAUTHENTICATED, the token is dropped and the call made again with a new one.
        assert await control.trust(external_client(f"retry-{secrets.token_hex(4)}"), "") is Trust.UNTRUSTED
        assert await tokens.token() != first and tokens.fetches == 2
    finally:
        await channel.close()
        await tokens.close()
