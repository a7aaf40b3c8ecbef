"""Entry point of the registry process: `agentvault-registry`."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterable
from importlib.resources import files

from agentvault.common import db
from agentvault.common.redis import create_redis
from agentvault.common.server import GrpcServer, run
from agentvault.common.settings import SettingsError
from agentvault.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from agentvault_registry.auth import Authenticator
from agentvault_registry.servicer import RegistryServicer
from agentvault_registry.settings import RegistrySettings
from agentvault_registry.store import Store, init_connection

SERVICE_NAME = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


def main() -> None:
    try:
        settings = RegistrySettings.load()
    except SettingsError as exc:
        sys.exit(f"registry: {exc}")

    async def serve(server: GrpcServer) -> Iterable[Callable[[], Awaitable[None]]]:
        pool = await db.create_pool(settings.database_url, max_size=settings.db_pool_size, init=init_connection)
        await db.migrate(pool, "registry", files("agentvault_registry") / "migrations")
        redis = create_redis(settings.redis_url)
        store = Store(pool)
        servicer = RegistryServicer(store, Authenticator(store, settings.admin_token), redis.ping)
        server.add(SERVICE_NAME, lambda s: registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, s))

        async def close() -> None:
            await pool.close()
            await redis.aclose()

        return [close]

    run(settings.common, serve)


if __name__ == "__main__":
    main()
