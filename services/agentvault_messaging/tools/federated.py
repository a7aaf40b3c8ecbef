"""Tools across meshes: invoking a peer mesh's tool through the federation channel, and serving ours to peers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
from google.protobuf import json_format

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
from agentvault.common.peers import PeerTarget
from agentvault.common.policy.asking import refuse_unless_decided
from agentvault.common.policy.enforcer import AuditEntry
from agentvault.common.policy.engine import Outcome
from agentvault.common.policy.request import Caller, Trust, caller, tool_target
from agentvault.common.principal import Principal
from agentvault.messaging.v1 import federated_messaging_pb2 as fpb
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import tool_service_pb2 as tpb
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault_messaging import metrics

log = logging.getLogger(__name__)

TOOLS_PATH = "/api/v1/federation/tools:invoke"
# Bounds on what a peer can make this mesh hold for one call: one event (a result's content, mostly), all of them.
MAX_EVENT_BYTES = 1024 * 1024 + 64 * 1024
MAX_STREAM_BYTES = 8 * 1024 * 1024
# A refusal's JSON error body.
MAX_ERROR_BYTES = 64 * 1024
REGISTRY_SECONDS = 5.0
_REASON = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


class PeerTools:
    """This mesh's side of a call to a peer's tool: this mesh's policy (tool.invoke on the tool, its `mesh` the
    peer's name) decides first, then one signed POST to the peer's edge whose SSE answer is relayed event by event.
    The caller's deadline is the peer call's timeout (and the peer's own, sent along); a caller that goes away closes
    the connection, which the peer's edge turns into cancelling the tool."""

    def __init__(self, book: Any, client: Any) -> None:
        self.book = book  # federation.PeerBook
        self.client = client  # federation.PeerClient: its session and signed headers

    async def invoke(
        self, tools: Any, who: Caller, request: tpb.InvokeToolRequest, deadline: float
    ) -> AsyncIterator[tpb.InvokeToolEvent]:
        if request.arguments.ByteSize() > capability_schemas.MAX_INPUT_BYTES:
            raise invalid("arguments", f"must be at most {capability_schemas.MAX_INPUT_BYTES} bytes")
        peer: PeerTarget = await self.book.require(request.mesh)
        target = tool_target(request.agent_id, request.tool, mesh=peer.name)
        verdict = await tools.enforcer.decide(
            who, "tool.invoke", target, agent_id=request.agent_id, payload_size=request.arguments.ByteSize()
        )
        refuse_unless_decided(verdict, "this tool call", "TOOL_DENIED")
        if verdict.outcome is Outcome.ASK:
            # Approvals name an agent of this mesh; a tool of a peer mesh cannot be approved here.
            await verdict.done()
            raise PermissionDenied(
                "this mesh's policy asks for an approval, which calls to tools of peer meshes cannot wait for: "
                + "; ".join(verdict.decision.reasons),
                "TOOL_DENIED",
            )
        outcome = "failed"
        try:
            async for event in self._stream(peer, who, request, deadline):
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
                await tools.control.audit(
                    [
                        AuditEntry(
                            verdict.caller.uid,
                            "tool.invoke",
                            target.uid,
                            "allow",
                            verdict.decision.policies,
                            f"invocation at peer {peer.name} {outcome}",
                        )
                    ]
                )

    async def _stream(
        self, peer: PeerTarget, who: Caller, request: tpb.InvokeToolRequest, deadline: float
    ) -> AsyncIterator[tpb.InvokeToolEvent]:
        left = deadline - time.monotonic()
        vouched = mpb.Party(agent_id=who.id if who.type == "Caller::Agent" else "")
        outgoing = fpb.InvokeFederatedToolRequest(
            agent_id=request.agent_id,
            tool=request.tool,
            arguments=request.arguments,
            caller=vouched,
            timeout_ms=max(1, int(left * 1000)),
        )
        body = json_format.MessageToJson(outgoing, preserving_proto_field_name=True, indent=None)
        url, headers = self.client.signed(peer, "POST", TOOLS_PATH, body)
        headers["Accept"] = "text/event-stream"
        loop_deadline = asyncio.get_running_loop().time() + left
        try:
            async with (
                asyncio.timeout_at(loop_deadline),
                self.client.session.post(url, data=body.encode(), headers=headers, allow_redirects=False) as answer,
            ):
                if answer.status != 200:
                    raw = await answer.content.read(MAX_ERROR_BYTES + 1)
                    document = _json(raw) if len(raw) <= MAX_ERROR_BYTES else None
                    raise peer_error(peer.name, answer.status, document)
                if not answer.headers.get("Content-Type", "").startswith("text/event-stream"):
                    raise _lying(peer.name, "its answer is not an event stream")
                async for event in events(answer.content, peer.name):
                    yield event
                    if event.WhichOneof("event") == "result":
                        return
                raise _lying(peer.name, "its stream ended without a result")
        except TimeoutError:
            raise DeadlineExceeded(
                f"the tool at peer mesh {peer.name} did not answer before the call's deadline", "TOOL_TIMEOUT"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            log.info("peer tool call failed", extra={"peer": peer.name, "error": type(exc).__name__})
            raise Unavailable(
                f"cannot reach peer mesh {peer.name} now ({type(exc).__name__})", "TOOL_UNAVAILABLE", peer=peer.name
            ) from None


async def events(content: aiohttp.StreamReader, peer: str) -> AsyncIterator[tpb.InvokeToolEvent]:
    """The tool events of a peer edge's Server-Sent Events, each and all bounded in bytes."""
    buffer = bytearray()
    total = 0
    async for chunk in content.iter_any():
        total += len(chunk)
        if total > MAX_STREAM_BYTES:
            raise _lying(peer, f"its answer is over {MAX_STREAM_BYTES} bytes")
        buffer += chunk.replace(b"\r\n", b"\n")
        while (end := buffer.find(b"\n\n")) >= 0:
            block = bytes(buffer[:end])
            del buffer[: end + 2]
            event = _event(block, peer)
            if event is not None:
                yield event
        if len(buffer) > MAX_EVENT_BYTES:
            raise _lying(peer, f"it sent an event over {MAX_EVENT_BYTES} bytes")


def _event(block: bytes, peer: str) -> tpb.InvokeToolEvent | None:
    name, data = "message", []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue  # keepalive comments
        field, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if field == b"event":
            name = value.decode("utf-8", "replace")
        elif field == b"data":
            data.append(value)
    if not data:
        return None
    document = _json(b"\n".join(data))
    if name == "error":
        error = document.get("error") if isinstance(document, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        raise peer_error(peer, code if isinstance(code, int) else 502, document)
    if name == "close":
        raise Unavailable(f"peer mesh {peer} closed the call (its edge is shutting down)", "TOOL_UNAVAILABLE")
    if not isinstance(document, dict):
        raise _lying(peer, "an event is not a JSON object")
    event = tpb.InvokeToolEvent()
    try:
        json_format.ParseDict(document, event, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError):
        raise _lying(peer, "an event is not a tool event") from None
    if event.WhichOneof("event") is None:
        raise _lying(peer, "an event is not a tool event")
    return event


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _lying(peer: str, what: str) -> Unavailable:
    return Unavailable(f"peer mesh {peer} answered wrongly: {what}", "TOOL_UNAVAILABLE", peer=peer)


def peer_error(peer: str, http_status: int, document: Any) -> AgentVaultError:
    """A peer's refusal as an error of this call, by the gRPC status its edge names (else its HTTP status): its
    policy's refusal stays a refusal, bad arguments stay field violations; its reason goes in `peer_reason`."""
    error = document.get("error") if isinstance(document, dict) else None
    error = error if isinstance(error, dict) else {}
    status = str(error.get("status", ""))
    text = str(error.get("message", ""))[:300] or f"HTTP {http_status}"
    reason, violations = "", []
    for detail in error.get("details") or ():
        if not isinstance(detail, dict):
            continue
        kind = str(detail.get("@type", ""))
        if kind.endswith("ErrorInfo") and _REASON.fullmatch(str(detail.get("reason", ""))):
            reason = str(detail["reason"])
        elif kind.endswith("BadRequest"):
            for v in (detail.get("field_violations") or detail.get("fieldViolations") or ())[:50]:
                if isinstance(v, dict):
                    violations.append(
                        FieldViolation(str(v.get("field", ""))[:200], str(v.get("description", ""))[:300])
                    )
    said = f"peer mesh {peer}: {text}"
    meta = {"peer": peer[:255], "peer_reason": reason}
    if status == "INVALID_ARGUMENT" or (not status and http_status == 400):
        return InvalidArgument(violations or [FieldViolation("arguments", said)], said)
    if status == "PERMISSION_DENIED" or (not status and http_status == 403):
        return PermissionDenied(said, "TOOL_DENIED", **meta)
    if status == "NOT_FOUND" or (not status and http_status == 404):
        return NotFound(said, "TOOL_NOT_FOUND", **meta)
    if status == "DEADLINE_EXCEEDED" or (not status and http_status == 504):
        return DeadlineExceeded(said, "TOOL_TIMEOUT", **meta)
    if status == "FAILED_PRECONDITION":
        return FailedPrecondition(said, "TOOL_CALL_REFUSED", **meta)
    return Unavailable(f"peer mesh {peer} refused the call: {text}", "TOOL_UNAVAILABLE", **meta)


class PeerToolServer:
    """The peer-facing side (FederatedMessagingService.InvokeFederatedTool, after the peer and its signature were
    admitted): a tool of an agent of this mesh shared with peers (federated), run as a local call would be, the peer
    being the caller of this mesh's policy, under the peer's timeout capped by this mesh's own."""

    def __init__(self, tools: Any, registry: Any) -> None:
        self.tools = tools  # service.ToolServicer
        self.registry = registry  # RegistryService stub, this service's own identity (agents:read)

    async def invoke(
        self, principal: Principal, request: fpb.InvokeFederatedToolRequest
    ) -> AsyncIterator[tpb.InvokeToolEvent]:
        if not request.agent_id:
            raise invalid("agent_id", "is required")
        if not request.tool:
            raise invalid("tool", "is required")
        if request.caller.agent_id:
            try:
                uuid.UUID(request.caller.agent_id)
            except ValueError:
                raise invalid("caller.agent_id", "must be a UUID") from None
        agent = await self._shared(request.agent_id)
        seconds = self.tools.max_seconds
        if request.timeout_ms:
            seconds = min(seconds, request.timeout_ms / 1000)
        who = caller(principal, Trust.UNTRUSTED, principal.name)
        detail = f" for peer {principal.name}" + (
            f" (agent {request.caller.agent_id})" if request.caller.agent_id else ""
        )
        async for event in self.tools.run(
            principal.id, who, agent, request.tool, request.arguments, time.monotonic() + seconds, detail
        ):
            yield event

    async def _shared(self, agent_id: str) -> reg_pb.Agent:
        """Only agents shared with peers; any other is not found, as for a search of this mesh."""
        missing = NotFound(f"agent {agent_id[:64]} not found", "AGENT_NOT_FOUND", id=agent_id[:64])
        try:
            agent: reg_pb.Agent = await self.registry.GetAgent(
                reg_pb.GetAgentRequest(id=agent_id), timeout=REGISTRY_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise missing from None
            raise Unavailable("the registry cannot be asked now", "REGISTRY_UNAVAILABLE") from None
        if agent.sharing != reg_pb.SHARING_FEDERATED:
            raise missing
        return agent
