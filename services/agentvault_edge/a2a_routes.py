"""The mesh's A2A endpoint for each agent at the edge: A2A 1.0 JSON-RPC (and 0.3's methods) onto MessagingService."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import grpc
from a2a.compat.v0_3 import conversions as v03
from a2a.compat.v0_3 import types as v03_types
from a2a.types import a2a_pb2 as a2a
from aiohttp import web
from google.protobuf import json_format, message
from pydantic import ValidationError

from agentvault.common import a2a_map
from agentvault.common.logs import request_id_var
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.registry.v1 import registry_service_pb2 as rpb
from agentvault.registry.v1 import registry_service_pb2_grpc as rpb_grpc
from agentvault_edge import errors
from agentvault_edge.backends import Backends
from agentvault_edge.forwarding import forwarded_metadata
from agentvault_edge.json_out import dumps
from agentvault_edge.request_body import parse_json, read_body
from agentvault_edge.responses import json_response
from agentvault_edge.server import Drain
from agentvault_edge.settings import EdgeSettings

log = logging.getLogger(__name__)

# The endpoint of agent {id} is PREFIX + id (the registry's cards name it: agent_cards.MESH_A2A_PATH).
PREFIX = "/a2a/agents/"
CARD_PATH = ".well-known/agent-card.json"
MESSAGING = "agentvault.messaging.v1.MessagingService"
REGISTRY = "agentvault.registry.v1.RegistryService"
# How long a blocking SendMessage waits for the agent's reply before answering the task as it is.
MAX_SEND_WAIT = 30.0
# How long a SendStreamingMessage follows its task; the client finds the rest with GetTask.
STREAM_SECONDS = 600.0
# AwaitReply's own bound, and the slack its call gets beyond the wait.
MAX_AWAIT = 60
CALL_MARGIN = 5.0
MAX_REPLIES = 100
MAX_REQUEST_ID = 128
MAX_ERROR_TEXT = 500
_ID_TEXT = re.compile(r"[\x21-\x7e]{1,128}")

# JSON-RPC 2.0's codes and A2A's; the mesh's own refusals (no credential, a policy's deny, ...) are server errors
# (-32000) whose data names the reason (google.rpc.ErrorInfo, as A2A 1.0 puts it).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000
TASK_NOT_FOUND = -32001
TASK_NOT_CANCELABLE = -32002
UNSUPPORTED_OPERATION = -32004
VERSION_NOT_SUPPORTED = -32009
VERSION_HEADER = "A2A-Version"
VERSIONS = ("1.0", "0.3")

# Task states for message statuses: waiting for a policy's approval or for the agent to take it is submitted; in
# the agent's hands (taken, or acknowledged without a reply so far) is working; a reply completes the task.
STATE_OF_STATUS = {
    "held": a2a.TASK_STATE_SUBMITTED,
    "accepted": a2a.TASK_STATE_SUBMITTED,
    "delivered": a2a.TASK_STATE_WORKING,
    "acknowledged": a2a.TASK_STATE_WORKING,
    "refused": a2a.TASK_STATE_REJECTED,
    "failed": a2a.TASK_STATE_FAILED,
    "dead_lettered": a2a.TASK_STATE_FAILED,
    "expired": a2a.TASK_STATE_FAILED,
}
FINAL_STATUSES = frozenset({"refused", "failed", "dead_lettered", "expired"})
# A2A methods this endpoint knows but does not serve (nothing to list, no push configs, no extended card).
UNSUPPORTED = frozenset(
    {
        "ListTasks",
        "SubscribeToTask",
        "CreateTaskPushNotificationConfig",
        "GetTaskPushNotificationConfig",
        "ListTaskPushNotificationConfigs",
        "DeleteTaskPushNotificationConfig",
        "GetExtendedAgentCard",
        "tasks/resubscribe",
        "tasks/pushNotificationConfig/set",
        "tasks/pushNotificationConfig/get",
        "tasks/pushNotificationConfig/list",
        "tasks/pushNotificationConfig/delete",
        "agent/getAuthenticatedExtendedCard",
    }
)


class RpcError(Exception):
    """A JSON-RPC error answer; `http_status` stays 200 except where HTTP itself must say it (401, the edge's
    own bounds)."""

    def __init__(
        self,
        code: int,
        text: str,
        data: Any = None,
        *,
        http_status: int = 200,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(text)
        self.code = code
        self.text = text[:MAX_ERROR_TEXT]
        self.data = data
        self.http_status = http_status
        self.headers = headers or {}
        self.close = close

    def envelope(self, request_id: str | int | None) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.text}
        if self.data is not None:
            error["data"] = self.data
        return {"jsonrpc": "2.0", "id": request_id, "error": error}


def invalid_params(field_name: str, description: str) -> RpcError:
    edge = errors.bad_request(field_name, description)
    return RpcError(INVALID_PARAMS, edge.message, edge.body()["error"]["details"])


def _reason(edge: errors.EdgeError) -> str:
    for detail in edge.body()["error"]["details"]:
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
            return str(detail.get("reason", ""))
    return ""


def from_edge_error(edge: errors.EdgeError, *, task_lookup: bool = False) -> RpcError:
    """A refusal (the edge's, or a backend's mapped by errors.from_rpc_error) as a JSON-RPC error."""
    code = edge.grpc_code
    details = edge.body()["error"]["details"]
    if code is grpc.StatusCode.UNAUTHENTICATED:
        # RFC 6750: the caller learns to come back with a bearer credential (an access token or an API key).
        headers = {**edge.headers, "WWW-Authenticate": 'Bearer realm="agentvault"'}
        return RpcError(SERVER_ERROR, edge.message, details, http_status=401, headers=headers)
    if task_lookup and code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        return RpcError(TASK_NOT_FOUND, edge.message, details)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE):
        return RpcError(INVALID_PARAMS, edge.message, details)
    if _reason(edge) == "MESSAGE_TOO_LARGE":
        return RpcError(INVALID_PARAMS, edge.message, details)
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return RpcError(UNSUPPORTED_OPERATION, edge.message, details)
    return RpcError(SERVER_ERROR, edge.message, details)


@dataclass
class Call:
    """One JSON-RPC request: its id, whether it came as A2A 0.3, and the caller's forwarded credential."""

    request_id: str | int | None
    legacy: bool
    metadata: list[tuple[str, str | bytes]] = field(default_factory=list)


