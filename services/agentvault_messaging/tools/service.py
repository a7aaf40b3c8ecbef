"""ToolService: the tools a caller may use, and invoking one on its MCP server under the policy engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from mcp.shared.exceptions import MCPError

from agentvault.common import capability_schemas
from agentvault.common.errors import (
    AgentVaultError,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    invalid,
)
from agentvault.common.interceptors import caller_metadata
from agentvault.common.policy.asking import ask_once, refuse_unless_decided
from agentvault.common.policy.enforcer import AuditEntry, Enforcer
from agentvault.common.policy.engine import Outcome
from agentvault.common.policy.request import Caller, Target, Trust, agent_target, caller, tool_target
from agentvault.common.principal import TOOLS_INVOKE
from agentvault.messaging.v1 import tool_service_pb2 as tpb
from agentvault.messaging.v1 import tool_service_pb2_grpc as tpb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault_messaging import metrics
from agentvault_messaging.tools.peer_listing import peer_tools
from agentvault_messaging.tools.pool import SessionPool

log = logging.getLogger(__name__)

REGISTRY_SECONDS = 5.0
MCP_TAG = "mcp"
# ListTools reads at most this many agents with tools (pages of the registry's search).
MAX_LIST_AGENTS = 500
APPROVAL_POLL_SECONDS = 0.2
# Progress events buffered per call while the caller reads slowly: past it, the oldest are dropped (only the latest
# progress matters); the result is never dropped.
MAX_QUEUED_PROGRESS = 64


def mcp_url(agent: reg_pb.Agent) -> str:
    return next((e.url for e in agent.endpoints if e.protocol == reg_pb.PROTOCOL_MCP), "")


def mcp_tools(agent: reg_pb.Agent) -> list[reg_pb.Capability]:
    """The agent's tools that its MCP server serves (the catalog's), when it has an MCP endpoint."""
    if not mcp_url(agent):
        return []
    return [c for c in agent.capabilities if c.kind == reg_pb.CAPABILITY_KIND_TOOL and MCP_TAG in c.tags]


def integral(value: Any) -> Any:
    """A Struct's numbers are doubles: whole ones back to ints, so "integer" schemas (and the tool) accept them."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def check_arguments(tool: reg_pb.Capability, arguments: struct_pb2.Struct) -> dict[str, Any]:
    """The arguments as JSON, bounded and satisfying the tool's input schema; INVALID_ARGUMENT with a violation per
    problem (field `arguments` plus the JSON pointer) otherwise."""
    if arguments.ByteSize() > capability_schemas.MAX_INPUT_BYTES:
        raise invalid("arguments", f"must be at most {capability_schemas.MAX_INPUT_BYTES} bytes")
    value = integral(json_format.MessageToDict(arguments))
    if tool.input_schema:
        try:
            schema = capability_schemas.load_schema(tool.input_schema)
        except ValueError as exc:  # stored schemas passed this check; kept safe anyway
            raise Unavailable(f"the tool's input schema cannot be used: {exc}", "TOOL_SCHEMA_UNUSABLE") from None
        reasons = capability_schemas.input_reasons(schema, value)
        if reasons:
            raise InvalidArgument([FieldViolation("arguments" + r.pointer, r.message) for r in reasons])
    return value


def result_event(result: Any) -> tpb.InvokeToolEvent:
    content = []
    for block in result.content or []:
        s = struct_pb2.Struct()
        s.update(block.model_dump(mode="json", by_alias=True, exclude_none=True))
        content.append(s)
    out = tpb.ToolResult(is_error=bool(result.is_error), content=content)
    if isinstance(result.structured_content, dict):
        out.structured_content.update(result.structured_content)
    return tpb.InvokeToolEvent(result=out)


