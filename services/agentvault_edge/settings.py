"""Edge settings, read once from the environment into a frozen object."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from agentvault.common.settings import Env, SettingsError

# Which process serves each API, as (<SERVICE>_ADDR, its *_PORT fallback); federation and identity (the OAuth
# authorization server) live in the registry.
BACKEND_ENV: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "registry": ("REGISTRY_ADDR", "REGISTRY_PORT"),
        "federation": ("REGISTRY_ADDR", "REGISTRY_PORT"),
        "identity": ("REGISTRY_ADDR", "REGISTRY_PORT"),
        "policy": ("REGISTRY_ADDR", "REGISTRY_PORT"),
        "discovery": ("DISCOVERY_ADDR", "DISCOVERY_PORT"),
        "healthmonitor": ("HEALTH_MONITOR_ADDR", "HEALTH_MONITOR_PORT"),
        "messaging": ("MESSAGING_ADDR", "MESSAGING_PORT"),
    }
)
MIB = 1024 * 1024


@dataclass(frozen=True)
class EdgeSettings:
    bind_host: str = "127.0.0.1"
    port: int = 8080
    call_timeout: float = 30.0
    max_body_bytes: int = MIB
    readiness_timeout: float = 2.0
    # Seconds between SSE keepalive comments on a quiet stream.
    stream_heartbeat: float = 15.0
    log_level: str = "INFO"
    log_format: str = "json"
    shutdown_grace_seconds: float = 5.0
    # Seconds a client has to send a whole request head (from connecting, or from the first byte of the next
    # request on a kept-alive connection), to send a whole body, and to stay idle between requests.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    # Open connections; past it, each request is answered 503 with `Connection: close`.
    max_connections: int = 1000
    # Bytes of gRPC metadata forwarded from request headers (name + value + 32 per entry, as HTTP/2 counts
    # them); below gRPC's default 8 KiB limit at the backends, so an oversized set is a 431 here.
    max_forwarded_header_bytes: int = 6 * 1024
    # Backend address ("host:port") by API name, e.g. {"registry": "127.0.0.1:50051"}.
    backends: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, apis: Iterable[str] = (), env: Env | None = None) -> EdgeSettings:
        """`apis` are the APIs the edge found; one without a known address variable needs `<API>_ADDR`."""
        env = env or Env()
        log_format = env.str("LOG_FORMAT", "json").lower()
        if log_format not in ("json", "text"):
            raise SettingsError(f"LOG_FORMAT must be json or text, got {log_format!r}")
        backends: dict[str, str] = {}
        for api in sorted({*BACKEND_ENV, *apis}):
            if api in BACKEND_ENV:
                addr_var, port_var = BACKEND_ENV[api]
                backends[api] = env.addr(addr_var, port_var)
            else:
                backends[api] = env.str(f"{api.upper()}_ADDR", required=True)
        return cls(
            bind_host=env.str("AGENTVAULT_BIND_HOST", "127.0.0.1"),
            port=env.port("EDGE_PORT"),
            call_timeout=env.float("EDGE_CALL_TIMEOUT", 30.0, minimum=0.001),
            max_body_bytes=env.int("EDGE_MAX_BODY_BYTES", MIB, minimum=1),
            readiness_timeout=env.float("EDGE_READINESS_TIMEOUT", 2.0, minimum=0.001),
            stream_heartbeat=env.float("EDGE_STREAM_HEARTBEAT", 15.0, minimum=0.01),
            log_level=env.str("LOG_LEVEL", "INFO").upper(),
            log_format=log_format,
            shutdown_grace_seconds=env.float("SHUTDOWN_GRACE_SECONDS", 5.0, minimum=0),
            header_timeout=env.float("EDGE_HEADER_TIMEOUT", 10.0, minimum=0.01),
            body_timeout=env.float("EDGE_BODY_TIMEOUT", 30.0, minimum=0.01),
            keepalive_timeout=env.float("EDGE_KEEPALIVE_TIMEOUT", 75.0, minimum=0.01),
            max_connections=env.int("EDGE_MAX_CONNECTIONS", 1000, minimum=1),
            max_forwarded_header_bytes=env.int("EDGE_MAX_FORWARDED_HEADER_BYTES", 6 * 1024, minimum=256),
            backends=MappingProxyType(backends),
        )
