"""The one gRPC server skeleton every service runs: grpc.aio, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agentvault.common import errors, reflection
from agentvault.common.healthcheck import LIVENESS_SERVICE, StoreWatch
from agentvault.common.interceptors import instrument
from agentvault.common.logs import configure_logging
from agentvault.common.metrics import serve_metrics
from agentvault.common.services import service_of_module
from agentvault.common.settings import CommonSettings, SettingsError
from agentvault.common.tracing import configure_tracing

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

SERVER_OPTIONS: list[tuple[str, int]] = [
    # Without this, Linux lets a second server bind the same port silently and steal half the calls.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Clients reconnect every few minutes, so behind a Kubernetes Service new replicas get traffic too.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
]

# gRPC core queues calls the application has not picked up yet (grpc.aio asks for one call at a time, so a
# burst waits there) and, past 1,000 queued, cancels them at random (random early drop up to a hard 3,000):
# 2,000 streams opened at once on one channel lost ~10% to a bare CANCELLED. The queue is only a burst
# buffer; the bound that refuses is StreamLimiter's, with a clear RESOURCE_EXHAUSTED. Queued calls cost core
# memory until picked up, so the queue stays bounded, at a size a burst of the stream bound always fits.
MIN_PENDING_CALLS = 10_000


def server_options(max_concurrent_streams: int) -> list[tuple[str, int]]:
    pending = max(MIN_PENDING_CALLS, 2 * max_concurrent_streams)
    return [
        *SERVER_OPTIONS,
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", pending),
    ]


class StreamLimiter:
    """Bounds the streaming calls open in this process; the one past the bound is refused at once.

    A stream holds a task and its buffers for as long as the client keeps it open, so an unbounded number is
    a memory bound left to clients. grpc.aio's own `maximum_concurrent_rpcs` would make excess calls wait in
    core's queue (and be cancelled there), not refuse them.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        behavior: Callable[..., Any] | None = handler.unary_stream or handler.stream_stream
        if behavior is None:
            return handler
        limiter = self

        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if limiter.open >= limiter.limit:
                raise errors.ResourceExhausted(
                    f"this server already has {limiter.limit} streams open, its limit "
                    "(GRPC_MAX_CONCURRENT_STREAMS); retry later",
                    "TOO_MANY_STREAMS",
                    limit=str(limiter.limit),
                )
            limiter.open += 1
            try:
                if inspect.isasyncgenfunction(behavior):
                    async for item in behavior(request, context):
                        yield item
                else:
                    await behavior(request, context)
            finally:
                limiter.open -= 1

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(call, **kwargs)
        return grpc.stream_stream_rpc_method_handler(call, **kwargs)


class _Registrar:
    """Stands in for the server while generated code registers a service, and wraps each handler once.

    Generated `add_*_to_server` registers the same handlers twice: as a generic handler and by name. The
    instrumented handlers are registered both ways too; the uninstrumented generic one is dropped.

    Why this and not a grpc.aio.ServerInterceptor: an interceptor runs per call and must rebuild the handler on
    every call (intercept_service gets the continuation, not the handler), which costs on the hot path the
    benchmarks measure (GetAgent against the echo ceiling); wrapping once at registration costs nothing per call.
    Why not build the handlers ourselves from the descriptors: that re-implements what the generated code (pinned
    with grpcio-tools to this grpcio) already does, and would drift from it silently. The cost of this choice is a
    dependence on the two calls generated code makes, so it is checked, loudly: `GrpcServer.add` fails unless
    every method of the service's descriptor came through here, and tests/common/test_runtime.py calls every
    method of every service and checks each one is counted (an uninstrumented path would not be).
    """

    def __init__(self, server: grpc.aio.Server, streams: StreamLimiter) -> None:
        self._server = server
        self._streams = streams
        self.registered: dict[str, set[str]] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        return None

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        # The limiter inside the instrumentation: a refused stream is counted and mapped like any error.
        wrapped = {
            name: instrument(f"/{service_name}/{name}", self._streams.wrap(h)) for name, h in method_handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, wrapped),))
        self._server.add_registered_method_handlers(service_name, wrapped)
        self.registered.setdefault(service_name, set()).update(method_handlers)

    def __getattr__(self, name: str) -> Any:
        # Generated code calling anything else on the server is a registration path this class does not know.
        raise RuntimeError(
            f"generated code called server.{name}, which _Registrar does not instrument; grpcio's generated code "
            "changed: update agentvault.common.server._Registrar"
        )


def _check_registered(service_name: str, methods: set[str]) -> None:
    """Every method the service's descriptor declares must have come through the registrar (and so be wrapped)."""
    try:
        declared = {m.name for m in descriptor_pool.Default().FindServiceByName(service_name).methods}
    except KeyError:
        raise RuntimeError(f"{service_name} is not a known gRPC service (is its *_pb2 module imported?)") from None
    if methods != declared:
        raise RuntimeError(
            f"{service_name} registered {sorted(methods)} but declares {sorted(declared)}: some methods would not be "
            "instrumented; regenerate the stubs (make proto) or update agentvault.common.server._Registrar"
        )


