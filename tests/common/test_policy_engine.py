"""The policy engine on real Cedar (cedarpy): decisions, constraints, time, grants, explain and write-time checks."""

from __future__ import annotations

import calendar
import json
import re
import time
from collections.abc import Callable

import cedarpy
import pytest

from agentvault.common.auth import Role
from agentvault.common.policy import (
    Caller,
    Grant,
    Outcome,
    PolicyEngine,
    PolicyError,
    Target,
    Trust,
    agent_target,
    caller,
    capability_target,
    external_client,
    tool_target,
    validate,
)
from agentvault.common.policy.request import counters
from agentvault.common.principal import Kind, Principal, peer, person

MESH = "mesh-a"
# Thursday 26 November 2026, 10:00 UTC.
THURSDAY_10 = calendar.timegm((2026, 11, 26, 10, 0, 0))


class Clock:
    """A settable clock the engine reads instead of the wall clock."""

    def __init__(self, now: float = THURSDAY_10) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


AGENT = caller(Principal(Kind.AGENT, "agent-1", scopes=frozenset({"tools:invoke"}), owner="alice"), Trust.BASIC, MESH)
OTHER = caller(Principal(Kind.AGENT, "agent-2", owner="bob"), Trust.BASIC, MESH)
STRANGER = external_client("https://stranger.example")
TOOL = tool_target("summarizer", "summarize", version="1.4.2", owner="carol")
CARD = agent_target("summarizer", owner="carol", tags={"nlp"})

INVOKE = 'permit(principal is Caller::Agent, action == Action::"tool.invoke", resource) when { %s };'


def engine(policies: dict[str, str], clock: Clock | None = None) -> PolicyEngine:
    return PolicyEngine(policies, clock=clock or Clock())


# Decisions --------------------------------------------------------------------------------------------------------


def test_each_decision_kind_and_default_deny() -> None:
    e = engine(
        {
            "invoke": INVOKE % "principal.trust_rank >= 2",
            "read-ask": '@decision("ask")\n@reason("strangers read cards after the owner agrees")\n'
            'permit(principal is Caller::Client, action == Action::"agent.read", resource);',
            "no-handoff": 'forbid(principal, action == Action::"session.handoff", resource);',
            "handoff": 'permit(principal, action == Action::"session.handoff", resource);',
        }
    )
    allowed = e.decide(AGENT, "tool.invoke", TOOL)
    assert (allowed.outcome, allowed.policies) == (Outcome.ALLOW, ("invoke",))

    asked = e.decide(STRANGER, "agent.read", CARD)
    assert (asked.outcome, asked.policies) == (Outcome.ASK, ("read-ask",))
    assert "after the owner agrees" in asked.reasons[0]

    denied = e.decide(AGENT, "session.handoff", CARD)
    assert (denied.outcome, denied.policies) == (Outcome.DENY, ("no-handoff",))

    # An external caller no rule mentions is refused: untrusted by default, default deny.
    assert STRANGER.trust is Trust.UNTRUSTED
    nothing = e.decide(STRANGER, "tool.invoke", TOOL)
    assert (nothing.outcome, nothing.policies) == (Outcome.DENY, ())
    assert "default deny" in nothing.reasons[0]
    assert e.decide(STRANGER, "message.send", CARD).outcome is Outcome.DENY


def test_deny_wins_over_allow_and_ask_and_allow_beats_ask() -> None:
    e = engine(
        {
            "allow": INVOKE % "true",
            "ask": '@decision("ask") permit(principal, action == Action::"tool.invoke", resource);',
            "forbid-low-trust": "forbid(principal, action, resource) when { principal.trust_rank < 2 };",
        }
    )
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW  # plain permit + ask permit: allow
    low = caller(Principal(Kind.AGENT, "agent-9"), Trust.UNTRUSTED, MESH)
    d = e.decide(low, "tool.invoke", TOOL)
    assert (d.outcome, d.policies) == (Outcome.DENY, ("forbid-low-trust",))
    e.replace(
        {"ask": '@decision("ask") permit(principal, action, resource);', "no": "forbid(principal, action, resource);"}
    )
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.DENY


