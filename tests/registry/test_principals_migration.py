"""Migration 0003 on a database written by the releases before it: owners named by key names become principal
ids, and neither a key that shares a name nor one named like the admin inherits anything."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path

import asyncpg
import pytest

from agentvault.common import db

from ..conftest import Infra

MIGRATIONS = Path(str(files("agentvault_registry") / "migrations"))


@pytest.fixture
async def legacy_db(infra: Infra, tmp_path: Path) -> AsyncIterator[asyncpg.Pool]:
    name = f"legacy_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(infra.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(infra.dsn(name), min_size=1, max_size=2)
    assert pool is not None
    old = tmp_path / "migrations"
    old.mkdir()
    for path in sorted(MIGRATIONS.glob("000[12]_*.sql")):
        shutil.copy(path, old / path.name)
    assert await db.migrate(pool, "registry", old) == 2
    try:
        yield pool
    finally:
        await pool.close()


async def add_key(conn: asyncpg.Connection, key_id: str, name: str, role: str = "member") -> None:
    await conn.execute(
        "INSERT INTO api_keys (id, name, role, secret_hash, created_by, created_at)"
        " VALUES ($1, $2, $3, $4, 'admin', now() + make_interval(secs => $5))",
        key_id,
        name,
        role,
        b"\0" * 32,
        # Issue order is what decides who a shared name belonged to.
        float(int(key_id, 16)),
    )


async def add_agent(conn: asyncpg.Connection, owner: str, sharing: str = "private") -> uuid.UUID:
    agent_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO agents (id, did, name, version, owner, sharing, search_vector)"
        " VALUES ($1, $2, 'legacy', '1.0.0', $3, $4, to_tsvector('legacy'))",
        agent_id,
        f"did:web:legacy.example:{agent_id}",
        owner,
        sharing,
    )
    return agent_id


async def test_existing_owners_become_principal_ids(legacy_db: asyncpg.Pool) -> None:
    async with legacy_db.acquire() as conn:
        await add_key(conn, "0000000000000001", "alice")
        await add_key(conn, "0000000000000002", "alice")  # the impostor: same name, issued later
        await add_key(conn, "0000000000000003", "admin")  # a member key named like the bootstrap admin
        await add_key(conn, "0000000000000004", "bob")
        alices = await add_agent(conn, "alice")
        admins = await add_agent(conn, "admin")
        bobs = await add_agent(conn, "bob", "federated")
        orphans = await add_agent(conn, "gone")  # no key holds this name any more

    assert await db.migrate(legacy_db, "registry", MIGRATIONS) == len(list(MIGRATIONS.glob("*.sql"))) - 2

    async with legacy_db.acquire() as conn:
        keys = {r["id"]: r["principal_id"] for r in await conn.fetch("SELECT id, principal_id FROM api_keys")}
        owners = {r["id"]: r["owner"] for r in await conn.fetch("SELECT id, owner FROM agents")}
        principals = {r["id"]: r["name"] for r in await conn.fetch("SELECT id, name FROM principals")}
    assert len(set(keys.values())) == 4, "every key is a principal of its own"
    assert owners[alices] == keys["0000000000000001"] != keys["0000000000000002"]
    assert owners[admins] == "prn_bootstrap_admin" != keys["0000000000000003"]
    assert owners[bobs] == keys["0000000000000004"]
    assert owners[orphans] not in keys.values() and principals[owners[orphans]] == "gone"
    assert set(owners.values()) <= set(principals), "every owner is a principal (a foreign key now says so)"
    async with legacy_db.acquire() as conn:
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await add_agent(conn, "alice")
    # The migrated rows still read as JSON the registry understands.
    row = await legacy_db.fetchrow("SELECT capabilities, endpoints FROM agents WHERE id = $1", alices)
    assert json.loads(row["capabilities"]) == [] and json.loads(row["endpoints"]) == []
