"""SQL for checks, current state, the shared schedule (leases) and pruning. Nothing here knows protobuf."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import asyncpg

from agentvault.common.lease import Leases
from agentvault_healthmonitor.domain import CheckResult, HistoryEntry, State, Summary, apply_check

_STATE_COLUMNS = (
    "subject_kind, subject_id, name, status, response_time_ms, error, consecutive_failures, is_down, "
    "agent_count, last_check, last_success"
)
MAINTENANCE = "maintenance"
PRUNE_BATCH = 10_000


def _state(row: asyncpg.Record) -> State:
    return State(**dict(row))


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.leases = Leases(pool, "health_leases")

    # Schedule ------------------------------------------------------------------------------------------

    async def sync_subjects(self, kind: str, ids: Sequence[str]) -> None:
        """Makes the schedule hold exactly these subjects of `kind`; new ones are due at once."""
        await self.leases.sync(kind, ids)

    async def claim(
        self, replica: str, known: Mapping[str, Sequence[str]], limit: int, interval: float
    ) -> list[tuple[str, str, datetime]]:
        """Claims up to `limit` due subjects this replica knows, and moves them one interval ahead.

        A replica that dies mid-check delays that subject by one interval (its lease expires; agentvault.common.lease).
        """
        claims = await self.leases.claim(replica, known, limit, interval)
        return [(c.kind, c.id, c.claimed_at) for c in claims]

    async def claim_maintenance(self, task: str, replica: str, every: float) -> bool:
        """True for exactly one replica per `every` seconds: the same lease mechanism, for periodic chores."""
        return await self.leases.claim_one(MAINTENANCE, task, replica, every)

    # Checks ------------------------------------------------------------------------------------------

    async def record(
        self,
        kind: str,
        subject_id: str,
        name: str,
        result: CheckResult,
        checked_at: datetime,
        replica: str,
        threshold: int,
    ) -> tuple[State, State]:
        """Stores a check and the state it leads to; returns (before, after)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_STATE_COLUMNS} FROM health_state WHERE subject_kind = $1 AND subject_id = $2 FOR UPDATE",
                kind,
                subject_id,
            )
            before = _state(row) if row else State(kind, subject_id)
            after = apply_check(before, result, checked_at, threshold, name)
            await conn.execute(
                f"""INSERT INTO health_state ({_STATE_COLUMNS})
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                    ON CONFLICT (subject_kind, subject_id) DO UPDATE SET
                        name = EXCLUDED.name, status = EXCLUDED.status,
                        response_time_ms = EXCLUDED.response_time_ms, error = EXCLUDED.error,
                        consecutive_failures = EXCLUDED.consecutive_failures, is_down = EXCLUDED.is_down,
                        agent_count = EXCLUDED.agent_count, last_check = EXCLUDED.last_check,
                        last_success = EXCLUDED.last_success""",
                kind,
                subject_id,
                after.name[:255],
                after.status,
                after.response_time_ms,
                after.error,
                after.consecutive_failures,
                after.is_down,
                after.agent_count,
                after.last_check,
                after.last_success,
            )
            await conn.execute(
                """INSERT INTO health_checks
                       (subject_kind, subject_id, status, response_time_ms, error, checked_at, checked_by)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                kind,
                subject_id,
                result.status,
                result.response_time_ms,
                result.error,
                checked_at,
                replica,
            )
        return before, after

    async def states(self, kind: str, ids: Sequence[str]) -> dict[str, State]:
        rows = await self.pool.fetch(
            f"SELECT {_STATE_COLUMNS} FROM health_state WHERE subject_kind = $1 AND subject_id = ANY($2::text[])",
            kind,
            list(ids),
        )
        return {r["subject_id"]: _state(r) for r in rows}

    async def summaries(self, kind: str, ids: Sequence[str], window_seconds: float) -> dict[str, Summary]:
        rows = await self.pool.fetch(
            """SELECT subject_id, count(*) AS checks,
                      count(*) FILTER (WHERE status = 'healthy') AS healthy,
                      coalesce(avg(response_time_ms) FILTER (WHERE status = 'healthy'), 0) AS avg_ms
               FROM health_checks
               WHERE subject_kind = $1 AND subject_id = ANY($2::text[])
                 AND checked_at > now() - make_interval(secs => $3)
               GROUP BY subject_id""",
            kind,
            list(ids),
            window_seconds,
        )
        return {r["subject_id"]: Summary(r["checks"], r["healthy"], float(r["avg_ms"])) for r in rows}

    async def history(self, kind: str, subject_id: str, limit: int) -> list[HistoryEntry]:
        rows = await self.pool.fetch(
            """SELECT status, response_time_ms, error, checked_at FROM health_checks
               WHERE subject_kind = $1 AND subject_id = $2
               ORDER BY checked_at DESC, id DESC LIMIT $3""",
            kind,
            subject_id,
            limit,
        )
        return [HistoryEntry(**dict(r)) for r in rows]

    # Maintenance -------------------------------------------------------------------------------------

    async def prune(self, retention_seconds: float) -> int:
        """Deletes history older than the retention in batches, so no statement holds locks for long."""
        total = 0
        while True:
            result = await self.pool.execute(
                """DELETE FROM health_checks WHERE id IN (
                       SELECT id FROM health_checks
                       WHERE checked_at < now() - make_interval(secs => $1) LIMIT $2)""",
                retention_seconds,
                PRUNE_BATCH,
            )
            deleted = int(result.split()[-1])
            total += deleted
            if deleted < PRUNE_BATCH:
                break
        # States of subjects that left the schedule (deleted peers and agents) go once their history has.
        await self.pool.execute(
            """DELETE FROM health_state s
               WHERE s.last_check < now() - make_interval(secs => $1)
                 AND NOT EXISTS (SELECT 1 FROM health_leases l
                                 WHERE l.subject_kind = s.subject_kind AND l.subject_id = s.subject_id)""",
            retention_seconds,
        )
        return total
