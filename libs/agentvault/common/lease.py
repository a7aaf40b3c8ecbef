"""Work leases in PostgreSQL: replicas claim due rows with FOR UPDATE SKIP LOCKED, never the same row twice.

A lease table has at least these columns (the health monitor's `health_leases` is one):

    kind VARCHAR NOT NULL, id VARCHAR NOT NULL,            -- named by the caller, e.g. subject_kind, subject_id
    next_check_at TIMESTAMPTZ NOT NULL DEFAULT now(),      -- the row is free (due) once this has passed
    claimed_by VARCHAR NOT NULL DEFAULT '', claimed_at TIMESTAMPTZ,
    PRIMARY KEY (kind, id)

A claim moves `next_check_at` one hold ahead in the same statement that locks the rows, so the row lock lasts only
that statement and the work needs no open transaction: a holder that dies leaves its lease to expire after the hold,
and then any replica reclaims it. `release` frees a lease early (work done, or given up).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

# Table and column names are spliced into SQL, so they must be plain identifiers chosen by code, never input.
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _identifier(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


@dataclass(frozen=True)
class Claim:
    kind: str
    id: str
    claimed_at: datetime  # the database's clock, the same for every replica


class Leases:
    """Claims, reclaims and releases rows of one lease table."""

    def __init__(
        self, pool: asyncpg.Pool, table: str, kind_column: str = "subject_kind", id_column: str = "subject_id"
    ) -> None:
        self.pool = pool
        self.table = _identifier(table)
        self.kind = _identifier(kind_column)
        self.id = _identifier(id_column)

    def schema(self) -> str:
        """DDL for a lease table with this object's names (migrations may add columns or checks)."""
        return f"""CREATE TABLE IF NOT EXISTS {self.table} (
            {self.kind} VARCHAR(16) NOT NULL,
            {self.id} VARCHAR(64) NOT NULL,
            next_check_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            claimed_by VARCHAR(128) NOT NULL DEFAULT '',
            claimed_at TIMESTAMPTZ,
            PRIMARY KEY ({self.kind}, {self.id}))"""

    async def sync(self, kind: str, ids: Sequence[str]) -> None:
        """Makes the table hold exactly these rows of `kind`; new ones are due at once, existing ones keep theirs."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO {self.table} ({self.kind}, {self.id}) "
                "SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
                kind,
                list(ids),
            )
            await conn.execute(
                f"DELETE FROM {self.table} WHERE {self.kind} = $1 AND NOT ({self.id} = ANY($2::text[]))",
                kind,
                list(ids),
            )

    async def claim(self, owner: str, known: Mapping[str, Sequence[str]], limit: int, hold: float) -> list[Claim]:
        """Claims up to `limit` due rows among `known` (kind -> ids), oldest due first, for `hold` seconds.

        SKIP LOCKED keeps two concurrent claimers off the same rows; the moved next_check_at keeps every later
        claimer off them until the hold has passed (or the lease is released).
        """
        if limit <= 0:
            return []
        kinds = list(known)
        rows = await self.pool.fetch(
            f"""WITH due AS (
                   SELECT l.{self.kind}, l.{self.id} FROM {self.table} l
                   JOIN unnest($1::text[], $2::text[]) AS k(kind, id)
                     ON l.{self.kind} = k.kind AND l.{self.id} = k.id
                   WHERE l.next_check_at <= now()
                   ORDER BY l.next_check_at
                   LIMIT $3
                   FOR UPDATE OF l SKIP LOCKED)
               UPDATE {self.table} l
               SET next_check_at = now() + make_interval(secs => $4), claimed_by = $5, claimed_at = now()
               FROM due
               WHERE l.{self.kind} = due.{self.kind} AND l.{self.id} = due.{self.id}
               RETURNING l.{self.kind} AS kind, l.{self.id} AS id, l.claimed_at""",
            [kind for kind in kinds for _ in known[kind]],
            [item for kind in kinds for item in known[kind]],
            limit,
            hold,
            owner,
        )
        return [Claim(r["kind"], r["id"], r["claimed_at"]) for r in rows]

    async def claim_one(self, kind: str, id_: str, owner: str, hold: float) -> bool:
        """Claims (creating it if absent) one named lease: true for exactly one claimer per hold, e.g. a chore."""
        row = await self.pool.fetchrow(
            f"""INSERT INTO {self.table} ({self.kind}, {self.id}, next_check_at, claimed_by, claimed_at)
               VALUES ($1, $2, now() + make_interval(secs => $3), $4, now())
               ON CONFLICT ({self.kind}, {self.id}) DO UPDATE
               SET next_check_at = EXCLUDED.next_check_at, claimed_by = EXCLUDED.claimed_by,
                   claimed_at = EXCLUDED.claimed_at
               WHERE {self.table}.next_check_at <= now()
               RETURNING 1""",
            kind,
            id_,
            hold,
            owner,
        )
        return row is not None

    async def renew(self, kind: str, id_: str, owner: str, hold: float) -> bool:
        """Extends a lease `owner` holds by `hold` seconds from now, for work that lasts (a watch); false when
        another claimer holds it now (it had expired and was reclaimed) or it is gone. An expired lease nobody has
        reclaimed is still its holder's: the row lock orders a renewal and a reclaim, and the later one fails."""
        row = await self.pool.fetchrow(
            f"""UPDATE {self.table} SET next_check_at = now() + make_interval(secs => $4)
               WHERE {self.kind} = $1 AND {self.id} = $2 AND claimed_by = $3
               RETURNING 1""",
            kind,
            id_,
            owner,
            hold,
        )
        return row is not None

    async def release(self, kind: str, id_: str, owner: str) -> bool:
        """Frees a lease `owner` holds, so it is due at once; false if someone else holds it (or it is gone)."""
        result = await self.pool.execute(
            f"""UPDATE {self.table} SET next_check_at = now(), claimed_by = ''
               WHERE {self.kind} = $1 AND {self.id} = $2 AND claimed_by = $3""",
            kind,
            id_,
            owner,
        )
        return bool(int(result.split()[-1]))
