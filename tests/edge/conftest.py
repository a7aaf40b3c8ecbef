"""Edge test fixtures: a fake RegistryService and the test API on a real gRPC server, with the edge in front."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from google.protobuf import empty_pb2, message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agentvault.common import errors
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from agentvault_edge.app import create_app
from agentvault_edge.server import EdgeRunner
from agentvault_edge.settings import EdgeSettings

from .testproto import SERVICE as TEST_SERVICE
from .testproto import message_class, test_service

MAX_BODY = 64 * 1024


@dataclass
class Call:
    method: str
    request: Any
    metadata: dict[str, list[str | bytes]]


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    # Names of the streams whose server side has ended (finished or cancelled).
    ended_streams: set[str] = field(default_factory=set)

    def record(self, method: str, request: message.Message, context: grpc.aio.ServicerContext) -> None:
        metadata: dict[str, list[str | bytes]] = {}
        for key, value in context.invocation_metadata() or ():
            metadata.setdefault(key, []).append(value)
        copy = type(request)()
        copy.CopyFrom(request)
        self.calls.append(Call(method, copy, metadata))

    def last(self, method: str) -> Call:
        for call in reversed(self.calls):
            if call.method == method:
                return call
        raise AssertionError(f"{method} was not called; calls: {[c.method for c in self.calls]}")


async def _abort(context: grpc.aio.ServicerContext, err: errors.AgentVaultError) -> None:
    await context.abort_with_status(err.to_status())


class FakeRegistry(pb_grpc.RegistryServiceServicer):
    """Just enough of the registry to exercise the edge; records every call with its metadata."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.agents: dict[str, pb.Agent] = {}

    def reset(self) -> None:
        self.agents.clear()

    async def CreateAgent(self, request: pb.CreateAgentRequest, context: grpc.aio.ServicerContext) -> pb.Agent:
        self.recorder.record("CreateAgent", request, context)
        if not request.agent.name:
            await _abort(context, errors.invalid("agent.name", "is required"))
        if any(a.did == request.agent.did for a in self.agents.values()):
            await _abort(
                context, errors.AlreadyExists("an agent with this DID exists", "DID_TAKEN", did=request.agent.did)
            )
        agent = pb.Agent()
        agent.CopyFrom(request.agent)
        agent.id = str(uuid.uuid4())
        auth = dict(context.invocation_metadata() or ()).get("authorization", "")
        agent.owner = str(auth).removeprefix("Bearer ") or "anonymous"
        agent.create_time.FromSeconds(1_700_000_000)
        agent.update_time.FromSeconds(1_700_000_000)
        self.agents[agent.id] = agent
        return agent

    async def GetAgent(self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext) -> pb.Agent:
        self.recorder.record("GetAgent", request, context)
        agent = self.agents.get(request.id)
        if agent is None:
            await _abort(context, errors.NotFound("agent not found", "AGENT_NOT_FOUND", agent_id=request.id))
        return agent  # type: ignore[return-value]

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        self.recorder.record("ListAgents", request, context)
        if request.page_token == "slow":
            await asyncio.sleep(3)
        agents = [
            a
            for a in self.agents.values()
            if (not request.search or request.search in a.name or request.search in a.description)
            and (not request.agent_type or a.agent_type == request.agent_type)
            and (not request.sharing or a.sharing == request.sharing)
            and (not request.capability_kind or any(c.kind == request.capability_kind for c in a.capabilities))
        ]
        return pb.ListAgentsResponse(agents=agents, next_page_token=f"size={request.page_size}")

    async def UpdateAgent(self, request: pb.UpdateAgentRequest, context: grpc.aio.ServicerContext) -> pb.Agent:
        self.recorder.record("UpdateAgent", request, context)
        current = self.agents.get(request.agent.id)
        if current is None:
            await _abort(context, errors.NotFound("agent not found", "AGENT_NOT_FOUND", agent_id=request.agent.id))
            raise AssertionError("unreachable")
        if request.update_mask.paths:
            for path in request.update_mask.paths:
                fd = pb.Agent.DESCRIPTOR.fields_by_name.get(path)
                if fd is None:
                    await _abort(context, errors.invalid("update_mask", f"unknown path {path}"))
                    raise AssertionError("unreachable")
                current.ClearField(path)
                if fd.is_repeated:
                    getattr(current, path).extend(getattr(request.agent, path))
                elif fd.message_type is not None:
                    getattr(current, path).CopyFrom(getattr(request.agent, path))
                else:
                    setattr(current, path, getattr(request.agent, path))
        else:
            keep_id, keep_owner = current.id, current.owner
            current.CopyFrom(request.agent)
            current.id, current.owner = keep_id, keep_owner
        return current

    async def DeleteAgent(self, request: pb.DeleteAgentRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        self.recorder.record("DeleteAgent", request, context)
        if self.agents.pop(request.id, None) is None:
            await _abort(context, errors.NotFound("agent not found", "AGENT_NOT_FOUND", agent_id=request.id))
        return empty_pb2.Empty()

    async def GetHealth(self, request: pb.GetHealthRequest, context: grpc.aio.ServicerContext) -> pb.GetHealthResponse:
        self.recorder.record("GetHealth", request, context)
        # Above 2**53: a JSON number, printed exactly.
        return pb.GetHealthResponse(status=pb.HEALTH_STATUS_HEALTHY, agent_count=9_007_199_254_740_993)

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateApiKeyResponse:
        self.recorder.record("CreateApiKey", request, context)
        if request.name == "forbidden":
            await _abort(context, errors.PermissionDenied("admins only", "ADMIN_REQUIRED"))
        key = pb.ApiKey(id="key1", name=request.name, role=request.role or pb.ROLE_MEMBER)
        key.create_time.FromSeconds(1_700_000_000)
        return pb.CreateApiKeyResponse(api_key=key, token="secret-token")

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListApiKeysResponse:
        self.recorder.record("ListApiKeys", request, context)
        return pb.ListApiKeysResponse()

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: grpc.aio.ServicerContext) -> pb.ApiKey:
        self.recorder.record("RevokeApiKey", request, context)
        key = pb.ApiKey(id=request.id, name="someone", role=pb.ROLE_ADMIN)
        key.create_time.FromSeconds(1_700_000_000)
        key.revoke_time.FromSeconds(1_700_000_100)
        return key


