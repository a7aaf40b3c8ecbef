"""SQL for agents, capabilities and API keys. Every statement is parameterized; nothing here knows protobuf."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg

from agentvault.common import versions
from agentvault.common.agents import Agent, AgentAuth, AgentQuery, AgentSpec, Capability, Endpoint
from agentvault.common.errors import NotFound, Unavailable, invalid
from agentvault.common.principal import HEALTH_REPORT, Principal
from agentvault.common.secretbox import SecretBox
from agentvault_registry.domain import ApiKey

_COLUMNS = (
    "a.id, a.did, a.name, a.description, a.version, a.agent_type, a.capabilities, a.endpoints, a.tags, "
    "a.owner, a.sharing, a.health_check_url, a.health_status, a.created_at, a.updated_at, a.auth, "
    "(a.auth_secret IS NOT NULL) AS auth_secret_set"
)
# RETURNING cannot name the table's alias.
_RETURNING = _COLUMNS.replace("a.", "")
_KEY_COLUMNS = "id, name, role, principal_id, created_at, revoked_at"
_WORD = re.compile(r"\w+", re.UNICODE)
MAX_SEARCH_TERMS = 16


# agent_capabilities as rows are copied into it: the capability, then its parsed version key.
CAPABILITY_COLUMNS = [
    "agent_id", "kind", "name", "version", "v_major", "v_minor", "v_patch", "v_release", "description"
]  # fmt: skip


def capability_rows(agent_id: uuid.UUID, spec: AgentSpec) -> list[tuple[Any, ...]]:
    """The agent's rows of agent_capabilities, in CAPABILITY_COLUMNS order."""
    rows = []
    for cap in spec.capabilities:
        key: tuple[int | None, ...] = (None, None, None, None)
        if cap.version:
            key = versions.parse_version(cap.version).key
        rows.append((agent_id, cap.kind, cap.name, cap.version, *key, cap.description))
    return rows


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def search_terms(text: str) -> str:
    """A prefix-matching tsquery (`nlp:* & summar:*`) built from the words of free text.

    Only word characters reach to_tsquery, so no user input can form tsquery syntax.
    """
    words = _WORD.findall(text.lower())[:MAX_SEARCH_TERMS]
    return " & ".join(f"{w}:*" for w in words)


def _texts(spec: AgentSpec) -> tuple[str, str]:
    keywords = " ".join(
        [spec.agent_type, *spec.tags, *(w for c in spec.capabilities for w in (c.name, c.title, *c.tags))]
    )
    prose = " ".join([spec.description, *(c.description for c in spec.capabilities)])
    return keywords, prose


