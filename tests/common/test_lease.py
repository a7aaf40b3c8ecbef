"""The shared lease claim on a real PostgreSQL: exclusive claims, expiry, release."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from agentvault.common.lease import Leases

from ..conftest import Infra


@pytest.fixture(scope="module")
async def pool(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    name = f"lease_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(infra.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(infra.dsn(name), min_size=1, max_size=12)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def leases(pool: asyncpg.Pool) -> Leases:
    table = f"leases_{secrets.token_hex(4)}"
    lease = Leases(pool, table, "kind", "item")
    await pool.execute(lease.schema())
    return lease


async def test_concurrent_claimers_never_get_the_same_row(leases: Leases) -> None:
    ids = [f"job-{i}" for i in range(200)]
    await leases.sync("job", ids)
    owners = [f"replica-{i}" for i in range(8)]
    # Several rounds of eight claimers at once on separate connections, each taking a few rows at a time.
    taken: list[tuple[str, str]] = []
    while True:
        rounds = await asyncio.gather(*(leases.claim(o, {"job": ids}, 7, 60) for o in owners))
        got = [(claim.id, owner) for owner, claims in zip(owners, rounds, strict=True) for claim in claims]
        if not got:
            break
        taken.extend(got)
    claimed = [item for item, _ in taken]
    assert len(claimed) == len(set(claimed)), "a row was claimed twice"
    assert sorted(claimed) == sorted(ids)
    # More than one replica did work, so the rows really were contended.
    assert len({owner for _, owner in taken}) > 1


async def test_only_known_and_due_rows_are_claimed(leases: Leases) -> None:
    await leases.sync("job", ["a", "b"])
    assert [c.id for c in await leases.claim("r1", {"job": ["a"]}, 10, 60)] == ["a"]
    assert await leases.claim("r2", {"job": ["a"]}, 10, 60) == []
    assert await leases.claim("r2", {"job": ["a", "b"]}, 0, 60) == []


async def test_an_expired_lease_is_reclaimed(leases: Leases, pool: asyncpg.Pool) -> None:
    await leases.sync("job", ["x"])
    first = await leases.claim("dead-replica", {"job": ["x"]}, 1, 0.2)
    assert [c.id for c in first] == ["x"]
    assert await leases.claim("r2", {"job": ["x"]}, 1, 60) == []
    # Polls until the hold has passed in the database's clock: then another replica takes it over.
    for _ in range(200):
        again = await leases.claim("r2", {"job": ["x"]}, 1, 60)
        if again:
            break
        await asyncio.sleep(0.02)
    assert [c.id for c in again] == ["x"]
    assert again[0].claimed_at > first[0].claimed_at
    assert await pool.fetchval(f"SELECT claimed_by FROM {leases.table} WHERE item = 'x'") == "r2"


async def test_a_released_lease_is_free_and_only_its_holder_releases_it(leases: Leases) -> None:
    await leases.sync("job", ["y"])
    assert await leases.claim("r1", {"job": ["y"]}, 1, 3600)
    assert not await leases.release("job", "y", "r2"), "someone else's lease was released"
    assert await leases.claim("r2", {"job": ["y"]}, 1, 3600) == []
    assert await leases.release("job", "y", "r1")
    assert [c.id for c in await leases.claim("r2", {"job": ["y"]}, 1, 3600)] == ["y"]


async def test_a_named_chore_goes_to_one_claimer_per_hold(leases: Leases) -> None:
    wins = await asyncio.gather(*(leases.claim_one("chore", "prune", f"r{i}", 3600) for i in range(6)))
    assert sum(wins) == 1


async def test_a_held_lease_is_renewed_only_by_its_holder(leases: Leases, pool: asyncpg.Pool) -> None:
    assert await leases.claim_one("watch", "w1", "a", hold=0.2)
    assert not await leases.renew("watch", "w1", "b", hold=60)
    assert await leases.renew("watch", "w1", "a", hold=60)
    # Past the first hold, the renewal keeps it: no one else can claim it.
    await pool.execute("SELECT pg_sleep(0.3)")
    assert not await leases.claim_one("watch", "w1", "b", hold=60)
    # Expired and reclaimed by another: the old holder cannot renew it any more.
    await pool.execute(f"UPDATE {leases.table} SET next_check_at = now() - interval '1 second'")
    assert await leases.claim_one("watch", "w1", "b", hold=60)
    assert not await leases.renew("watch", "w1", "a", hold=60)
    assert not await leases.renew("watch", "gone", "a", hold=60)


async def test_sync_removes_rows_that_left_and_keeps_leases_of_the_rest(leases: Leases) -> None:
    await leases.sync("job", ["p", "q"])
    assert await leases.claim("r1", {"job": ["p"]}, 1, 3600)
    await leases.sync("job", ["p"])
    assert await leases.claim("r2", {"job": ["p", "q"]}, 5, 3600) == [], "sync reset a held lease or kept q"


def test_names_must_be_plain_identifiers(pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="identifier"):
        Leases(pool, "leases; DROP TABLE x")
