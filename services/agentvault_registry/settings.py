"""Registry settings, read once from the environment."""

from __future__ import annotations

from dataclasses import dataclass, field

from agentvault.common.peers import TlsFiles, tls_files
from agentvault.common.services import SECRETS_VAR, parse_service_secrets
from agentvault.common.settings import CommonSettings, Env


@dataclass(frozen=True)
class FederationSettings:
    """The seed's FEDERATION_* variables that concern the peer-facing API, plus what it needs beside them."""

    enabled: bool
    registry_name: str
    public_grpc_endpoint: str
    max_results_per_peer: int
    require_signature: bool
    signature_max_age: int
    rate_limit_per_minute: int
    # Seconds a peer's credential is trusted from memory; revocation drops it at once on every replica that hears
    # of it, so this only bounds a revocation message lost in flight.
    credential_cache_ttl: float
    encryption_keys: str | None
    # Mutual TLS between meshes: a second listener, for peers, when certificate files are configured.
    tls: TlsFiles | None
    tls_port: int
    mtls_required: bool
    peers_file: str | None
    # This mesh's public base URL (its edge): what an invitation code names, and what a mesh redeeming another's
    # invitation tells it, so that the inviter can search it too.
    public_url: str = "http://127.0.0.1:8080"
    # Invitation redemptions a caller (by address) may attempt per minute: the redeem call needs no credential.
    invitation_rate_limit_per_minute: int = 30

    @classmethod
    def load(cls, env: Env, registry_port: int) -> FederationSettings:
        tls = tls_files(env)
        tls_port = env.int("FEDERATION_TLS_PORT", 50055, minimum=0, maximum=65535)
        # Peers are sent to the TLS listener when there is one.
        advertised = f"127.0.0.1:{tls_port if tls else registry_port}"
        return cls(
            enabled=env.bool("FEDERATION_ENABLED", True),
            registry_name=env.str("FEDERATION_REGISTRY_NAME", "agentvault")[:255],
            public_grpc_endpoint=env.str("FEDERATION_PUBLIC_GRPC_ENDPOINT", advertised),
            max_results_per_peer=env.int("FEDERATION_MAX_RESULTS_PER_PEER", 50, minimum=1, maximum=500),
            require_signature=env.bool("FEDERATION_REQUIRE_SIGNATURE", True),
            signature_max_age=env.int("FEDERATION_SIGNATURE_MAX_AGE", 300, minimum=1, maximum=86_400),
            rate_limit_per_minute=env.int("FEDERATION_RATE_LIMIT_PER_MINUTE", 600, minimum=1),
            credential_cache_ttl=env.float("FEDERATION_CREDENTIAL_CACHE_TTL", 30.0, minimum=0),
            encryption_keys=env.optional("FEDERATION_ENCRYPTION_KEYS"),
            tls=tls,
            tls_port=tls_port,
            mtls_required=env.bool("FEDERATION_MTLS_REQUIRED", True),
            peers_file=env.optional("FEDERATION_PEERS_FILE"),
            public_url=env.str("FEDERATION_PUBLIC_URL", env.str("OAUTH_ISSUER", "http://127.0.0.1:8080")).rstrip("/")[
                :500
            ],
            invitation_rate_limit_per_minute=env.int("FEDERATION_INVITATION_RATE_LIMIT_PER_MINUTE", 30, minimum=1),
        )


@dataclass(frozen=True)
class OAuthSettings:
    """The authorization server's OAUTH_* variables (durations in seconds, rate limits per minute)."""

    issuer: str
    audience: str
    access_token_ttl: int
    refresh_token_ttl: int
    key_rotation_seconds: int
    rate_limit_per_client: int
    rate_limit_per_source: int

    @classmethod
    def load(cls, env: Env) -> OAuthSettings:
        return cls(
            # The edge's public URL: the token endpoint is <issuer>/oauth/token (RFC 8414 3).
            issuer=env.str("OAUTH_ISSUER", "http://127.0.0.1:8080").rstrip("/")[:500],
            audience=env.str("OAUTH_AUDIENCE", "agentvault")[:255],
            access_token_ttl=env.int("OAUTH_ACCESS_TOKEN_TTL", 900, minimum=30, maximum=86_400),
            refresh_token_ttl=env.int("OAUTH_REFRESH_TOKEN_TTL", 30 * 86_400, minimum=60, maximum=365 * 86_400),
            key_rotation_seconds=env.int("OAUTH_KEY_ROTATION_SECONDS", 86_400, minimum=1),
            rate_limit_per_client=env.int("OAUTH_TOKEN_RATE_LIMIT_PER_CLIENT", 600, minimum=1),
            rate_limit_per_source=env.int("OAUTH_TOKEN_RATE_LIMIT_PER_SOURCE", 1200, minimum=1),
        )


@dataclass(frozen=True)
class RegistrySettings:
    common: CommonSettings
    database_url: str
    redis_url: str
    admin_token: str | None
    db_pool_size: int
    agent_cache_ttl: float
    agent_cache_size: int
    # Memory the agent, peer-answer and credential caches may use together (half, a quarter, a quarter).
    agent_cache_bytes: int
    federation: FederationSettings
    oauth: OAuthSettings
    # Service name -> the secret of its own OAuth client (SERVICE_CLIENT_SECRETS); upserted at start, hashed.
    service_secrets: dict[str, str] = field(repr=False, default_factory=dict)

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
            # Writes invalidate over pub/sub and a replica that loses its subscription stops serving from the
            # cache; the TTL only bounds a publish lost while every subscriber stayed connected.
            agent_cache_ttl=env.float("REGISTRY_AGENT_CACHE_TTL", 30.0, minimum=0),
            agent_cache_size=env.int("REGISTRY_AGENT_CACHE_SIZE", 10_000, minimum=1),
            agent_cache_bytes=env.int("REGISTRY_AGENT_CACHE_BYTES", 64 * 1024 * 1024, minimum=1024 * 1024),
            federation=FederationSettings.load(env, common.port),
            oauth=OAuthSettings.load(env),
            service_secrets=parse_service_secrets(env.str(SECRETS_VAR, "")),
        )
