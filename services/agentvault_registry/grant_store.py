"""Approvals of "ask" decisions and the grants they and allowed requests make; every grant change moves the set."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from agentvault_registry.policy_store import GRANT_COLUMNS, LIVE, GrantRecord, bump_version

APPROVAL_COLUMNS = (
    "id, status, caller, requested_by, action, target, target_agent_id, target_owner, purpose, reasons, "
    "policy_ids, grant_action, grant_target, grant_duration_seconds, grant_uses, created_at, expires_at, "
    "decided_by, decided_at, note, grant_id"
)
# Channel of every approval event: "<event> <approval id>", so each replica's watchers hear of it at once.
APPROVALS_CHANNEL = "approvals:changes"


@dataclass(frozen=True)
class ApprovalRecord:
    id: uuid.UUID
    status: str
    caller: str
    requested_by: str
    action: str
    target: str
    target_agent_id: str
    target_owner: str
    purpose: str
    reasons: Sequence[str]
    policy_ids: Sequence[str]
    grant_action: str
    grant_target: str
    grant_duration_seconds: int
    grant_uses: int | None
    created_at: datetime
    expires_at: datetime
    decided_by: str
    decided_at: datetime | None
    note: str
    grant_id: uuid.UUID | None

    def visible_to(self, principal_id: str, admin: bool) -> bool:
        return admin or principal_id in (self.requested_by, self.target_owner)


@dataclass(frozen=True)
class NewGrant:
    caller: str
    holder: str
    action: str
    target: str
    target_agent_id: str
    target_owner: str
    duration_seconds: int
    uses: int | None
    granted_by: str
    approval_id: uuid.UUID | None = None


class NotPending(Exception):
    """The approval was already answered or has expired."""

    def __init__(self, approval: ApprovalRecord) -> None:
        super().__init__(approval.status)
        self.approval = approval


def _approval(row: asyncpg.Record) -> ApprovalRecord:
    return ApprovalRecord(**dict(row))


def _grant(row: asyncpg.Record) -> GrantRecord:
    return GrantRecord(**dict(row))


async def _insert_grant(conn: asyncpg.Connection, grant: NewGrant) -> GrantRecord:
    row = await conn.fetchrow(
        f"""INSERT INTO grants (id, caller, holder, action, target, target_agent_id, target_owner, expires_at,
                                uses_left, approval_id, granted_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8), $9, $10, $11)
            RETURNING {GRANT_COLUMNS}""",
        uuid.uuid4(),
        grant.caller,
        grant.holder[:128],
        grant.action,
        grant.target,
        grant.target_agent_id,
        grant.target_owner[:128],
        float(grant.duration_seconds),
        grant.uses,
        grant.approval_id,
        grant.granted_by[:128],
    )
    return _grant(row)


class GrantStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # Grants -----------------------------------------------------------------------------------------------

    async def create_grant(self, grant: NewGrant) -> tuple[GrantRecord, int]:
        """The grant and the policy set version it made."""
        async with self.pool.acquire() as conn, conn.transaction():
            record = await _insert_grant(conn, grant)
            return record, await bump_version(conn)

    async def get_grant(self, grant_id: uuid.UUID) -> GrantRecord | None:
        row = await self.pool.fetchrow(f"SELECT {GRANT_COLUMNS} FROM grants WHERE id = $1", grant_id)
        return _grant(row) if row else None

    async def revoke_grant(self, grant_id: uuid.UUID) -> tuple[GrantRecord, int | None] | None:
        """The grant, revoked now (the version it made; None when it had already ended); None when not found."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE grants SET revoked_at = now() WHERE id = $1 AND {LIVE} RETURNING {GRANT_COLUMNS}", grant_id
            )
            if row is not None:
                return _grant(row), await bump_version(conn)
        found = await self.get_grant(grant_id)
        return (found, None) if found is not None else None

    async def consume(self, grant_id: uuid.UUID) -> tuple[int | None, int] | None:
        """One use of a grant in force: (uses left, None when unlimited; the version it made, 0 when none); None
        when it has ended (spent, revoked, expired) or does not exist. Atomic, so no two replicas spend one use."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""UPDATE grants SET uses_left = CASE WHEN uses_left IS NULL THEN NULL ELSE uses_left - 1 END
                    WHERE id = $1 AND {LIVE} RETURNING uses_left""",
                grant_id,
            )
            if row is None:
                return None
            left = row["uses_left"]
            # A spent grant leaves the set; a use that leaves some only changes a count the enforcers keep too.
            return left, (await bump_version(conn) if left == 0 else 0)

    async def page_grants(
        self, limit: int, after: tuple[datetime, uuid.UUID] | None, *, include_ended: bool, viewer: str | None
    ) -> list[GrantRecord]:
        """Newest first; `viewer` limits to grants it holds or on agents it owns (None: all)."""
        rows = await self.pool.fetch(
            f"""SELECT {GRANT_COLUMNS} FROM grants
                WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))
                  AND ($3 OR ({LIVE}))
                  AND ($4::text IS NULL OR holder = $4 OR target_owner = $4)
                ORDER BY created_at DESC, id DESC LIMIT $5""",
            after[0] if after else None,
            after[1] if after else None,
            include_ended,
            viewer,
            limit,
        )
        return [_grant(r) for r in rows]

    # Approvals --------------------------------------------------------------------------------------------

    async def create_approval(
        self,
        *,
        caller: str,
        requested_by: str,
        action: str,
        target: str,
        target_agent_id: str,
        target_owner: str,
        purpose: str,
        reasons: Sequence[str],
        policy_ids: Sequence[str],
        grant_action: str,
        grant_target: str,
        grant_duration_seconds: int,
        grant_uses: int | None,
        ttl_seconds: float,
    ) -> ApprovalRecord:
        row = await self.pool.fetchrow(
            f"""INSERT INTO approvals (id, caller, requested_by, action, target, target_agent_id, target_owner,
                    purpose, reasons, policy_ids, grant_action, grant_target, grant_duration_seconds, grant_uses,
                    expires_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                        now() + make_interval(secs => $15))
                RETURNING {APPROVAL_COLUMNS}""",
            uuid.uuid4(),
            caller,
            requested_by[:128],
            action,
            target,
            target_agent_id,
            target_owner[:128],
            purpose,
            list(reasons),
            list(policy_ids),
            grant_action,
            grant_target,
            grant_duration_seconds,
            grant_uses,
            ttl_seconds,
        )
        return _approval(row)

    async def get_approval(self, approval_id: uuid.UUID) -> ApprovalRecord | None:
        """The approval; one whose time ran out reads as expired even before the sweeper marked it."""
        row = await self.pool.fetchrow(
            f"""SELECT {APPROVAL_COLUMNS.replace("status,", "")},
                       CASE WHEN status = 'pending' AND expires_at <= now() THEN 'expired' ELSE status END AS status
                FROM approvals WHERE id = $1""",
            approval_id,
        )
        return _approval(row) if row else None

    async def page_approvals(
        self, limit: int, after: tuple[datetime, uuid.UUID] | None, *, status: str, viewer: str | None
    ) -> list[ApprovalRecord]:
        """Newest first; `viewer` limits to those it asked for or may answer (None: all)."""
        effective = "CASE WHEN status = 'pending' AND expires_at <= now() THEN 'expired' ELSE status END"
        rows = await self.pool.fetch(
            f"""SELECT {APPROVAL_COLUMNS.replace("status,", "")}, {effective} AS status FROM approvals
                WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))
                  AND ($3 = '' OR {effective} = $3)
                  AND ($4::text IS NULL OR requested_by = $4 OR target_owner = $4)
                ORDER BY created_at DESC, id DESC LIMIT $5""",
            after[0] if after else None,
            after[1] if after else None,
            status,
            viewer,
            limit,
        )
        return [_approval(r) for r in rows]

    async def pending(self) -> list[ApprovalRecord]:
        """Every approval still waiting, oldest first (what a new watcher is shown at once); bounded by the TTL."""
        rows = await self.pool.fetch(
            f"""SELECT {APPROVAL_COLUMNS} FROM approvals WHERE status = 'pending' AND expires_at > now()
                ORDER BY created_at, id LIMIT 10000"""
        )
        return [_approval(r) for r in rows]

    async def count_pending(self) -> int:
        return int(
            await self.pool.fetchval("SELECT count(*) FROM approvals WHERE status = 'pending' AND expires_at > now()")
        )

    async def answer(
        self,
        approval_id: uuid.UUID,
        *,
        approve: bool,
        by: str,
        note: str,
        duration_seconds: int,
        uses: int | None,
    ) -> tuple[ApprovalRecord, GrantRecord | None, int | None] | None:
        """Approves (making its grant, in the same transaction) or denies a pending approval: (the approval, its
        grant, the policy set version the grant made). None when not found; NotPending when already answered or
        expired."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {APPROVAL_COLUMNS}, expires_at <= now() AS late FROM approvals WHERE id = $1 FOR UPDATE",
                approval_id,
            )
            if row is None:
                return None
            fields = dict(row)
            late = fields.pop("late")
            current = ApprovalRecord(**fields)
            if current.status != "pending" or late:
                if current.status == "pending":
                    current = ApprovalRecord(**{**fields, "status": "expired"})
                raise NotPending(current)
            grant: GrantRecord | None = None
            version: int | None = None
            if approve:
                holder = current.requested_by
                grant = await _insert_grant(
                    conn,
                    NewGrant(
                        caller=current.caller,
                        holder=holder,
                        action=current.grant_action,
                        target=current.grant_target,
                        target_agent_id=current.target_agent_id,
                        target_owner=current.target_owner,
                        duration_seconds=duration_seconds or current.grant_duration_seconds,
                        uses=uses if uses is not None else current.grant_uses,
                        granted_by=by,
                        approval_id=current.id,
                    ),
                )
                version = await bump_version(conn)
            row = await conn.fetchrow(
                f"""UPDATE approvals SET status = $2, decided_by = $3, decided_at = now(), note = $4, grant_id = $5
                    WHERE id = $1 RETURNING {APPROVAL_COLUMNS}""",
                approval_id,
                "approved" if approve else "denied",
                by[:128],
                note,
                grant.id if grant is not None else None,
            )
            return _approval(row), grant, version

    async def expire_due(self) -> list[ApprovalRecord]:
        """Marks pending approvals whose time ran out as expired (each row by exactly one replica's statement)."""
        rows = await self.pool.fetch(
            f"""UPDATE approvals SET status = 'expired' WHERE status = 'pending' AND expires_at <= now()
                RETURNING {APPROVAL_COLUMNS}"""
        )
        return [_approval(r) for r in rows]
