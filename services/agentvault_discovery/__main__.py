"""Entry point of the discovery-aggregator process: `agentvault-discovery`."""

from __future__ import annotations

import contextlib
import logging
from importlib.resources import files

import aiohttp
import grpc

from agentvault.common import db
from agentvault.common.redis import create_redis
from agentvault.common.remote_auth import registry_validator
from agentvault.common.revocations import RevocationWatcher
from agentvault.common.server import GrpcServer, background, run_service
from agentvault.common.services import SECRET_VAR
from agentvault.common.token_source import BearerInterceptor, GrpcTokenSource
from agentvault.discovery.v1 import discovery_service_pb2_grpc
from agentvault.federation.v1 import federation_service_pb2_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc
from agentvault_discovery.federator import Federator, PeerDirectory
from agentvault_discovery.servicer import DiscoveryServicer
from agentvault_discovery.settings import DiscoverySettings
from agentvault_discovery.store import BackgroundWriter, Store

log = logging.getLogger(__name__)


async def build(settings: DiscoverySettings, server: GrpcServer, stack: contextlib.AsyncExitStack) -> None:
    pool = await db.create_pool(settings.database_url, max_size=settings.db_pool_size)
    stack.push_async_callback(pool.close)
    await db.migrate(pool, "discovery", files("agentvault_discovery") / "migrations")
    redis = create_redis(settings.redis_url)
    stack.push_async_callback(redis.aclose)
    registry_channel = grpc.aio.insecure_channel(settings.registry_addr)
    stack.push_async_callback(registry_channel.close)
    store = Store(pool)
    writer = BackgroundWriter(store)
    writer.start()
    stack.push_async_callback(writer.stop)
    # One HTTP client for the process: peers' connections are pooled and kept alive across searches.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, limit_per_host=16, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.query_timeout_seconds),
        trust_env=False,
    )
    stack.push_async_callback(session.close)
    federator = None
    if settings.federation_active:
        assert settings.identity is not None
        # This service's own identity (svc-discovery, federation:resolve), its token fetched from the registry's
        # IdentityService over the plain channel; its own calls go on a second channel that adds the token, while
        # searches forward their caller's credential on the plain one.
        identity = GrpcTokenSource(
            registry_channel,
            settings.registry_addr,
            settings.identity.client_id,
            settings.identity.client_secret,
        )
        own_channel = grpc.aio.insecure_channel(settings.registry_addr, interceptors=[BearerInterceptor(identity)])
        stack.push_async_callback(own_channel.close)
        directory = PeerDirectory(federation_service_pb2_grpc.PeerServiceStub(own_channel), identity, settings)
        federator = Federator(settings, directory, redis, writer, session)
        stack.push_async_callback(federator.close)
    elif settings.federation_enabled:
        missing = "FEDERATION_ENCRYPTION_KEYS" if settings.box is None else SECRET_VAR
        log.warning("federated search is off: %s is not set, so peers' credentials cannot be used", missing)
    registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
    # Access tokens are validated here, against the registry's JWKS and the revocations mirrored from Redis.
    revoked = RevocationWatcher(redis)
    background(stack, revoked.run(), "oauth-revocations")
    jwt = registry_validator(registry_channel, revoked.is_revoked)
    servicer = DiscoveryServicer(settings, registry, federator, store, registry_channel, redis, jwt=jwt)
    server.serve(discovery_service_pb2_grpc.add_DiscoveryServiceServicer_to_server, servicer)


def main() -> None:
    run_service("agentvault_discovery", DiscoverySettings.load, build)


if __name__ == "__main__":
    main()
