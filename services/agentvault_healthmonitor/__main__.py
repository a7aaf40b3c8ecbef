"""Entry point of the health-monitor process: `python -m agentvault_healthmonitor`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable
from importlib.resources import files

from agentvault.common import db
from agentvault.common.peers import client_credentials
from agentvault.common.remote_auth import AdminGate
from agentvault.common.server import GrpcServer, run
from agentvault.common.settings import SettingsError
from agentvault.healthmonitor.v1 import health_monitor_service_pb2, health_monitor_service_pb2_grpc
from agentvault_healthmonitor.checks import Prober
from agentvault_healthmonitor.events import EventHub
from agentvault_healthmonitor.monitor import Monitor
from agentvault_healthmonitor.registry import RegistryClient
from agentvault_healthmonitor.servicer import HealthMonitorServicer
from agentvault_healthmonitor.settings import HealthMonitorSettings
from agentvault_healthmonitor.store import Store

SERVICE_NAME = health_monitor_service_pb2.DESCRIPTOR.services_by_name["HealthMonitorService"].full_name
log = logging.getLogger(__name__)


def main() -> None:
    try:
        settings = HealthMonitorSettings.load()
    except SettingsError as exc:
        sys.exit(f"health-monitor: {exc}")

    async def serve(server: GrpcServer) -> Iterable[Callable[[], Awaitable[None]]]:
        pool = await db.create_pool(settings.database_url, max_size=settings.db_pool_size)
        await db.migrate(pool, "health-monitor", files("agentvault_healthmonitor") / "migrations")
        store = Store(pool)
        tls = client_credentials(settings.tls) if settings.tls else None
        prober = Prober(
            settings.check_timeout, settings.discovery_ttl, tls, settings.concurrency, settings.block_private_agent_urls
        )
        registry = RegistryClient(settings.registry_addr, settings.admin_token, settings.box)
        hub = EventHub(settings.redis_url, settings.events_channel)
        monitor = Monitor(settings, store, prober, registry, hub)
        gate = AdminGate(registry.registry_stub, settings.admin_token)
        servicer = HealthMonitorServicer(store, monitor, hub, gate, settings.summary_window_seconds, settings.interval)
        server.add(
            SERVICE_NAME,
            lambda s: health_monitor_service_pb2_grpc.add_HealthMonitorServiceServicer_to_server(servicer, s),
        )
        background = [
            asyncio.create_task(hub.run(), name="health-events"),
            asyncio.create_task(monitor.run(), name="health-monitor"),
        ]
        log.info(
            "health monitor started",
            extra={
                "replica": settings.replica_id,
                "interval": settings.interval,
                "threshold": settings.unhealthy_threshold,
                "timeout": settings.check_timeout,
                "concurrency": settings.concurrency,
            },
        )

        async def close() -> None:
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await prober.close()
            await registry.close()
            await hub.close()
            await pool.close()

        return [close]

    run(settings.common, serve)


if __name__ == "__main__":
    main()