def test_a_blocked_caller_is_denied_without_a_forbid_saying_so() -> None:
    e = engine({"allow": 'permit(principal, action == Action::"tool.invoke", resource);'})
    blocked = caller(Principal(Kind.AGENT, "agent-1"), Trust.BLOCKED, MESH)
    d = e.decide(blocked, "tool.invoke", TOOL)
    assert (d.outcome, d.reasons) == (Outcome.DENY, ('Caller::Agent::"agent-1" is blocked on this connection',))
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW


def test_a_forbid_that_fails_to_evaluate_still_denies() -> None:
    e = engine(
        {
            "allow": INVOKE % "true",
            # Overflows (an evaluation error) once calls_today is above 2: Cedar alone would skip it and allow.
            "overflow": "forbid(principal, action, resource) when { context.calls_today + 9223372036854775805 < 0 };",
        }
    )
    assert e.decide(AGENT, "tool.invoke", TOOL, {"calls_today": 1}).outcome is Outcome.ALLOW
    d = e.decide(AGENT, "tool.invoke", TOOL, {"calls_today": 5})
    assert (d.outcome, d.policies) == (Outcome.DENY, ("overflow",))
    assert "could not be evaluated" in d.reasons[0]
    x = e.explain(AGENT, "tool.invoke", TOOL, {"calls_today": 5})
    assert (x.decision, set(x.matched)) == (d, {"allow", "overflow"})


def test_callers_and_targets_are_built_from_principals() -> None:
    e = engine(
        {
            "scoped": 'permit(principal, action == Action::"tool.invoke", resource) when { '
            'principal.scopes.contains("tools:invoke") && resource.owner == "carol" && resource.version like "1.*" };',
            "peers-read-nlp": 'permit(principal is Caller::Peer, action == Action::"agent.read", resource) '
            'when { resource.tags.contains("nlp") && principal.mesh == "mesh-b" };',
            "own": 'permit(principal, action == Action::"capability.request", resource) when '
            "{ principal.owner == resource.owner };",
        }
    )
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW
    assert e.decide(OTHER, "tool.invoke", TOOL).outcome is Outcome.DENY  # no tools:invoke scope
    member = caller(person("p-1", "Pat", Role.MEMBER), Trust.TRUSTED, MESH)
    assert member.type == "Caller::Person" and "tools:invoke" in member.scopes  # the role's scopes
    assert e.decide(member, "tool.invoke", TOOL).outcome is Outcome.ALLOW
    mesh_b = caller(peer("peer-b", "B"), Trust.BASIC, "mesh-b")
    assert mesh_b.type == "Caller::Peer"
    assert e.decide(mesh_b, "agent.read", CARD).outcome is Outcome.ALLOW
    assert e.decide(mesh_b, "agent.read", agent_target("x", tags={"vision"})).outcome is Outcome.DENY
    bound = Principal(Kind.AGENT, "client-7", agent_id="agent-1", owner="alice", scopes=frozenset({"tools:invoke"}))
    assert caller(bound, Trust.BASIC, MESH).id == "agent-1"  # its registered agent id, as when it is a target
    skill = capability_target("summarizer", "summarize", owner="alice")
    assert e.decide(AGENT, "capability.request", skill).outcome is Outcome.ALLOW  # alice owns agent-1 and the skill
    assert e.decide(OTHER, "capability.request", skill).outcome is Outcome.DENY


def test_policies_naming_one_caller_or_target_apply_to_it_only() -> None:
    e = engine(
        {
            "agent-1": 'permit(principal == Caller::Agent::"agent-1", action == Action::"tool.invoke", resource);',
            "this-tool": 'permit(principal, action, resource == Target::Tool::"other/tool");',
            "forbid-agent-2": 'forbid(principal == Caller::Agent::"agent-2", action, resource);',
            "small": INVOKE % "context.payload_size < 100",
        }
    )
    # The general part of a slice is parsed once and this request's own policies added to it: ids stay right.
    d = e.decide(AGENT, "tool.invoke", TOOL, {"payload_size": 10})
    assert (d.outcome, set(d.policies)) == (Outcome.ALLOW, {"agent-1", "small"})
    assert e.decide(AGENT, "tool.invoke", TOOL, {"payload_size": 1000}).policies == ("agent-1",)
    third = caller(Principal(Kind.AGENT, "agent-3"), Trust.BASIC, MESH)
    assert e.decide(third, "tool.invoke", TOOL).policies == ("small",)
    assert e.decide(third, "tool.invoke", TOOL, {"payload_size": 1000}).outcome is Outcome.DENY
    d = e.decide(OTHER, "tool.invoke", TOOL)  # a general permit applies, and agent-2's own forbid
    assert (d.outcome, d.policies) == (Outcome.DENY, ("forbid-agent-2",))
    assert e.decide(AGENT, "tool.invoke", tool_target("other", "tool")).outcome is Outcome.ALLOW
    d = e.decide(OTHER, "tool.invoke", tool_target("other", "tool"))
    assert (d.outcome, d.policies) == (Outcome.DENY, ("forbid-agent-2",))


