"""The enforcer's control plane in a service other than the registry: PolicyService's internal RPCs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from agentvault.common.policy.api import MAX_NOTE
from agentvault.common.policy.enforcer import CONNECTION_KINDS, SERVICE_TYPE, AuditEntry
from agentvault.common.policy.request import Caller, Trust
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc

log = logging.getLogger(__name__)

# The bounds of the internal RPCs, for the registry that checks them and the client that batches (and trims the
# decision log's free text to fit). Sizes follow the columns (migrations 0007 and 0008).
MAX_BATCH = 500  # interactions or decisions per call
MAX_CALLER_ID = 500  # connections.caller_id
MAX_AGENT_ID = 64  # connections.agent_id, approvals.target_agent_id
MAX_ACTION = 64  # the action columns
MAX_LOG_UID = 500  # policy_decisions.caller and .target
MAX_APPROVAL_UID = 600  # approvals.caller, .target and .grant_target
MAX_REQUESTED_BY = 128  # approvals.requested_by
MAX_LOG_REASON = 4000  # one decision's reasons, joined
MAX_REASONS = 64  # an approval's reasons (each at most MAX_PURPOSE)
MAX_POLICY_IDS = 256  # the deciding policies of one decision or approval
MAX_POLICY_ID = 500
CALLER_TYPES = (*CONNECTION_KINDS, SERVICE_TYPE)
TIMEOUT_SECONDS = 5.0

T = TypeVar("T")


class RemoteControlPlane:
    """agentvault.common.policy.enforcer.ControlPlane over the registry's PolicyService.

    `channel` is the service's channel to the registry with its BearerInterceptor (token_source), which adds the
    service's own token (scope policies:enforce) and, after UNAUTHENTICATED (a token expired or revoked), retries
    once with a fresh one: nothing was done by the refused call, so even ConsumeGrant is safe to repeat. Any other
    error reaches the Enforcer, which fails closed on trust and consume and logs a lost audit or interaction.
    """

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = TIMEOUT_SECONDS) -> None:
        self.timeout = timeout
        self._stub = ppb_grpc.PolicyServiceStub(channel)

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        return await method(request, timeout=self.timeout)

    async def trust(self, caller: Caller, agent_id: str) -> Trust:
        if caller.type == SERVICE_TYPE:
            return Trust.TRUSTED  # a mesh service is trusted by identity: it has no connection
        request = ppb.ResolveTrustRequest(caller_type=caller.type, caller_id=caller.id, agent_id=agent_id)
        answer: ppb.ResolveTrustResponse = await self._call(self._stub.ResolveTrust, request)
        return Trust(answer.trust_level)

    async def record(self, caller: Caller, agent_id: str, violation: str | None) -> None:
        await self.record_many([(caller, agent_id, violation)])

    async def record_many(self, items: Sequence[tuple[Caller, str, str | None]]) -> None:
        """Several interactions, in calls of at most MAX_BATCH (a buffered control plane's batches)."""
        interactions = [
            ppb.Interaction(
                caller_type=caller.type, caller_id=caller.id, agent_id=agent_id, violation=(violation or "")[:MAX_NOTE]
            )
            for caller, agent_id, violation in items
            if caller.type in CONNECTION_KINDS
        ]
        for start in range(0, len(interactions), MAX_BATCH):
            request = ppb.RecordInteractionsRequest(interactions=interactions[start : start + MAX_BATCH])
            await self._call(self._stub.RecordInteractions, request)

    async def consume(self, grant_id: str) -> bool:
        answer: ppb.ConsumeGrantResponse = await self._call(
            self._stub.ConsumeGrant, ppb.ConsumeGrantRequest(grant_id=grant_id)
        )
        return answer.consumed

    async def audit(self, entries: Sequence[AuditEntry]) -> None:
        decisions = [
            ppb.Decision(
                caller=e.caller,
                action=e.action,
                target=e.target,
                outcome=e.outcome,
                policy_ids=list(e.policy_ids[:MAX_POLICY_IDS]),
                reason=e.reason[:MAX_LOG_REASON],  # the log line's bound; the decision itself stands whole
            )
            for e in entries
        ]
        for start in range(0, len(decisions), MAX_BATCH):
            chunk = decisions[start : start + MAX_BATCH]
            await self._call(self._stub.LogDecisions, ppb.LogDecisionsRequest(decisions=chunk))

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
    ) -> ppb.Approval:
        """A pending approval of an "ask" decision, for the owner of `target_agent_id` (looked up by the registry)
        to answer; it expires after the registry's approval time."""
        request = ppb.CreateApprovalRequest(
            caller=caller,
            requested_by=requested_by,
            action=action,
            target=target,
            target_agent_id=target_agent_id,
            purpose=purpose,
            reasons=list(reasons),
            policy_ids=list(policy_ids),
            grant_action=grant_action,
            grant_target=grant_target,
            grant_duration_seconds=grant_duration_seconds,
            grant_uses=grant_uses or 0,
        )
        approval: ppb.Approval = await self._call(self._stub.CreateApproval, request)
        return approval


__all__ = ["MAX_BATCH", "RemoteControlPlane"]
