"""Connections and their trust: created on first contact, changed by owners and admins, and by the trust rules."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import asyncpg

from agentvault.common.policy import Trust

_COLUMNS = (
    "id, caller_kind, caller_id, agent_id, trust_level, interactions, violations, violation_window_start, "
    "clean_interactions, created_at, last_seen_at, trust_changed_at"
)
SYSTEM = "system"
MAX_REASON = 500


@dataclass(frozen=True)
class TrustRules:
    """How trust evolves by itself: `violation_limit` violations within `violation_window` drop it one level, not
    below `floor` (0: never); `promote_after` interactions without a violation raise it one level up to
    `promote_up_to` (0: never). The floor is untrusted by default: shutting a caller out altogether (blocked) is
    a person's decision unless the operator lets the rules make it, since retried requests or a skewed clock can
    look like violations too."""

    violation_limit: int = 5
    violation_window: float = 3600.0
    floor: Trust = Trust.UNTRUSTED
    promote_after: int = 0
    promote_up_to: Trust = Trust.BASIC


@dataclass(frozen=True)
class ConnectionRecord:
    id: uuid.UUID
    caller_kind: str
    caller_id: str
    agent_id: str
    trust_level: str
    interactions: int
    violations: int
    violation_window_start: datetime | None
    clean_interactions: int
    created_at: datetime
    last_seen_at: datetime
    trust_changed_at: datetime


@dataclass(frozen=True)
class TrustChangeRecord:
    from_level: str
    to_level: str
    reason: str
    changed_by: str
    changed_at: datetime


def _record(row: asyncpg.Record) -> ConnectionRecord:
    return ConnectionRecord(**dict(row))


def _step(level: str, by: int) -> Trust:
    order = list(Trust)
    return order[max(0, min(len(order) - 1, Trust(level).rank + by))]


class ConnectionStore:
    def __init__(self, pool: asyncpg.Pool, rules: TrustRules | None = None) -> None:
        self.pool = pool
        self.rules = rules or TrustRules()

    async def contact(self, kind: str, caller_id: str, agent_id: str, default: Trust) -> ConnectionRecord:
        """The connection, created at first contact: one seen by an agent starts at the trust the mesh has for
        the caller (its mesh-wide connection) when there is one, else at `default`."""
        row = await self.pool.fetchrow(
            f"""INSERT INTO connections (id, caller_kind, caller_id, agent_id, trust_level)
                VALUES ($1, $2::text, $3::text, $4::text, COALESCE(
                    (SELECT trust_level FROM connections
                     WHERE caller_kind = $2::text AND caller_id = $3::text AND agent_id = '' AND $4::text <> ''),
                    $5::text))
                ON CONFLICT (caller_kind, caller_id, agent_id) DO UPDATE SET last_seen_at = now()
                RETURNING {_COLUMNS}""",
            uuid.uuid4(),
            kind,
            caller_id[:500],
            agent_id,
            default.value,
        )
        return _record(row)

    async def trust(self, kind: str, caller_id: str, agent_id: str, default: Trust) -> Trust:
        """The trust a decision uses: the connection seen by the agent, except that a caller the mesh blocked is
        blocked everywhere. Creates the connections (the mesh's, then the agent's) at first contact."""
        mesh = await self.contact(kind, caller_id, "", default)
        if not agent_id or mesh.trust_level == Trust.BLOCKED:
            return Trust(mesh.trust_level)
        return Trust((await self.contact(kind, caller_id, agent_id, default)).trust_level)

    async def record(self, kind: str, caller_id: str, agent_id: str, violation: str | None) -> TrustChangeRecord | None:
        """Counts one interaction (a violation when `violation` says why) and applies the trust rules; the change it
        made, if any. A connection never seen is created first (at `untrusted`: only seen callers have a default)."""
        changes = await self.record_many(kind, caller_id, agent_id, (violation,))
        return changes[-1] if changes else None

    async def record_many(
        self, kind: str, caller_id: str, agent_id: str, violations: Sequence[str | None]
    ) -> list[TrustChangeRecord]:
        """Counts interactions of one connection, in order (each a violation when its entry says why), applying
        the trust rules after each exactly as one call per interaction would; the changes made. One transaction and
        one row lock for all of them: an enforcer reports its interactions in batches, mostly of a few connections,
        and a statement per interaction cost the registry and PostgreSQL more than the sends they counted."""
        if not violations:
            return []
        rules = self.rules
        changes: list[TrustChangeRecord] = []
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""SELECT {_COLUMNS}, now() AS now FROM connections
                    WHERE caller_kind = $1 AND caller_id = $2 AND agent_id = $3 FOR UPDATE""",
                kind,
                caller_id[:500],
                agent_id,
            )
            if row is None:
                return changes
            values = dict(row)
            now: datetime = values.pop("now")
            current = ConnectionRecord(**values)
            level = Trust(current.trust_level)
            violations_seen = current.violations
            window = current.violation_window_start
            clean = current.clean_interactions
            for violation in violations:
                clean += 1
                change: tuple[Trust, str] | None = None
                if violation is not None:
                    clean = 0
                    if window is None or now - window > timedelta(seconds=rules.violation_window):
                        window, violations_seen = now, 0
                    violations_seen += 1
                    if (
                        rules.violation_limit
                        and violations_seen >= rules.violation_limit
                        and level.rank > rules.floor.rank
                    ):
                        reason = (
                            f"{violations_seen} violations within {rules.violation_window:g} s "
                            f"(limit {rules.violation_limit}); the last: {violation}"
                        )
                        change = (_step(level, -1), reason)
                elif (
                    rules.promote_after
                    and clean >= rules.promote_after
                    and level is not Trust.BLOCKED
                    and level.rank < rules.promote_up_to.rank
                ):
                    change = (
                        _step(level, +1),
                        f"{clean} interactions without a violation (rule: {rules.promote_after})",
                    )
                if change is not None:
                    violations_seen, window, clean = 0, None, 0
                    changes.append(await self._change(conn, current, change[0], change[1][:MAX_REASON], SYSTEM))
                    level = change[0]
                    current = replace(current, trust_level=level.value)
            await conn.execute(
                """UPDATE connections SET interactions = interactions + $5, violations = $2,
                   violation_window_start = $3, clean_interactions = $4, last_seen_at = now() WHERE id = $1""",
                current.id,
                violations_seen,
                window,
                clean,
                len(violations),
            )
        return changes

    async def _change(
        self, conn: asyncpg.Connection, current: ConnectionRecord, to: Trust, reason: str, by: str
    ) -> TrustChangeRecord:
        await conn.execute(
            """UPDATE connections SET trust_level = $2, trust_changed_at = now(), violations = 0,
               violation_window_start = NULL, clean_interactions = 0 WHERE id = $1""",
            current.id,
            to.value,
        )
        row = await conn.fetchrow(
            """INSERT INTO trust_changes (connection_id, from_level, to_level, reason, changed_by)
               VALUES ($1, $2, $3, $4, $5) RETURNING from_level, to_level, reason, changed_by, changed_at""",
            current.id,
            current.trust_level,
            to.value,
            reason,
            by[:128],
        )
        return TrustChangeRecord(**dict(row))

    async def set_trust(self, connection_id: uuid.UUID, to: Trust, reason: str, by: str) -> ConnectionRecord | None:
        """Sets the trust by hand (recorded even when unchanged, so the reason is kept); None when not found."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM connections WHERE id = $1 FOR UPDATE", connection_id)
            if row is None:
                return None
            await self._change(conn, _record(row), to, reason[:MAX_REASON], by)
            found = await conn.fetchrow(f"SELECT {_COLUMNS} FROM connections WHERE id = $1", connection_id)
        return _record(found)

    async def find(self, kind: str, caller_id: str, agent_id: str) -> ConnectionRecord | None:
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM connections WHERE caller_kind = $1 AND caller_id = $2 AND agent_id = $3",
            kind,
            caller_id[:500],
            agent_id,
        )
        return _record(row) if row else None

    async def get(self, connection_id: uuid.UUID) -> ConnectionRecord | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM connections WHERE id = $1", connection_id)
        return _record(row) if row else None

    async def page(
        self,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
        *,
        trust_level: str = "",
        agent_id: str | None = None,
        owner: str | None = None,
    ) -> list[ConnectionRecord]:
        """Latest contact first; `owner` limits to connections seen by agents that principal owns."""
        where, args = ["TRUE"], []

        def param(value: object) -> str:
            args.append(value)
            return f"${len(args)}"

        if after is not None:
            where.append(f"(last_seen_at, id) < ({param(after[0])}, {param(after[1])})")
        if trust_level:
            where.append(f"trust_level = {param(trust_level)}")
        if agent_id is not None:
            where.append(f"agent_id = {param(agent_id)}")
        if owner is not None:
            where.append(f"agent_id IN (SELECT id::text FROM agents WHERE owner = {param(owner)})")
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM connections WHERE {' AND '.join(where)} "
            f"ORDER BY last_seen_at DESC, id DESC LIMIT {param(limit)}",
            *args,
        )
        return [_record(r) for r in rows]

    async def changes(
        self, connection_id: uuid.UUID, limit: int, before: int | None = None
    ) -> list[tuple[int, TrustChangeRecord]]:
        """The connection's trust changes, newest first, with their sequence numbers (for paging)."""
        rows = await self.pool.fetch(
            """SELECT id, from_level, to_level, reason, changed_by, changed_at FROM trust_changes
               WHERE connection_id = $1 AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3""",
            connection_id,
            before,
            limit,
        )
        found = []
        for row in rows:
            fields = dict(row)
            found.append((int(fields.pop("id")), TrustChangeRecord(**fields)))
        return found