OVERFLOW = "+ 9223372036854775800"  # added to a counter above 7: an evaluation error, not false
MIXED = {
    # General: naming no one caller or target, shared by every pair's set.
    "g-trusted": "permit(principal, action, resource) when { principal.trust_rank >= 3 };",
    "g-big": "forbid(principal, action, resource) when { context.payload_size > 1000 };",
    "g-clients-ask": '@decision("ask") permit(principal is Caller::Client, action, resource);',
    "g-overflow": 'forbid(principal, action == Action::"tool.invoke", resource) when '
    f"{{ context.calls_today {OVERFLOW} < 0 }};",
    "g-permit-error": "permit(principal is Caller::Agent, action, resource) when "
    f"{{ context.calls_in_window {OVERFLOW} > 0 }};",
    # Own: naming one caller or one target, added to a copy of the general set for each pair.
    **{
        f"c-{i}": f'permit(principal == Caller::Agent::"a{i}", action == Action::"tool.invoke", resource) '
        "when { context.calls_in_window < 5 };"
        for i in range(4)
    },
    "c-forbid-a1": 'forbid(principal == Caller::Agent::"a1", action, resource) when { context.payload_size > 500 };',
    "c-ask-a2": '@decision("ask") permit(principal == Caller::Agent::"a2", action, resource);',
    "c-overflow-a3": 'forbid(principal == Caller::Agent::"a3", action, resource) when '
    f"{{ context.concurrent_calls {OVERFLOW} < 0 }};",
    "t-0": 'permit(principal is Caller::Agent, action, resource == Target::Tool::"x0/t") '
    "when { principal.trust_rank >= 2 };",
    "t-forbid-1": 'forbid(principal, action, resource == Target::Tool::"x1/t") when { context.payload_size > 100 };',
}


def reference(policies: dict[str, str], grants: list[Grant]) -> Callable[..., tuple[Outcome, set[str]]]:
    """The engine's rule applied to one Cedar call over every policy and grant: no slicing, no caching."""
    texts = [f'@id("{pid}")\n{text}' for pid, text in policies.items()]
    texts += [f'@id("{g.policy_id}")\n{g.text()}' for g in grants]
    whole = cedarpy.PolicySet.from_str("\n".join(texts))
    ids = {key: node.annotations["id"] for key, node in whole.to_pst().static_policies.items()}
    utc = time.gmtime(THURSDAY_10)

    def decide(who: Caller, what: Target, ctx: dict[str, int]) -> tuple[Outcome, set[str]]:
        request = {
            "principal": {"type": who.type, "id": who.id},
            "action": {"type": "Action", "id": "tool.invoke"},
            "resource": {"type": what.type, "id": what.id},
            "context": {"now": THURSDAY_10, "hour": utc.tm_hour, "weekday": utc.tm_wday, **counters(ctx)},
        }
        result = cedarpy.is_authorized(request, whole, json.dumps([who.entity(), what.entity()]))
        named = {result.diagnostics.id_annotations_by_reason[r] for r in result.diagnostics.reasons}
        errors = (re.search(r"policy\d+", str(error)) for error in result.diagnostics.errors)
        broken = {ids[m.group(0)] for m in errors if m and policies[ids[m.group(0)]].startswith("forbid")}
        denied = named if result.decision is cedarpy.Decision.Deny else set()  # Cedar's satisfied forbids, if any
        if denied or broken:  # a forbid that fails to evaluate applies
            return Outcome.DENY, denied | broken
        if not named:
            return Outcome.DENY, set()
        plain = {pid for pid in named if not policies.get(pid, "").startswith('@decision("ask")')}
        return (Outcome.ALLOW, plain) if plain else (Outcome.ASK, named)

    return decide


