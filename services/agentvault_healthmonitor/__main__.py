"""Entry point of the health-monitor process: `agentvault-health-monitor`."""

from __future__ import annotations

import contextlib
import logging
from importlib.resources import files

import grpc

from agentvault.common import db
from agentvault.common.peers import client_credentials
from agentvault.common.redis import create_redis
from agentvault.common.remote_auth import AdminGate, registry_validator
from agentvault.common.revocations import RevocationWatcher
from agentvault.common.server import GrpcServer, background, run_service
from agentvault.common.token_source import GrpcTokenSource
from agentvault.healthmonitor.v1 import health_monitor_service_pb2_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc
from agentvault_healthmonitor.checks import Prober
from agentvault_healthmonitor.events import EventHub
from agentvault_healthmonitor.monitor import Monitor
from agentvault_healthmonitor.registry import RegistryClient
from agentvault_healthmonitor.servicer import HealthMonitorServicer
from agentvault_healthmonitor.settings import HealthMonitorSettings
from agentvault_healthmonitor.store import Store

log = logging.getLogger(__name__)


async def build(settings: HealthMonitorSettings, server: GrpcServer, stack: contextlib.AsyncExitStack) -> None:
    pool = await db.create_pool(settings.database_url, max_size=settings.db_pool_size)
    stack.push_async_callback(pool.close)
    await db.migrate(pool, "health-monitor", files("agentvault_healthmonitor") / "migrations")
    store = Store(pool)
    hub = EventHub(settings.redis_url, settings.events_channel)
    stack.push_async_callback(hub.close)
    # Two channels to the registry: a plain one for the token calls and for resolving this service's own callers
    # (with their credential), and RegistryClient's, where every call carries this service's token
    # (svc-health-monitor: agents:read, agents:connect, federation:resolve, health:report), never the bootstrap
    # admin token.
    plain = grpc.aio.insecure_channel(settings.registry_addr)
    stack.push_async_callback(plain.close)
    identity = GrpcTokenSource(
        plain, settings.registry_addr, settings.identity.client_id, settings.identity.client_secret
    )
    registry = RegistryClient(settings.registry_addr, identity, settings.box)
    stack.push_async_callback(registry.close)
    tls = client_credentials(settings.tls) if settings.tls else None
    prober = Prober(
        settings.check_timeout,
        settings.discovery_ttl,
        tls,
        settings.concurrency,
        settings.block_private_agent_urls,
        agent_tls=settings.tls,
        resolve_auth=registry.agent_auth,
    )
    stack.push_async_callback(prober.close)
    monitor = Monitor(settings, store, prober, registry, hub)
    # Access tokens are validated here, against the registry's JWKS and the revocations mirrored from Redis.
    redis = create_redis(settings.redis_url)
    stack.push_async_callback(redis.aclose)
    revoked = RevocationWatcher(redis)
    background(stack, revoked.run(), "oauth-revocations")
    jwt = registry_validator(plain, revoked.is_revoked)
    gate = AdminGate(registry_service_pb2_grpc.RegistryServiceStub(plain), None, jwt=jwt)
    servicer = HealthMonitorServicer(store, monitor, hub, gate, settings.summary_window_seconds, settings.interval)
    server.serve(health_monitor_service_pb2_grpc.add_HealthMonitorServiceServicer_to_server, servicer)
    # Stopped first, after the server: no check runs against a closed prober or pool.
    background(stack, hub.run(), "health-events")
    background(stack, monitor.run(), "health-monitor")
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


def main() -> None:
    run_service("agentvault_healthmonitor", HealthMonitorSettings.load, build)


if __name__ == "__main__":
    main()
