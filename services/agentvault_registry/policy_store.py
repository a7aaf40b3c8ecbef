"""The policies' tables: CRUD with the set version bumped in the same transaction, the decision log and its pruning."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from agentvault.common.lease import Leases
from agentvault.common.redis import raise_if_cancelling

log = logging.getLogger(__name__)

# Published with the new version after every change, so each replica's watchers reload within the second.
CHANNEL = "policy:changes"
_COLUMNS = "id, name, description, text, enabled, created_by, created_at, updated_at"
WRITABLE = ("name", "description", "text", "enabled")
PRUNE_KIND = "policy"
PRUNE_ID = "decision-log-prune"
PRUNE_PERIOD_SECONDS = 3600.0


@dataclass(frozen=True)
class PolicyRecord:
    id: uuid.UUID
    name: str
    description: str
    text: str
    enabled: bool
    created_by: str
    created_at: datetime
    updated_at: datetime


# A grant is part of the policy set while it is in force: not revoked, not expired, not spent.
GRANT_COLUMNS = (
    "id, caller, holder, action, target, target_agent_id, target_owner, expires_at, uses_left, approval_id, "
    "granted_by, created_at, revoked_at"
)
LIVE = "revoked_at IS NULL AND expires_at > now() AND (uses_left IS NULL OR uses_left > 0)"


@dataclass(frozen=True)
class GrantRecord:
    id: uuid.UUID
    caller: str  # a Caller uid
    holder: str  # the principal it was granted to (who may read and revoke it)
    action: str
    target: str  # a Target uid
    target_agent_id: str
    target_owner: str
    expires_at: datetime
    uses_left: int | None
    approval_id: uuid.UUID | None
    granted_by: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class DecisionRecord:
    caller: str
    action: str
    target: str
    outcome: str
    policy_ids: Sequence[str]
    reason: str = ""


async def bump_version(conn: asyncpg.Connection) -> int:
    """The next policy set version, in the caller's transaction (policies and grants both move it)."""
    return int(await conn.fetchval("UPDATE policy_set_version SET version = version + 1 RETURNING version"))


def _record(row: asyncpg.Record) -> PolicyRecord:
    return PolicyRecord(**dict(row))


class NameTaken(Exception):
    """Another policy has this name."""


class PolicyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.leases = Leases(pool, "policy_leases", "chore_kind", "chore_id")

    async def _bump(self, conn: asyncpg.Connection) -> int:
        return await bump_version(conn)

    async def create(
        self, name: str, description: str, text: str, enabled: bool, created_by: str
    ) -> tuple[PolicyRecord, int]:
        """The new policy and the set version it made; NameTaken when the name is in use."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""INSERT INTO policies (id, name, description, text, enabled, created_by)
                       VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLUMNS}""",
                    uuid.uuid4(),
                    name,
                    description,
                    text,
                    enabled,
                    created_by,
                )
                return _record(row), await self._bump(conn)
        except asyncpg.UniqueViolationError:
            raise NameTaken(name) from None

    async def get(self, policy_id: uuid.UUID) -> PolicyRecord | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM policies WHERE id = $1", policy_id)
        return _record(row) if row else None

    async def page(self, limit: int, after: str | None) -> list[PolicyRecord]:
        """Up to `limit` policies by name, after the name `after` (exclusive)."""
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM policies WHERE $1::text IS NULL OR name > $1 ORDER BY name LIMIT $2",
            after,
            limit,
        )
        return [_record(r) for r in rows]

    async def update(self, policy_id: uuid.UUID, changes: dict[str, object]) -> tuple[PolicyRecord, int] | None:
        """Sets the given WRITABLE columns; None when the policy is gone; NameTaken when the new name is in use."""
        names = [name for name in WRITABLE if name in changes]
        sets = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(names))
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"UPDATE policies SET {sets}{', ' if sets else ''}updated_at = now() WHERE id = $1 "
                    f"RETURNING {_COLUMNS}",
                    policy_id,
                    *(changes[name] for name in names),
                )
                if row is None:
                    return None
                return _record(row), await self._bump(conn)
        except asyncpg.UniqueViolationError:
            raise NameTaken(str(changes.get("name", ""))) from None

    async def delete(self, policy_id: uuid.UUID) -> int | None:
        """The set version the deletion made; None when there was no such policy."""
        async with self.pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval("DELETE FROM policies WHERE id = $1 RETURNING 1", policy_id)
            return await self._bump(conn) if found else None

    async def enabled_set(self) -> tuple[int, list[PolicyRecord], list[GrantRecord]]:
        """The version, the enabled policies and the grants in force, read in one snapshot so they belong together."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            version = int(await conn.fetchval("SELECT version FROM policy_set_version"))
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM policies WHERE enabled ORDER BY name")
            grants = await conn.fetch(f"SELECT {GRANT_COLUMNS} FROM grants WHERE {LIVE} ORDER BY created_at, id")
        return version, [_record(r) for r in rows], [GrantRecord(**dict(r)) for r in grants]

    async def version(self) -> int:
        return int(await self.pool.fetchval("SELECT version FROM policy_set_version"))

    # The decision log -------------------------------------------------------------------------------------

    async def log_decisions(self, decisions: Sequence[DecisionRecord]) -> None:
        """Appends decisions (the enforcers' audit log); long fields are cut to the columns' bounds."""
        await self.pool.executemany(
            """INSERT INTO policy_decisions (caller, action, target, outcome, policy_ids, reason)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            [
                (d.caller[:500], d.action[:64], d.target[:500], d.outcome, list(d.policy_ids), d.reason[:2000])
                for d in decisions
            ],
        )

    async def page_decisions(
        self, limit: int, before: int | None, outcome: str = ""
    ) -> list[tuple[int, datetime, DecisionRecord]]:
        """The decision log, newest first, with each row's sequence number (for paging) and time."""
        rows = await self.pool.fetch(
            """SELECT id, decided_at, caller, action, target, outcome, policy_ids, reason FROM policy_decisions
               WHERE ($1::bigint IS NULL OR id < $1) AND ($2 = '' OR outcome = $2) ORDER BY id DESC LIMIT $3""",
            before,
            outcome,
            limit,
        )
        return [
            (
                int(r["id"]),
                r["decided_at"],
                DecisionRecord(r["caller"], r["action"], r["target"], r["outcome"], r["policy_ids"], r["reason"]),
            )
            for r in rows
        ]

    async def prune_decisions(self, retention_days: int) -> int:
        """Deletes what is older than the retention: decisions, answered or expired approvals, and grants that have
        ended (expired, revoked or spent); how many rows went."""
        removed = 0
        async with self.pool.acquire() as conn, conn.transaction():
            for statement in (
                "DELETE FROM policy_decisions WHERE decided_at < now() - make_interval(days => $1)",
                "DELETE FROM approvals WHERE expires_at < now() - make_interval(days => $1)"
                " AND (status <> 'pending' OR expires_at <= now())",
                f"DELETE FROM grants WHERE NOT ({LIVE}) AND created_at < now() - make_interval(days => $1)",
            ):
                removed += int((await conn.execute(statement, retention_days)).split()[-1])
        return removed


class DecisionLogPruner:
    """Prunes the decision log hourly, one replica at a time (a named lease)."""

    def __init__(self, store: PolicyStore, retention_days: int, period: float = PRUNE_PERIOD_SECONDS) -> None:
        self.store = store
        self.retention_days = retention_days
        self.period = period
        self._owner = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"[:128]

    async def run_once(self) -> int | None:
        """Prunes if this replica holds the lease for this period; how many rows went (None: another replica's turn)."""
        if not await self.store.leases.claim_one(PRUNE_KIND, PRUNE_ID, self._owner, hold=self.period):
            return None
        pruned = await self.store.prune_decisions(self.retention_days)
        if pruned:
            log.info("pruned the policy decision log", extra={"rows": pruned, "retention_days": self.retention_days})
        return pruned

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelling()
                log.warning("policy decision log pruning failed: %s", exc)
            await asyncio.sleep(min(self.period, 60.0))