def test_one_cedar_call_over_the_pairs_set_decides_as_cedar_over_the_whole_set() -> None:
    # Each pair's set is the general set parsed once plus the pair's own policies added to a copy, cached by
    # content: a set reused for the wrong pair, a policy lost in the copy or a misnamed error would show here.
    e = engine(MIXED)
    a0, a4 = (caller(Principal(Kind.AGENT, f"a{i}"), Trust.BASIC, MESH) for i in (0, 4))
    grants = [
        Grant.of("a0-x1", a0, "tool.invoke", tool_target("x1", "t"), THURSDAY_10 + 60),
        Grant.of("a4-x2", a4, "tool.invoke", tool_target("x2", "t"), THURSDAY_10 + 60),
    ]
    for g in grants:
        e.grant(g)
    cedar = reference(MIXED, grants)
    trusts = [Trust.BASIC, Trust.TRUSTED, Trust.UNTRUSTED, Trust.BASIC, Trust.TRUSTED]
    callers = [caller(Principal(Kind.AGENT, f"a{i}"), trust, MESH) for i, trust in enumerate(trusts)]
    callers.append(external_client("c"))
    contexts = [
        {},
        {"payload_size": 200},
        {"payload_size": 600, "calls_in_window": 3},
        {"payload_size": 2000},
        {"calls_in_window": 9},
        {"calls_today": 9},
        {"concurrent_calls": 9, "calls_in_window": 6},
        {"calls_today": 9, "concurrent_calls": 9, "payload_size": 700},
    ]
    seen = set()
    for _ in range(2):  # the second time from the engine's caches
        for who in callers:
            for what in (tool_target(f"x{i}", "t") for i in range(3)):
                for ctx in contexts:
                    d, expected = e.decide(who, "tool.invoke", what, ctx), cedar(who, what, ctx)
                    assert (d.outcome, set(d.policies)) == expected, (who.id, what.id, ctx)
                    assert e.explain(who, "tool.invoke", what, ctx).decision == d
                    seen.add((d.outcome, frozenset(d.policies)))
    assert {o for o, _ in seen} == set(Outcome) and len(seen) > 12  # the mix covers every kind of answer
    assert len(e._handles) > 6  # and many pairs' sets, sharing one general set


def test_forbids_from_the_general_and_the_own_policies_are_named_in_order() -> None:
    e = engine(MIXED)
    a3 = caller(Principal(Kind.AGENT, "a3"), Trust.BASIC, MESH)
    # Both forbids fail to evaluate, one in the general set and one added for the pair (Cedar renumbers its
    # positional ids when adding): each is named by its own id, the general ones first.
    d = e.decide(
        a3, "tool.invoke", tool_target("x1", "t"), {"calls_today": 9, "concurrent_calls": 9, "payload_size": 2000}
    )
    assert d.outcome is Outcome.DENY
    assert d.policies == ("g-big", "t-forbid-1", "g-overflow", "c-overflow-a3")
    assert d.reasons[-1] == "policy 'c-overflow-a3' forbids this (its condition could not be evaluated)"
    d = e.decide(a3, "tool.invoke", tool_target("x0", "t"), {"concurrent_calls": 9})
    assert (d.outcome, d.policies) == (Outcome.DENY, ("c-overflow-a3",))


# Constraints and time ---------------------------------------------------------------------------------------------

CONSTRAINTS = {
    "invoke": INVOKE % "true",
    "payload": '@reason("payload over 1 MiB") forbid(principal, action, resource) when '
    "{ context.payload_size > 1048576 };",
    "rate": "forbid(principal, action, resource) when { context.calls_in_window >= 60 };",
    "concurrency": "forbid(principal, action, resource) when { context.concurrent_calls >= 4 };",
    "quota": "forbid(principal, action, resource) when { context.calls_today >= 1000 };",
}


@pytest.mark.parametrize(
    ("field", "under", "over", "policy"),
    [
        ("payload_size", 1048576, 1048577, "payload"),
        ("calls_in_window", 59, 60, "rate"),
        ("concurrent_calls", 3, 4, "concurrency"),
        ("calls_today", 999, 1000, "quota"),
    ],
)
def test_each_resource_constraint(field: str, under: int, over: int, policy: str) -> None:
    e = engine(CONSTRAINTS)
    assert e.decide(AGENT, "tool.invoke", TOOL, {field: under}).outcome is Outcome.ALLOW
    d = e.decide(AGENT, "tool.invoke", TOOL, {field: over})
    assert (d.outcome, d.policies) == (Outcome.DENY, (policy,))
    if policy == "payload":
        assert d.reasons == ("policy 'payload' forbids this: payload over 1 MiB",)


