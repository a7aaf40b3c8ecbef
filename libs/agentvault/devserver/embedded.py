"""A real PostgreSQL and Redis in a data folder for `make run` and the tests: the names, from one module each."""

from __future__ import annotations

from agentvault.devserver.credentials import (
    ensure_admin_token,
    ensure_encryption_key,
    ensure_secret,
    ensure_service_secrets,
)
from agentvault.devserver.postgres import EmbeddedPostgres
from agentvault.devserver.processes import (
    Interrupted,
    InUse,
    free_port,
    listens_on,
    port_in_use,
    terminate,
    wait_for_port,
)
from agentvault.devserver.redis_server import EmbeddedRedis, redis_server_binary

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "InUse",
    "Interrupted",
    "ensure_admin_token",
    "ensure_encryption_key",
    "ensure_secret",
    "ensure_service_secrets",
    "free_port",
    "listens_on",
    "port_in_use",
    "redis_server_binary",
    "terminate",
    "wait_for_port",
]
