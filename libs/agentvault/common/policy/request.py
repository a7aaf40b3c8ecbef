"""The one mapping from a mesh caller (Principal + trust) and a target to Cedar entities and a request."""

from __future__ import annotations

import enum
import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agentvault.common.policy.schema import ACTIONS, COUNTERS
from agentvault.common.principal import Kind, Principal


def uid(type_: str, id_: str) -> str:
    """An entity's uid in Cedar's syntax, e.g. Caller::Agent::"a1": the key the engine indexes policies by."""
    return f"{type_}::{json.dumps(id_, ensure_ascii=False)}"


# An entity uid as `uid` writes it: a known type, then the id as one JSON string (quotes inside escaped), nothing
# after. What comes from outside and ends up in a grant's Cedar text must match this whole, so it cannot add text.
_UID = re.compile(
    r"(?P<type>(?:Caller::(?:Person|Agent|Service|Peer|Client))|(?:Target::(?:Agent|Tool|Capability)))"
    r'::(?P<id>"(?:[^"\\\x00-\x1f]|\\.)*")'
)


def parse_uid(text: str) -> tuple[str, str] | None:
    """(type, id) of a uid written by `uid`; None for anything else."""
    match = _UID.fullmatch(text)
    if match is None:
        return None
    try:
        return match["type"], json.loads(match["id"])
    except ValueError:
        return None


class Trust(enum.StrEnum):
    """A connection's trust level, lowest first; policies compare `principal.trust_rank` to order them."""

    BLOCKED = "blocked"
    UNTRUSTED = "untrusted"
    BASIC = "basic"
    TRUSTED = "trusted"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {trust: rank for rank, trust in enumerate(Trust)}

_CALLER_TYPE = {
    Kind.PERSON: "Caller::Person",
    Kind.AGENT: "Caller::Agent",
    Kind.SERVICE: "Caller::Service",
    Kind.PEER: "Caller::Peer",
}
CLIENT_TYPE = "Caller::Client"


@dataclass(frozen=True)
class Caller:
    """Who asks, as the policy sees it: a Cedar entity type and id plus the attributes policies may test."""

    type: str
    id: str
    trust: Trust = Trust.UNTRUSTED
    scopes: frozenset[str] = frozenset()
    mesh: str = ""
    owner: str = ""

    @functools.cached_property
    def uid(self) -> str:
        return uid(self.type, self.id)

    def entity(self) -> dict[str, Any]:
        trust = Trust(self.trust)
        attrs = {"trust": trust.value, "trust_rank": trust.rank, "scopes": sorted(self.scopes)}
        return {
            "uid": {"type": self.type, "id": self.id},
            "attrs": {**attrs, "mesh": self.mesh, "owner": self.owner},
            "parents": [],
        }


def caller(principal: Principal, trust: Trust, mesh: str) -> Caller:
    """A mesh principal with the trust of its connection; `mesh` is the mesh it belongs to (a peer: its own).

    An agent is named by its registered agent id when its credential carries one, the id it has as a target too,
    so `principal == Caller::Agent::"x"` and `resource == Target::Agent::"x"` mean the same agent.
    """
    kind = _CALLER_TYPE[principal.kind]
    name = principal.agent_id or principal.id if principal.kind is Kind.AGENT else principal.id
    return Caller(kind, name, Trust(trust), principal.scopes, mesh, principal.owner)


def external_client(client_id: str, mesh: str = "", trust: Trust = Trust.UNTRUSTED) -> Caller:
    """A caller from outside any mesh (an external agent or client): untrusted unless its connection says more."""
    return Caller(CLIENT_TYPE, client_id, Trust(trust), frozenset(), mesh, "")


@dataclass(frozen=True)
class Target:
    """What the action is done to: an agent, or a tool or capability of one (Target::Tool / Target::Capability)."""

    type: str
    id: str
    owner: str = ""
    mesh: str = ""
    tags: frozenset[str] = field(default_factory=frozenset)
    name: str = ""
    kind: str = ""
    version: str = ""
    agent: str = ""

    @functools.cached_property
    def uid(self) -> str:
        return uid(self.type, self.id)

    def entity(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"owner": self.owner, "tags": sorted(self.tags)}
        if self.type == "Target::Agent":
            attrs["mesh"] = self.mesh
        else:
            # mesh: the peer mesh of a tool invoked there ("" for this mesh's own), as for an agent.
            attrs.update(name=self.name, kind=self.kind, version=self.version, agent=self.agent, mesh=self.mesh)
        return {"uid": {"type": self.type, "id": self.id}, "attrs": attrs, "parents": []}


def agent_target(agent_id: str, owner: str = "", tags: Iterable[str] = (), mesh: str = "") -> Target:
    return Target("Target::Agent", agent_id, owner=owner, mesh=mesh, tags=frozenset(tags))


def tool_target(
    agent_id: str, name: str, version: str = "", owner: str = "", tags: Iterable[str] = (), mesh: str = ""
) -> Target:
    """A tool of an agent (or MCP server); its id is `agent_id/name` so a policy can name one tool exactly (with
    `mesh` set, a tool of that peer mesh)."""
    return Target("Target::Tool", f"{agent_id}/{name}", owner, mesh, frozenset(tags), name, "tool", version, agent_id)


def capability_target(
    agent_id: str, name: str, kind: str = "skill", version: str = "", owner: str = "", tags: Iterable[str] = ()
) -> Target:
    return Target("Target::Capability", f"{agent_id}/{name}", owner, "", frozenset(tags), name, kind, version, agent_id)


def check(action: str, target: Target) -> None:
    """ValueError when the action is unknown or does not apply to this kind of target."""
    expected = ACTIONS.get(action)
    if expected is None:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
    if target.type != expected:
        raise ValueError(f"action {action!r} applies to {expected}, not {target.type}")


def counters(context: Mapping[str, int] | None) -> dict[str, int]:
    """The measured counters, 0 when not given; ValueError on an unknown name or a value that is not an int."""
    values = dict.fromkeys(COUNTERS, 0)
    for name, value in (context or {}).items():
        if name not in values:
            raise ValueError(f"unknown context field {name!r}; known: {', '.join(COUNTERS)}")
        if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
            raise ValueError(f"context field {name!r} must be a 64-bit integer")
        values[name] = value
    return values
