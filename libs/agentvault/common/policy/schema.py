"""The mesh's Cedar schema (callers, targets, actions, context) and write-time validation of one policy."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import cedarpy

# The actions every enforcer asks about, with the target type each one applies to.
ACTIONS: dict[str, str] = {
    "agent.read": "Target::Agent",
    "message.send": "Target::Agent",
    "tool.list": "Target::Agent",
    "tool.invoke": "Target::Tool",
    "session.handoff": "Target::Agent",
    "capability.request": "Target::Capability",
}
CALLER_TYPES = ("Caller::Person", "Caller::Agent", "Caller::Service", "Caller::Peer", "Caller::Client")
# Counters the enforcing service measures and passes in; the engine adds now/hour/weekday from its own clock.
COUNTERS = ("payload_size", "calls_in_window", "concurrent_calls", "calls_today")
CLOCK_FIELDS = ("now", "hour", "weekday")
CONTEXT = (*CLOCK_FIELDS, *COUNTERS)

# Annotations a policy may carry: a typo such as @decison("ask") would otherwise silently make an ask an allow.
# @id is the engine's: it tags each policy with the key it is stored under, which Cedar's answers then name.
ANNOTATIONS = frozenset({"decision", "reason"})
DECISIONS = frozenset({"allow", "ask"})
MAX_POLICY_CHARS = 16_384

_CALLER = "{ trust: String, trust_rank: Long, scopes: Set<String>, mesh: String, owner: String }"
_CAPABILITY = (
    "{ name: String, kind: String, version: String, agent: String, owner: String, mesh: String, tags: Set<String> }"
)
_CALLERS = ", ".join(CALLER_TYPES)


def _schema_text() -> str:
    context = ", ".join(f"{name}: Long" for name in CONTEXT)
    actions = "\n".join(
        f'action "{name}" appliesTo {{ principal: [{_CALLERS}], resource: [{target}], context: Context }};'
        for name, target in ACTIONS.items()
    )
    return f"""