class GrpcServer:
    """A grpc.aio server with the stock health servicer and reflection, stopped cleanly on SIGTERM."""

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self.server = grpc.aio.server(options=server_options(settings.max_concurrent_streams))
        self.streams = StreamLimiter(settings.max_concurrent_streams)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self.port = 0
        self._stopped = asyncio.Event()
        self._store_watch: asyncio.Task[None] | None = None

    def add(self, service_name: str, register: Callable[[grpc.aio.Server], None]) -> None:
        """Registers a service through its generated `add_*_to_server`, every handler instrumented."""
        registrar = _Registrar(self.server, self.streams)
        register(registrar)  # type: ignore[arg-type]
        if service_name not in registrar.registered:
            raise RuntimeError(f"{service_name} did not register its methods; regenerate the stubs (make proto)")
        for name, methods in registrar.registered.items():
            _check_registered(name, methods)
            if name not in self._service_names:
                self._service_names.append(name)

    def serve(self, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        """Registers `servicer` with its generated `add_*Servicer_to_server`, e.g.
        `server.serve(registry_service_pb2_grpc.add_RegistryServiceServicer_to_server, servicer)`."""
        registrar = _Registrar(self.server, self.streams)
        add_to_server(servicer, registrar)
        if not registrar.registered:
            raise RuntimeError(f"{add_to_server.__name__} registered no service; regenerate the stubs (make proto)")
        for name, methods in registrar.registered.items():
            _check_registered(name, methods)
            if name not in self._service_names:
                self._service_names.append(name)

    @property
    def service_names(self) -> tuple[str, ...]:
        return tuple(self._service_names)

    def add_secure_port(self, port: int, credentials: grpc.ServerCredentials) -> int:
        """An extra TLS listener (e.g. for peer meshes over mutual TLS); call before start()."""
        bound = self.server.add_secure_port(f"{self.settings.bind_host}:{port}", credentials)
        if bound == 0:
            raise RuntimeError(f"cannot bind TLS port {self.settings.bind_host}:{port}")
        return int(bound)

    async def start(self, credentials: grpc.ServerCredentials | None = None) -> int:
        reflection.enable([*self._service_names, health.SERVICE_NAME], self.server)
        address = f"{self.settings.bind_host}:{self.settings.port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {address}")
        await self.server.start()
        for name in ("", LIVENESS_SERVICE, *self._service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.database_url or self.settings.redis_url:
            watch = StoreWatch(
                self.settings.database_url,
                self.settings.redis_url,
                self._stores_changed,
                self.settings.store_check_interval,
            )
            self._store_watch = asyncio.create_task(watch.run(), name="store-watch")
        log.info("%s listening", self.settings.service, extra={"port": self.port, "services": self._service_names})
        return self.port

    async def _stores_changed(self, healthy: bool, problem: str) -> None:
        """Readiness follows the stores: NOT_SERVING while PostgreSQL or Redis does not answer."""
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self._service_names):
            await self.health.set(name, status)

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._store_watch is not None:
            self._store_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._store_watch
        # Readiness probes see NOT_SERVING first; in-flight calls get the grace period to finish.
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_seconds)

    async def wait_for_signal(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(self.server.wait_for_termination())
        signalled = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, signalled}, return_when=asyncio.FIRST_COMPLETED)
        log.info("%s shutting down", self.settings.service)
        await self.stop()
        for task in (waiter, signalled):
            task.cancel()


def run(
    settings: CommonSettings,
    serve: Callable[[GrpcServer], Awaitable[Iterable[Callable[[], Awaitable[None]]]]],
) -> None:
    """Runs a service: `serve` registers servicers and returns cleanup callbacks run after shutdown."""
    configure_logging(settings.service, settings.log_level, settings.log_format)
    configure_tracing(settings.service)
    serve_metrics(settings.metrics_port, settings.bind_host)

    async def main() -> None:
        server = GrpcServer(settings)
        cleanups = list(await serve(server))
        try:
            await server.start()
            await server.wait_for_signal()
        finally:
            for cleanup in reversed(cleanups):
                await cleanup()

    try:
        run_loop(main())
    except SettingsError as exc:
        # Configuration found bad while starting (a file, a key): one clear line, not a traceback.
        sys.exit(f"{settings.service}: {exc}")


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Runs `main` on uvloop where it exists (not on Windows), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is absent only on Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


class ServiceSettings(Protocol):
    """What run_service needs of a service's settings: the part every service shares."""

    @property
    def common(self) -> CommonSettings: ...


S = TypeVar("S", bound=ServiceSettings)


def background(stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Starts `work` as a task that is cancelled (and awaited) when `stack` closes, i.e. after shutdown."""
    task = asyncio.create_task(work, name=name)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)
    return task


def run_service(
    module: str,
    load: Callable[[], S],
    build: Callable[[S, GrpcServer, contextlib.AsyncExitStack], Awaitable[None]],
) -> None:
    """The whole `main` of a gRPC service: settings, then `build`, then serve until SIGTERM, then clean up.

    `module` is the service's package (a __main__'s `__package__`), which names its entry in
    agentvault.common.services. `build(settings, server, stack)` opens what the service needs, registering each
    closer on `stack` (closed in reverse order after the server has stopped) and its servicers on `server`;
    the service refuses to start unless it served exactly the gRPC services its entry lists.
    """
    spec = service_of_module(module)
    try:
        settings = load()
    except SettingsError as exc:
        sys.exit(f"{spec.name}: {exc}")

    async def serve(server: GrpcServer) -> list[Callable[[], Awaitable[None]]]:
        stack = contextlib.AsyncExitStack()
        try:
            await build(settings, server, stack)
            if set(server.service_names) != set(spec.proto_services):
                raise RuntimeError(
                    f"{spec.name} serves {sorted(server.service_names)} but agentvault.common.services lists "
                    f"{sorted(spec.proto_services)}: update one of them"
                )
        except BaseException:
            await stack.aclose()
            raise
        return [stack.aclose]

    run(settings.common, serve)
