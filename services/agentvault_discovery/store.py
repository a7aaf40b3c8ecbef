"""SQL for federated_agents_cache and federation_query_log, and the bounded background writer that feeds them."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from google.protobuf import json_format

from agentvault.common.batching import BATCH_FAILED, BatchWriter
from agentvault.registry.v1 import registry_service_pb2 as pb

log = logging.getLogger(__name__)


# How long a search's log rows wait for those of other searches to share one database write.
LINGER_SECONDS = 0.05


@dataclass(frozen=True)
class QueryLogRow:
    peer_id: str
    peer_name: str
    status: str
    response_time_ms: float
    result_count: int
    from_cache: bool
    error: str
    query_hash: str
    created_at: datetime


@dataclass(frozen=True)
class CacheUpsert:
    peer_id: str
    # Already validated; turned into JSON by the background writer, not on the request path.
    agents: list[pb.Agent]
    expires_at: datetime
    # What the agents cost in memory while they wait (they may outlive the memos that held them).
    weight: int = 0


def _json(agent: pb.Agent) -> str:
    return json_format.MessageToJson(agent, preserving_proto_field_name=True, indent=None)


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def insert_query_logs(self, rows: list[QueryLogRow]) -> None:
        records = [
            (
                uuid.UUID(r.peer_id),
                r.peer_name[:255],
                r.status,
                r.response_time_ms,
                r.result_count,
                r.from_cache,
                r.error[:1000],
                r.query_hash,
                r.created_at,
            )
            for r in rows
        ]
        await self.pool.copy_records_to_table(
            "federation_query_log",
            records=records,
            columns=[
                "peer_id",
                "peer_name",
                "status",
                "response_time_ms",
                "result_count",
                "from_cache",
                "error",
                "query_hash",
                "created_at",
            ],
        )

    async def upsert_cached_agents(self, upsert: CacheUpsert) -> None:
        if not upsert.agents:
            return
        peer = uuid.UUID(upsert.peer_id)
        async with self.pool.acquire() as conn:
            await conn.executemany(
                """INSERT INTO federated_agents_cache (peer_id, agent_data, agent_did, cached_at, expires_at)
                   VALUES ($1, $2::jsonb, $3, now(), $4)
                   ON CONFLICT (agent_did, peer_id)
                   DO UPDATE SET agent_data = EXCLUDED.agent_data, cached_at = now(),
                       expires_at = EXCLUDED.expires_at""",
                [
                    (
                        peer,
                        json_format.MessageToJson(a, preserving_proto_field_name=True, indent=None),
                        a.did,
                        upsert.expires_at,
                    )
                    for a in upsert.agents
                ],
            )

    async def delete_peer_cache(self, peer_id: str) -> int:
        result = await self.pool.execute("DELETE FROM federated_agents_cache WHERE peer_id = $1", uuid.UUID(peer_id))
        return int(result.rsplit(" ", 1)[-1])

    async def purge_expired(self) -> int:
        result = await self.pool.execute("DELETE FROM federated_agents_cache WHERE expires_at < now()")
        return int(result.rsplit(" ", 1)[-1])


class BackgroundWriter(BatchWriter[QueryLogRow | CacheUpsert]):
    """Query-log rows and cache upserts, written off the request path in batches; expired cache rows are purged
    every `purge_every` seconds."""

    def __init__(
        self,
        store: Store,
        *,
        max_queue: int = 10_000,
        batch: int = 500,
        purge_every: float = 60.0,
        linger: float = LINGER_SECONDS,
    ) -> None:
        # Bytes held by queued cache upserts: the queue is bounded in entries, and peers choose how big they are.
        self.pending_upsert_bytes = 0
        super().__init__(
            "discovery",
            self._write_items,
            max_queue=max_queue,
            batch=batch,
            tick=self._purge,
            tick_every=purge_every,
            linger=linger,
        )
        self.store = store

    def submit_upsert(self, upsert: CacheUpsert, budget: int) -> bool:
        """Queues the upsert unless the ones already waiting hold `budget` bytes (federated_agents_cache is a
        record for troubleshooting: under pressure it may miss an answer, memory may not grow)."""
        if self.pending_upsert_bytes + upsert.weight > budget or not self.submit(upsert):
            return False
        self.pending_upsert_bytes += upsert.weight
        return True

    async def _write_items(self, items: list[QueryLogRow | CacheUpsert]) -> None:
        # Each kind separately, so that one failing does not cost the other.
        rows = [i for i in items if isinstance(i, QueryLogRow)]
        if rows:
            try:
                await self.store.insert_query_logs(rows)
            except Exception:
                BATCH_FAILED.labels("discovery_query_log").inc()
                log.exception("cannot write %d row(s) to federation_query_log", len(rows))
        for upsert in (i for i in items if isinstance(i, CacheUpsert)):
            try:
                await self.store.upsert_cached_agents(upsert)
            except Exception:
                BATCH_FAILED.labels("discovery_agents_cache").inc()
                log.exception("cannot upsert %d agent(s) of peer %s", len(upsert.agents), upsert.peer_id)
            finally:
                self.pending_upsert_bytes -= upsert.weight

    async def _purge(self) -> None:
        purged = await self.store.purge_expired()
        if purged:
            log.info("purged expired federated agents", extra={"rows": purged})


def expiry(ttl_seconds: int) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=ttl_seconds)