def test_a_rule_active_only_in_a_time_window_follows_the_injected_clock() -> None:
    clock = Clock()
    e = engine({"office": INVOKE % "context.hour >= 9 && context.hour < 17 && context.weekday < 5"}, clock)
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW  # Thursday 10:00
    clock.now = THURSDAY_10 + 7 * 3600  # 17:00
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.DENY
    clock.now = THURSDAY_10 + 2 * 86400  # Saturday 10:00
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.DENY
    # context.now is epoch seconds: an absolute window.
    e.replace({"until": INVOKE % f"context.now < {THURSDAY_10 + 60}"})
    clock.now = THURSDAY_10 + 59
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW
    clock.now = THURSDAY_10 + 60
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.DENY


def test_a_grant_allows_until_it_expires_and_is_then_dropped() -> None:
    clock = Clock()
    e = engine({"ask": '@decision("ask") permit(principal, action == Action::"tool.invoke", resource);'}, clock)
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ASK
    e.grant(Grant.of("g1", AGENT, "tool.invoke", TOOL, expires_at=clock.now + 300))
    d = e.decide(AGENT, "tool.invoke", TOOL)
    assert (d.outcome, d.policies) == (Outcome.ALLOW, ("grant:g1",))
    assert e.decide(OTHER, "tool.invoke", TOOL).outcome is Outcome.ASK  # the grant is for agent-1 only
    clock.now += 299
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW
    clock.now += 1
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ASK
    assert e.grants() == []
    e.grant(Grant.of("g2", AGENT, "tool.invoke", TOOL, expires_at=clock.now + 300))
    assert e.revoke("g2") and not e.revoke("g2")
    # Ids are quoted into the generated policy, never spliced: quotes stay part of the id.
    odd = caller(Principal(Kind.AGENT, 'a") permit(principal, action, resource); @reason("'), Trust.BASIC, MESH)
    e.grant(Grant.of('g"3', odd, "tool.invoke", TOOL, expires_at=clock.now + 300))
    assert e.decide(odd, "tool.invoke", TOOL).outcome is Outcome.ALLOW
    assert e.decide(OTHER, "tool.invoke", TOOL).outcome is Outcome.ASK
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ASK


def test_a_one_time_grant_is_spent_by_the_allow_it_decides() -> None:
    clock = Clock()
    e = engine({}, clock)
    e.grant(Grant.of("once", AGENT, "tool.invoke", TOOL, expires_at=clock.now + 300, uses=1))
    e.grant(Grant.of("twice", AGENT, "agent.read", CARD, expires_at=clock.now + 300, uses=2))
    # Explain is a what-if: it spends nothing.
    assert e.explain(AGENT, "tool.invoke", TOOL).decision.outcome is Outcome.ALLOW
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.DENY
    assert [g.id for g in e.grants()] == ["twice"]
    assert [e.decide(AGENT, "agent.read", CARD).outcome for _ in range(3)] == [Outcome.ALLOW] * 2 + [Outcome.DENY]
    # When a standing permit allows anyway, the one-time grant is kept for when it is needed.
    e.replace({"standing": 'permit(principal, action == Action::"tool.invoke", resource);'})
    e.grant(Grant.of("spare", AGENT, "tool.invoke", TOOL, expires_at=clock.now + 300, uses=1))
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW
    assert [g.id for g in e.grants()] == ["spare"]


def test_preview_answers_as_decide_would_and_spends_no_grant() -> None:
    clock = Clock()
    e = engine({"ask": '@decision("ask")\npermit(principal, action == Action::"agent.read", resource);'}, clock)
    e.grant(Grant.of("once", AGENT, "tool.invoke", TOOL, expires_at=clock.now + 300, uses=1))
    assert [e.preview(AGENT, "tool.invoke", TOOL).outcome for _ in range(3)] == [Outcome.ALLOW] * 3
    assert [g.id for g in e.grants()] == ["once"]
    assert e.preview(AGENT, "agent.read", CARD).outcome is Outcome.ASK
    assert e.preview(OTHER, "tool.invoke", TOOL).outcome is Outcome.DENY
    # The real decision spends the use; the preview then says so.
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW
    assert e.preview(AGENT, "tool.invoke", TOOL).outcome is Outcome.DENY