class A2ARoutes:
    """POST /a2a/agents/{id} (JSON-RPC) and GET /a2a/agents/{id}/.well-known/agent-card.json.

    A thin adapter: the caller's own credential goes to MessagingService as on the REST routes, so the sender is
    the verified caller and every message passes the policy engine (message.send). A task is a mesh message: its
    id the message's, its context the conversation, its state the message's status, its answer the recipient's
    reply (in_reply_to)."""

    def __init__(self, settings: EdgeSettings, backends: Backends, drain: Drain) -> None:
        self.settings = settings
        self.backends = backends
        self.drain = drain
        self._messaging_cache: tuple[grpc.aio.Channel, mpb_grpc.MessagingServiceAsyncStub] | None = None
        self._registry_cache: tuple[grpc.aio.Channel, rpb_grpc.RegistryServiceAsyncStub] | None = None

    @staticmethod
    def owns(raw_path: str) -> bool:
        return raw_path.startswith(PREFIX)

    @staticmethod
    def label(raw_path: str) -> str:
        """The route template, for metrics: never the agent's id."""
        tail = raw_path[len(PREFIX) :].partition("/")[2]
        return PREFIX + "{agent_id}" + ("/" + CARD_PATH if tail == CARD_PATH else "")

    def _messaging(self) -> mpb_grpc.MessagingServiceAsyncStub:
        channel = self.backends.channel(self.backends.address("messaging"))
        if self._messaging_cache is None or self._messaging_cache[0] is not channel:
            self._messaging_cache = (channel, cast(Any, mpb_grpc.MessagingServiceStub(channel)))
        return self._messaging_cache[1]

    def _registry(self) -> rpb_grpc.RegistryServiceAsyncStub:
        channel = self.backends.channel(self.backends.address("registry"))
        if self._registry_cache is None or self._registry_cache[0] is not channel:
            self._registry_cache = (channel, cast(Any, rpb_grpc.RegistryServiceStub(channel)))
        return self._registry_cache[1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        agent_id, _, tail = request.rel_url.raw_path[len(PREFIX) :].partition("/")
        try:
            uuid.UUID(agent_id)
        except ValueError:
            raise errors.not_found(request.rel_url.raw_path) from None
        if tail == CARD_PATH:
            if request.method != "GET":
                raise errors.method_not_allowed(request.method, ["GET"])
            return await self._card(request, agent_id)
        if tail:
            raise errors.not_found(request.rel_url.raw_path)
        if request.method != "POST":
            raise errors.method_not_allowed(request.method, ["POST"])
        return await self._rpc(request, agent_id)

    # ----------------------------------------------------------------------------- the agent card

    async def _card(self, request: web.Request, agent_id: str) -> web.StreamResponse:
        """The registry's card (as the caller may see it) naming only this endpoint: a client that found the
        agent here talks to it here, whatever endpoints of its own the agent has."""
        metadata = forwarded_metadata(request, b"", self.settings.max_forwarded_header_bytes)
        try:
            reply = await self._registry().GetAgentCard(
                rpb.GetAgentCardRequest(id=agent_id), timeout=self.settings.call_timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise errors.from_rpc_error(exc, REGISTRY) from None
        card: dict[str, Any] = json_format.MessageToDict(reply.card)
        here = PREFIX + agent_id
        found = card.get("supportedInterfaces")
        mine = (
            [i for i in found if isinstance(i, dict) and urlsplit(str(i.get("url", ""))).path == here] if found else []
        )
        if mine:
            card["supportedInterfaces"] = mine
            card["url"], card["preferredTransport"] = mine[0]["url"], mine[0].get("protocolBinding", "JSONRPC")
            card["capabilities"] = {**(card.get("capabilities") or {}), "streaming": True}
        return json_response(card)

    # ----------------------------------------------------------------------------- JSON-RPC

    async def _rpc(self, request: web.Request, agent_id: str) -> web.StreamResponse:
        call = Call(None, legacy=False)
        try:
            raw = await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout)
            body = _parse(raw)
            call.request_id, method, params = _envelope(body)
            call.legacy = "/" in method
            version = request.headers.get(VERSION_HEADER, "")
            if version and not version.startswith(VERSIONS):
                raise RpcError(VERSION_NOT_SUPPORTED, f"A2A version {version[:20]!r} is not served; use 1.0 or 0.3")
            if method in UNSUPPORTED:
                raise RpcError(UNSUPPORTED_OPERATION, f"{method} is not served by the mesh's A2A endpoint")
            handler = self._methods().get(method)
            if handler is None:
                raise RpcError(METHOD_NOT_FOUND, f"method {method[:64]!r} not found")
            if not request.headers.get("Authorization", "").strip():
                raise RpcError(
                    SERVER_ERROR,
                    "authentication required: send Authorization: Bearer <the mesh's access token or API key>",
                    [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "UNAUTHENTICATED"}],
                    http_status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="agentvault"'},
                )
            call.metadata = forwarded_metadata(request, raw, self.settings.max_forwarded_header_bytes)
            return await handler(request, agent_id, call, body if call.legacy else params)
        except RpcError as exc:
            return _error_response(call.request_id, exc)
        except errors.EdgeError as exc:  # the edge's own bounds: body size and time, header size
            failure = RpcError(
                INVALID_REQUEST, exc.message, exc.body()["error"]["details"], http_status=exc.http_status
            )
            failure.headers, failure.close = exc.headers, exc.close_connection
            return _error_response(call.request_id, failure)
        except Exception:
            # A JSON-RPC answer even here: never a 500 page, never the exception's text.
            log.exception("A2A request failed unexpectedly")
            return _error_response(
                call.request_id, RpcError(INTERNAL_ERROR, f"internal error (request id {request_id_var.get()})")
            )

    def _methods(self) -> dict[str, Callable[[web.Request, str, Call, Any], Awaitable[web.StreamResponse]]]:
        return {
            "SendMessage": self._send_message,
            "message/send": self._send_message,
            "SendStreamingMessage": self._send_streaming,
            "message/stream": self._send_streaming,
            "GetTask": self._get_task,
            "tasks/get": self._get_task,
            "CancelTask": self._cancel_task,
            "tasks/cancel": self._cancel_task,
        }

    async def _send_message(self, request: web.Request, agent_id: str, call: Call, params: Any) -> web.StreamResponse:
        send = _send_request(params, call.legacy, streaming=False)
        sent, duplicate = await self._send(agent_id, send, call)
        task = task_of(sent, [])
        if not send.configuration.return_immediately and sent.status not in FINAL_STATUSES:
            replies = await self._replies(call, sent) if duplicate else []
            if replies:
                task = task_of(sent, replies)
            else:
                last: tuple[mpb.Message, list[mpb.Message]] = (sent, [])
                async with contextlib.aclosing(self._follow(call, sent, self._send_wait())) as events:
                    async for event in events:
                        last = event
                task = task_of(*last)
        if call.legacy:
            result: Any = _compat_dump(v03.to_compat_task(task))
        else:
            result = json_format.MessageToDict(a2a.SendMessageResponse(task=task))
        return _result_response(call.request_id, result)

    def _send_wait(self) -> float:
        return min(MAX_SEND_WAIT, max(self.settings.call_timeout - CALL_MARGIN, 0.0))

    async def _get_task(self, request: web.Request, agent_id: str, call: Call, params: Any) -> web.StreamResponse:
        if call.legacy:
            task_id = v03.to_core_get_task_request(_compat(v03_types.GetTaskRequest, params)).id
        else:
            task_id = _parse_params(params, a2a.GetTaskRequest()).id
        original = await self._task_message(agent_id, task_id, call)
        task = task_of(original, await self._replies(call, original))
        result = _compat_dump(v03.to_compat_task(task)) if call.legacy else json_format.MessageToDict(task)
        return _result_response(call.request_id, result)

    async def _cancel_task(self, request: web.Request, agent_id: str, call: Call, params: Any) -> web.StreamResponse:
        if call.legacy:
            task_id = v03.to_core_cancel_task_request(_compat(v03_types.CancelTaskRequest, params)).id
        else:
            task_id = _parse_params(params, a2a.CancelTaskRequest()).id
        await self._task_message(agent_id, task_id, call)
        raise RpcError(TASK_NOT_CANCELABLE, "a message the mesh accepted cannot be withdrawn; the task goes on")

    async def _task_message(self, agent_id: str, task_id: str, call: Call) -> mpb.Message:
        """The message a task id names, when it was sent to this agent and the caller may see it."""
        if not task_id:
            raise invalid_params("id", "is required")
        found = await self._unary(
            self._messaging().GetMessage, mpb.GetMessageRequest(id=task_id), call, task_lookup=True
        )
        if found.recipient.agent_id != agent_id:
            raise RpcError(TASK_NOT_FOUND, f"task {task_id[:128]} not found")
        return cast(mpb.Message, found)

    # ----------------------------------------------------------------------------- streaming

    async def _send_streaming(self, request: web.Request, agent_id: str, call: Call, params: Any) -> web.StreamResponse:
        send = _send_request(params, call.legacy, streaming=True)
        # Refusals (policy, size, credential) come before the stream: a plain JSON-RPC error answer.
        sent, duplicate = await self._send(agent_id, send, call)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)

        async def emit(event: a2a.StreamResponse) -> None:
            if call.legacy:
                payload: Any = _compat_dump(v03.to_compat_stream_response(event, call.request_id))
            else:
                payload = {"jsonrpc": "2.0", "id": call.request_id, "result": json_format.MessageToDict(event)}
            await response.write(b"data: " + dumps(payload) + b"\n\n")

        task = task_of(sent, [])
        try:
            await emit(a2a.StreamResponse(task=task))
            replies = await self._replies(call, sent) if duplicate else []
            if replies:
                await _emit_update(emit, task_of(sent, replies), task.status.state)
            elif sent.status not in FINAL_STATUSES:
                await self._stream_updates(call, sent, task.status.state, emit, response)
        except RpcError as exc:
            with contextlib.suppress(ConnectionError):
                await response.write(b"data: " + dumps(exc.envelope(call.request_id)) + b"\n\n")
        except ConnectionError:
            return response  # the client went away
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    async def _stream_updates(
        self,
        call: Call,
        sent: mpb.Message,
        state: int,
        emit: Callable[[a2a.StreamResponse], Awaitable[None]],
        response: web.StreamResponse,
    ) -> None:
        """Each change of the task's state, until its answer, its end, the stream's time or the edge's drain."""
        closing = asyncio.ensure_future(self.drain.wait())
        events = self._follow(call, sent, STREAM_SECONDS)
        pending = asyncio.ensure_future(_next(events))
        try:
            while True:
                done, _ = await asyncio.wait(
                    {pending, closing}, timeout=self.settings.stream_heartbeat, return_when=asyncio.FIRST_COMPLETED
                )
                if closing in done:
                    return
                if not done:
                    await response.write(b": keepalive\n\n")  # and how a client gone away is noticed
                    continue
                item = pending.result()
                if item is None:
                    return
                state = await _emit_update(emit, task_of(*item), state)
                pending = asyncio.ensure_future(_next(events))
        finally:
            pending.cancel()
            closing.cancel()
            with contextlib.suppress(BaseException):
                await pending
            await events.aclose()

    # ----------------------------------------------------------------------------- the mesh's side

    async def _send(self, agent_id: str, send: a2a.SendMessageRequest, call: Call) -> tuple[mpb.Message, bool]:
        """The A2A message as a mesh message from the caller to this agent: its content only (content_of: the
        sender and ids are the mesh's), its messageId as the idempotency key (a retried send is one message)."""
        if not send.HasField("message"):
            raise invalid_params("message", "is required")
        key = send.message.message_id
        if not _ID_TEXT.fullmatch(key):
            raise invalid_params("message.messageId", "is required: 1-128 printable ASCII characters, no spaces")
        outgoing = a2a_map.content_of(send.message)
        outgoing.id = ""
        outgoing.idempotency_key = key
        outgoing.recipient.CopyFrom(mpb.Party(agent_id=agent_id))
        answer = await self._unary(self._messaging().SendMessage, mpb.SendMessageRequest(message=outgoing), call)
        return answer.message, bool(answer.duplicate)

    async def _replies(self, call: Call, original: mpb.Message) -> list[mpb.Message]:
        """The replies to `original` so far, oldest first, read without taking them from the caller's inbox."""
        page = await self._unary(
            self._messaging().ListMessages,
            mpb.ListMessagesRequest(correlation_id=original.correlation_id or original.id, page_size=MAX_REPLIES),
            call,
        )
        return [m for m in reversed(page.messages) if m.in_reply_to == original.id]

    async def _follow(
        self, call: Call, sent: mpb.Message, seconds: float
    ) -> AsyncGenerator[tuple[mpb.Message, list[mpb.Message]], None]:
        """The message at each status change (WatchMessages), and last with its replies once the first came
        (AwaitReply, which takes it from the caller's inbox: the answer is delivered here), until then, a final
        status, or `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        stub = self._messaging()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        watch = stub.WatchMessages(mpb.WatchMessagesRequest(id=sent.id), metadata=call.metadata)

        async def watching() -> None:
            try:
                async for event in watch:
                    queue.put_nowait(("status", event.message))
            except grpc.aio.AioRpcError as exc:
                # The reply is still awaited below; only the intermediate states are lost.
                log.debug("watching message %s ended: %s", sent.id, exc.code().name)

        async def awaiting() -> None:
            try:
                while (left := deadline - loop.time()) > 0:
                    wait = min(MAX_AWAIT, int(left))
                    answer = await stub.AwaitReply(
                        mpb.AwaitReplyRequest(id=sent.id, wait_seconds=wait),
                        metadata=call.metadata,
                        timeout=wait + CALL_MARGIN,
                    )
                    if answer.HasField("reply"):
                        queue.put_nowait(("reply", answer.reply))
                        return
                    if wait == 0:
                        break
            except grpc.aio.AioRpcError as exc:
                queue.put_nowait(("error", exc))
                return
            queue.put_nowait(("timeout", None))

        tasks = [asyncio.create_task(watching()), asyncio.create_task(awaiting())]
        try:
            current = sent
            while True:
                kind, item = await queue.get()
                if kind == "error":
                    raise from_edge_error(errors.from_rpc_error(item, MESSAGING))
                if kind == "timeout":
                    return
                if kind == "reply":
                    replies = await self._replies(call, sent)
                    if not any(r.id == item.id for r in replies):
                        replies.append(item)
                    yield current, replies
                    return
                current = item
                yield current, []
                if current.status in FINAL_STATUSES:
                    return
        finally:
            watch.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _unary(self, method: Any, request: message.Message, call: Call, *, task_lookup: bool = False) -> Any:
        try:
            return await method(request, timeout=self.settings.call_timeout, metadata=call.metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_edge_error(errors.from_rpc_error(exc, MESSAGING), task_lookup=task_lookup) from None


# --------------------------------------------------------------------------------- tasks


def task_of(original: mpb.Message, replies: Sequence[mpb.Message]) -> a2a.Task:
    """The A2A task of a mesh message: its replies complete it, the answer (the last reply) as the status message,
    earlier ones in the history, and replies that carried an artifact (a2a_map.answer_replies' form) as
    artifacts; without a reply, its state is the message's status."""
    task = a2a.Task(id=original.id, context_id=original.conversation_id)
    answers: list[mpb.Message] = []
    for reply in replies:
        artifact = _artifact_of(reply)
        if artifact is not None:
            task.artifacts.append(artifact)
        else:
            answers.append(reply)
    if replies:
        task.status.state = a2a.TASK_STATE_COMPLETED
        if answers:
            task.status.message.CopyFrom(_answer(answers[-1], original))
            task.history.extend(_answer(a, original) for a in answers[:-1])
        task.status.timestamp.CopyFrom(replies[-1].create_time)
        return task
    task.status.state = STATE_OF_STATUS.get(original.status, a2a.TASK_STATE_WORKING)
    if original.status_reason and (original.status in FINAL_STATUSES or original.status == "held"):
        task.status.message.CopyFrom(
            a2a.Message(
                # Stable, so that the same state read twice is the same message.
                message_id=str(uuid.uuid5(uuid.UUID(original.id), original.status)),
                context_id=original.conversation_id,
                task_id=original.id,
                role=a2a.ROLE_AGENT,
                parts=[a2a.Part(text=original.status_reason)],
            )
        )
    if original.HasField("update_time"):
        task.status.timestamp.CopyFrom(original.update_time)
    return task


def _answer(reply: mpb.Message, original: mpb.Message) -> a2a.Message:
    """A reply in A2A form (a2a_map.to_a2a, lossless), without principal ids, as external agents get messages."""
    copy = mpb.Message()
    copy.CopyFrom(reply)
    copy.sender.ClearField("principal_id")
    copy.recipient.ClearField("principal_id")
    out = a2a_map.to_a2a(copy)
    out.task_id = out.task_id or original.id
    if out.role == a2a.ROLE_UNSPECIFIED:
        out.role = a2a.ROLE_AGENT
    return out


def _artifact_of(reply: mpb.Message) -> a2a.Artifact | None:
    namespace = reply.metadata.fields.get(a2a_map.NAMESPACE)
    if namespace is None or namespace.WhichOneof("kind") != "struct_value":
        return None
    info = namespace.struct_value.fields.get("artifact")
    if info is None or info.WhichOneof("kind") != "struct_value":
        return None
    about = {k: v.string_value for k, v in info.struct_value.fields.items() if v.WhichOneof("kind") == "string_value"}
    artifact = a2a.Artifact(
        artifact_id=about.get("id") or reply.id,
        name=about.get("name", ""),
        description=about.get("description", ""),
        parts=[a2a_map.part_to_a2a(p) for p in reply.parts],
        extensions=list(reply.extensions),
    )
    own = {k: v for k, v in reply.metadata.fields.items() if k != a2a_map.NAMESPACE}
    for key, value in own.items():
        artifact.metadata.fields[key].CopyFrom(value)
    return artifact


async def _next(
    events: AsyncIterator[tuple[mpb.Message, list[mpb.Message]]],
) -> tuple[mpb.Message, list[mpb.Message]] | None:
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


async def _emit_update(emit: Callable[[a2a.StreamResponse], Awaitable[None]], task: a2a.Task, state: int) -> int:
    """The task's artifacts and status as stream events, when something changed; the state now."""
    done = task.status.state == a2a.TASK_STATE_COMPLETED
    if task.status.state == state and not done:
        return state
    for artifact in task.artifacts:
        await emit(
            a2a.StreamResponse(
                artifact_update=a2a.TaskArtifactUpdateEvent(
                    task_id=task.id, context_id=task.context_id, artifact=artifact, last_chunk=True
                )
            )
        )
    update = a2a.TaskStatusUpdateEvent(task_id=task.id, context_id=task.context_id, status=task.status)
    await emit(a2a.StreamResponse(status_update=update))
    return int(task.status.state)


# --------------------------------------------------------------------------------- JSON-RPC plumbing


def _parse(raw: bytes) -> Any:
    try:
        return parse_json(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RpcError(PARSE_ERROR, "the request body is not valid UTF-8") from None
    except errors.EdgeError as exc:
        raise RpcError(PARSE_ERROR, exc.message) from None


def _envelope(body: Any) -> tuple[str | int | None, str, Any]:
    if isinstance(body, list):
        raise RpcError(INVALID_REQUEST, "batch requests are not supported")
    if not isinstance(body, dict):
        raise RpcError(INVALID_REQUEST, "a JSON-RPC request is a JSON object")
    request_id = body.get("id")
    valid_id = request_id is None or (isinstance(request_id, int) and not isinstance(request_id, bool))
    if isinstance(request_id, str):
        valid_id = len(request_id) <= MAX_REQUEST_ID
    if not valid_id:
        raise RpcError(INVALID_REQUEST, f"id must be a string (at most {MAX_REQUEST_ID} characters), integer or null")
    if body.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, "'jsonrpc' must be exactly '2.0'")
    method = body.get("method")
    if not isinstance(method, str) or not method:
        raise RpcError(INVALID_REQUEST, "method is required")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "params must be a JSON object")
    return request_id, method, params


_Proto = Any


_PART_KINDS = ("text", "raw", "url")


def _drop_shadowed_null_data(params: Any) -> None:
    """A Part's `"data": null` beside another kind is what a JSON writer emits for a field it left unset; protobuf's
    parser would take whichever comes last (the text silently lost), so it is dropped first. Alone it stays the
    JSON null. Iterative: the body's depth is the caller's choice."""
    stack = [params]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "data" in node and node["data"] is None and any(node.get(k) is not None for k in _PART_KINDS):
                del node["data"]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _parse_params(params: Any, target: _Proto) -> _Proto:
    _drop_shadowed_null_data(params)
    try:
        # Unknown fields are ignored for forward compatibility, as the SDK's own server does.
        json_format.ParseDict(params, target, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from None
    return target


def _compat(model: type[Any], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise RpcError(INVALID_PARAMS, f"invalid params: {problems}") from None


def _compat_dump(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def _send_request(params: Any, legacy: bool, *, streaming: bool) -> a2a.SendMessageRequest:
    if not legacy:
        return cast(a2a.SendMessageRequest, _parse_params(params, a2a.SendMessageRequest()))
    model = v03_types.SendStreamingMessageRequest if streaming else v03_types.SendMessageRequest
    try:
        return v03.to_core_send_message_request(_compat(model, params))
    except (ValueError, TypeError) as exc:  # content the 1.0 types cannot hold (e.g. bad base64)
        raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from None


def _result_response(request_id: str | int | None, result: Any) -> web.Response:
    return json_response({"jsonrpc": "2.0", "id": request_id, "result": result})


def _error_response(request_id: str | int | None, exc: RpcError) -> web.Response:
    response = json_response(exc.envelope(request_id), exc.http_status, exc.headers)
    if exc.close:
        response.force_close()
    return response
