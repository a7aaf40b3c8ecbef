"""The shared server skeleton over real gRPC: error mapping, request ids, trace context, health, shutdown."""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from agentvault.common.errors import FieldViolation, InvalidArgument, NotFound
from agentvault.common.interceptors import outgoing_metadata
from agentvault.common.server import GrpcServer
from agentvault.common.services import SERVICES, ServiceSpec
from agentvault.common.settings import CommonSettings, Env
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc


class Probe(pb_grpc.RegistryServiceServicer):
    """Each method exercises one path of the interceptor."""

    async def GetCaller(self, request: pb.GetCallerRequest, context: grpc.aio.ServicerContext) -> pb.Caller:
        # Echo what a call made from inside this handler would carry onwards.
        return pb.Caller(name=json.dumps(dict(outgoing_metadata())))

    async def GetAgent(self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext) -> pb.Agent:
        if request.id == "missing":
            raise NotFound("agent missing not found", "AGENT_NOT_FOUND", id="missing")
        if request.id == "invalid":
            raise InvalidArgument([FieldViolation("id", "bad"), FieldViolation("name", "worse")])
        if request.id == "duplicate":
            raise asyncpg.UniqueViolationError("duplicate key value violates unique constraint")
        raise RuntimeError("secret internal detail")


@pytest.fixture(scope="module")
async def probe() -> AsyncIterator[tuple[pb_grpc.RegistryServiceStub, health_pb2_grpc.HealthStub, GrpcServer]]:
    settings = CommonSettings.load("probe", "REGISTRY_PORT", Env({"REGISTRY_PORT": "0"}))
    server = GrpcServer(settings)
    server.add(
        "agentvault.registry.v1.RegistryService", lambda s: pb_grpc.add_RegistryServiceServicer_to_server(Probe(), s)
    )
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.RegistryServiceStub(channel), health_pb2_grpc.HealthStub(channel), server
    await server.stop()


def details(err: grpc.aio.AioRpcError) -> dict[str, object]:
    status = rpc_status.from_call(err)
    assert status is not None
    found: dict[str, object] = {}
    for any_detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if any_detail.Is(kind.DESCRIPTOR):
                message = kind()
                any_detail.Unpack(message)
                found[kind.__name__] = message
    return found