# Explain ----------------------------------------------------------------------------------------------------------


def test_explain_names_the_deciding_policy_and_why_others_did_not_apply() -> None:
    e = engine(
        {
            "invoke": INVOKE % "context.payload_size < 1000",
            "ask": '@decision("ask") permit(principal, action == Action::"tool.invoke", resource);',
            "big": "forbid(principal, action, resource) when { context.payload_size > 5000 };",
            "clients": 'permit(principal is Caller::Client, action == Action::"tool.invoke", resource);',
            "read": 'permit(principal, action == Action::"agent.read", resource);',
            "agent-2": 'permit(principal == Caller::Agent::"agent-2", action, resource);',
        }
    )
    x = e.explain(AGENT, "tool.invoke", TOOL, {"payload_size": 10})
    assert (x.decision.outcome, x.decision.policies) == (Outcome.ALLOW, ("invoke",))
    assert set(x.matched) == {"invoke", "ask"}
    why = dict(x.not_applied)
    assert why["big"] == "condition false: when { context.payload_size > 5000 };"
    assert why["clients"] == "its principal must be a Caller::Client, this one is a Caller::Agent"
    assert why["read"] == "it is about action agent.read, not tool.invoke"
    assert why["agent-2"] == 'it names principal Caller::Agent::"agent-2", not Caller::Agent::"agent-1"'
    assert x.omitted == 0 and x.version == e.version

    x = e.explain(AGENT, "tool.invoke", TOOL, {"payload_size": 2000})
    assert (x.decision.outcome, x.decision.policies, x.matched) == (Outcome.ASK, ("ask",), ("ask",))
    assert dict(x.not_applied)["invoke"] == "condition false: when { context.payload_size < 1000 };"

    capped = e.explain(AGENT, "tool.invoke", TOOL, {"payload_size": 10}, limit=2)
    assert len(capped.not_applied) == 2 and capped.omitted == 2


# Writing policies -------------------------------------------------------------------------------------------------


def test_a_policy_is_checked_against_the_schema_when_written() -> None:
    assert validate(INVOKE % "principal.trust_rank >= 2 && context.calls_today < 10") == []
    assert validate('permit(principal, action, resource) when { principal.clearance == "top" };') == [
        "unknown attribute `clearance` of Caller::Agent, Caller::Client, Caller::Peer, Caller::Person, Caller::Service"
    ]
    assert validate(INVOKE % "resource.colour == 1") == ["unknown attribute `colour` of Target::Tool"]
    assert validate('permit(principal, action == Action::"tool.delete", resource);') == [
        'unrecognized action `Action::"tool.delete"`',
        "unable to find an applicable action given the policy scope constraints",
    ]
    assert validate("permit(principal, action, resource) when { context.temperature > 3 };") == [
        "unknown context attribute `temperature`; known: now, hour, weekday, payload_size, calls_in_window, "
        "concurrent_calls, calls_today"
    ]
    assert validate('permit(principal, action, resource) when { context.hour == "nine" };')  # a type error
    assert validate('@decison("ask") permit(principal, action, resource);') == [
        "unknown annotation @decison; known: decision, reason"
    ]
    assert validate('@id("other") permit(principal, action, resource);') == [
        "@id is not written by hand: a policy's id is the key it is stored under"
    ]
    assert validate('@decision("ask") forbid(principal, action, resource);') == [
        "@decision applies to permit policies only; a forbid always denies"
    ]
    assert validate('@decision("maybe") permit(principal, action, resource);') == [
        '@decision must be one of allow, ask, not "maybe"'
    ]
    assert validate("permit(principal, action, resource); permit(principal, action, resource);") == [
        "exactly one policy per entry, found 2"
    ]
    assert validate("permit(principal, action, resource")[0].startswith("not a Cedar policy: ")
    assert validate("permit(principal == ?principal, action, resource);")[0].startswith("templates")


