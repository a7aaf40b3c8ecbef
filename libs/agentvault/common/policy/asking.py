"""What an enforcing service does with a verdict that is not a plain allow: refuse, ask once, read the answer."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from typing import Protocol

from agentvault.common.errors import PermissionDenied, Unavailable
from agentvault.common.policy.api import DEFAULT_DURATION
from agentvault.common.policy.enforcer import Verdict
from agentvault.common.policy.engine import Outcome
from agentvault.policy.v1 import policy_service_pb2 as ppb


class Spender(Protocol):
    """The part of a control plane that spends a grant's use."""

    async def consume(self, grant_id: str) -> bool: ...


class Asker(Spender, Protocol):
    """The part of a control plane (agentvault.common.policy.remote) that asking needs."""

    async def create_approval(
        self,
        *,
        caller: str,
        requested_by: str,
        action: str,
        target: str,
        target_agent_id: str,
        purpose: str,
        reasons: Sequence[str],
        policy_ids: Sequence[str],
        grant_action: str,
        grant_target: str,
        grant_duration_seconds: int,
        grant_uses: int | None,
    ) -> ppb.Approval: ...


def refuse_unless_decided(verdict: Verdict, what: str, reason: str) -> None:
    """Raises for a verdict the caller must not act on: UNAVAILABLE POLICY_UNAVAILABLE when it could not be made
    (the caller may try again; a refusal would be believed), PERMISSION_DENIED `reason` with the policies' reasons
    when it is a deny. `what` names the refused thing ("this message")."""
    if verdict.transient:
        raise Unavailable(
            "the policy engine cannot decide now (" + "; ".join(verdict.decision.reasons) + ")", "POLICY_UNAVAILABLE"
        )
    if verdict.outcome is Outcome.DENY:
        raise PermissionDenied(
            f"the policy engine refused {what}: " + "; ".join(verdict.decision.reasons),
            reason,
            policies=",".join(verdict.decision.policies)[:500],
        )


async def ask_once(
    control: Asker,
    verdict: Verdict,
    *,
    requested_by: str,
    action: str,
    target: str,
    agent_id: str,
    purpose: str,
    duration_seconds: int = DEFAULT_DURATION,
) -> ppb.Approval:
    """The approval an "ask" verdict calls for, for the owner of `agent_id` to answer. Approving it grants one use
    of `action` on `target`: the held action itself spends it (see `answer_of`)."""
    return await control.create_approval(
        caller=verdict.caller.uid,
        requested_by=requested_by,
        action=action,
        target=target,
        target_agent_id=agent_id,
        purpose=purpose[:200],
        reasons=verdict.decision.reasons,
        policy_ids=verdict.decision.policies,
        grant_action=action,
        grant_target=target,
        grant_duration_seconds=duration_seconds,
        grant_uses=1,
    )


def held_for(approval: ppb.Approval) -> tuple[str, uuid.UUID, str]:
    """How an action held for `approval` is stored: its status, the approval's id and the status reason."""
    return "held", uuid.UUID(approval.id), "waiting for approval " + approval.id


async def answer_of(control: Spender, approval: ppb.Approval) -> tuple[bool, str]:
    """Whether an answered approval lets its held action go, and why, said for the action's status. An approval
    spends its one-use grant here: the released action is that use."""
    approved = approval.status == "approved"
    if approved:
        reason = f"approved by {approval.decided_by}"
        if approval.grant_id:
            # Spent or revoked meanwhile changes nothing: the person's answer stands for this one action.
            with contextlib.suppress(Exception):
                await control.consume(approval.grant_id)
    else:
        reason = f"denied by {approval.decided_by}" if approval.status == "denied" else "the approval expired"
    if approval.note:
        reason += f": {approval.note}"
    return approved, reason
