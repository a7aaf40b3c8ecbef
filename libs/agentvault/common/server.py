"""The one gRPC server skeleton every service runs: grpc.aio, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentvault.common.interceptors import instrument
from agentvault.common.logs import configure_logging
from agentvault.common.metrics import serve_metrics
from agentvault.common.settings import CommonSettings, SettingsError
from agentvault.common.tracing import configure_tracing

log = logging.getLogger("agentvault.server")

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


class _Registrar:
    """Stands in for the server while generated code registers a service, and wraps each handler once.

    Generated `add_*_to_server` registers the same handlers twice: as a generic handler and by name. The
    instrumented handlers are registered both ways too; the uninstrumented generic one is dropped.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.registered: set[str] = set()

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        return None

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrapped = {name: instrument(f"/{service_name}/{name}", h) for name, h in method_handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, wrapped),))
        self._server.add_registered_method_handlers(service_name, wrapped)
        self.registered.add(service_name)


class GrpcServer:
    """A grpc.aio server with the stock health servicer and reflection, stopped cleanly on SIGTERM."""

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self.port = 0
        self._stopped = asyncio.Event()

    def add(self, service_name: str, register: Callable[[grpc.aio.Server], None]) -> None:
        """Registers a service through its generated `add_*_to_server`, every handler instrumented."""
        registrar = _Registrar(self.server)
        register(registrar)  # type: ignore[arg-type]
        if service_name not in registrar.registered:
            raise RuntimeError(f"{service_name} did not register its methods; regenerate the stubs (make proto)")
        self._service_names.append(service_name)

    def add_secure_port(self, port: int, credentials: grpc.ServerCredentials) -> int:
        """An extra TLS listener (e.g. for peer meshes over mutual TLS); call before start()."""
        bound = self.server.add_secure_port(f"{self.settings.bind_host}:{port}", credentials)
        if bound == 0:
            raise RuntimeError(f"cannot bind TLS port {self.settings.bind_host}:{port}")
        return int(bound)

    async def start(self, credentials: grpc.ServerCredentials | None = None) -> int:
        names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        address = f"{self.settings.bind_host}:{self.settings.port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {address}")
        await self.server.start()
        for name in ("", *self._service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s listening", self.settings.service, extra={"port": self.port, "services": names})
        return self.port

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
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
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is absent only on Windows
            asyncio.run(main())
        else:
            uvloop.run(main())
    except SettingsError as exc:
        # Configuration found bad while starting (a file, a key): one clear line, not a traceback.
        sys.exit(f"{settings.service}: {exc}")
