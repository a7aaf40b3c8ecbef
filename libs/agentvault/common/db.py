"""asyncpg pool creation and versioned SQL migrations, applied under an advisory lock on start."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from importlib.resources.abc import Traversable

import asyncpg

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any fixed 64-bit number works; every service takes the same lock so concurrent starts serialize.
_MIGRATION_LOCK = 7_413_062_555_001


class MigrationError(RuntimeError):
    """An applied migration was edited, or the files are misnumbered."""


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    wait_seconds: float = 30,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    server_settings: dict[str, str] | None = None,
    stateless: bool = False,
) -> asyncpg.Pool:
    """Connects, retrying for `wait_seconds` so services can start before the database is ready."""
    deadline = time.monotonic() + wait_seconds
    delay = 0.2
    while True:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                command_timeout=30,
                max_inactive_connection_lifetime=300,
                init=init,
                server_settings=server_settings,
                # A service that never changes session state (no SET, LISTEN or advisory locks outside a
                # transaction) can skip the reset round trip asyncpg runs on every release.
                **({"reset": _keep_session} if stateless else {}),
            )
            assert pool is not None
            return pool
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.PostgresConnectionError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database not ready (%s); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _keep_session(conn: asyncpg.Connection) -> None:
    return None


def _load(migrations: Traversable) -> list[tuple[int, str, str]]:
    found = []
    for entry in migrations.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migrations must be numbered 0001, 0002, ... without gaps: {versions}")
    return found


async def migrate(pool: asyncpg.Pool, service: str, migrations: Traversable) -> int:
    """Applies every migration of `service` not applied yet, each in its own transaction; returns how many."""
    files = _load(migrations)
    applied = 0
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       service TEXT NOT NULL,
                       version INTEGER NOT NULL,
                       name TEXT NOT NULL,
                       checksum TEXT NOT NULL,
                       applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                       PRIMARY KEY (service, version))"""
            )
            rows = await conn.fetch("SELECT version, checksum FROM schema_migrations WHERE service = $1", service)
            done = {r["version"]: r["checksum"] for r in rows}
            for version, name, sql in files:
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if version in done:
                    if done[version] != checksum:
                        raise MigrationError(f"{service} migration {name} changed after it was applied")
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (service, version, name, checksum) VALUES ($1, $2, $3, $4)",
                        service,
                        version,
                        name,
                        checksum,
                    )
                applied += 1
                log.info("applied migration", extra={"migration": name, "owner": service})
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied
