"""A real A2A agent for tests: a2a-sdk's own server on loopback, behaving as the first word of each message says."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import uvicorn
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format, struct_pb2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

RPC_PATH = "/a2a"

# What the agent does, by the first word of the text it receives:
#   echo  - answers a Message with the received parts and metadata (any other first word does too)
#   task  - a task: submitted, working, then completed with one artifact ("result") and a status message
#   fail  - a task that fails, its status message saying why
#   input - a task that waits for input (its status message asks a question)
#   slow  - a task that stays working for `slow_seconds` (or until the agent stops), then completes
#   boom  - the executor raises (the SDK's own error path)


@dataclass
class Received:
    """One message the agent received, with the HTTP headers of the request that carried it (lower-case names)."""

    message: a2a.Message
    headers: dict[str, str]


class _Executor(AgentExecutor):
    def __init__(self, agent: A2AAgent) -> None:
        self.agent = agent

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        assert message is not None
        headers = dict(context.call_context.state.get("headers", {}))
        self.agent.received.append(Received(message, headers))
        text = context.get_user_input().strip()
        word = text.split()[0].lower() if text else ""
        task_id = context.task_id or str(uuid.uuid4())
        context_id = context.context_id or str(uuid.uuid4())
        if word not in ("task", "fail", "input", "slow", "boom"):
            answer = a2a.Message(
                message_id=str(uuid.uuid4()),
                context_id=context_id,
                role=a2a.ROLE_AGENT,
                parts=list(message.parts),
                extensions=list(message.extensions),
            )
            if message.HasField("metadata"):
                answer.metadata.CopyFrom(message.metadata)
            await event_queue.enqueue_event(answer)
            return
        if word == "boom":
            raise RuntimeError("the agent broke")
        await event_queue.enqueue_event(
            a2a.Task(id=task_id, context_id=context_id, status=a2a.TaskStatus(state=a2a.TASK_STATE_SUBMITTED))
        )
        updater = TaskUpdater(event_queue, task_id, context_id)
        await updater.start_work()
        if word == "fail":
            await updater.failed(updater.new_agent_message([a2a.Part(text="cannot do that")]))
        elif word == "input":
            await updater.requires_input(updater.new_agent_message([a2a.Part(text="which one?")]))
        elif word == "slow":
            with suppress(TimeoutError):
                await asyncio.wait_for(self.agent.stopping.wait(), self.agent.slow_seconds)
            await updater.complete()
        else:
            await updater.add_artifact(
                [a2a.Part(text=f"done: {text}"), a2a.Part(data=_json_value({"words": len(text.split())}))],
                name="result",
                metadata={"kind": "summary"},
            )
            await updater.complete(updater.new_agent_message([a2a.Part(text="finished")]))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, context.task_id or "", context.context_id or "")
        await updater.cancel()


def _json_value(data: object) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.Parse(json.dumps(data), value)
    return value


def card(base: str, *, streaming: bool = True, version: str = "1.0") -> a2a.AgentCard:
    return a2a.AgentCard(
        name="Test Agent",
        description="Echoes, runs tasks, fails and waits, as the text it receives says",
        version="1.0.0",
        supported_interfaces=[
            a2a.AgentInterface(url=f"{base}{RPC_PATH}", protocol_binding="JSONRPC", protocol_version=version)
        ],
        capabilities=a2a.AgentCapabilities(streaming=streaming),
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["text/plain", "application/json"],
        skills=[a2a.AgentSkill(id="echo", name="Echo", description="Echoes", tags=["test"])],
    )


@dataclass
class A2AAgent:
    """A running agent: its base URL, its JSON-RPC `endpoint` (what an agent registers as its a2a endpoint) and
    everything it received. `version="0.3"` serves only the 0.3 methods (the SDK's compat adapter) and refuses
    1.0's as an A2A 0.3 agent does; `streaming=False` refuses SendStreamingMessage."""

    streaming: bool = True
    version: str = "1.0"
    slow_seconds: float = 30.0
    base: str = ""
    received: list[Received] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def endpoint(self) -> str:
        return f"{self.base}{RPC_PATH}"

    def app(self) -> Starlette:
        agent_card = card(self.base, streaming=self.streaming, version=self.version)
        handler = DefaultRequestHandler(_Executor(self), InMemoryTaskStore(), agent_card)
        if self.version == "1.0":
            rpc = create_jsonrpc_routes(handler, RPC_PATH)
        else:
            dispatcher = JsonRpcDispatcher(handler, enable_v0_3_compat=True)

            async def legacy_only(request: Request) -> Response:
                body = json.loads(await request.body() or b"null")
                method = body.get("method", "") if isinstance(body, dict) else ""
                if "/" not in str(method):  # 0.3 methods are "message/send"...; 1.0's are "SendMessage"...
                    error = {"code": -32601, "message": "Method not found"}
                    return JSONResponse({"jsonrpc": "2.0", "id": body.get("id"), "error": error})
                return await dispatcher.handle_requests(request)

            rpc = [Route(RPC_PATH, legacy_only, methods=["POST"])]

        async def busy(request: Request) -> Response:
            return JSONResponse({"error": "overloaded"}, status_code=503, headers={"Retry-After": "7"})

        async def moved(request: Request) -> Response:
            return RedirectResponse(RPC_PATH, status_code=307)

        # /busy: an endpoint that is overloaded (503 with Retry-After); /moved: one that redirects to the agent.
        extra = [Route("/busy", busy, methods=["POST"]), Route("/moved", moved, methods=["POST"])]
        return Starlette(routes=[*create_agent_card_routes(agent_card), *rpc, *extra])


@asynccontextmanager
async def running_agent(
    *, streaming: bool = True, version: str = "1.0", slow_seconds: float = 30.0, port: int = 0
) -> AsyncIterator[A2AAgent]:
    """An agent served by uvicorn on a loopback port (a free one unless `port`) for the duration of the block."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    agent = A2AAgent(streaming=streaming, version=version, slow_seconds=slow_seconds)
    agent.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(agent.app(), log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if serving.done():
                serving.result()  # raises why it could not start
            await asyncio.sleep(0.01)
        yield agent
    finally:
        agent.stopping.set()  # slow tasks end now, not after slow_seconds
        server.should_exit = True
        await serving
        sock.close()