class ToolServicer(tpb_grpc.ToolServiceServicer):
    def __init__(
        self,
        callers: Any,  # CallerResolver
        registry: Any,  # RegistryService stub; calls carry the caller's own credential (caller_metadata)
        credentials: Any,  # AgentDirectory: the mesh's own credentials per agent
        enforcer: Enforcer,
        control: Any,  # RemoteControlPlane: approvals and the audit log
        policies: Any,  # PolicyService stub on the channel carrying the service's token (GetApproval)
        *,
        mesh: str,
        block_private: bool,
        max_seconds: float,
    ) -> None:
        self.callers = callers
        self.registry = registry
        self.credentials = credentials
        self.enforcer = enforcer
        self.control = control
        self.policies = policies
        self.mesh = mesh
        self.block_private = block_private
        self.max_seconds = max_seconds
        # Tools of peer meshes (federated.PeerTools; set by wiring when federation is configured).
        self.peers: Any = None
        # DiscoveryService stub, for ListTools' include_federated (peer_listing; set by wiring).
        self.discovery: Any = None
        # Open MCP sessions shared by the calls (an initialize handshake per call costs ~100 ms); closed at shutdown.
        self.sessions = SessionPool(block_private=block_private)

    async def _who(self, context: grpc.aio.ServicerContext, scope: str = "") -> tuple[Any, Caller]:
        metadata = context.invocation_metadata()
        found = await (self.callers.require_scope(metadata, scope) if scope else self.callers.require(metadata))
        principal = found.principal
        return principal, caller(principal, Trust.UNTRUSTED, self.mesh)

    async def _registry(self, method: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(request, metadata=tuple(caller_metadata(context)), timeout=REGISTRY_SECONDS)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            ):
                raise NotFound("agent not found", "AGENT_NOT_FOUND") from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise invalid("agent_id", "is not a valid agent id") from None
            raise Unavailable("the registry cannot be asked now", "REGISTRY_UNAVAILABLE") from None

    # ListTools ---------------------------------------------------------------------------------------------

    async def ListTools(
        self, request: tpb.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> tpb.ListToolsResponse:
        _, who = await self._who(context)
        if request.agent_id:
            agents = [
                await self._registry(self.registry.GetAgent, reg_pb.GetAgentRequest(id=request.agent_id), context)
            ]
        else:
            agents, token = [], ""
            while len(agents) < MAX_LIST_AGENTS:
                page = await self._registry(
                    self.registry.ListAgents,
                    reg_pb.ListAgentsRequest(
                        capability_kind=reg_pb.CAPABILITY_KIND_TOOL, capability_name="", page_size=500, page_token=token
                    ),
                    context,
                )
                agents.extend(page.agents)
                token = page.next_page_token
                if not token:
                    break
        tools: list[tpb.Tool] = []
        for agent in agents:
            offered = mcp_tools(agent)
            if not offered:
                continue
            # tool.list on the agent: decided (and logged) like every enforced action.
            verdict = await self.enforcer.decide(
                who, "tool.list", agent_target(agent.id, agent.owner, agent.tags, self.mesh), agent_id=agent.id
            )
            await verdict.done()
            if verdict.outcome is Outcome.DENY:
                continue
            for cap in offered:
                # Only what the caller could invoke: allowed, or "ask" (the call waits for the approval). A preview:
                # listing spends no one-time grant and logs nothing per tool.
                target = tool_target(agent.id, cap.name, cap.version, agent.owner, cap.tags)
                decision = self.enforcer.preview(verdict.caller, "tool.invoke", target)
                if decision.outcome is Outcome.DENY:
                    continue
                tools.append(
                    tpb.Tool(
                        agent_id=agent.id,
                        name=cap.name,
                        title=cap.title,
                        description=cap.description,
                        input_schema=cap.input_schema,
                        output_schema=cap.output_schema,
                        agent_name=agent.name,
                    )
                )
        notes: list[str] = []
        if request.include_federated and not request.agent_id:
            found, notes = await peer_tools(self.discovery, self.enforcer, who, context)
            tools.extend(found)
        return tpb.ListToolsResponse(tools=tools, notes=notes)

    # InvokeTool --------------------------------------------------------------------------------------------

    async def InvokeTool(
        self, request: tpb.InvokeToolRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tpb.InvokeToolEvent]:
        principal, who = await self._who(context, TOOLS_INVOKE)
        if not request.agent_id:
            raise invalid("agent_id", "is required")
        if not request.tool:
            raise invalid("tool", "is required")
        remaining = context.time_remaining()
        seconds = min(self.max_seconds, remaining) if remaining is not None else self.max_seconds
        deadline = time.monotonic() + seconds
        if request.mesh:
            # A tool of a peer mesh: this mesh's policy, then the peer's, through the federation channel.
            if self.peers is None:
                raise Unavailable(
                    "tools of peer meshes need FEDERATION_ENCRYPTION_KEYS on the messaging service", "FEDERATION_OFF"
                )
            async for event in self.peers.invoke(self, who, request, deadline):
                yield event
            return
        try:
            agent = await self._registry(self.registry.GetAgent, reg_pb.GetAgentRequest(id=request.agent_id), context)
        except NotFound:
            # Deleted (or no longer visible to anyone we call for): its pooled sessions go too.
            await self.sessions.close_agent(request.agent_id)
            raise
        async for event in self.run(principal.id, who, agent, request.tool, request.arguments, deadline):
            yield event

    async def run(
        self,
        requested_by: str,
        who: Caller,
        agent: reg_pb.Agent,
        name: str,
        raw_arguments: struct_pb2.Struct,
        deadline: float,
        detail: str = "",
    ) -> AsyncIterator[tpb.InvokeToolEvent]:
        """One invocation of `agent`'s tool `name` for `who` (a caller of this mesh, or a peer: federated.py):
        the arguments checked, the policy engine, its approval if asked, the MCP call, the audit entry."""
        tool = next((c for c in mcp_tools(agent) if c.name == name), None)
        if tool is None:
            raise NotFound(f"the agent has no tool {name[:128]!r}", "TOOL_NOT_FOUND", tool=name[:128])
        arguments = check_arguments(tool, raw_arguments)
        target = tool_target(agent.id, tool.name, tool.version, agent.owner, tool.tags)
        verdict = await self.enforcer.decide(
            who, "tool.invoke", target, agent_id=agent.id, payload_size=raw_arguments.ByteSize()
        )
        if verdict.outcome is Outcome.ASK:
            approval = await ask_once(
                self.control,
                verdict,
                requested_by=requested_by,
                action="tool.invoke",
                target=target.uid,
                agent_id=agent.id,
                purpose=f"invoke tool {tool.name}",
            )
            yield tpb.InvokeToolEvent(
                approval_pending=tpb.ToolApprovalPending(approval_id=approval.id, reasons=verdict.decision.reasons)
            )
            verdict = await self._approved(who, target, agent.id, approval.id, deadline, raw_arguments.ByteSize())
        refuse_unless_decided(verdict, "this tool call", "TOOL_DENIED")
        outcome = "failed"
        try:
            async for event in self._call(agent, tool.name, arguments, deadline):
                if event.WhichOneof("event") == "result":
                    outcome = "tool error" if event.result.is_error else "completed"
                yield event
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except AgentVaultError as exc:
            outcome = f"failed: {exc.reason}"
            raise
        finally:
            metrics.TOOL_CALLS.labels(outcome.split(":")[0].replace(" ", "_")).inc()
            await verdict.done()
            with contextlib.suppress(Exception):
                await self.control.audit(
                    [
                        AuditEntry(
                            verdict.caller.uid,
                            "tool.invoke",
                            target.uid,
                            "allow",
                            verdict.decision.policies,
                            f"invocation {outcome}{detail}",
                        )
                    ]
                )

    async def _approved(
        self, who: Caller, target: Target, agent_id: str, approval_id: str, deadline: float, size: int
    ) -> Any:
        """Waits, within the call's deadline, for the approval's answer; on approval, for its grant to reach this
        replica's engine, then decides again (spending the grant's one use)."""
        while True:
            approval = await self.policies.GetApproval(ppb.GetApprovalRequest(id=approval_id), timeout=REGISTRY_SECONDS)
            if approval.status == "approved":
                break
            if approval.status == "denied":
                raise PermissionDenied("the approval was denied", "TOOL_APPROVAL_DENIED", approval_id=approval_id)
            if approval.status == "expired":
                raise PermissionDenied("the approval expired", "TOOL_APPROVAL_EXPIRED", approval_id=approval_id)
            await self._pause(deadline, approval_id)
        while True:
            verdict = await self.enforcer.decide(who, "tool.invoke", target, agent_id=agent_id, payload_size=size)
            if verdict.outcome is not Outcome.ASK:
                return verdict
            await self._pause(deadline, approval_id)

    @staticmethod
    async def _pause(deadline: float, approval_id: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(
                "no answer to the approval before the call's deadline; call again once it is approved (its grant "
                "then allows one call)",
                "TOOL_APPROVAL_PENDING",
                approval_id=approval_id,
            )
        await asyncio.sleep(min(APPROVAL_POLL_SECONDS, left))

    async def _call(
        self, agent: reg_pb.Agent, name: str, arguments: dict[str, Any], deadline: float
    ) -> AsyncIterator[tpb.InvokeToolEvent]:
        """The MCP tools/call: progress events as they come, then the result. Leaving early (the caller cancelled,
        the deadline passed) cancels the MCP request, which the SDK tells the server (notifications/cancelled)."""
        queue: asyncio.Queue[tpb.InvokeToolEvent | None] = asyncio.Queue()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            if queue.qsize() >= MAX_QUEUED_PROGRESS:
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(
                tpb.InvokeToolEvent(
                    progress=tpb.ToolProgress(progress=progress, total=total or 0.0, message=(message or "")[:1024])
                )
            )

        async def run() -> tpb.InvokeToolEvent:
            try:
                # The registration just read: credentials changed by it are used (and its old sessions closed) now.
                version = f"{agent.update_time.seconds}.{agent.update_time.nanos}"
                prepared = await self.credentials.auth(agent.id, version)

                async def call(session: Any) -> Any:
                    return await session.call_tool(name, arguments, progress_callback=on_progress)

                result = await self.sessions.call(agent.id, mcp_url(agent), prepared, call, deadline)
                return result_event(result)
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + (deadline - time.monotonic())):
                while (event := await queue.get()) is not None:
                    yield event
                yield task.result()
        except TimeoutError:
            raise DeadlineExceeded("the tool did not answer before the call's deadline", "TOOL_TIMEOUT") from None
        except AgentVaultError:
            raise
        except MCPError as exc:
            raise FailedPrecondition(f"the MCP server refused the call: {exc}"[:500], "TOOL_CALL_REFUSED") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("tool call failed", extra={"agent_id": agent.id, "error": f"{type(exc).__name__}: {exc}"[:300]})
            raise Unavailable("the tool's MCP server cannot be reached now", "TOOL_UNAVAILABLE") from None
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
