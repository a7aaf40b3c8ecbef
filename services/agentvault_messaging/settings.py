"""Messaging settings, read once from the environment."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from agentvault.common.peers import TlsFiles, tls_files
from agentvault.common.secretbox import SecretBox
from agentvault.common.services import ServiceCredentials
from agentvault.common.settings import CommonSettings, Env, SettingsError
from agentvault_messaging.model import DEFAULT_MAX_BYTES

MIN_WEBHOOK_KEY = 32


@dataclass(frozen=True)
class MessagingSettings:
    common: CommonSettings
    database_url: str
    redis_url: str
    registry_addr: str
    # This service's own OAuth client: reads agents (agents:read), their credentials (agents:connect), follows the
    # policies (policies:read) and asks the control plane (policies:enforce).
    identity: ServiceCredentials
    # Decrypts agents' secrets (their API keys, OAuth client secrets) for delivery; without it only agents without
    # a secret can be pushed to.
    box: SecretBox | None
    tls: TlsFiles | None
    # The mesh's name, as the policy engine sees callers of this mesh.
    mesh: str
    max_message_bytes: int
    # Deliveries of one message before it is dead-lettered (inbox: receives without an ack; push: attempts).
    max_attempts: int
    # A push message still undelivered this long after it was sent is dead-lettered.
    max_age_seconds: float
    retry_base_seconds: float
    retry_max_seconds: float
    # One push attempt, all of it.
    delivery_timeout: float
    delivery_concurrency: int
    # Consecutive failures of one endpoint that open its circuit, and how long it stays open.
    breaker_failures: int
    breaker_seconds: float
    # Finished messages (acknowledged, failed, dead-lettered, expired, refused) are deleted after this.
    retention_seconds: float
    block_private_agent_urls: bool
    # The key the per-agent webhook signing secrets are derived from (Standard Webhooks).
    webhook_key: bytes
    # Sessions (sessions.py): the key handoffs are signed with, a state document's bound, an offer's longest life.
    session_key: bytes
    session_max_bytes: int
    handoff_max_seconds: int
    log_allows: bool
    db_pool_size: int
    # How often inbox streams and workers look at the database when no wake-up came (Redis down, a lost event).
    poll_seconds: float
    # Messages sent open (streaming): all their parts together, how many, and how long one may stay idle.
    stream_max_bytes: int
    stream_max_parts: int
    stream_idle_seconds: float

    def signing_secret(self, agent_id: str) -> bytes:
        """The Standard Webhooks secret of one agent: derived, so nothing per agent is stored."""
        return hashlib.blake2b(agent_id.encode(), key=self.webhook_key, digest_size=32, person=b"av-webhook").digest()

    @classmethod
    def load(cls, env: Env | None = None) -> MessagingSettings:
        env = env or Env()
        common = CommonSettings.load("messaging", "MESSAGING_PORT", env)
        keys = env.optional("FEDERATION_ENCRYPTION_KEYS")
        identity = ServiceCredentials.load("messaging", env)
        webhook_key = env.str("MESSAGING_WEBHOOK_KEY", "").strip()
        if webhook_key and len(webhook_key) < MIN_WEBHOOK_KEY:
            raise SettingsError(f"MESSAGING_WEBHOOK_KEY must be at least {MIN_WEBHOOK_KEY} characters")
        # Unset: derived from the service's own secret, so a deployment has one secret less to manage (rotating
        # that secret then rotates every agent's webhook secret too).
        key = (
            webhook_key.encode()
            or hashlib.blake2b(identity.client_secret.encode(), digest_size=32, person=b"av-webhook-key").digest()
        )
        return cls(
            common=common,
            database_url=common.require_database(),
            redis_url=common.require_redis(),
            registry_addr=env.addr("REGISTRY_ADDR", "REGISTRY_PORT"),
            identity=identity,
            box=SecretBox.from_env(env) if keys else None,
            tls=tls_files(env),
            mesh=env.str("FEDERATION_REGISTRY_NAME", "agentvault")[:255],
            max_message_bytes=env.int(
                "MESSAGING_MAX_MESSAGE_BYTES", DEFAULT_MAX_BYTES, minimum=1024, maximum=3 * 1024 * 1024
            ),
            max_attempts=env.int("MESSAGING_MAX_ATTEMPTS", 8, minimum=1, maximum=1000),
            max_age_seconds=env.float("MESSAGING_MAX_AGE_SECONDS", 86_400.0, minimum=1),
            retry_base_seconds=env.float("MESSAGING_RETRY_BASE_SECONDS", 0.5, minimum=0.01),
            retry_max_seconds=env.float("MESSAGING_RETRY_MAX_SECONDS", 300.0, minimum=0.01),
            delivery_timeout=env.float("MESSAGING_DELIVERY_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            delivery_concurrency=env.int("MESSAGING_DELIVERY_CONCURRENCY", 64, minimum=1, maximum=10_000),
            breaker_failures=env.int("MESSAGING_BREAKER_FAILURES", 5, minimum=1, maximum=1000),
            breaker_seconds=env.float("MESSAGING_BREAKER_SECONDS", 30.0, minimum=0.1),
            retention_seconds=env.float("MESSAGING_RETENTION_SECONDS", 7 * 86_400.0, minimum=60),
            block_private_agent_urls=env.bool("MESSAGING_BLOCK_PRIVATE_AGENT_URLS", False),
            webhook_key=key,
            session_key=_session_key(env, key),
            session_max_bytes=env.int(
                "MESSAGING_SESSION_MAX_BYTES", 2 * 1024 * 1024, minimum=1024, maximum=64 * 1024 * 1024
            ),
            handoff_max_seconds=env.int("MESSAGING_HANDOFF_MAX_SECONDS", 3600, minimum=1, maximum=7 * 86_400),
            log_allows=env.bool("POLICY_DECISION_LOG_ALLOWS", True),
            db_pool_size=env.int("MESSAGING_DB_POOL_SIZE", 20, minimum=2, maximum=200),
            poll_seconds=env.float("MESSAGING_POLL_SECONDS", 1.0, minimum=0.05),
            stream_max_bytes=env.int(
                "MESSAGING_STREAM_MAX_BYTES", 16 * 1024 * 1024, minimum=1024, maximum=1024 * 1024 * 1024
            ),
            stream_max_parts=env.int("MESSAGING_STREAM_MAX_PARTS", 10_000, minimum=64, maximum=1_000_000),
            stream_idle_seconds=env.float("MESSAGING_STREAM_IDLE_SECONDS", 300.0, minimum=1.0),
        )


def _session_key(env: Env, webhook_key: bytes) -> bytes:
    """MESSAGING_SESSION_KEY, or one derived from the webhook key (itself derived when unset): every replica of the
    mesh signs and verifies handoffs alike, and no key is stored."""
    given = env.str("MESSAGING_SESSION_KEY", "").strip()
    if given and len(given) < MIN_WEBHOOK_KEY:
        raise SettingsError(f"MESSAGING_SESSION_KEY must be at least {MIN_WEBHOOK_KEY} characters")
    return given.encode() or hashlib.blake2b(webhook_key, digest_size=32, person=b"av-session-key").digest()
