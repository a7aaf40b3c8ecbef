"""The sessions, session_handoffs and session_owners tables: one owner per session, fenced by its generation.

Lock order, everywhere both are taken: the session row, then the handoff row (an offer racing an acceptance
cannot deadlock). An owner changes only in `accept`, one transaction, whose UPDATE names the generation the offer
was made at. Every change that tells someone (an offer, an acceptance, a rejection, an expiry...) stores its inbox
notices in its own transaction, so that no acknowledged change lacks its notice; the caller announces them after.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from agentvault_messaging.store import INBOX, IdempotencyConflict, NewMessage, Row, Store

OPEN = ("held", "offered")

_SESSION = (
    "id, conversation_id, owner_agent, owner_instance, owner_principal, generation, state_version, state, "
    "state_sha256, metadata::text AS metadata, created_at, updated_at, owner_mesh, "
    "(SELECT h.id FROM session_handoffs h WHERE h.session_id = sessions.id AND h.status IN ('held', 'offered')) "
    "AS open_handoff"
)
# Without the state: what most statements need (the state is up to MESSAGING_SESSION_MAX_BYTES).
_SESSION_NO_STATE = _SESSION.replace("state_version, state, ", "state_version, ''::bytea AS state, ")
_HANDOFF = (
    "h.id, h.session_id, s.conversation_id, h.from_agent, h.from_instance, h.from_principal, h.target_agent, "
    "h.target_instance, h.target_mesh, h.target_principal, h.status, h.status_reason, h.base_generation, h.state, "
    "h.state_sha256, h.signature, h.approval_id, h.note, h.deadline_seconds, h.deadline, h.accepted_instance, "
    "h.created_at, h.updated_at"
)
_HANDOFF_NO_STATE = _HANDOFF.replace("h.state,", "''::bytea AS state, length(h.state) AS state_size,")


@dataclass(frozen=True)
class SessionRow:
    id: uuid.UUID
    conversation_id: str
    owner_agent: str
    owner_instance: str
    owner_principal: str
    generation: int
    state_version: int
    state: bytes
    state_sha256: bytes
    metadata: str
    created_at: datetime
    updated_at: datetime
    open_handoff: uuid.UUID | None
    # Set when the session was handed to an agent of a peer mesh (session_federation.py).
    owner_mesh: str = ""

    @classmethod
    def of(cls, record: asyncpg.Record) -> SessionRow:
        return cls(**dict(record))


@dataclass(frozen=True)
class HandoffRow:
    id: uuid.UUID
    session_id: uuid.UUID
    conversation_id: str
    from_agent: str
    from_instance: str
    from_principal: str
    target_agent: str
    target_instance: str
    target_mesh: str
    target_principal: str
    status: str
    status_reason: str
    base_generation: int
    state: bytes
    state_sha256: bytes
    signature: bytes
    approval_id: uuid.UUID | None
    note: str
    deadline_seconds: int
    deadline: datetime | None
    accepted_instance: str
    created_at: datetime
    updated_at: datetime
    state_size: int = -1

    @classmethod
    def of(cls, record: asyncpg.Record) -> HandoffRow:
        return cls(**dict(record))

    @property
    def size(self) -> int:
        return self.state_size if self.state_size >= 0 else len(self.state)


@dataclass(frozen=True)
class NewHandoff:
    id: uuid.UUID
    session_id: uuid.UUID
    from_agent: str
    from_instance: str
    from_principal: str
    target_agent: str
    target_instance: str
    target_principal: str
    status: str
    base_generation: int
    state: bytes
    state_sha256: bytes
    signature: bytes
    approval_id: uuid.UUID | None
    note: str
    deadline_seconds: int
    status_reason: str = ""


class SessionExists(Exception):
    """The conversation has a session already."""


class HandoffOpen(Exception):
    """The session has an open handoff already."""


class Changed(Exception):
    """The session is not as the caller saw it: `why` says how (not_owner, generation, state_version, open)."""

    def __init__(self, why: str, session: SessionRow | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.session = session


@dataclass(frozen=True)
class Accepted:
    handoff: HandoffRow
    session: SessionRow
    # Message ids moved from the old owner's inbox to the new owner's.
    moved: list[uuid.UUID]
    # The notices stored with the acceptance (not before), for the caller to announce.
    told: list[Row]


# The inbox notices a handoff as it now is calls for (sessions.Notices.of).
Notify = Callable[[HandoffRow], Sequence[NewMessage]]


class SessionStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.messages = Store(pool)

    async def _tell(self, conn: asyncpg.Connection, handoffs: Sequence[HandoffRow], notify: Notify | None) -> list[Row]:
        """Stores the notices of `handoffs` in the caller's transaction; the newly stored ones, to announce."""
        told: list[Row] = []
        if notify is None:
            return told
        for handoff in handoffs:
            for new in notify(handoff):
                try:
                    row, duplicate = await self.messages.insert(new, conn)
                except IdempotencyConflict:  # its fixed id is stored already (as told before): told once
                    continue
                if not duplicate:
                    told.append(row)
        return told

    # Sessions ----------------------------------------------------------------------------------------------

    async def create(
        self,
        session_id: uuid.UUID,
        conversation_id: str,
        owner: str,
        instance: str,
        principal: str,
        state: bytes,
        digest: bytes,
        metadata: dict[str, str],
    ) -> SessionRow:
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                """INSERT INTO sessions (id, conversation_id, owner_agent, owner_instance, owner_principal, state,
                       state_sha256, metadata)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb) ON CONFLICT (conversation_id) DO NOTHING
                   RETURNING id""",
                session_id,
                conversation_id,
                owner,
                instance,
                principal,
                state,
                digest,
                json.dumps(metadata),
            )
            if inserted is None:
                raise SessionExists(conversation_id)
            await conn.execute(
                "INSERT INTO session_owners (session_id, generation, agent_id, instance) VALUES ($1, 1, $2, $3)",
                session_id,
                owner,
                instance,
            )
            record = await conn.fetchrow(f"SELECT {_SESSION} FROM sessions WHERE id = $1", session_id)
        return SessionRow.of(record)

    async def get(self, session_id: uuid.UUID, *, with_state: bool = True) -> SessionRow | None:
        columns = _SESSION if with_state else _SESSION_NO_STATE
        record = await self.pool.fetchrow(f"SELECT {columns} FROM sessions WHERE id = $1", session_id)
        return SessionRow.of(record) if record is not None else None

    async def was_owner(self, session_id: uuid.UUID, agent_id: str) -> bool:
        """Whether the agent owned the session once, or was offered it."""
        return bool(
            await self.pool.fetchval(
                """SELECT EXISTS (SELECT 1 FROM session_owners WHERE session_id = $1 AND agent_id = $2)
                       OR EXISTS (SELECT 1 FROM session_handoffs WHERE session_id = $1 AND target_agent = $2)""",
                session_id,
                agent_id,
            )
        )

    async def update_state(
        self, session_id: uuid.UUID, owner: str, state: bytes, digest: bytes, expected_version: int
    ) -> SessionRow:
        async with self.pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(
                f"SELECT {_SESSION_NO_STATE} FROM sessions WHERE id = $1 FOR UPDATE", session_id
            )
            if current is None:
                raise Changed("missing")
            row = SessionRow.of(current)
            if row.owner_agent != owner:
                raise Changed("not_owner", row)
            # Read after the lock: an offer made meanwhile has committed and is seen (a new snapshot per statement).
            if await conn.fetchval(
                "SELECT 1 FROM session_handoffs WHERE session_id = $1 AND status IN ('held', 'offered')", session_id
            ):
                raise Changed("open", row)
            if expected_version and row.state_version != expected_version:
                raise Changed("state_version", row)
            record = await conn.fetchrow(
                f"""UPDATE sessions SET state = $2, state_sha256 = $3, state_version = state_version + 1,
                        updated_at = now() WHERE id = $1 RETURNING {_SESSION}""",
                session_id,
                state,
                digest,
            )
        return SessionRow.of(record)

    async def owners(self, session_id: uuid.UUID) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT generation, agent_id, instance, handoff_id, since, until FROM session_owners
               WHERE session_id = $1 ORDER BY generation""",
            session_id,
        )

    async def current_owner(self, conversation_id: str, recipient: str) -> tuple[str, str] | None:
        """The conversation's session owner and its instance when `recipient` owns it or owned it before; else
        None. One statement on the conversation's unique index and the owners' primary key."""
        record = await self.pool.fetchrow(
            """SELECT s.owner_agent, s.owner_instance FROM sessions s
               WHERE s.conversation_id = $1 AND (s.owner_agent = $2
                 OR EXISTS (SELECT 1 FROM session_owners o WHERE o.session_id = s.id AND o.agent_id = $2))""",
            conversation_id,
            recipient,
        )
        return None if record is None else (record["owner_agent"], record["owner_instance"])

    # Handoffs ----------------------------------------------------------------------------------------------

    async def has_open(self, session_id: uuid.UUID) -> bool:
        return bool(
            await self.pool.fetchval(
                "SELECT 1 FROM session_handoffs WHERE session_id = $1 AND status IN ('held', 'offered')", session_id
            )
        )

    async def offer(self, new: NewHandoff, notify: Notify | None = None) -> tuple[HandoffRow, list[Row]]:
        """Stores the handoff, held or offered (its deadline then starts), if the session is still the caller's at
        the generation it was read at, with its notices; Changed or HandoffOpen otherwise."""
        async with self.pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(
                f"SELECT {_SESSION_NO_STATE} FROM sessions WHERE id = $1 FOR UPDATE", new.session_id
            )
            if current is None:
                raise Changed("missing")
            row = SessionRow.of(current)
            if row.owner_agent != new.from_agent:
                raise Changed("not_owner", row)
            if row.generation != new.base_generation:
                raise Changed("generation", row)
            try:
                await conn.execute(
                    """INSERT INTO session_handoffs (id, session_id, from_agent, from_instance, from_principal,
                           target_agent, target_instance, target_principal, status, status_reason, base_generation,
                           state, state_sha256, signature, approval_id, note, deadline_seconds, deadline)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text, $10, $11, $12, $13, $14, $15, $16, $17::int,
                           CASE WHEN $9::text = 'offered' THEN now() + make_interval(secs => $17::int) END)""",
                    new.id,
                    new.session_id,
                    new.from_agent,
                    new.from_instance,
                    new.from_principal,
                    new.target_agent,
                    new.target_instance,
                    new.target_principal,
                    new.status,
                    new.status_reason,
                    new.base_generation,
                    new.state,
                    new.state_sha256,
                    new.signature,
                    new.approval_id,
                    new.note,
                    new.deadline_seconds,
                )
            except asyncpg.UniqueViolationError:
                raise HandoffOpen(str(new.session_id)) from None
            record = await conn.fetchrow(
                f"SELECT {_HANDOFF_NO_STATE} FROM session_handoffs h JOIN sessions s ON s.id = h.session_id "
                "WHERE h.id = $1",
                new.id,
            )
            handoff = HandoffRow.of(record)
            told = await self._tell(conn, [handoff], notify)
        return handoff, told

    async def handoff(self, handoff_id: uuid.UUID, *, with_state: bool = True) -> HandoffRow | None:
        columns = _HANDOFF if with_state else _HANDOFF_NO_STATE
        record = await self.pool.fetchrow(
            f"SELECT {columns} FROM session_handoffs h JOIN sessions s ON s.id = h.session_id WHERE h.id = $1",
            handoff_id,
        )
        return HandoffRow.of(record) if record is not None else None

    async def handoffs(
        self, *, session_id: uuid.UUID | None, agent_id: str | None, status: str, limit: int
    ) -> list[HandoffRow]:
        records = await self.pool.fetch(
            f"""SELECT {_HANDOFF_NO_STATE} FROM session_handoffs h JOIN sessions s ON s.id = h.session_id
                WHERE ($1::uuid IS NULL OR h.session_id = $1)
                  AND ($2::text IS NULL OR h.from_agent = $2 OR h.target_agent = $2)
                  AND ($3::text = '' OR h.status = $3::text)
                ORDER BY h.created_at DESC, h.id LIMIT $4""",
            session_id,
            agent_id,
            status,
            limit,
        )
        return [HandoffRow.of(r) for r in records]

    async def settle(
        self,
        handoff_id: uuid.UUID,
        from_status: tuple[str, ...],
        status: str,
        reason: str,
        notify: Notify | None = None,
        tell_if: tuple[str, ...] = OPEN,
    ) -> tuple[HandoffRow | None, list[Row]]:
        """Moves an open handoff to a final status (rejected, cancelled, refused), with its notices when it was in
        `tell_if` (a held offer was never told of); None when it was not in `from_status` any more. Nothing else
        moves."""
        async with self.pool.acquire() as conn, conn.transaction():
            was = await conn.fetchval("SELECT status FROM session_handoffs WHERE id = $1 FOR UPDATE", handoff_id)
            if was not in from_status:
                return None, []
            record = await conn.fetchrow(
                f"""WITH h AS (UPDATE session_handoffs SET status = $2::text, status_reason = $3, updated_at = now()
                        WHERE id = $1 RETURNING *)
                    SELECT {_HANDOFF_NO_STATE} FROM h JOIN sessions s ON s.id = h.session_id""",
                handoff_id,
                status,
                reason,
            )
            row = HandoffRow.of(record)
            told = await self._tell(conn, [row], notify if was in tell_if else None)
        return row, told

    async def release(
        self, approval_id: uuid.UUID, approved: bool, reason: str, notify: Notify | None = None
    ) -> tuple[list[HandoffRow], list[Row]]:
        """Held handoffs of this approval: offered (their deadline starts now) when approved, refused when not;
        with their notices."""
        async with self.pool.acquire() as conn, conn.transaction():
            records = await conn.fetch(
                f"""WITH h AS (UPDATE session_handoffs SET status = $2::text, status_reason = $3, updated_at = now(),
                        deadline = CASE WHEN $2::text = 'offered' THEN now() + make_interval(secs => deadline_seconds)
                        END
                    WHERE approval_id = $1 AND status = 'held' RETURNING *)
                SELECT {_HANDOFF_NO_STATE} FROM h JOIN sessions s ON s.id = h.session_id""",
                approval_id,
                "offered" if approved else "refused",
                reason,
            )
            rows = [HandoffRow.of(r) for r in records]
            told = await self._tell(conn, rows, notify)
        return rows, told

    async def held(self, limit: int) -> list[uuid.UUID]:
        records = await self.pool.fetch(
            "SELECT DISTINCT approval_id FROM session_handoffs WHERE status = 'held' AND approval_id IS NOT NULL "
            "LIMIT $1",
            limit,
        )
        return [r["approval_id"] for r in records]

    async def expire(
        self, limit: int, handoff_id: uuid.UUID | None = None, notify: Notify | None = None
    ) -> tuple[list[HandoffRow], list[Row]]:
        """Offers past their deadline, expired, with their notices; one a caller holds (accepting it) is skipped
        and settled by it."""
        async with self.pool.acquire() as conn, conn.transaction():
            records = await conn.fetch(
                f"""WITH h AS (UPDATE session_handoffs SET status = 'expired',
                        status_reason = 'no answer before the deadline', updated_at = now()
                    WHERE id IN (SELECT id FROM session_handoffs
                                 WHERE status = 'offered' AND deadline <= now() AND ($2::uuid IS NULL OR id = $2)
                                 ORDER BY deadline LIMIT $1 FOR UPDATE SKIP LOCKED)
                    RETURNING *)
                SELECT {_HANDOFF_NO_STATE} FROM h JOIN sessions s ON s.id = h.session_id""",
                limit,
                handoff_id,
            )
            rows = [HandoffRow.of(r) for r in records]
            told = await self._tell(conn, rows, notify)
        return rows, told

    async def accept(
        self,
        handoff_id: uuid.UUID,
        session_id: uuid.UUID,
        instance: str,
        check: Callable[[HandoffRow, bool], None],
        notify: Notify | None = None,
    ) -> Accepted:
        """The owner change, all of it or nothing: the session (locked first), then the handoff, which must still
        be offered, before its deadline, at the session's generation, and pass `check(handoff, intact)` (the
        integrity check, which raises; `intact`: the state matches its digest, computed by the database, so the state
        never travels here). The new owner takes the session at generation + 1, the history gets its row, and the
        old owner's still unclaimed inbox messages of the conversation move to the new owner."""
        async with self.pool.acquire() as conn, conn.transaction():
            session = await conn.fetchrow(
                f"SELECT {_SESSION_NO_STATE} FROM sessions WHERE id = $1 FOR UPDATE", session_id
            )
            record = await conn.fetchrow(
                f"""SELECT {_HANDOFF_NO_STATE}, h.deadline > clock_timestamp() AS in_time,
                        sha256(h.state) = h.state_sha256 AS intact
                    FROM session_handoffs h JOIN sessions s ON s.id = h.session_id WHERE h.id = $1 FOR UPDATE OF h""",
                handoff_id,
            )
            if session is None or record is None:
                raise Changed("missing")
            fields = dict(record)
            in_time = fields.pop("in_time")
            intact = bool(fields.pop("intact"))
            handoff = HandoffRow(**fields)
            base = SessionRow.of(session)
            if handoff.status != "offered":
                raise Changed("status:" + handoff.status)
            if not in_time:
                raise Changed("late")
            if base.generation != handoff.base_generation:
                raise Changed("generation", base)
            check(handoff, intact)
            # The state is copied inside the database: it never travels to this process on acceptance.
            updated = await conn.fetchrow(
                f"""UPDATE sessions SET owner_agent = $3, owner_instance = $4, owner_principal = $5,
                        generation = generation + 1, state_version = state_version + 1, updated_at = now(),
                        (state, state_sha256) = (SELECT h.state, h.state_sha256 FROM session_handoffs h WHERE h.id = $6)
                    WHERE id = $1 AND generation = $2
                    RETURNING {_SESSION_NO_STATE}""",
                session_id,
                handoff.base_generation,
                handoff.target_agent,
                instance,
                handoff.target_principal,
                handoff_id,
            )
            if updated is None:  # cannot happen under the lock; the fence says so if it ever does
                raise Changed("generation", base)
            now_session = SessionRow.of(updated)
            await conn.execute(
                "UPDATE session_owners SET until = now() WHERE session_id = $1 AND until IS NULL", session_id
            )
            await conn.execute(
                """INSERT INTO session_owners (session_id, generation, agent_id, instance, handoff_id)
                   VALUES ($1, $2, $3, $4, $5)""",
                session_id,
                now_session.generation,
                handoff.target_agent,
                instance,
                handoff_id,
            )
            done = await conn.fetchrow(
                f"""WITH h AS (UPDATE session_handoffs SET status = 'accepted', accepted_instance = $2,
                        status_reason = '', updated_at = now() WHERE id = $1 RETURNING *)
                    SELECT {_HANDOFF_NO_STATE} FROM h JOIN sessions s ON s.id = h.session_id""",
                handoff_id,
                instance,
            )
            moved: list[uuid.UUID] = []
            if handoff.target_agent != handoff.from_agent or instance != base.owner_instance:
                # Re-addressed to the new owner's instance too ("" when it named none): between instances of one
                # agent, only the address changes.
                records = await conn.fetch(
                    """UPDATE messages SET inbox = $3, recipient_agent = $4, recipient_owner = $5,
                           recipient_instance = $7, updated_at = now()
                       WHERE inbox = $1 AND conversation_id = $2 AND status = 'accepted' AND transport = $6
                       RETURNING id""",
                    f"agent:{handoff.from_agent}",
                    base.conversation_id,
                    f"agent:{handoff.target_agent}",
                    handoff.target_agent,
                    handoff.target_principal,
                    INBOX,
                    instance,
                )
                moved = [r["id"] for r in records]
            accepted = HandoffRow.of(done)
            told = await self._tell(conn, [accepted], notify)
        return Accepted(accepted, now_session, moved, told)