def test_replace_is_all_or_nothing_and_takes_effect_at_once() -> None:
    e = engine({"invoke": INVOKE % "true"})
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW
    with pytest.raises(PolicyError) as raised:
        e.replace({"invoke": INVOKE % "true", "bad": INVOKE % "principal.karma > 3"})
    assert raised.value.policy_id == "bad"
    assert raised.value.errors == ["unknown attribute `karma` of Caller::Agent"]
    assert e.version == 0 and e.policy_ids() == ["invoke"]
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW
    assert e.replace({"invoke": INVOKE % "true", "stop": "forbid(principal, action, resource);"}) == 1
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.DENY  # the cached slice is not reused
    assert e.replace({"invoke": INVOKE % "true"}, version=7) == 7
    assert e.decide(AGENT, "tool.invoke", TOOL).outcome is Outcome.ALLOW


def test_memory_for_callers_and_candidates_is_bounded_in_bytes() -> None:
    budget = 64 * 1024
    policies = {f"own-{i}": f'permit(principal == Caller::Client::"c{i}", action, resource);' for i in range(300)}
    e = PolicyEngine({**policies, "ask": '@decision("ask") permit(principal, action, resource);'}, cache_bytes=budget)
    for i in range(600):  # strangers and known clients, each a new caller with its own parsed entities and set
        outcome = e.decide(external_client(f"c{i}"), "agent.read", CARD).outcome
        assert outcome is (Outcome.ALLOW if i < 300 else Outcome.ASK)
    assert 0 < e._handles.bytes <= budget and 0 < e._state.slices.bytes <= budget
    assert 0 < e._entities.bytes <= budget // 2
    assert len(e._state.slices) < 600


def test_bad_requests_are_clear_errors() -> None:
    e = engine({"invoke": INVOKE % "true"})
    with pytest.raises(ValueError, match=r"unknown action 'tool\.delete'"):
        e.decide(AGENT, "tool.delete", TOOL)
    with pytest.raises(ValueError, match="applies to Target::Tool, not Target::Agent"):
        e.decide(AGENT, "tool.invoke", CARD)
    with pytest.raises(ValueError, match="unknown context field 'now'"):
        e.decide(AGENT, "tool.invoke", TOOL, {"now": 0})  # the engine's clock, not the caller, says what time it is
    with pytest.raises(ValueError, match="must be a 64-bit integer"):
        e.decide(AGENT, "tool.invoke", TOOL, {"payload_size": 2**63})
    with pytest.raises(PolicyError):
        e.replace({"grant:x": INVOKE % "true"})
    with pytest.raises(PolicyError, match="printable"):
        e.replace({"bad\nid": INVOKE % "true"})
    with pytest.raises(ValueError, match="uses is at least 1"):
        e.grant(Grant.of("g", AGENT, "tool.invoke", TOOL, expires_at=THURSDAY_10 + 60, uses=0))


def test_a_grant_naming_anything_but_an_entity_uid_is_refused() -> None:
    # A grant's caller and target are written into Cedar text: a "uid" that closes the scope and widens it must not
    # become a policy that allows everything.
    engine = PolicyEngine()
    injected = 'Caller::Agent::"a", action, resource) when { true }; //"'
    with pytest.raises(ValueError, match="entity uids"):
        engine.grant(Grant("g1", injected, "agent.read", 'Target::Agent::"b"', time.time() + 60))
    with pytest.raises(ValueError, match="entity uids"):
        engine.grant(Grant("g2", 'Caller::Agent::"a"', "agent.read", 'Target::Nope::"b"', time.time() + 60))
    assert engine.grants() == []
    outsider = external_client("z")
    assert engine.decide(outsider, "agent.read", agent_target("b")).outcome is Outcome.DENY


def test_the_engine_says_which_actions_need_usage_counters() -> None:
    engine = PolicyEngine()
    engine.replace({"any": 'permit(principal, action == Action::"message.send", resource);'})
    assert not engine.measures("message.send") and not engine.measures("tool.invoke")
    engine.replace(
        {
            "any": 'permit(principal, action == Action::"message.send", resource);',
            "rate": 'forbid(principal, action == Action::"tool.invoke", resource) '
            "when { context.calls_in_window >= 10 };",
            "size": 'forbid(principal, action == Action::"message.send", resource) when { context.payload_size > 9 };',
        }
    )
    # payload_size is the request's own; only the meter's counters need counting.
    assert engine.measures("tool.invoke") and not engine.measures("message.send")
    engine.replace({"all": "permit(principal, action, resource) when { context.calls_today < 5 };"})
    assert engine.measures("message.send") and engine.measures("agent.read")
