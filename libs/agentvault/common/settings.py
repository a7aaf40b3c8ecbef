"""Typed settings read once from the environment; a bad value fails start-up with a clear message."""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Default ports, each overridable by its environment variable, so several meshes can share a host.
DEFAULT_PORTS: dict[str, int] = {
    "EDGE_PORT": 8080,
    "REGISTRY_PORT": 50051,
    "DISCOVERY_PORT": 50052,
    "HEALTH_MONITOR_PORT": 50053,
    "MESSAGING_PORT": 50054,
    # The Redis `make run` embeds (unless REDIS_URL is set): fixed, so a second mesh on the host is told which
    # variable to change; next to Redis's usual 6379, so a Redis already installed there is left alone.
    "AGENTVAULT_REDIS_PORT": 6380,
}


class SettingsError(ValueError):
    """A setting is missing or malformed."""


class Env:
    """Reads typed values from an environment mapping, naming the variable in every error."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if environ is None else environ

    def str(
        self, name: builtins.str, default: builtins.str | None = None, *, required: builtins.bool = False
    ) -> builtins.str:
        value = self._env.get(name)
        if value is None or value == "":
            if required:
                raise SettingsError(f"{name} is required but not set")
            return default if default is not None else ""
        return value

    def optional(self, name: builtins.str) -> builtins.str | None:
        value = self._env.get(name)
        return value if value else None

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int | None = None,
        maximum: builtins.int | None = None,
    ) -> builtins.int:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = builtins.int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise SettingsError(f"{name} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise SettingsError(f"{name} must be <= {maximum}, got {value}")
        return value

    def float(
        self, name: builtins.str, default: builtins.float, *, minimum: builtins.float | None = None
    ) -> builtins.float:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = builtins.float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise SettingsError(f"{name} must be >= {minimum}, got {value}")
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false, got {raw!r}")

    def port(self, name: builtins.str) -> builtins.int:
        return self.int(name, DEFAULT_PORTS[name], minimum=0, maximum=65535)

    def addr(self, name: builtins.str, port_var: builtins.str) -> builtins.str:
        """A peer service's address: `<SERVICE>_ADDR`, else localhost on its configured port."""
        return self.optional(name) or f"127.0.0.1:{self.port(port_var)}"


@dataclass(frozen=True)
class CommonSettings:
    """Settings every service shares."""

    service: str
    bind_host: str
    port: int
    metrics_port: int
    data_dir: Path
    database_url: str | None
    redis_url: str | None
    log_level: str
    log_format: str
    shutdown_grace_seconds: float
    # Streaming calls one server process keeps open at once; the next is refused with RESOURCE_EXHAUSTED.
    max_concurrent_streams: int = 1000
    # How often the server pings its PostgreSQL and Redis; while one is unreachable it reports NOT_SERVING.
    store_check_interval: float = 1.0

    @classmethod
    def load(cls, service: str, port_var: str, env: Env | None = None) -> CommonSettings:
        env = env or Env()
        log_format = env.str("LOG_FORMAT", "json").lower()
        if log_format not in ("json", "text"):
            raise SettingsError(f"LOG_FORMAT must be json or text, got {log_format!r}")
        prefix = port_var.removesuffix("_PORT")
        return cls(
            service=service,
            bind_host=env.str("AGENTVAULT_BIND_HOST", "127.0.0.1"),
            port=env.port(port_var),
            metrics_port=env.int(f"{prefix}_METRICS_PORT", 0, minimum=0, maximum=65535),
            data_dir=Path(env.str("AGENTVAULT_DATA_DIR", "./.data")),
            database_url=env.optional("DATABASE_URL"),
            redis_url=env.optional("REDIS_URL"),
            log_level=env.str("LOG_LEVEL", "INFO").upper(),
            log_format=log_format,
            shutdown_grace_seconds=env.float("SHUTDOWN_GRACE_SECONDS", 5.0, minimum=0),
            max_concurrent_streams=env.int("GRPC_MAX_CONCURRENT_STREAMS", 1000, minimum=1),
            store_check_interval=env.float("STORE_CHECK_INTERVAL", 1.0, minimum=0.05),
        )

    def require_database(self) -> builtins.str:
        if not self.database_url:
            raise SettingsError(f"{self.service} needs DATABASE_URL (make run sets it for the embedded server)")
        return self.database_url

    def require_redis(self) -> builtins.str:
        if not self.redis_url:
            raise SettingsError(f"{self.service} needs REDIS_URL (make run sets it for the embedded server)")
        return self.redis_url
