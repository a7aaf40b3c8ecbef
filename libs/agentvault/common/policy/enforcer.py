"""The one decision path of every enforcing service: trust of the connection, measured usage, the engine, audit."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Histogram

from agentvault.common.policy.engine import GRANT_PREFIX, Decision, Outcome, PolicyEngine
from agentvault.common.policy.request import Caller, Target, Trust

log = logging.getLogger(__name__)

DECISIONS = Counter(
    "policy_decisions_total",
    "Policy decisions made by enforcing services, by action and outcome.",
    ["action", "outcome"],
)
DECISION_SECONDS = Histogram(
    "policy_decision_seconds",
    "Time to decide one action: trust lookup, usage counters, the engine and the grant's use.",
    ["action"],
    buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)

# The Caller entity types that have connections (a mesh's own services do not: they are trusted by identity).
CONNECTION_KINDS = {
    "Caller::Person": "person",
    "Caller::Agent": "agent",
    "Caller::Peer": "peer",
    "Caller::Client": "client",
}
SERVICE_TYPE = "Caller::Service"


def default_trust(caller_type: str) -> Trust:
    """Where a new connection starts: a person of this mesh at basic, a service trusted, anything else (agents,
    peer meshes, external clients) untrusted."""
    if caller_type == SERVICE_TYPE:
        return Trust.TRUSTED
    return Trust.BASIC if caller_type == "Caller::Person" else Trust.UNTRUSTED


@dataclass(frozen=True)
class AuditEntry:
    """One decision for the audit log (policy_decisions)."""

    caller: str
    action: str
    target: str
    outcome: str
    policy_ids: tuple[str, ...]
    reason: str


class ControlPlane(Protocol):
    """What an enforcer needs of the control plane (the registry): its database in the registry itself, its
    PolicyService RPCs in any other service."""

    async def trust(self, caller: Caller, agent_id: str) -> Trust:
        """The trust of this caller's connection as seen by `agent_id` ("" for the mesh), created on first contact."""

    async def record(self, caller: Caller, agent_id: str, violation: str | None) -> None:
        """One interaction; `violation` says why it counts against the connection (None when it does not)."""

    async def consume(self, grant_id: str) -> bool:
        """One use of a limited grant; false when it was already spent, revoked or expired."""

    async def audit(self, entries: Sequence[AuditEntry]) -> None:
        """Appends to the decision log."""


class UsageTicket(Protocol):
    """A call counted by a usage meter (agentvault.common.policy.meter.Ticket)."""

    def counters(self, payload_size: int) -> dict[str, int]: ...

    async def refuse(self) -> None: ...

    async def done(self) -> None: ...


class UsageMeter(Protocol):
    async def take(self, caller: str, action: str, target: str) -> UsageTicket: ...


@dataclass(frozen=True)
class Verdict:
    """A decision with the trust it was made at and, on allow, the ticket to close (`done`) when the call ends."""

    decision: Decision
    caller: Caller
    ticket: UsageTicket | None = None
    # Denied because something the decision needs could not be read (the usage counters): fail closed, but a
    # service that can say "try again" (UNAVAILABLE) should, rather than answer a refusal the caller would believe.
    transient: bool = False

    @property
    def outcome(self) -> Outcome:
        return self.decision.outcome

    async def done(self) -> None:
        if self.ticket is not None:
            await self.ticket.done()