def _agent(row: asyncpg.Record) -> Agent:
    spec = AgentSpec(
        did=row["did"],
        name=row["name"],
        description=row["description"],
        version=row["version"],
        agent_type=row["agent_type"],
        capabilities=tuple(Capability.from_json(c) for c in row["capabilities"]),
        endpoints=tuple(Endpoint(**e) for e in row["endpoints"]),
        tags=tuple(row["tags"]),
        sharing=row["sharing"],
        health_check_url=row["health_check_url"],
        auth=AgentAuth.from_json(row["auth"], row["auth_secret_set"]),
    )
    return Agent(
        id=str(row["id"]),
        owner=row["owner"],
        spec=spec,
        health_status=row["health_status"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def parse_id(value: str, field: str = "id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError):
        raise invalid(field, f"must be a UUID (got {value[:80]!r})") from None


class Store:
    def __init__(self, pool: asyncpg.Pool, box: SecretBox | None = None) -> None:
        self.pool = pool
        # Encrypts agents' auth secrets (FEDERATION_ENCRYPTION_KEYS); without it no agent can be given one.
        self.box = box

    def _sealed_secret(self, auth: AgentAuth) -> str | None:
        """The new secret encrypted, or None when the request sent none (the stored one is kept or cleared)."""
        secret = auth.secret
        if not secret:
            return None
        if self.box is None:
            raise Unavailable(
                "this registry cannot store agents' secrets: FEDERATION_ENCRYPTION_KEYS is not set",
                "ENCRYPTION_KEY_MISSING",
            )
        return self.box.encrypt(secret)

    # Agents ------------------------------------------------------------------------------------------

    async def create_agent(self, owner: str, spec: AgentSpec) -> Agent:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await self._insert(conn, owner, spec)
            await self._write_capabilities(conn, row["id"], spec)
        return _agent(row)

    async def _insert(self, conn: asyncpg.Connection, owner: str, spec: AgentSpec) -> asyncpg.Record:
        keywords, prose = _texts(spec)
        return await conn.fetchrow(
            f"""INSERT INTO agents (did, name, description, version, agent_type, capabilities, endpoints, tags,
                    owner, sharing, health_check_url, search_vector, auth, auth_secret)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                    setweight(to_tsvector('english', $12), 'A') ||
                    setweight(to_tsvector('english', $13), 'B') ||
                    setweight(to_tsvector('english', $14), 'C'), $15, $16)
                RETURNING {_RETURNING}""",
            *self._agent_params(spec),
            owner,
            spec.sharing,
            spec.health_check_url,
            spec.name,
            keywords,
            prose,
            spec.auth.as_json(),
            self._sealed_secret(spec.auth),
        )

    @staticmethod
    def _agent_params(spec: AgentSpec) -> tuple[Any, ...]:
        return (
            spec.did,
            spec.name,
            spec.description,
            spec.version,
            spec.agent_type,
            [c.as_json() for c in spec.capabilities],
            [e.as_json() for e in spec.endpoints],
            list(spec.tags),
        )

    @staticmethod
    async def _write_capabilities(conn: asyncpg.Connection, agent_id: uuid.UUID, spec: AgentSpec) -> None:
        await conn.execute("DELETE FROM agent_capabilities WHERE agent_id = $1", agent_id)
        if not spec.capabilities:
            return
        await conn.copy_records_to_table(
            "agent_capabilities",
            records=capability_rows(agent_id, spec),
            columns=CAPABILITY_COLUMNS,
        )

    async def get_agent(self, agent_id: str) -> Agent | None:
        row = await self.pool.fetchrow(f"SELECT {_COLUMNS} FROM agents a WHERE a.id = $1", parse_id(agent_id))
        return _agent(row) if row else None

    async def update_agent(
        self, agent_id: str, authorize: Callable[[Agent], None], apply: Callable[[AgentSpec], AgentSpec]
    ) -> Agent:
        """Locks the agent, checks `authorize`, writes `apply(current spec)`; all in one transaction."""
        uid = parse_id(agent_id, "agent.id")
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM agents a WHERE a.id = $1 FOR UPDATE", uid)
            if row is None:
                raise NotFound(f"agent {agent_id} not found", "AGENT_NOT_FOUND", id=agent_id)
            current = _agent(row)
            authorize(current)
            spec = apply(current.spec)
            keywords, prose = _texts(spec)
            row = await conn.fetchrow(
                f"""UPDATE agents SET did = $2, name = $3, description = $4, version = $5, agent_type = $6,
                        capabilities = $7, endpoints = $8, tags = $9, sharing = $10, health_check_url = $11,
                        search_vector = setweight(to_tsvector('english', $12), 'A') ||
                            setweight(to_tsvector('english', $13), 'B') ||
                            setweight(to_tsvector('english', $14), 'C'),
                        auth = $15,
                        -- A new secret replaces the stored one; without one it is kept only where the merge
                        -- said so (AgentAuth.keeps_secret_of), else cleared.
                        auth_secret = CASE WHEN $16::text IS NOT NULL THEN $16::text
                            WHEN $17 THEN auth_secret END,
                        updated_at = now()
                    WHERE id = $1
                    RETURNING {_RETURNING}""",
                uid,
                *self._agent_params(spec),
                spec.sharing,
                spec.health_check_url,
                spec.name,
                keywords,
                prose,
                spec.auth.as_json(),
                self._sealed_secret(spec.auth),
                spec.auth.secret_set,
            )
            if spec.capabilities != current.spec.capabilities:
                await self._write_capabilities(conn, uid, spec)
        return _agent(row)

    async def delete_agent(self, agent_id: str, authorize: Callable[[Agent], None]) -> None:
        uid = parse_id(agent_id)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM agents a WHERE a.id = $1 FOR UPDATE", uid)
            if row is None:
                raise NotFound(f"agent {agent_id} not found", "AGENT_NOT_FOUND", id=agent_id)
            authorize(_agent(row))
            await conn.execute("DELETE FROM agents WHERE id = $1", uid)

    async def list_agents(
        self, query: AgentQuery, viewer: Principal | None, limit: int, after: list[Any] | None
    ) -> tuple[list[Agent], list[Any] | None]:
        """One page of agents and the position after its last item (None when there is no next page)."""
        where: list[str] = []
        params: list[Any] = []

        def param(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        source = "agents a"
        tsquery = search_terms(query.search) if query.search else ""
        if query.search and not tsquery:
            return [], None
        if tsquery:
            source = f"agents a, to_tsquery('english', {param(tsquery)}) q"
            where.append("a.search_vector @@ q")
        if viewer is None:
            where.append("a.sharing <> 'private'")
        elif not viewer.is_admin and not (query.has_health_check_url and viewer.has_scope(HEALTH_REPORT)):
            # (The health monitor, health:report, checks every agent with a health-check URL, private ones too.)
            where.append(f"(a.sharing <> 'private' OR a.owner = {param(viewer.id)})")
        if query.agent_type:
            where.append(f"a.agent_type = {param(query.agent_type)}")
        if query.tag:
            where.append(f"a.tags @> ARRAY[{param(query.tag)}]::text[]")
        if query.owner:
            where.append(f"a.owner = {param(query.owner)}")
        if query.sharing:
            where.append(f"a.sharing = {param(query.sharing)}")
        if query.has_health_check_url:
            where.append("a.health_check_url <> ''")
        if query.capability_kind or query.capability_name:
            cap = ["c.agent_id = a.id"]
            if query.capability_kind:
                cap.append(f"c.kind = {param(query.capability_kind)}")
            if query.capability_name:
                cap.append(f"c.name = {param(query.capability_name)}")
            if query.capability_version is not None:
                sql, values = query.capability_version.to_sql(
                    "c.v_major, c.v_minor, c.v_patch, c.v_release", len(params) + 1
                )
                cap.append("c.v_major IS NOT NULL")
                cap.append(sql)
                params.extend(values)
            where.append(f"EXISTS (SELECT 1 FROM agent_capabilities c WHERE {' AND '.join(cap)})")

        if tsquery:
            rank = "ts_rank(a.search_vector, q)"
            if after is not None:
                last_rank, last_id = _position(after, 2)
                r, i = param(float(last_rank)), param(parse_id(str(last_id), "page_token"))
                where.append(f"({rank} < {r}::real OR ({rank} = {r}::real AND a.id > {i}))")
            select = f"SELECT {_COLUMNS}, {rank} AS rank FROM {source}"
            order = "ORDER BY rank DESC, a.id ASC"
        else:
            if after is not None:
                last_created, last_id = _position(after, 2)
                try:
                    created = datetime.fromisoformat(str(last_created))
                except ValueError:
                    raise invalid("page_token", "is not a valid page token") from None
                c, i = param(created), param(parse_id(str(last_id), "page_token"))
                where.append(f"(a.created_at, a.id) < ({c}, {i})")
            select = f"SELECT {_COLUMNS} FROM {source}"
            order = "ORDER BY a.created_at DESC, a.id DESC"
        sql = f"{select} {'WHERE ' + ' AND '.join(where) if where else ''} {order} LIMIT {param(limit + 1)}"
        rows = await self.pool.fetch(sql, *params)
        more = len(rows) > limit
        rows = rows[:limit]
        agents = [_agent(r) for r in rows]
        if not more or not rows:
            return agents, None
        last = rows[-1]
        if tsquery:
            return agents, [float(last["rank"]), str(last["id"])]
        return agents, [last["created_at"].isoformat(), str(last["id"])]

    async def list_mcp_agents(self, after: str | None, limit: int) -> list[Agent]:
        """Agents with an MCP endpoint, whatever their sharing, by id (for the MCP tool catalog)."""
        rows = await self.pool.fetch(
            f"""SELECT {_COLUMNS} FROM agents a
                WHERE a.endpoints @> '[{{"protocol": "mcp"}}]'::jsonb AND ($1::uuid IS NULL OR a.id > $1::uuid)
                ORDER BY a.id LIMIT $2""",
            parse_id(after, "page_token") if after else None,
            limit,
        )
        return [_agent(r) for r in rows]

    async def set_agent_health(self, agent_id: str, status: str) -> Agent | None:
        # updated_at is the agent's own change time; a health observation does not change the agent.
        row = await self.pool.fetchrow(
            f"UPDATE agents a SET health_status = $2 WHERE a.id = $1 RETURNING {_COLUMNS}", parse_id(agent_id), status
        )
        return _agent(row) if row else None

    async def get_agent_auth(self, agent_id: str) -> tuple[Agent, str | None] | None:
        """The agent and its auth secret, still encrypted (None when it has none)."""
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS}, a.auth_secret FROM agents a WHERE a.id = $1", parse_id(agent_id, "agent_id")
        )
        return (_agent(row), row["auth_secret"]) if row else None

    async def rotate_agent_secrets(self, rotate: Callable[[str], str]) -> int:
        """Re-encrypts every agent's auth secret under the primary key (see FederationStore.rotate_secrets)."""
        changed = 0
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch("SELECT id, auth_secret FROM agents WHERE auth_secret IS NOT NULL FOR UPDATE")
            for row in rows:
                rotated = rotate(row["auth_secret"])
                if rotated != row["auth_secret"]:
                    await conn.execute("UPDATE agents SET auth_secret = $2 WHERE id = $1", row["id"], rotated)
                    changed += 1
        return changed

    async def count_agents(self, viewer: Principal | None) -> int:
        """How many agents `viewer` may see: a peer the shared ones, anyone else what ListAgents would show."""
        if viewer is not None and viewer.is_peer:
            return int(await self.pool.fetchval("SELECT count(*) FROM agents WHERE sharing = 'federated'"))
        if viewer is None:
            return int(await self.pool.fetchval("SELECT count(*) FROM agents WHERE sharing <> 'private'"))
        if viewer.is_admin:
            return int(await self.pool.fetchval("SELECT count(*) FROM agents"))
        return int(
            await self.pool.fetchval("SELECT count(*) FROM agents WHERE sharing <> 'private' OR owner = $1", viewer.id)
        )

    # API keys ----------------------------------------------------------------------------------------

    async def insert_key(
        self, key_id: str, name: str, role: str, secret_hash: bytes, created_by: str, principal_id: str, *, new: bool
    ) -> ApiKey:
        """Issues a key acting as `principal_id`: a new principal named `name` when `new`, else an existing one
        (NotFound when it does not exist)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if new:
                await conn.execute("INSERT INTO principals (id, name) VALUES ($1, $2)", principal_id, name)
            elif not await conn.fetchval("SELECT true FROM principals WHERE id = $1 FOR SHARE", principal_id):
                raise NotFound(f"principal {principal_id} not found", "PRINCIPAL_NOT_FOUND", id=principal_id)
            row = await conn.fetchrow(
                f"""INSERT INTO api_keys (id, name, role, secret_hash, created_by, principal_id)
                    VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_KEY_COLUMNS}""",
                key_id,
                name,
                role,
                secret_hash,
                created_by,
                principal_id,
            )
        return ApiKey(**dict(row))

    async def get_key_secret(self, key_id: str) -> tuple[ApiKey, bytes] | None:
        row = await self.pool.fetchrow(f"SELECT {_KEY_COLUMNS}, secret_hash FROM api_keys WHERE id = $1", key_id)
        if row is None:
            return None
        data = dict(row)
        secret_hash = data.pop("secret_hash")
        return ApiKey(**data), bytes(secret_hash)

    async def list_keys(self, limit: int, after: list[Any] | None) -> tuple[list[ApiKey], list[Any] | None]:
        params: list[Any] = [limit + 1]
        where = ""
        if after is not None:
            last_created, last_id = _position(after, 2)
            try:
                params += [datetime.fromisoformat(str(last_created)), str(last_id)]
            except ValueError:
                raise invalid("page_token", "is not a valid page token") from None
            where = "WHERE (created_at, id) < ($2, $3)"
        rows = await self.pool.fetch(
            f"""SELECT {_KEY_COLUMNS} FROM api_keys {where}
                ORDER BY created_at DESC, id DESC LIMIT $1""",
            *params,
        )
        keys = [ApiKey(**dict(r)) for r in rows[:limit]]
        if len(rows) <= limit:
            return keys, None
        return keys, [keys[-1].created_at.isoformat(), keys[-1].id]

    async def revoke_key(self, key_id: str) -> ApiKey | None:
        row = await self.pool.fetchrow(
            f"""UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1
                RETURNING {_KEY_COLUMNS}""",
            key_id,
        )
        return ApiKey(**dict(row)) if row else None


def _position(after: list[Any], size: int) -> list[Any]:
    if len(after) != size:
        raise invalid("page_token", "is not a valid page token")
    return after
