"""The shared server skeleton over real gRPC: error mapping, request ids, trace context, health, shutdown."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from agentvault.common.errors import FieldViolation, InvalidArgument, NotFound
from agentvault.common.interceptors import outgoing_metadata
from agentvault.common.server import GrpcServer
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
