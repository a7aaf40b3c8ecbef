"""Discovery-aggregator settings, read once from the environment."""

from __future__ import annotations

from dataclasses import dataclass

from agentvault.common.peers import TlsFiles, tls_files
from agentvault.common.secretbox import SecretBox
from agentvault.common.services import SECRET_VAR, ServiceCredentials
from agentvault.common.settings import CommonSettings, Env


@dataclass(frozen=True)
class DiscoverySettings:
    common: CommonSettings
    database_url: str
    redis_url: str
    registry_addr: str
    # This service's own OAuth client (SERVICE_CLIENT_ID/SECRET): its token authorizes ResolvePeers on the
    # registry. None when SERVICE_CLIENT_SECRET is unset: federated search is then off.
    identity: ServiceCredentials | None
    federation_enabled: bool
    cache_ttl_seconds: int
    query_timeout_seconds: float
    max_results_per_peer: int
    registry_name: str
    # Public base URL of this mesh, shown as registry_url on local results; empty when not configured.
    public_url: str
    # None when FEDERATION_ENCRYPTION_KEYS is unset: peers' keys cannot be read, so federation is off.
    box: SecretBox | None
    tls: TlsFiles | None
    max_peer_response_bytes: int
    max_local_results: int
    peer_list_ttl_seconds: float
    db_pool_size: int
    # Memory every in-process memo together may use (peers' answers, scored and merged results).
    memo_budget_bytes: int
    # How long a peer's sharing generation is trusted before a cached answer of it is revalidated: the longest an
    # agent the peer stopped sharing can still be shown here (plus one call).
    revalidate_seconds: float
    # force_refresh searches one (non-admin) principal may make per minute.
    force_refresh_per_minute: int

    @property
    def federation_active(self) -> bool:
        return self.federation_enabled and self.box is not None and self.identity is not None

    @classmethod
    def load(cls, env: Env | None = None) -> DiscoverySettings:
        env = env or Env()
        common = CommonSettings.load("discovery", "DISCOVERY_PORT", env)
        keys = env.optional("FEDERATION_ENCRYPTION_KEYS")
        return cls(
            common=common,
            database_url=common.require_database(),
            redis_url=common.require_redis(),
            registry_addr=env.addr("REGISTRY_ADDR", "REGISTRY_PORT"),
            identity=ServiceCredentials.load("discovery", env) if env.optional(SECRET_VAR) else None,
            federation_enabled=env.bool("FEDERATION_ENABLED", True),
            cache_ttl_seconds=env.int("FEDERATION_CACHE_TTL", 300, minimum=0, maximum=86_400),
            query_timeout_seconds=env.int("FEDERATION_QUERY_TIMEOUT", 5000, minimum=1, maximum=120_000) / 1000,
            max_results_per_peer=env.int("FEDERATION_MAX_RESULTS_PER_PEER", 50, minimum=1, maximum=500),
            registry_name=env.str("FEDERATION_REGISTRY_NAME", "agentvault")[:255],
            public_url=env.str("AGENTVAULT_PUBLIC_URL", "").rstrip("/"),
            box=SecretBox.from_env(env) if keys else None,
            tls=tls_files(env),
            max_peer_response_bytes=env.int(
                "FEDERATION_MAX_RESPONSE_BYTES", 1024 * 1024, minimum=16 * 1024, maximum=64 * 1024 * 1024
            ),
            max_local_results=env.int("DISCOVERY_MAX_LOCAL_RESULTS", 500, minimum=1, maximum=500),
            peer_list_ttl_seconds=env.float("DISCOVERY_PEER_LIST_TTL", 1.5, minimum=0),
            db_pool_size=env.int("DISCOVERY_DB_POOL_SIZE", 5, minimum=1, maximum=100),
            memo_budget_bytes=env.int("DISCOVERY_MEMO_BYTES", 64 * 1024 * 1024, minimum=1024 * 1024),
            revalidate_seconds=env.int("FEDERATION_REVALIDATE_INTERVAL", 2000, minimum=0, maximum=60_000) / 1000,
            force_refresh_per_minute=env.int("DISCOVERY_FORCE_REFRESH_PER_MINUTE", 10, minimum=0, maximum=100_000),
        )
