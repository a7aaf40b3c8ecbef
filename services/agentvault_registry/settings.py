"""Registry settings, read once from the environment."""

from __future__ import annotations

from dataclasses import dataclass

from agentvault.common.settings import CommonSettings, Env


@dataclass(frozen=True)
class RegistrySettings:
    common: CommonSettings
    database_url: str
    redis_url: str
    admin_token: str | None
    db_pool_size: int

    @classmethod
    def load(cls, env: Env | None = None) -> RegistrySettings:
        env = env or Env()
        common = CommonSettings.load("registry", "REGISTRY_PORT", env)
        return cls(
            common=common,
            database_url=common.require_database(),
            redis_url=common.require_redis(),
            admin_token=env.optional("AGENTVAULT_ADMIN_TOKEN"),
            db_pool_size=env.int("REGISTRY_DB_POOL_SIZE", 10, minimum=1, maximum=200),
        )
