"""The messages table: durable sends, inbox claims with a visibility timeout, push claims with a lease, dead letters.

Every state change is one statement, so two replicas never both move a message; what a change moved is returned,
and the caller announces it (events.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from google.protobuf import timestamp_pb2

from agentvault.messaging.v1 import messaging_service_pb2 as mpb

INBOX = "inbox"
LIVE = ("accepted", "delivered")

_COLUMNS = (
    "id, seq, sender, sender_kind, sender_id, sender_agent, sender_inbox, inbox, recipient_agent, recipient_owner, "
    "recipient_mesh, transport, endpoint, conversation_id, correlation_id, in_reply_to, idempotency_key, "
    "request_hash, body, size, status, status_reason, approval_id, attempts, visible_at, receipt, expire_at, "
    "annotations, created_at, updated_at, traceparent, recipient_instance"
)


# Every column but the message's content: for answers and events that do not need it.
_NO_BODY = _COLUMNS.replace("body,", "''::bytea AS body,")
# A row without its content, for statements of other modules that return messages (Row.of reads it).
ROW_COLUMNS_NO_BODY = _NO_BODY

# Who may take a message from an inbox: (the caller's own inbox, a person's principal id for the agents it owns,
# or "" for an agent, which holds only its own inbox).
Holder = tuple[str, str]


def holds(holder: Holder, row: Row) -> bool:
    inbox, owner = holder
    return row.inbox == inbox or (bool(owner) and row.recipient_owner == owner)


@dataclass(frozen=True)
class Row:
    id: uuid.UUID
    seq: int
    sender: str
    sender_kind: str
    sender_id: str
    sender_agent: str
    sender_inbox: str
    inbox: str
    recipient_agent: str
    recipient_owner: str
    recipient_mesh: str
    transport: str
    endpoint: str
    conversation_id: str
    correlation_id: str
    in_reply_to: uuid.UUID | None
    idempotency_key: str | None
    request_hash: bytes
    body: bytes
    size: int
    status: str
    status_reason: str
    approval_id: uuid.UUID | None
    attempts: int
    visible_at: datetime
    receipt: uuid.UUID | None
    expire_at: datetime | None
    annotations: str
    created_at: datetime
    updated_at: datetime
    # The W3C traceparent of the send (0005_traceparent.sql): its delivery joins the sender's trace.
    traceparent: str = ""
    # The recipient agent's instance it is addressed to, "" for any (0008_recipient_instance.sql).
    recipient_instance: str = ""

    @classmethod
    def of(cls, record: asyncpg.Record) -> Row:
        return cls(**dict(record))

    def proto(self, *, with_content: bool = True) -> mpb.Message:
        message = mpb.Message.FromString(self.body) if with_content else mpb.Message()
        message.id = str(self.id)
        message.format_version = message.format_version or "1"
        message.sender.CopyFrom(
            mpb.Party(kind=self.sender_kind, principal_id=self.sender_id, agent_id=self.sender_agent)
        )
        if self.sender_kind == "peer" and self.sender_inbox.startswith("mesh:"):
            message.sender.mesh = self.sender_inbox[5:]  # a peer mesh's agent, by this mesh's name of the peer
        if not message.HasField("recipient"):  # a reply names none: it goes to the original's sender
            message.recipient.CopyFrom(mpb.Party(agent_id=self.recipient_agent, mesh=self.recipient_mesh))
        message.conversation_id = self.conversation_id
        message.correlation_id = self.correlation_id
        message.in_reply_to = str(self.in_reply_to) if self.in_reply_to else ""
        message.status = self.status
        message.status_reason = self.status_reason
        message.attempts = self.attempts
        message.approval_id = str(self.approval_id) if self.approval_id else ""
        message.transport = self.transport
        message.recipient_instance = self.recipient_instance
        message.create_time.CopyFrom(_stamp(self.created_at))
        message.update_time.CopyFrom(_stamp(self.updated_at))
        return message

    @property
    def participants(self) -> tuple[str, ...]:
        return (self.sender_id, self.inbox, self.recipient_owner)


_ROW_FIELDS = tuple(Row.__dataclass_fields__)
_M_NO_BODY = ", ".join("m." + c.strip() for c in _COLUMNS.split(",")).replace("m.body", "''::bytea AS body")


def _stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


@dataclass(frozen=True)
class NewMessage:
    id: uuid.UUID
    sender: str
    sender_kind: str
    sender_id: str
    sender_agent: str
    sender_inbox: str
    inbox: str
    recipient_agent: str
    recipient_owner: str
    recipient_mesh: str
    transport: str
    endpoint: str
    conversation_id: str
    correlation_id: str
    in_reply_to: uuid.UUID | None
    idempotency_key: str | None
    request_hash: bytes
    body: bytes
    status: str
    approval_id: uuid.UUID | None
    expire_at: datetime | None
    status_reason: str = ""
    traceparent: str = ""
    recipient_instance: str = ""


class IdempotencyConflict(Exception):
    """The key (or the id) was used before with other content, or by another sender (`taken`)."""

    def __init__(self, existing: Row | None) -> None:
        super().__init__("idempotency conflict")
        self.existing = existing


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # Sending ------------------------------------------------------------------------------------------------

    async def insert(self, new: NewMessage, conn: asyncpg.Connection | None = None) -> tuple[Row, bool]:
        """The stored message and whether it was already there (the same send repeated). A repeated id or
        idempotency key with other content, or an id another sender used, is IdempotencyConflict. `conn`: a
        connection in a caller's transaction, so that the message is stored with the change it tells of."""
        db = conn if conn is not None else self.pool
        record = await db.fetchrow(
            f"""
            INSERT INTO messages (id, sender, sender_kind, sender_id, sender_agent, sender_inbox, inbox,
                recipient_agent, recipient_owner, recipient_mesh, transport, endpoint, conversation_id,
                correlation_id, in_reply_to, idempotency_key, request_hash, body, size, status, status_reason,
                approval_id, expire_at, traceparent, recipient_instance)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
                $21, $22, $23, $24, $25)
            ON CONFLICT DO NOTHING
            RETURNING {_COLUMNS}
            """,
            new.id,
            new.sender,
            new.sender_kind,
            new.sender_id,
            new.sender_agent,
            new.sender_inbox,
            new.inbox,
            new.recipient_agent,
            new.recipient_owner,
            new.recipient_mesh,
            new.transport,
            new.endpoint,
            new.conversation_id,
            new.correlation_id,
            new.in_reply_to,
            new.idempotency_key,
            new.request_hash,
            new.body,
            len(new.body),
            new.status,
            new.status_reason,
            new.approval_id,
            new.expire_at,
            new.traceparent,
            new.recipient_instance,
        )
        if record is not None:
            return Row.of(record), False
        existing = await db.fetchrow(
            f"""SELECT {_COLUMNS} FROM messages
                WHERE id = $1 OR (sender = $2 AND idempotency_key = $3) ORDER BY (sender = $2) DESC LIMIT 1""",
            new.id,
            new.sender,
            new.idempotency_key,
        )
        if existing is None:  # deleted in between (purged): the send can be made again
            return await self.insert(new, conn)
        row = Row.of(existing)
        if row.sender != new.sender or row.request_hash != new.request_hash:
            raise IdempotencyConflict(row if row.sender == new.sender else None)
        return row, True

    async def find_repeat(self, sender: str, message_id: uuid.UUID | None, key: str | None) -> Row | None:
        """An earlier message with this (sender-given) id, or this sender's idempotency key."""
        if message_id is None and key is None:
            return None
        record = await self.pool.fetchrow(
            f"""SELECT {_COLUMNS} FROM messages WHERE id = $1 OR (sender = $2 AND idempotency_key = $3)
                ORDER BY (sender = $2) DESC LIMIT 1""",
            message_id,
            sender,
            key,
        )
        return Row.of(record) if record else None

    async def get(self, message_id: uuid.UUID) -> Row | None:
        record = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM messages WHERE id = $1", message_id)
        return Row.of(record) if record else None

    # Inboxes ------------------------------------------------------------------------------------------------

    async def claim_inbox(
        self, inbox: str, limit: int, visibility: float, max_attempts: int, instance: str = ""
    ) -> list[Row]:
        """Up to `limit` deliverable messages of `inbox`, oldest first, each invisible to others for `visibility`
        seconds from now and with a new receipt; in the same statement, those already delivered `max_attempts`
        times without an ack are dead-lettered instead (returned with that status). One indexed scan from the
        head of the inbox, however long its backlog. Only messages addressed to no instance, or to `instance`
        (the receiver's label; "" takes only the former)."""
        records = await self.pool.fetch(
            f"""
            WITH picked AS (
                SELECT id FROM messages
                WHERE inbox = $1 AND status IN ('accepted', 'delivered') AND transport = 'inbox'
                  AND visible_at <= now() AND (expire_at IS NULL OR expire_at > now())
                  AND recipient_instance IN ('', $5)
                ORDER BY seq LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            UPDATE messages m SET
                status = CASE WHEN m.attempts >= $4 THEN 'dead_lettered' ELSE 'delivered' END,
                attempts = CASE WHEN m.attempts >= $4 THEN m.attempts ELSE m.attempts + 1 END,
                receipt = CASE WHEN m.attempts >= $4 THEN NULL ELSE gen_random_uuid() END,
                status_reason = CASE WHEN m.attempts >= $4
                    THEN 'delivered ' || m.attempts || ' times without an ack' ELSE '' END,
                visible_at = now() + make_interval(secs => $3), updated_at = now()
            FROM picked WHERE m.id = picked.id
            RETURNING {", ".join("m." + c.strip() for c in _COLUMNS.split(","))}
            """,
            inbox,
            limit,
            visibility,
            max_attempts,
            instance,
        )
        return sorted((Row.of(r) for r in records), key=lambda r: r.seq)

    async def ack(self, message_id: uuid.UUID, receipt: uuid.UUID, holder: Holder | None) -> tuple[str, Row | None]:
        """("acked", row), ("already", row) when it was acknowledged before, ("stale", row) when the receipt is
        not the current delivery's, ("missing", None) when there is no such message `holder` holds (None: an
        admin, any). The common case is one statement that also checks the holder; the row comes back without its
        body (events and answers do not need it)."""
        inbox, owner = holder if holder is not None else ("", "")
        record = await self.pool.fetchrow(
            f"""UPDATE messages SET status = 'acknowledged', updated_at = now(), receipt = NULL
                WHERE id = $1 AND receipt = $2 AND status = 'delivered'
                  AND ($3 = '' OR inbox = $3 OR ($4 <> '' AND recipient_owner = $4))
                RETURNING {_NO_BODY}""",
            message_id,
            receipt,
            inbox,
            owner,
        )
        if record is not None:
            return "acked", Row.of(record)
        row = await self.get(message_id)
        if row is None or (holder is not None and not holds(holder, row)):
            return "missing", None
        return ("already" if row.status == "acknowledged" else "stale"), row

    async def ack_many(
        self, receipts: Sequence[tuple[uuid.UUID, uuid.UUID]], holder: Holder | None
    ) -> list[tuple[uuid.UUID, str, Row | None]]:
        """`ack` for many (message id, receipt) pairs in one statement (ids distinct): for each, in order, its
        result ("acked", "already", "stale", "missing") and, when acked, the row without its body."""
        inbox, owner = holder if holder is not None else ("", "")
        records = await self.pool.fetch(
            f"""
            WITH wanted AS (
                SELECT w.id, w.receipt, w.n FROM unnest($1::uuid[], $2::uuid[]) WITH ORDINALITY AS w(id, receipt, n)
            ), acked AS (
                UPDATE messages m SET status = 'acknowledged', updated_at = now(), receipt = NULL
                FROM wanted w
                WHERE m.id = w.id AND m.receipt = w.receipt AND m.status = 'delivered'
                  AND ($3 = '' OR m.inbox = $3 OR ($4 <> '' AND m.recipient_owner = $4))
                RETURNING {_M_NO_BODY}
            )
            SELECT w.id AS wanted_id, o.status AS was_status, o.inbox AS was_inbox,
                o.recipient_owner AS was_owner, a.*
            FROM wanted w
            LEFT JOIN acked a ON a.id = w.id
            LEFT JOIN messages o ON o.id = w.id
            ORDER BY w.n
            """,
            [m for m, _ in receipts],
            [r for _, r in receipts],
            inbox,
            owner,
        )
        out: list[tuple[uuid.UUID, str, Row | None]] = []
        for record in records:
            wanted = record["wanted_id"]
            if record["id"] is not None:
                out.append((wanted, "acked", Row(**{k: record[k] for k in _ROW_FIELDS})))
            elif record["was_status"] is None or (
                holder is not None and not (record["was_inbox"] == inbox or (owner and record["was_owner"] == owner))
            ):
                out.append((wanted, "missing", None))
            else:
                out.append((wanted, "already" if record["was_status"] == "acknowledged" else "stale", None))
        return out

    async def nack(
        self, message_id: uuid.UUID, receipt: uuid.UUID, delay: float, reason: str, dead_letter: bool
    ) -> tuple[str, Row | None]:
        """("nacked", row) or, as ack, ("stale", row) / ("missing", None)."""
        if dead_letter:
            sql = f"""UPDATE messages SET status = 'dead_lettered', updated_at = now(), receipt = NULL,
                        status_reason = $3
                      WHERE id = $1 AND receipt = $2 AND status = 'delivered' RETURNING {_COLUMNS}"""
            args: tuple[Any, ...] = (message_id, receipt, reason or "dead-lettered by its receiver")
        else:
            sql = f"""UPDATE messages SET visible_at = now() + make_interval(secs => $3), updated_at = now(),
                        receipt = NULL, status_reason = $4
                      WHERE id = $1 AND receipt = $2 AND status = 'delivered' RETURNING {_COLUMNS}"""
            args = (message_id, receipt, delay, reason)
        record = await self.pool.fetchrow(sql, *args)
        if record is not None:
            return "nacked", Row.of(record)
        row = await self.get(message_id)
        return ("missing", None) if row is None else ("stale", row)

    async def find_reply(self, inbox: str, original: uuid.UUID) -> Row | None:
        """The first unacknowledged reply to `original` in `inbox`, taken (acknowledged) at once."""
        record = await self.pool.fetchrow(
            f"""
            WITH picked AS (
                SELECT id FROM messages
                WHERE in_reply_to = $2 AND inbox = $1 AND status IN ('accepted', 'delivered')
                ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED
            )
            UPDATE messages m SET status = 'acknowledged', attempts = m.attempts + 1, receipt = NULL,
                updated_at = now()
            FROM picked WHERE m.id = picked.id
            RETURNING {", ".join("m." + c.strip() for c in _COLUMNS.split(","))}
            """,
            inbox,
            original,
        )
        return Row.of(record) if record else None

    # Push delivery ------------------------------------------------------------------------------------------

    async def claim_due(self, limit: int, lease: float, transports: Sequence[str]) -> list[Row]:
        """Up to `limit` messages due for a push transport, held for `lease` seconds by this worker (a worker that
        dies leaves them due again when the lease ends: delivery is at least once)."""
        records = await self.pool.fetch(
            f"""
            WITH picked AS (
                SELECT id FROM messages
                WHERE status = 'accepted' AND transport <> 'inbox' AND visible_at <= now()
                  AND transport = ANY($3::text[])
                ORDER BY visible_at LIMIT $1
                FOR UPDATE SKIP LOCKED
            )
            UPDATE messages m SET attempts = m.attempts + 1, visible_at = now() + make_interval(secs => $2),
                receipt = gen_random_uuid(), updated_at = now()
            FROM picked WHERE m.id = picked.id
            RETURNING {", ".join("m." + c.strip() for c in _COLUMNS.split(","))}
            """,
            limit,
            lease,
            list(transports),
        )
        return sorted((Row.of(r) for r in records), key=lambda r: r.seq)

    async def settle(self, row: Row, status: str, reason: str, annotations: dict[str, str] | None = None) -> Row | None:
        """The outcome of the push attempt `row` names (by its receipt); None when another worker has taken the
        message since (this worker's lease ran out)."""
        record = await self.pool.fetchrow(
            f"""UPDATE messages SET status = $3, status_reason = $4, updated_at = now(), receipt = NULL,
                    annotations = annotations || $5::jsonb
                WHERE id = $1 AND receipt = $2 RETURNING {_COLUMNS}""",
            row.id,
            row.receipt,
            status,
            reason[:1024],
            json.dumps(annotations or {}),
        )
        return Row.of(record) if record else None

    async def retry_later(self, row: Row, delay: float, reason: str) -> Row | None:
        """The attempt failed: due again in `delay` seconds (None when the message was taken since)."""
        record = await self.pool.fetchrow(
            f"""UPDATE messages SET visible_at = now() + make_interval(secs => $3), status_reason = $4,
                    updated_at = now(), receipt = NULL
                WHERE id = $1 AND receipt = $2 RETURNING {_COLUMNS}""",
            row.id,
            row.receipt,
            delay,
            reason[:1024],
        )
        return Row.of(record) if record else None

    async def postpone(self, row: Row, delay: float, reason: str) -> Row | None:
        """Not attempted (its endpoint's circuit is open): due again later, the attempt not counted."""
        record = await self.pool.fetchrow(
            f"""UPDATE messages SET visible_at = now() + make_interval(secs => $3), status_reason = $4,
                    attempts = greatest(attempts - 1, 0), updated_at = now(), receipt = NULL
                WHERE id = $1 AND receipt = $2 RETURNING {_COLUMNS}""",
            row.id,
            row.receipt,
            delay,
            reason[:1024],
        )
        return Row.of(record) if record else None

    # Held messages, expiry, retention -----------------------------------------------------------------------

    async def held(self, limit: int) -> list[uuid.UUID]:
        """The approvals held messages wait for."""
        records = await self.pool.fetch(
            "SELECT DISTINCT approval_id FROM messages WHERE status = 'held' AND approval_id IS NOT NULL LIMIT $1",
            limit,
        )
        return [r["approval_id"] for r in records]

    async def release(self, approval_id: uuid.UUID, approved: bool, reason: str) -> list[Row]:
        """The messages held for this approval: accepted when approved, refused when not."""
        records = await self.pool.fetch(
            f"""UPDATE messages SET status = $2, status_reason = $3, updated_at = now(), visible_at = now()
                WHERE approval_id = $1 AND status = 'held' RETURNING {_COLUMNS}""",
            approval_id,
            "accepted" if approved else "refused",
            reason[:1024],
        )
        return [Row.of(r) for r in records]

    async def expire(self, limit: int) -> list[Row]:
        """Messages past their expiry that were never handled: expired, never delivered after it."""
        records = await self.pool.fetch(
            f"""
            WITH picked AS (
                SELECT id FROM messages
                WHERE expire_at IS NOT NULL AND expire_at <= now() AND status IN ('held', 'accepted', 'delivered')
                LIMIT $1 FOR UPDATE SKIP LOCKED
            )
            UPDATE messages m SET status = 'expired', updated_at = now(), receipt = NULL,
                status_reason = 'expired before it was handled'
            FROM picked WHERE m.id = picked.id
            RETURNING {", ".join("m." + c.strip() for c in _COLUMNS.split(","))}
            """,
            limit,
        )
        return [Row.of(r) for r in records]

    async def prune(self, retention_seconds: float, limit: int) -> int:
        """Deletes finished messages older than the retention; how many."""
        result = await self.pool.execute(
            """
            DELETE FROM messages WHERE id IN (
                SELECT id FROM messages
                WHERE status IN ('acknowledged', 'failed', 'dead_lettered', 'expired', 'refused')
                  AND updated_at < now() - make_interval(secs => $1)
                LIMIT $2)
            """,
            retention_seconds,
            limit,
        )
        return int(result.split()[-1])

    # Listing and dead letters -------------------------------------------------------------------------------

    async def page(
        self,
        limit: int,
        after: tuple[datetime, str] | None,
        *,
        viewer: tuple[str, ...] | None,
        conversation_id: str = "",
        correlation_id: str = "",
        agent_id: str = "",
        status: str = "",
    ) -> list[Row]:
        """Newest first. `viewer`: the principal ids and inboxes whose messages may be shown (None: all)."""
        where = ["TRUE"]
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if viewer is not None:
            ids = arg(list(viewer))
            where.append(
                f"(sender_id = ANY({ids}::text[]) OR sender_inbox = ANY({ids}::text[]) OR inbox = ANY({ids}::text[]) "
                f"OR recipient_owner = ANY({ids}::text[]))"
            )
        if conversation_id:
            where.append(f"conversation_id = {arg(conversation_id)}")
        if correlation_id:
            where.append(f"correlation_id = {arg(correlation_id)}")
        if agent_id:
            a = arg(agent_id)
            where.append(f"(recipient_agent = {a} OR sender_agent = {a})")
        if status:
            where.append(f"status = {arg(status)}")
        if after is not None:
            where.append(f"(created_at, id) < ({arg(after[0])}, {arg(uuid.UUID(after[1]))})")
        records = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM messages WHERE {' AND '.join(where)} "
            f"ORDER BY created_at DESC, id DESC LIMIT {arg(limit)}",
            *args,
        )
        return [Row.of(r) for r in records]

    async def replay(self, message_id: uuid.UUID) -> Row | None:
        record = await self.pool.fetchrow(
            f"""UPDATE messages SET status = 'accepted', attempts = 0, visible_at = now(), receipt = NULL,
                    status_reason = 'replayed from the dead-letter queue', updated_at = now()
                WHERE id = $1 AND status = 'dead_lettered' RETURNING {_COLUMNS}""",
            message_id,
        )
        return Row.of(record) if record else None

    async def purge(self, agent_id: str, before: datetime | None) -> int:
        result = await self.pool.execute(
            """DELETE FROM messages WHERE status = 'dead_lettered'
                 AND ($1 = '' OR recipient_agent = $1) AND ($2::timestamptz IS NULL OR updated_at < $2)""",
            agent_id,
            before,
        )
        return int(result.split()[-1])

    async def depth(self) -> dict[tuple[str, str], int]:
        """Messages not yet finished, by transport and status (the queue-depth gauge)."""
        records = await self.pool.fetch(
            "SELECT transport, status, count(*) AS n FROM messages "
            "WHERE status IN ('held', 'accepted', 'delivered') GROUP BY transport, status"
        )
        return {(r["transport"], r["status"]): r["n"] for r in records}
