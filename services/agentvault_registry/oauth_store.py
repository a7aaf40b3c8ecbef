"""PostgreSQL storage of the authorization server: OAuth clients, refresh token families and signing keys."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from agentvault.common import pagination

_CLIENT_COLUMNS = (
    "client_id, name, scopes, grant_types, token_endpoint_auth_method, agent_id, jwks, owner_principal_id, kind, "
    "disabled, created_at"
)


@dataclass(frozen=True)
class OAuthClientRecord:
    client_id: str
    name: str
    scopes: list[str]
    grant_types: list[str]
    token_endpoint_auth_method: str
    agent_id: uuid.UUID | None
    jwks: str
    owner_principal_id: str
    kind: str
    disabled: bool
    created_at: datetime


@dataclass(frozen=True)
class RefreshRecord:
    id: str
    family_id: str
    client_id: str
    subject: str
    scopes: list[str]
    secret_hash: bytes
    access_jti: str
    access_exp: datetime
    expires_at: datetime
    used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class SigningKeyRecord:
    kid: str
    private_jwk_encrypted: bytes
    public_jwk: dict[str, Any]
    created_at: datetime
    retire_at: datetime
    expire_at: datetime


def _client(row: asyncpg.Record) -> OAuthClientRecord:
    data = dict(row)
    data["scopes"] = list(data["scopes"])
    data["grant_types"] = list(data["grant_types"])
    return OAuthClientRecord(**data)


def _refresh(row: asyncpg.Record) -> RefreshRecord:
    data = dict(row)
    data["scopes"] = list(data["scopes"])
    data["secret_hash"] = bytes(data["secret_hash"])
    return RefreshRecord(**data)


class OAuthStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # Clients -----------------------------------------------------------------------------------------

    async def agent_exists(self, agent_id: uuid.UUID) -> bool:
        return bool(await self.pool.fetchval("SELECT true FROM agents WHERE id = $1", agent_id))

    async def create_client(self, client: OAuthClientRecord, secret_hash: bytes | None) -> OAuthClientRecord:
        row = await self.pool.fetchrow(
            f"""INSERT INTO oauth_clients (client_id, name, secret_hash, scopes, grant_types,
                    token_endpoint_auth_method, agent_id, jwks, owner_principal_id, kind)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {_CLIENT_COLUMNS}""",
            client.client_id,
            client.name,
            secret_hash,
            client.scopes,
            client.grant_types,
            client.token_endpoint_auth_method,
            client.agent_id,
            client.jwks,
            client.owner_principal_id,
            client.kind,
        )
        return _client(row)

    async def upsert_service_client(
        self, client_id: str, name: str, scopes: list[str], secret_hash: bytes, owner: str
    ) -> None:
        """A mesh service's own client, with the scopes and secret the configuration gives it now."""
        await self.pool.execute(
            """INSERT INTO oauth_clients (client_id, name, secret_hash, scopes, grant_types, owner_principal_id, kind)
               VALUES ($1, $2, $3, $4, ARRAY['client_credentials'], $5, 'service')
               ON CONFLICT (client_id) DO UPDATE SET secret_hash = EXCLUDED.secret_hash, scopes = EXCLUDED.scopes""",
            client_id,
            name,
            secret_hash,
            scopes,
            owner,
        )

    async def get_client(self, client_id: str) -> OAuthClientRecord | None:
        row = await self.pool.fetchrow(f"SELECT {_CLIENT_COLUMNS} FROM oauth_clients WHERE client_id = $1", client_id)
        return _client(row) if row else None

    async def get_client_secret(self, client_id: str) -> tuple[OAuthClientRecord, bytes | None] | None:
        row = await self.pool.fetchrow(
            f"SELECT {_CLIENT_COLUMNS}, secret_hash FROM oauth_clients WHERE client_id = $1", client_id
        )
        if row is None:
            return None
        data = dict(row)
        secret_hash = data.pop("secret_hash")
        data["scopes"] = list(data["scopes"])
        data["grant_types"] = list(data["grant_types"])
        return OAuthClientRecord(**data), bytes(secret_hash) if secret_hash is not None else None

    async def list_clients(
        self, limit: int, after: list[Any] | None
    ) -> tuple[list[OAuthClientRecord], list[Any] | None]:
        params: list[Any] = [limit + 1]
        where = ""
        if after is not None:
            params += list(pagination.time_and_id(after))
            where = "WHERE (created_at, client_id) < ($2, $3)"
        rows = await self.pool.fetch(
            f"""SELECT {_CLIENT_COLUMNS} FROM oauth_clients {where}
                ORDER BY created_at DESC, client_id DESC LIMIT $1""",
            *params,
        )
        clients = [_client(r) for r in rows[:limit]]
        if len(rows) <= limit:
            return clients, None
        return clients, [clients[-1].created_at.isoformat(), clients[-1].client_id]

    async def set_secret(self, client_id: str, secret_hash: bytes) -> OAuthClientRecord | None:
        row = await self.pool.fetchrow(
            f"UPDATE oauth_clients SET secret_hash = $2 WHERE client_id = $1 RETURNING {_CLIENT_COLUMNS}",
            client_id,
            secret_hash,
        )
        return _client(row) if row else None

    async def set_disabled(self, client_id: str, disabled: bool) -> OAuthClientRecord | None:
        row = await self.pool.fetchrow(
            f"UPDATE oauth_clients SET disabled = $2 WHERE client_id = $1 RETURNING {_CLIENT_COLUMNS}",
            client_id,
            disabled,
        )
        return _client(row) if row else None

    async def delete_client(self, client_id: str) -> list[tuple[str, datetime]]:
        """Deletes the client; returns the (jti, exp) of access tokens still live from its refresh tokens."""
        async with self.pool.acquire() as conn, conn.transaction():
            live = await conn.fetch(
                """SELECT access_jti, access_exp FROM oauth_refresh_tokens
                   WHERE client_id = $1 AND access_exp > now()""",
                client_id,
            )
            deleted = await conn.execute("DELETE FROM oauth_clients WHERE client_id = $1", client_id)
        if deleted.endswith(" 0"):
            raise LookupError(client_id)
        return [(r["access_jti"], r["access_exp"]) for r in live]

    # Refresh tokens ----------------------------------------------------------------------------------

    async def insert_refresh(
        self,
        token_id: str,
        family_id: str,
        client_id: str,
        subject: str,
        scopes: list[str],
        secret_hash: bytes,
        access_jti: str,
        access_exp: datetime,
        expires_at: datetime,
    ) -> None:
        await self.pool.execute(
            """INSERT INTO oauth_refresh_tokens
                   (id, family_id, client_id, subject, scopes, secret_hash, access_jti, access_exp, expires_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            token_id,
            family_id,
            client_id,
            subject,
            scopes,
            secret_hash,
            access_jti,
            access_exp,
            expires_at,
        )

    async def get_refresh(self, token_id: str) -> RefreshRecord | None:
        row = await self.pool.fetchrow(
            """SELECT id, family_id, client_id, subject, scopes, secret_hash, access_jti, access_exp, expires_at,
                      used_at, revoked_at
               FROM oauth_refresh_tokens WHERE id = $1""",
            token_id,
        )
        return _refresh(row) if row else None

    async def use_refresh(self, token_id: str) -> bool:
        """Marks a refresh token used; true for exactly one caller, so two concurrent uses are one reuse."""
        result = await self.pool.execute(
            """UPDATE oauth_refresh_tokens SET used_at = now()
               WHERE id = $1 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > now()""",
            token_id,
        )
        return result.endswith(" 1")

    async def revoke_family(self, family_id: str) -> list[tuple[str, datetime]]:
        """Revokes every token of a family; returns the (jti, exp) of access tokens issued from it still live."""
        rows = await self.pool.fetch(
            """UPDATE oauth_refresh_tokens SET revoked_at = COALESCE(revoked_at, now())
               WHERE family_id = $1 RETURNING access_jti, access_exp""",
            family_id,
        )
        return [(r["access_jti"], r["access_exp"]) for r in rows]

    async def revoke_client_refresh(self, client_id: str) -> list[tuple[str, datetime]]:
        """Revokes a client's refresh tokens; returns the (jti, exp) of access tokens issued with them still live."""
        rows = await self.pool.fetch(
            """UPDATE oauth_refresh_tokens SET revoked_at = COALESCE(revoked_at, now())
               WHERE client_id = $1 AND (revoked_at IS NULL OR access_exp > now())
               RETURNING access_jti, access_exp""",
            client_id,
        )
        return [(r["access_jti"], r["access_exp"]) for r in rows if r["access_exp"] > datetime.now(UTC)]

    async def purge_refresh(self) -> int:
        """Drops refresh tokens past their expiry; they can no longer be used nor reused."""
        result = await self.pool.execute("DELETE FROM oauth_refresh_tokens WHERE expires_at < now()")
        return int(result.split()[-1])

    # Signing keys ------------------------------------------------------------------------------------

    async def signing_keys(self) -> list[SigningKeyRecord]:
        """Keys still in the JWKS, newest first."""
        rows = await self.pool.fetch(
            """SELECT kid, private_jwk_encrypted, public_jwk, created_at, retire_at, expire_at
               FROM oauth_signing_keys WHERE expire_at > now() ORDER BY created_at DESC, kid"""
        )
        return [
            SigningKeyRecord(
                kid=r["kid"],
                private_jwk_encrypted=bytes(r["private_jwk_encrypted"]),
                public_jwk=dict(r["public_jwk"]),
                created_at=r["created_at"],
                retire_at=r["retire_at"],
                expire_at=r["expire_at"],
            )
            for r in rows
        ]
