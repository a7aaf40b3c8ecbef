"""PolicyClient: a typed asyncio client for agentvault.policy.v1.PolicyService (policies, access and approvals)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import field_mask_pb2

from agentvault.client.base import GrpcClient, pages
from agentvault.client.errors import from_rpc_error
from agentvault.common.interceptors import REQUEST_ID_KEY
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc

log = logging.getLogger(__name__)

SERVICE = ppb.DESCRIPTOR.services_by_name["PolicyService"].full_name
# Safe to repeat: reading twice has the same effect as reading once (Explain decides nothing).
IDEMPOTENT_METHODS = (
    "ListPolicies",
    "GetPolicy",
    "Explain",
    "ListConnections",
    "GetConnection",
    "ListTrustChanges",
    "ListApprovals",
    "GetApproval",
    "ListGrants",
    "ListDecisions",
)


@dataclass
class Explanation:
    """The hypothetical action of `PolicyClient.explain`: who (caller_*), what (action) and to what (agent_id...)."""

    caller_id: str
    action: str
    agent_id: str
    caller_kind: str = ""
    trust_level: str = ""
    scopes: Sequence[str] = field(default_factory=tuple)
    name: str = ""
    version: str = ""
    capability_kind: str = ""
    payload_size: int = 0
    time: int = 0

    def request(self) -> ppb.ExplainRequest:
        return ppb.ExplainRequest(
            caller=ppb.ExplainCaller(
                kind=self.caller_kind, id=self.caller_id, trust_level=self.trust_level, scopes=list(self.scopes)
            ),
            action=self.action,
            target=ppb.ExplainTarget(
                agent_id=self.agent_id, name=self.name, version=self.version, capability_kind=self.capability_kind
            ),
            context=ppb.ExplainContext(payload_size=self.payload_size, time=self.time),
        )


class PolicyClient(GrpcClient):
    """Manages the mesh's Cedar policies, connections and trust, approvals, grants and permission requests.

    The registry serves this API: address default $REGISTRY_ADDR, else 127.0.0.1:$REGISTRY_PORT; the other
    options are GrpcClient's (token, timeout, root_certificates, tls, retry, options)."""

    SERVICE_LABEL = "registry"
    ADDRESS_ENV, PORT_ENV = "REGISTRY_ADDR", "REGISTRY_PORT"
    IDEMPOTENT = tuple((SERVICE, m) for m in IDEMPOTENT_METHODS)

    @property
    def _stub(self) -> ppb_grpc.PolicyServiceAsyncStub:
        return self._stub_of(ppb_grpc.PolicyServiceStub)

    # ----------------------------------------------------------------------------------------- policies

    async def create_policy(self, policy: ppb.Policy, *, timeout: float | None = None) -> ppb.Policy:
        """Stores `policy` (name, text, and enabled to put it in force); never retried."""
        return await self._call(self._stub.CreatePolicy, ppb.CreatePolicyRequest(policy=policy), timeout)

    async def list_policies(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> ppb.ListPoliciesResponse:
        request = ppb.ListPoliciesRequest(page_size=page_size, page_token=page_token)
        return await self._call(self._stub.ListPolicies, request, timeout)

    async def iter_policies(self, *, page_size: int = 0, timeout: float | None = None) -> AsyncIterator[ppb.Policy]:
        async for page in pages(lambda t: self.list_policies(page_size=page_size, page_token=t, timeout=timeout)):
            for policy in page.policies:
                yield policy

    async def get_policy(self, id: str, *, timeout: float | None = None) -> ppb.Policy:
        return await self._call(self._stub.GetPolicy, ppb.GetPolicyRequest(id=id), timeout)

    async def update_policy(
        self, policy: ppb.Policy, update_mask: Sequence[str] | None = None, *, timeout: float | None = None
    ) -> ppb.Policy:
        """Changes the fields of `policy` (its id set) named in `update_mask`; None or [] replaces every writable
        field, so pass a mask unless `policy` is complete."""
        mask = field_mask_pb2.FieldMask(paths=list(update_mask or ()))
        request = ppb.UpdatePolicyRequest(policy=policy, update_mask=mask)
        return await self._call(self._stub.UpdatePolicy, request, timeout)

    async def delete_policy(self, id: str, *, timeout: float | None = None) -> None:
        await self._call(self._stub.DeletePolicy, ppb.DeletePolicyRequest(id=id), timeout)

    async def explain(self, what: Explanation, *, timeout: float | None = None) -> ppb.ExplainResponse:
        """What the enabled policies would decide for `what`, without doing it."""
        return await self._call(self._stub.Explain, what.request(), timeout)

    # -------------------------------------------------------------------------------------- connections

    async def list_connections(
        self,
        *,
        trust_level: str = "",
        agent_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> ppb.ListConnectionsResponse:
        request = ppb.ListConnectionsRequest(
            page_size=page_size, page_token=page_token, trust_level=trust_level, agent_id=agent_id
        )
        return await self._call(self._stub.ListConnections, request, timeout)

    async def iter_connections(
        self, *, trust_level: str = "", agent_id: str = "", page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[ppb.Connection]:
        async for page in pages(
            lambda t: self.list_connections(
                trust_level=trust_level, agent_id=agent_id, page_size=page_size, page_token=t, timeout=timeout
            )
        ):
            for connection in page.connections:
                yield connection

    async def get_connection(self, id: str, *, timeout: float | None = None) -> ppb.Connection:
        return await self._call(self._stub.GetConnection, ppb.GetConnectionRequest(id=id), timeout)

    async def set_trust_level(
        self, id: str, trust_level: str, reason: str, *, timeout: float | None = None
    ) -> ppb.Connection:
        request = ppb.SetTrustLevelRequest(id=id, trust_level=trust_level, reason=reason)
        return await self._call(self._stub.SetTrustLevel, request, timeout)

    async def list_trust_changes(
        self, connection_id: str, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> ppb.ListTrustChangesResponse:
        request = ppb.ListTrustChangesRequest(connection_id=connection_id, page_size=page_size, page_token=page_token)
        return await self._call(self._stub.ListTrustChanges, request, timeout)

    async def iter_trust_changes(
        self, connection_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[ppb.TrustChange]:
        async for page in pages(
            lambda t: self.list_trust_changes(connection_id, page_size=page_size, page_token=t, timeout=timeout)
        ):
            for change in page.changes:
                yield change

    # ----------------------------------------------------------------------- permission requests, approvals

    async def request_capability(
        self,
        agent_id: str,
        capability: str,
        *,
        kind: str = "",
        version_constraint: str = "",
        purpose: str = "",
        max_calls: int = 0,
        duration_seconds: int = 0,
        wait_seconds: int = 0,
        timeout: float | None = None,
    ) -> ppb.CapabilityDecision:
        """Asks for a capability: allow (a grant), deny, or ask (a pending approval, waited for up to
        `wait_seconds`). Never retried: a repeated ask would make a second approval. The call's deadline is
        lengthened to cover the wait."""
        request = ppb.RequestCapabilityRequest(
            agent_id=agent_id,
            capability=capability,
            kind=kind,
            version_constraint=version_constraint,
            purpose=purpose,
            max_calls=max_calls,
            duration_seconds=duration_seconds,
            wait_seconds=wait_seconds,
        )
        deadline = (self.timeout if timeout is None else timeout) + max(wait_seconds, 0)
        return await self._call(self._stub.RequestCapability, request, deadline)

    async def list_approvals(
        self, *, status: str = "", page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> ppb.ListApprovalsResponse:
        request = ppb.ListApprovalsRequest(page_size=page_size, page_token=page_token, status=status)
        return await self._call(self._stub.ListApprovals, request, timeout)

    async def iter_approvals(
        self, *, status: str = "", page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[ppb.Approval]:
        async for page in pages(
            lambda t: self.list_approvals(status=status, page_size=page_size, page_token=t, timeout=timeout)
        ):
            for approval in page.approvals:
                yield approval

    async def get_approval(self, id: str, *, timeout: float | None = None) -> ppb.Approval:
        return await self._call(self._stub.GetApproval, ppb.GetApprovalRequest(id=id), timeout)

    async def approve(
        self, id: str, *, duration_seconds: int = 0, uses: int = 0, note: str = "", timeout: float | None = None
    ) -> ppb.Approval:
        """Answers yes; the approval then names the grant it made. 0 keeps the requested duration or uses."""
        request = ppb.ApproveApprovalRequest(id=id, duration_seconds=duration_seconds, uses=uses, note=note)
        return await self._call(self._stub.ApproveApproval, request, timeout)

    async def deny(self, id: str, *, note: str = "", timeout: float | None = None) -> ppb.Approval:
        return await self._call(self._stub.DenyApproval, ppb.DenyApprovalRequest(id=id, note=note), timeout)

    async def watch_approvals(self, *, include_answered: bool = False) -> AsyncIterator[ppb.ApprovalEvent]:
        """The approvals the caller may see: those pending at once, then every change. No deadline: a watch lasts
        as long as its reader wants.

        It ends when the server ends it, also by shutting down (a restart or deploy cuts every watch; the reader
        starts a new one, which sends the pending approvals again). A watch that could not start, or that the
        server refused (denied, fallen behind), raises ClientError."""
        md = self._metadata()
        call = self._stub.WatchApprovals(
            ppb.WatchApprovalsRequest(include_answered=include_answered), timeout=None, metadata=md
        )
        connected = False
        try:
            await call.wait_for_connection()  # the request reached the server
            connected = True
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc, dict(md)[REQUEST_ID_KEY])
            # A status without an ErrorInfo domain is gRPC's own, not the service's: after the request got
            # through, that is the server going away (its shutdown cancels the calls still open).
            if connected and not err.domain and err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                log.info("the %s ended the watch: %s", self.SERVICE_LABEL, err)
                return
            raise self._explain(err) from None
        finally:
            call.cancel()

    # ---------------------------------------------------------------------------------- grants, decisions

    async def list_grants(
        self, *, include_ended: bool = False, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> ppb.ListGrantsResponse:
        request = ppb.ListGrantsRequest(page_size=page_size, page_token=page_token, include_ended=include_ended)
        return await self._call(self._stub.ListGrants, request, timeout)

    async def iter_grants(
        self, *, include_ended: bool = False, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[ppb.Grant]:
        async for page in pages(
            lambda t: self.list_grants(include_ended=include_ended, page_size=page_size, page_token=t, timeout=timeout)
        ):
            for grant in page.grants:
                yield grant

    async def revoke_grant(self, id: str, *, timeout: float | None = None) -> ppb.Grant:
        return await self._call(self._stub.RevokeGrant, ppb.RevokeGrantRequest(id=id), timeout)

    async def list_decisions(
        self, *, outcome: str = "", page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> ppb.ListDecisionsResponse:
        request = ppb.ListDecisionsRequest(page_size=page_size, page_token=page_token, outcome=outcome)
        return await self._call(self._stub.ListDecisions, request, timeout)

    async def iter_decisions(
        self, *, outcome: str = "", page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[ppb.Decision]:
        async for page in pages(
            lambda t: self.list_decisions(outcome=outcome, page_size=page_size, page_token=t, timeout=timeout)
        ):
            for decision in page.decisions:
                yield decision