namespace Caller {{
  entity Person, Agent, Service, Peer, Client = {_CALLER};
}}
namespace Target {{
  entity Agent = {{ owner: String, mesh: String, tags: Set<String> }};
  entity Tool, Capability = {_CAPABILITY};
}}
// now: epoch seconds; hour (0-23) and weekday (0 Monday .. 6 Sunday) in UTC, all from the engine's clock.
type Context = {{ {context} }};
{actions}
"""


SCHEMA_TEXT = _schema_text()
SCHEMA = cedarpy.Schema.from_str(SCHEMA_TEXT)

# Cedar names the policy by its position in the text it parsed ("policy0"), which means nothing to the author.
_POSITIONAL = re.compile(r"for policy `policy\d+`, ")
_ENTITY_ATTR = re.compile(r"attribute `(?P<attr>[^`]+)` on entity type `(?P<type>[^`]+)` not found")
_CONTEXT_ATTR = re.compile(r"attribute `(?P<attr>[^`]+)` in context for .* not found")
_POLICY_ID = re.compile(r"[^\x00-\x1f\x7f]{1,200}")
_CONDITION = re.compile(r"\b(when|unless)\s*\{", re.DOTALL)


class PolicyError(ValueError):
    """A policy that cannot be used; `errors` says why, one clear sentence each (for field violations)."""

    def __init__(self, policy_id: str, errors: list[str]) -> None:
        super().__init__(f"policy {policy_id!r}: " + "; ".join(errors))
        self.policy_id = policy_id
        self.errors = errors


@dataclass(frozen=True)
class PolicyMeta:
    """One parsed, schema-valid policy: what the engine indexes it by and what Explain says about it."""

    text: str
    tagged: str  # the text under an @id annotation naming the policy, as the engine hands it to Cedar
    effect: str  # "permit" or "forbid"
    ask: bool  # a permit annotated @decision("ask"): allowed only after an approval
    reason: str  # its @reason annotation, for the caller's refusal message; "" when absent
    principal: dict[str, Any]  # the scope constraints as Cedar's JSON form (EST)
    actions: tuple[str, ...] | None  # the action names its scope names; None for any action
    resource: dict[str, Any]
    condition: str  # the when/unless text, for Explain


def _clean(message: str) -> str:
    return _POSITIONAL.sub("", message).strip()


def _parse(text: str) -> tuple[dict[str, Any] | None, list[str]]:
    if len(text) > MAX_POLICY_CHARS:
        return None, [f"a policy is at most {MAX_POLICY_CHARS} characters"]
    try:
        est = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        return None, [f"not a Cedar policy: {_clean(str(exc))}"]
    if est.get("templates"):
        return None, ["templates (?principal, ?resource) are not accepted; name the principal and resource"]
    policies = list(est.get("staticPolicies", {}).values())
    if len(policies) != 1:
        return None, [f"exactly one policy per entry, found {len(policies)}"]
    return policies[0], []


def _annotation_errors(policy: dict[str, Any]) -> list[str]:
    errors = []
    annotations: dict[str, str] = policy.get("annotations", {})
    for name in sorted(set(annotations) - ANNOTATIONS):
        if name == "id":
            errors.append("@id is not written by hand: a policy's id is the key it is stored under")
        else:
            errors.append(f"unknown annotation @{name}; known: {', '.join(sorted(ANNOTATIONS))}")
    decision = annotations.get("decision")
    if decision is not None:
        if decision not in DECISIONS:
            errors.append(f'@decision must be one of {", ".join(sorted(DECISIONS))}, not "{decision}"')
        elif policy["effect"] == "forbid":
            errors.append("@decision applies to permit policies only; a forbid always denies")
    return errors


def _check(text: str) -> tuple[dict[str, Any] | None, list[str]]:
    policy, errors = _parse(text)
    if policy is None:
        return None, errors
    errors = _annotation_errors(policy)
    result = cedarpy.validate_policies(text, SCHEMA)
    return policy, errors + _summarize([_clean(err.error) for err in result.errors])


def validate(text: str) -> list[str]:
    """Why `text` cannot be stored as one policy of the mesh (empty when it can): syntax, schema, annotations."""
    return _check(text)[1]


def _summarize(errors: list[str]) -> list[str]:
    """The validator repeats one fault once per entity type or action the scope allows; say each once."""
    said: dict[str, list[str]] = {}
    for error in errors:
        if match := _ENTITY_ATTR.fullmatch(error):
            key = f"unknown attribute `{match['attr']}` of "
            said.setdefault(key, []).append(match["type"])
        elif match := _CONTEXT_ATTR.fullmatch(error):
            said.setdefault(f"unknown context attribute `{match['attr']}`; known: {', '.join(CONTEXT)}", [])
        elif error:
            said.setdefault(error, [])
    return [key + ", ".join(sorted(types)) if types else key for key, types in said.items()]


def _actions(scope: dict[str, Any]) -> tuple[str, ...] | None:
    if scope["op"] == "All":
        return None
    entities = [scope["entity"]] if "entity" in scope else scope.get("entities", [])
    return tuple(entity["id"] for entity in entities)


def parse_policy(policy_id: str, text: str) -> PolicyMeta:
    """The policy ready for the engine; PolicyError when `validate` finds anything."""
    if not _POLICY_ID.fullmatch(policy_id):
        raise PolicyError(policy_id, ["a policy id is 1-200 printable characters"])
    policy, errors = _check(text)
    if policy is None or errors:
        raise PolicyError(policy_id, errors)
    annotations = policy.get("annotations", {})
    match = _CONDITION.search(text)
    return PolicyMeta(
        text=text,
        tagged=f"@id({json.dumps(policy_id)})\n{text}",
        effect=policy["effect"],
        ask=policy["effect"] == "permit" and annotations.get("decision") == "ask",
        reason=annotations.get("reason", ""),
        principal=policy["principal"],
        actions=_actions(policy["action"]),
        resource=policy["resource"],
        condition=" ".join(text[match.start() :].split())[:200] if match else "",
    )
