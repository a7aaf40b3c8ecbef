"""SQL for federation peers, issued federation credentials and the inbound query log."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import astuple, dataclass
from datetime import datetime
from typing import Any

import asyncpg
from prometheus_client import Counter

from agentvault.common import pagination
from agentvault.common.errors import invalid

# Every read of a federation credential from the database: a peer's call the credential cache did not answer.
CREDENTIAL_READS = Counter(
    "registry_federation_credential_reads_total", "Federation credentials read from the database."
)

_PEER_COLUMNS = (
    "id, name, registry_url, api_key, is_active, last_sync, last_health_check, health_status, agent_count, "
    "metadata, protocol, grpc_endpoint, require_mtls, consecutive_failures, is_down, created_at, updated_at"
)
_CREDENTIAL_COLUMNS = "id, name, token_encrypted, created_at, revoked_at, last_used_at"
_INVITATION_COLUMNS = (
    "id, name, private_key_encrypted, secret_encrypted, public_key, inviter_url, created_at, expires_at, redeemed_at, "
    "redeemed_by, credential_id"
)


@dataclass(frozen=True)
class PeerRecord:
    id: str
    name: str
    registry_url: str
    api_key: str | None  # encrypted
    is_active: bool
    last_sync: datetime | None
    last_health_check: datetime | None
    health_status: str
    agent_count: int
    metadata: dict[str, str]
    protocol: str
    grpc_endpoint: str
    require_mtls: bool
    consecutive_failures: int
    is_down: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class CredentialRecord:
    id: str
    name: str
    token_encrypted: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class InvitationRecord:
    id: str
    name: str
    private_key_encrypted: str | None  # erased once redeemed
    secret_encrypted: str
    public_key: bytes
    inviter_url: str
    created_at: datetime
    expires_at: datetime
    redeemed_at: datetime | None
    redeemed_by: str
    credential_id: str


def _invitation(row: asyncpg.Record) -> InvitationRecord:
    data = dict(row)
    data["id"] = str(data["id"])
    return InvitationRecord(**data)


class InvitationGone(Exception):
    """The invitation was redeemed (or expired, or deleted) between its proof check and its redemption."""


def _peer(row: asyncpg.Record) -> PeerRecord:
    data = dict(row)
    data["id"] = str(data["id"])
    metadata = data["metadata"]
    data["metadata"] = json.loads(metadata) if isinstance(metadata, str) else dict(metadata)
    return PeerRecord(**data)


def _peer_id(value: str, field: str = "peer_id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError):
        raise invalid(field, f"must be a UUID (got {value[:80]!r})") from None


# Columns a caller may write, in the order PeerWrite lists them.
PEER_WRITABLE = (
    "name",
    "registry_url",
    "api_key",
    "is_active",
    "protocol",
    "grpc_endpoint",
    "require_mtls",
    "metadata",
)


@dataclass(frozen=True)
class InboundLogRow:
    """One federation query a peer made, as federation_inbound_log stores it (fields in column order)."""

    credential_id: str
    peer_name: str
    peer_registry: str
    method: str
    query: dict[str, Any]
    result_count: int
    response_time_ms: float
    created_at: datetime


async def _insert_peer(conn: asyncpg.Connection, values: dict[str, Any]) -> asyncpg.Record:
    columns = [c for c in PEER_WRITABLE if c in values]
    placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
    return await conn.fetchrow(
        f"INSERT INTO federation_peers ({', '.join(columns)}) VALUES ({placeholders}) RETURNING {_PEER_COLUMNS}",
        *(values[c] for c in columns),
    )


async def _issued_to(conn: asyncpg.Connection, peer_id: Any, credential_id: str) -> None:
    """Records which credential an invitation handshake issued to the peer it created (deleting the peer revokes it)."""
    await conn.execute("UPDATE federation_peers SET issued_credential_id = $2 WHERE id = $1", peer_id, credential_id)


class FederationStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create_peer(self, values: dict[str, Any]) -> PeerRecord:
        columns = [c for c in PEER_WRITABLE if c in values]
        placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
        row = await self.pool.fetchrow(
            f"INSERT INTO federation_peers ({', '.join(columns)}) VALUES ({placeholders}) RETURNING {_PEER_COLUMNS}",
            *(values[c] for c in columns),
        )
        return _peer(row)

    async def upsert_declared_peer(self, values: dict[str, Any]) -> PeerRecord:
        """Inserts a peer from the declared-peers file, or updates the one with its URL (keeping is_active)."""
        columns = [c for c in PEER_WRITABLE if c in values and c != "is_active"]
        placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c != "registry_url")
        row = await self.pool.fetchrow(
            f"""INSERT INTO federation_peers ({", ".join(columns)}) VALUES ({placeholders})
                ON CONFLICT (registry_url) DO UPDATE SET {updates}, updated_at = now()
                RETURNING {_PEER_COLUMNS}""",
            *(values[c] for c in columns),
        )
        return _peer(row)

    async def get_peer(self, peer_id: str) -> PeerRecord | None:
        row = await self.pool.fetchrow(f"SELECT {_PEER_COLUMNS} FROM federation_peers WHERE id = $1", _peer_id(peer_id))
        return _peer(row) if row else None

    async def list_peers(
        self, limit: int, after: list[Any] | None, *, active_only: bool = False
    ) -> tuple[list[PeerRecord], list[Any] | None]:
        where: list[str] = []
        params: list[Any] = [limit + 1]
        if active_only:
            where.append("is_active")
        if after is not None:
            if len(after) != 2:
                raise invalid("page_token", "is not a valid page token")
            params += [str(after[0]), _peer_id(str(after[1]), "page_token")]
            where.append("(name, id) > ($2, $3)")
        clause = "WHERE " + " AND ".join(where) if where else ""
        rows = await self.pool.fetch(
            f"SELECT {_PEER_COLUMNS} FROM federation_peers {clause} ORDER BY name, id LIMIT $1", *params
        )
        peers = [_peer(r) for r in rows[:limit]]
        more = len(rows) > limit
        return peers, ([peers[-1].name, peers[-1].id] if more else None)

    async def update_peer(self, peer_id: str, values: dict[str, Any]) -> PeerRecord | None:
        columns = [c for c in PEER_WRITABLE if c in values]
        if not columns:
            return await self.get_peer(peer_id)
        sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(columns))
        row = await self.pool.fetchrow(
            f"UPDATE federation_peers SET {sets}, updated_at = now() WHERE id = $1 RETURNING {_PEER_COLUMNS}",
            _peer_id(peer_id, "peer.id"),
            *(values[c] for c in columns),
        )
        return _peer(row) if row else None

    async def delete_peer(self, peer_id: str) -> tuple[bool, str | None]:
        """Deletes the peer; (whether it existed, the id of the credential an invitation handshake issued to it,
        revoked in the same transaction, or None)."""
        async with self.pool.acquire() as conn, conn.transaction():
            deleted = await conn.fetchrow(
                "DELETE FROM federation_peers WHERE id = $1 RETURNING issued_credential_id", _peer_id(peer_id)
            )
            if deleted is None:
                return False, None
            issued = deleted["issued_credential_id"]
            if issued is None:
                return True, None
            revoked = await conn.fetchval(
                """UPDATE federation_credentials SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1
                   RETURNING id""",
                issued,
            )
            return True, revoked

    async def record_health(
        self,
        peer_id: str,
        status: str,
        agent_count: int | None,
        is_down: bool,
        consecutive_failures: int,
        checked_at: datetime,
    ) -> PeerRecord | None:
        row = await self.pool.fetchrow(
            f"""UPDATE federation_peers SET health_status = $2, last_health_check = $3, is_down = $4,
                    consecutive_failures = $5,
                    agent_count = COALESCE($6, agent_count),
                    last_sync = CASE WHEN $6::int IS NULL THEN last_sync ELSE $3 END
                WHERE id = $1 RETURNING {_PEER_COLUMNS}""",
            _peer_id(peer_id),
            status,
            checked_at,
            is_down,
            consecutive_failures,
            agent_count,
        )
        return _peer(row) if row else None

    # Credentials issued to peer meshes ---------------------------------------------------------------

    async def insert_credential(
        self, cred_id: str, name: str, token_encrypted: str, created_by: str
    ) -> CredentialRecord:
        row = await self.pool.fetchrow(
            f"""INSERT INTO federation_credentials (id, name, token_encrypted, created_by) VALUES ($1, $2, $3, $4)
                RETURNING {_CREDENTIAL_COLUMNS}""",
            cred_id,
            name,
            token_encrypted,
            created_by,
        )
        return CredentialRecord(**dict(row))

    async def get_credential(self, cred_id: str) -> CredentialRecord | None:
        CREDENTIAL_READS.inc()
        row = await self.pool.fetchrow(
            f"SELECT {_CREDENTIAL_COLUMNS} FROM federation_credentials WHERE id = $1", cred_id
        )
        return CredentialRecord(**dict(row)) if row else None

    async def list_credentials(
        self, limit: int, after: list[Any] | None
    ) -> tuple[list[CredentialRecord], list[Any] | None]:
        params: list[Any] = [limit + 1]
        where = ""
        if after is not None:
            params += list(pagination.time_and_id(after))
            where = "WHERE (created_at, id) < ($2, $3)"
        rows = await self.pool.fetch(
            f"""SELECT {_CREDENTIAL_COLUMNS} FROM federation_credentials {where}
                ORDER BY created_at DESC, id DESC LIMIT $1""",
            *params,
        )
        creds = [CredentialRecord(**dict(r)) for r in rows[:limit]]
        if len(rows) <= limit:
            return creds, None
        return creds, [creds[-1].created_at.isoformat(), creds[-1].id]

    async def revoke_credential(self, cred_id: str) -> CredentialRecord | None:
        row = await self.pool.fetchrow(
            f"""UPDATE federation_credentials SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1
                RETURNING {_CREDENTIAL_COLUMNS}""",
            cred_id,
        )
        return CredentialRecord(**dict(row)) if row else None

    # Invitations this mesh issued, and the links an invitation handshake creates --------------------------

    async def insert_invitation(
        self,
        inv_id: str,
        name: str,
        sealed: tuple[str, str],
        public: tuple[bytes, str],
        created_by: str,
        ttl: int,
    ) -> InvitationRecord:
        """`sealed`: the encrypted private key and secret; `public`: the public key and this mesh's URL."""
        row = await self.pool.fetchrow(
            f"""INSERT INTO federation_invitations (id, name, private_key_encrypted, secret_encrypted, public_key,
                    inviter_url, created_by, expires_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
                RETURNING {_INVITATION_COLUMNS}""",
            uuid.UUID(inv_id),
            name,
            *sealed,
            *public,
            created_by,
            float(ttl),
        )
        return _invitation(row)

    async def get_invitation(self, inv_id: str) -> InvitationRecord | None:
        row = await self.pool.fetchrow(
            f"SELECT {_INVITATION_COLUMNS} FROM federation_invitations WHERE id = $1", uuid.UUID(inv_id)
        )
        return _invitation(row) if row else None

    async def list_invitations(
        self, limit: int, after: list[Any] | None
    ) -> tuple[list[InvitationRecord], list[Any] | None]:
        params: list[Any] = [limit + 1]
        where = ""
        if after is not None:
            when, last_id = pagination.time_and_id(after)
            params += [when, _peer_id(last_id, "page_token")]
            where = "WHERE (created_at, id) < ($2, $3)"
        rows = await self.pool.fetch(
            f"""SELECT {_INVITATION_COLUMNS} FROM federation_invitations {where}
                ORDER BY created_at DESC, id DESC LIMIT $1""",
            *params,
        )
        found = [_invitation(r) for r in rows[:limit]]
        if len(rows) <= limit:
            return found, None
        return found, [found[-1].created_at.isoformat(), found[-1].id]

    async def delete_invitation(self, inv_id: str) -> bool:
        result = await self.pool.execute("DELETE FROM federation_invitations WHERE id = $1", _peer_id(inv_id, "id"))
        return bool(result.endswith(" 1"))

    async def redeem_invitation(
        self,
        inv_id: str,
        redeemed_by: str,
        credential: tuple[str, str, str],
        peer: dict[str, Any] | None,
    ) -> None:
        """Marks the invitation redeemed (erasing its private key), creates the redeemer's credential
        (id, name, encrypted token) and, when given, the redeemer as a peer: all or nothing. Exactly one of racing
        redemptions passes the conditional update; the others raise InvitationGone, and a failing insert (a peer
        with that URL exists already) leaves the invitation unredeemed."""
        async with self.pool.acquire() as conn, conn.transaction():
            won = await conn.fetchval(
                """UPDATE federation_invitations
                   SET redeemed_at = now(), redeemed_by = $2, credential_id = $3, private_key_encrypted = NULL
                   WHERE id = $1 AND redeemed_at IS NULL AND expires_at > now() RETURNING id""",
                uuid.UUID(inv_id),
                redeemed_by,
                credential[0],
            )
            if won is None:
                raise InvitationGone(inv_id)
            await conn.execute(
                """INSERT INTO federation_credentials (id, name, token_encrypted, created_by)
                   VALUES ($1, $2, $3, 'invitation:' || $4)""",
                *credential,
                inv_id,
            )
            if peer is not None:
                row = await _insert_peer(conn, peer)
                await _issued_to(conn, row["id"], credential[0])

    async def link_peer(self, peer: dict[str, Any], credential: tuple[str, str, str], created_by: str) -> PeerRecord:
        """The redeeming side of a handshake: the peer and the credential issued to it, together."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await _insert_peer(conn, peer)
            await conn.execute(
                "INSERT INTO federation_credentials (id, name, token_encrypted, created_by) VALUES ($1, $2, $3, $4)",
                *credential,
                created_by,
            )
            await _issued_to(conn, row["id"], credential[0])
        return _peer(row)

    async def peer_url_taken(self, registry_url: str) -> bool:
        return bool(await self.pool.fetchval("SELECT 1 FROM federation_peers WHERE registry_url = $1", registry_url))

    async def log_inbound(self, rows: list[InboundLogRow]) -> None:
        """Inbound federation queries; each credential's last use moves to its latest query."""
        last_used: dict[str, datetime] = {}
        for row in rows:
            last_used[row.credential_id] = max(row.created_at, last_used.get(row.credential_id, row.created_at))
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                """INSERT INTO federation_inbound_log (credential_id, peer_name, peer_registry, method, query,
                       result_count, response_time_ms, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                [astuple(row) for row in rows],
            )
            await conn.execute(
                """UPDATE federation_credentials c SET last_used_at = GREATEST(c.last_used_at, u.used)
                   FROM unnest($1::text[], $2::timestamptz[]) AS u(id, used) WHERE c.id = u.id""",
                list(last_used),
                list(last_used.values()),
            )

    async def rotate_secrets(self, rotate: Callable[[str], str]) -> int:
        """Re-encrypts every stored peer key and issued token under the primary key; returns how many changed.

        Rows are locked while rewritten, so replicas starting together do not fight over them.
        """
        changed = 0
        async with self.pool.acquire() as conn, conn.transaction():
            for table, column in (
                ("federation_peers", "api_key"),
                ("federation_credentials", "token_encrypted"),
                ("federation_invitations", "private_key_encrypted"),
                ("federation_invitations", "secret_encrypted"),
            ):
                rows = await conn.fetch(
                    f"SELECT id, {column} AS secret FROM {table} WHERE {column} IS NOT NULL FOR UPDATE"
                )
                for row in rows:
                    rotated = rotate(row["secret"])
                    if rotated != row["secret"]:
                        await conn.execute(f"UPDATE {table} SET {column} = $2 WHERE id = $1", row["id"], rotated)
                        changed += 1
        return changed

    async def count_shared_agents(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM agents WHERE sharing = 'federated'"))
