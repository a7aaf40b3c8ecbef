"""Entry point of the discovery-aggregator process: `agentvault-discovery`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable, Iterable
from importlib.resources import files

import aiohttp
import grpc

from agentvault.common import db
from agentvault.common.redis import create_redis
from agentvault.common.server import GrpcServer, run
from agentvault.common.settings import SettingsError
from agentvault.discovery.v1 import discovery_service_pb2, discovery_service_pb2_grpc
from agentvault.federation.v1 import federation_service_pb2_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc
from agentvault_discovery.federator import Federator, PeerDirectory
from agentvault_discovery.servicer import DiscoveryServicer
from agentvault_discovery.settings import DiscoverySettings
from agentvault_discovery.store import BackgroundWriter, Store

SERVICE_NAME = discovery_service_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name
log = logging.getLogger(__name__)


def main() -> None:
    try:
        settings = DiscoverySettings.load()
    except SettingsError as exc:
        sys.exit(f"discovery: {exc}")

    async def serve(server: GrpcServer) -> Iterable[Callable[[], Awaitable[None]]]:
        pool = await db.create_pool(settings.database_url, max_size=settings.db_pool_size)
        await db.migrate(pool, "discovery", files("agentvault_discovery") / "migrations")
        redis = create_redis(settings.redis_url)
        store = Store(pool)
        writer = BackgroundWriter(store)
        writer.start()
        registry_channel = grpc.aio.insecure_channel(settings.registry_addr)
        registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
        # One HTTP client for the process: peers' connections are pooled and kept alive across searches.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=16, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.query_timeout_seconds),
            trust_env=False,
        )
        federator = None
        if settings.federation_active:
            directory = PeerDirectory(federation_service_pb2_grpc.PeerServiceStub(registry_channel), settings)
            federator = Federator(settings, directory, redis, writer, session)
        elif settings.federation_enabled:
            missing = "FEDERATION_ENCRYPTION_KEYS" if settings.box is None else "AGENTVAULT_ADMIN_TOKEN"
            log.warning("federated search is off: %s is not set, so peers' credentials cannot be used", missing)
        servicer = DiscoveryServicer(settings, registry, federator, store, registry_channel, redis)
        server.add(
            SERVICE_NAME, lambda s: discovery_service_pb2_grpc.add_DiscoveryServiceServicer_to_server(servicer, s)
        )

        async def close() -> None:
            if federator is not None:
                await federator.close()
            await session.close()
            await writer.stop()
            await registry_channel.close()
            await pool.close()
            await redis.aclose()

        return [close]

    run(settings.common, serve)


if __name__ == "__main__":
    main()