class Enforcer:
    """Decides one action for an enforcing service and leaves its traces.

    The steps: the connection's trust (created on first contact, at its kind's default), usage so far (calls in the
    rate window, in progress, today) from the meter when there is one, the engine's decision on the synced policy
    set, one use of the limited grant that allowed it (spent in the control plane, so two replicas cannot both
    spend the last use), then the decision log (every deny and ask; allows when `log_allows`), the connection's
    interaction (a deny counts as a violation, which may drop its trust) and the metrics.

    When the usage counters cannot be read the action is denied (fail closed): a limit that cannot be checked is
    not a limit.
    """

    def __init__(
        self,
        engine: PolicyEngine,
        control: ControlPlane,
        *,
        meter: UsageMeter | None = None,
        log_allows: bool = False,
        mesh: str = "",
    ) -> None:
        self.engine = engine
        self.control = control
        self.meter = meter
        self.log_allows = log_allows
        self.mesh = mesh

    async def decide(
        self, caller: Caller, action: str, target: Target, *, agent_id: str = "", payload_size: int = 0
    ) -> Verdict:
        """The decision for `caller` doing `action` to `target`, seen by `agent_id` (the target's agent)."""
        started = time.perf_counter()
        trust = await self.control.trust(caller, agent_id) if caller.type != SERVICE_TYPE else Trust.TRUSTED
        caller = dataclasses.replace(caller, trust=trust)
        ticket: UsageTicket | None = None
        decision: Decision
        # Counted only when a policy for this action reads a counter: one Redis round trip (two with `done`) less
        # per call otherwise. A policy that starts reading one sees the calls from then on.
        if self.meter is not None and self.engine.measures(action):
            try:
                ticket = await self.meter.take(caller.uid, action, target.uid)
            except Exception as exc:
                log.warning("usage counters unavailable; denying %s: %s", action, exc)
                decision = Decision(Outcome.DENY, (), ("usage counters are unavailable; try again later",))
                return await self._finish(caller, action, target, agent_id, decision, None, started, transient=True)
        counters = ticket.counters(payload_size) if ticket is not None else {"payload_size": payload_size}
        decision = self.engine.decide(caller, action, target, counters)
        if decision.outcome is Outcome.ALLOW:
            decision = await self._spend(caller, action, target, counters, decision)
        return await self._finish(caller, action, target, agent_id, decision, ticket, started)

    def preview(self, caller: Caller, action: str, target: Target) -> Decision:
        """What `decide` would answer for `caller` at the trust it carries (a Verdict's caller carries its
        connection's), leaving no trace: no grant use spent (here or in the control plane), no usage counted, no
        decision logged, no interaction recorded, no metrics; the control plane is not asked anything. For
        listing what a caller could do (tools/list): each actual call is decided again with `decide`. Policies
        reading usage counters see them at zero."""
        trust = Trust.TRUSTED if caller.type == SERVICE_TYPE else caller.trust
        return self.engine.preview(dataclasses.replace(caller, trust=trust), action, target)

    async def _spend(
        self, caller: Caller, action: str, target: Target, counters: dict[str, int], decision: Decision
    ) -> Decision:
        """Spends one use of the limited grant that alone allowed this, in the control plane; if another replica
        spent the last use first, decides again without it (a retry or two at most: each one drops a grant)."""
        for _ in range(3):
            limited = self._limited_grant(decision)
            if limited is None or await self.control.consume(limited):
                return decision
            self.engine.revoke(limited)  # spent elsewhere: gone here too until the next set arrives
            decision = self.engine.decide(caller, action, target, counters)
            if decision.outcome is not Outcome.ALLOW:
                return decision
        return decision

    def _limited_grant(self, decision: Decision) -> str | None:
        """The grant a decision spends: only when grants alone allowed it and none of them is unlimited. The engine
        has already spent one use of its own copy, and a copy whose last use that was is gone from it: so a grant
        that allowed this and is no longer held was limited, and is the one to spend."""
        if not decision.policies or not all(p.startswith(GRANT_PREFIX) for p in decision.policies):
            return None
        held = {g.id: g for g in self.engine.grants()}
        ids = [p[len(GRANT_PREFIX) :] for p in decision.policies]
        if any(i in held and held[i].uses is None for i in ids):
            return None
        return min(ids, key=lambda i: held[i].expires_at if i in held else float("-inf"))

    async def _finish(
        self,
        caller: Caller,
        action: str,
        target: Target,
        agent_id: str,
        decision: Decision,
        ticket: UsageTicket | None,
        started: float,
        *,
        transient: bool = False,
    ) -> Verdict:
        outcome = decision.outcome
        if ticket is not None and outcome is not Outcome.ALLOW:
            await ticket.refuse()  # not made: it does not count against the caller's limits
            ticket = None
        DECISIONS.labels(action, outcome.value).inc()
        DECISION_SECONDS.labels(action).observe(time.perf_counter() - started)
        if outcome is not Outcome.ALLOW or self.log_allows:
            entry = AuditEntry(
                caller.uid, action, target.uid, outcome.value, decision.policies, "; ".join(decision.reasons)
            )
            try:
                await self.control.audit([entry])
            except Exception as exc:  # the decision stands; losing its log line is logged instead
                log.error("cannot write the decision log: %s", exc, extra={"action": action, "outcome": outcome.value})
        if caller.type in CONNECTION_KINDS:
            # An outage of ours is not the caller's violation.
            violation = f"refused {action} on {target.uid}" if outcome is Outcome.DENY and not transient else None
            try:
                await self.control.record(caller, agent_id, violation)
            except Exception as exc:
                log.warning("cannot record the interaction: %s", exc)
        return Verdict(decision, caller, ticket, transient)