def _test_handlers(recorder: Recorder) -> grpc.GenericRpcHandler:
    probe_cls = message_class("Probe")
    echoed_cls = message_class("Echoed")

    def unary(name: str) -> Callable[..., Any]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            recorder.record(name, request, context)
            return echoed_cls(method=name, probe=request)

        return handle

    async def watch(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        recorder.record("Watch", request, context)
        if request.name == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such topic")
        for i in range(request.small):
            yield echoed_cls(method="Watch", probe=probe_cls(name=request.name, big=i, color=request.color))
            await asyncio.sleep(0)
        if request.name == "broken":
            await context.abort(grpc.StatusCode.DATA_LOSS, "stream broke")
        if request.flag:
            # An endless, quiet stream: only the client going away ends it.
            try:
                while True:
                    await asyncio.sleep(0.05)
            finally:
                recorder.ended_streams.add(request.name)

    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in test_service().methods:
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                watch, request_deserializer=probe_cls.FromString, response_serializer=echoed_cls.SerializeToString
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                unary(method.name),
                request_deserializer=probe_cls.FromString,
                response_serializer=echoed_cls.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(TEST_SERVICE, handlers)


@dataclass
class Backend:
    address: str
    registry: FakeRegistry
    recorder: Recorder
    health: Any


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def backend() -> AsyncIterator[Backend]:
    recorder = Recorder()
    registry = FakeRegistry(recorder)
    server = grpc.aio.server()
    pb_grpc.add_RegistryServiceServicer_to_server(registry, server)
    server.add_generic_rpc_handlers((_test_handlers(recorder),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    yield Backend(f"127.0.0.1:{port}", registry, recorder, health_servicer)
    await server.stop(0)


def edge_settings(address: str, **overrides: Any) -> EdgeSettings:
    values: dict[str, Any] = {
        "call_timeout": 5.0,
        "max_body_bytes": MAX_BODY,
        "stream_heartbeat": 0.05,
        "backends": {"registry": address, "federation": address, "edgetest": address},
    }
    values.update(overrides)
    return EdgeSettings(**values)


def edge_services() -> list[Any]:
    return [pb.DESCRIPTOR.services_by_name["RegistryService"], test_service()]


async def start_edge(settings: EdgeSettings, services: list[Any] | None = None) -> tuple[EdgeRunner, str]:
    app = create_app(settings, edge_services() if services is None else services)
    runner = EdgeRunner(app, settings)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def edge_url(backend: Backend) -> AsyncIterator[str]:
    runner, url = await start_edge(edge_settings(backend.address))
    yield url
    await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def http(edge_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=edge_url) as session:
        yield session


@pytest.fixture
def recorder(backend: Backend) -> Recorder:
    backend.recorder.calls.clear()
    backend.recorder.ended_streams.clear()
    backend.registry.reset()
    return backend.recorder
