"""Health-monitor settings, read once from the environment into a frozen object."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass

from agentvault.common.peers import TlsFiles, tls_files
from agentvault.common.secretbox import ENV_VAR, SecretBox
from agentvault.common.services import ServiceCredentials
from agentvault.common.settings import CommonSettings, Env, SettingsError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(env: Env, name: str, default: float, minimum: float) -> float:
    """Seconds, or a number with a unit suffix: `604800`, `90m`, `12h`, `7d`."""
    raw = env.str(name, "").strip().lower()
    if not raw:
        return default
    scale = _UNITS.get(raw[-1])
    number = raw[:-1] if scale else raw
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise SettingsError(f"{name} must be seconds or a number with s/m/h/d, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum:g} seconds, got {raw!r}")
    return value


@dataclass(frozen=True)
class HealthMonitorSettings:
    common: CommonSettings
    database_url: str
    redis_url: str
    registry_addr: str
    # This service's own OAuth client (SERVICE_CLIENT_ID/SECRET), with which it reads and reports to the registry.
    identity: ServiceCredentials
    # Optional: checks never send a peer's key, so without it peers are still checked (keys left encrypted).
    box: SecretBox | None
    tls: TlsFiles | None
    # Seconds between two checks of one subject (seed: FEDERATION_HEALTH_CHECK_INTERVAL=60).
    interval: float
    # Consecutive failures before a subject is down (seed: FEDERATION_UNHEALTHY_THRESHOLD=3).
    unhealthy_threshold: int
    # Deadline of one check, discovery included.
    check_timeout: float
    # Checks in flight at once, per replica.
    concurrency: int
    history_retention_seconds: float
    summary_window_seconds: int
    # How long a peer's learned protocol (discovery document) is reused.
    discovery_ttl: float
    check_agents: bool
    # Agents' health-check URLs come from any member; link-local, multicast and reserved addresses are always
    # refused, and private/loopback ones too when this is set (for meshes whose agents are all public).
    block_private_agent_urls: bool
    replica_id: str
    db_pool_size: int
    events_channel: str

    @classmethod
    def load(cls, env: Env | None = None) -> HealthMonitorSettings:
        env = env or Env()
        common = CommonSettings.load("health-monitor", "HEALTH_MONITOR_PORT", env)
        default_replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        return cls(
            common=common,
            database_url=common.require_database(),
            redis_url=common.require_redis(),
            registry_addr=env.addr("REGISTRY_ADDR", "REGISTRY_PORT"),
            identity=ServiceCredentials.load("health-monitor", env),
            box=SecretBox.from_env(env) if env.optional(ENV_VAR) else None,
            tls=tls_files(env),
            interval=env.float("FEDERATION_HEALTH_CHECK_INTERVAL", 60.0, minimum=0.1),
            unhealthy_threshold=env.int("FEDERATION_UNHEALTHY_THRESHOLD", 3, minimum=1, maximum=1000),
            check_timeout=env.float("HEALTH_CHECK_TIMEOUT", 5.0, minimum=0.01),
            concurrency=env.int("HEALTH_CHECK_CONCURRENCY", 100, minimum=1, maximum=10_000),
            history_retention_seconds=duration(env, "HEALTH_HISTORY_RETENTION", 7 * 86400.0, minimum=60),
            summary_window_seconds=env.int("HEALTH_SUMMARY_WINDOW", 86400, minimum=60, maximum=30 * 86400),
            discovery_ttl=env.float("HEALTH_DISCOVERY_TTL", 300.0, minimum=0),
            check_agents=env.bool("HEALTH_CHECK_AGENTS", True),
            block_private_agent_urls=env.bool("HEALTH_CHECK_BLOCK_PRIVATE_AGENT_URLS", False),
            replica_id=env.str("HEALTH_MONITOR_REPLICA_ID", default_replica)[:128],
            db_pool_size=env.int("HEALTH_MONITOR_DB_POOL_SIZE", 10, minimum=2, maximum=200),
            events_channel=env.str("HEALTH_EVENTS_CHANNEL", "health:events"),
        )