async def test_domain_errors_become_status_with_details(probe: tuple) -> None:
    stub = probe[0]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetAgent(pb.GetAgentRequest(id="missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    info = details(err.value)["ErrorInfo"]
    assert info.reason == "AGENT_NOT_FOUND" and info.domain == "agentvault.io" and info.metadata["id"] == "missing"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetAgent(pb.GetAgentRequest(id="invalid"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = details(err.value)["BadRequest"]
    assert [v.field for v in bad.field_violations] == ["id", "name"]


async def test_database_errors_are_mapped_by_class(probe: tuple) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await probe[0].GetAgent(pb.GetAgentRequest(id="duplicate"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_unexpected_errors_are_internal_without_leaking(probe: tuple) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await probe[0].GetAgent(pb.GetAgentRequest(id="boom"), metadata=[("x-request-id", "req-123")])
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internal detail" not in (err.value.details() or "")
    assert "req-123" in (err.value.details() or ""), "the request id lets an operator find the logged traceback"


async def test_request_id_and_trace_context_travel_on(probe: tuple) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    reply = await probe[0].GetCaller(
        pb.GetCallerRequest(), metadata=[("x-request-id", "abc-1"), ("traceparent", traceparent)]
    )
    onward = json.loads(reply.name)
    assert onward["x-request-id"] == "abc-1"
    assert onward["traceparent"] == traceparent
    generated = json.loads((await probe[0].GetCaller(pb.GetCallerRequest())).name)
    assert generated["x-request-id"] and generated["x-request-id"] != "abc-1"
    assert "traceparent" not in generated


async def test_health_serving_then_not_serving_on_shutdown(probe: tuple) -> None:
    health = probe[1]
    reply = await health.Check(health_pb2.HealthCheckRequest(service="agentvault.registry.v1.RegistryService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_settings_fail_clearly() -> None:
    from agentvault.common.settings import SettingsError

    with pytest.raises(SettingsError, match="REGISTRY_PORT must be an integer"):
        CommonSettings.load("x", "REGISTRY_PORT", Env({"REGISTRY_PORT": "http"}))
    with pytest.raises(SettingsError, match="LOG_FORMAT"):
        CommonSettings.load("x", "REGISTRY_PORT", Env({"LOG_FORMAT": "xml"}))
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        CommonSettings.load("x", "REGISTRY_PORT", Env({})).require_database()
    assert (
        Env({"REGISTRY_ADDR": "registry:1", "REGISTRY_PORT": "junk"}).addr("REGISTRY_ADDR", "REGISTRY_PORT")
        == "registry:1"
    )


def test_generated_code_has_no_drift_marker(tmp_path: Path) -> None:
    # The drift check itself runs in `make lint`; here: every proto has its four generated files.
    root = Path(__file__).resolve().parents[2]
    for proto in (root / "protos").rglob("*.proto"):
        stem = proto.with_suffix("").name
        out = root / "libs" / proto.parent.relative_to(root / "protos")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert (out / f"{stem}{suffix}").exists(), f"{stem}{suffix} missing: run make proto"


async def test_recorded_spans_continue_the_callers_trace(probe: tuple) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from agentvault.common import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        reply = await probe[0].GetCaller(
            pb.GetCallerRequest(), metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")]
        )
    finally:
        tracing._recording = False  # the other tests exercise the propagate-only path
    [span] = [s for s in exporter.get_finished_spans() if s.name.endswith("/GetCaller")]
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.parent is not None and f"{span.parent.span_id:016x}" == parent_id
    # Calls made while handling carry the same trace, with the server span as their parent.
    onward = json.loads(reply.name)["traceparent"]
    assert onward.split("-")[1] == trace_id and onward.split("-")[2] == f"{span.context.span_id:016x}"


# ---------------------------------------------------------------- every method of every service is instrumented
# _Registrar wraps the handlers generated code registers (agentvault.common.server explains why not an
# interceptor). These fail loudly if grpcio's generated code stops registering through the two calls it knows.


def _import_generated() -> None:
    """Every generated *_pb2 module, so the descriptor pool knows every service of this build."""
    import agentvault

    for root in agentvault.__path__:
        for path in Path(root).glob("*/v1/*_pb2.py"):
            importlib.import_module(f"agentvault.{path.parent.parent.name}.v1.{path.stem}")


def _generated(full_name: str) -> tuple[Any, type, Any]:
    """The generated add_*_to_server, base servicer class and service descriptor of a full service name."""
    _import_generated()
    service = descriptor_pool.Default().FindServiceByName(full_name)
    module = importlib.import_module(service.file.name.removesuffix(".proto").replace("/", ".") + "_pb2_grpc")
    return getattr(module, f"add_{service.name}Servicer_to_server"), getattr(module, f"{service.name}Servicer"), service


def _handled(service: str, method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "grpc_server_handled_total", {"grpc_service": service, "grpc_method": method, "grpc_code": code}
    )
    return value or 0.0


async def _counted(service: str, method: str, code: str, expected: float) -> bool:
    # The server counts a call after the client has its status: poll, with a bound for a broken run.
    for _ in range(200):
        if _handled(service, method, code) >= expected:
            return True
        await asyncio.sleep(0.01)
    return False


async def _finish(call: Any, streaming: bool) -> None:
    if streaming:
        async for _ in call:
            pass
    else:
        await call


@pytest.mark.parametrize("spec", [s for s in SERVICES if s.proto_services], ids=lambda s: s.name)
async def test_every_method_of_every_service_is_counted(spec: ServiceSpec) -> None:
    settings = CommonSettings.load("probe", "REGISTRY_PORT", Env({"REGISTRY_PORT": "0"}))
    server = GrpcServer(settings)
    generated = {name: _generated(name) for name in spec.proto_services}
    for add, servicer, _ in generated.values():
        # The generated base servicer fails every method: enough to see each call counted.
        server.serve(add, servicer())
    assert set(server.service_names) == set(spec.proto_services)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name, (_, _, service) in generated.items():
                for method in service.methods:
                    before = _handled(name, method.name, "INTERNAL")
                    path = f"/{name}/{method.name}"
                    if method.client_streaming:
                        call: Any = channel.stream_stream(path) if method.server_streaming else None
                        call = call or channel.stream_unary(path)
                        attempt = call(iter([b""]))
                    elif method.server_streaming:
                        attempt = channel.unary_stream(path)(b"")
                    else:
                        attempt = channel.unary_unary(path)(b"")
                    # The base servicer raises NotImplementedError, which the instrumentation maps and counts.
                    with pytest.raises(grpc.aio.AioRpcError):
                        await _finish(attempt, method.server_streaming)
                    # Counted, with the code the client saw: the error went through the instrumentation.
                    assert await _counted(name, method.name, "INTERNAL", before + 1), f"{path} is not instrumented"
    finally:
        await server.stop()


async def test_a_service_registered_in_part_is_refused() -> None:
    settings = CommonSettings.load("probe", "REGISTRY_PORT", Env({"REGISTRY_PORT": "0"}))
    server = GrpcServer(settings)
    name = "agentvault.registry.v1.RegistryService"

    def only_one_method(servicer: Any, registrar: Any) -> None:
        handler = grpc.unary_unary_rpc_method_handler(servicer.GetAgent)
        registrar.add_registered_method_handlers(name, {"GetAgent": handler})

    with pytest.raises(RuntimeError, match="would not be instrumented"):
        server.serve(only_one_method, Probe())


async def test_a_registration_path_the_registrar_does_not_know_is_refused() -> None:
    settings = CommonSettings.load("probe", "REGISTRY_PORT", Env({"REGISTRY_PORT": "0"}))
    server = GrpcServer(settings)

    def new_generated_code(servicer: Any, registrar: Any) -> None:
        registrar.add_method_handlers_some_new_way("agentvault.registry.v1.RegistryService", {})

    with pytest.raises(RuntimeError, match="does not instrument"):
        server.serve(new_generated_code, Probe())


def test_services_in_the_list_are_served_by_their_entry_points() -> None:
    # The list's proto names exist, and no two services claim one.
    claimed = [name for spec in SERVICES for name in spec.proto_services]
    assert len(claimed) == len(set(claimed))
    for name in claimed:
        _generated(name)


RUN_SERVICE_SERVING = """
import sys
from types import SimpleNamespace
from agentvault.common.server import run_service
from agentvault.common.settings import CommonSettings, Env
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

def load():
    return SimpleNamespace(common=CommonSettings.load("discovery", "DISCOVERY_PORT", Env({"DISCOVERY_PORT": "0"})))

async def build(settings, server, stack):
    async def closed():
        print("closed", flush=True)
    stack.push_async_callback(closed)
    # Not what agentvault.common.services lists for discovery.
    server.serve(pb_grpc.add_RegistryServiceServicer_to_server, pb_grpc.RegistryServiceServicer())

run_service("agentvault_discovery", load, build)
"""


def test_run_service_refuses_to_serve_other_than_its_entry_lists() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", RUN_SERVICE_SERVING], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "agentvault.common.services lists" in result.stderr, result.stderr
    # What build had opened is closed on the way out.
    assert "closed" in result.stdout
