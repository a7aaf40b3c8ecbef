"""SQL for federated_agents_cache and federation_query_log, and the bounded background writer that feeds them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from google.protobuf import json_format
from prometheus_client import Counter

from agentvault.registry.v1 import registry_service_pb2 as pb

log = logging.getLogger("agentvault.discovery.store")

BACKGROUND_DROPPED = Counter(
    "discovery_background_writes_dropped_total",
    "Query-log rows or cache upserts dropped because the background queue was full.",
    ["kind"],
)
BACKGROUND_FAILED = Counter(
    "discovery_background_write_errors_total",
    "Background writes to the database that failed (logged with their error).",
    ["kind"],
)


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


class BackgroundWriter:
    """Writes query-log rows and cache upserts off the request path, in batches.

    The queue is bounded so a slow database costs memory up to a limit, never latency; what does not fit is
    dropped and counted, and every failed write is logged, never swallowed.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_queue: int = 10_000,
        batch: int = 500,
        purge_every: float = 60.0,
    ) -> None:
        self.store = store
        self._queue: asyncio.Queue[QueryLogRow | CacheUpsert] = asyncio.Queue(max_queue)
        self._batch = batch
        self._purge_every = purge_every
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="discovery-background-writer")

    def submit(self, item: QueryLogRow | CacheUpsert) -> None:
        try:
            self._queue.put_nowait(item)
            self._idle.clear()
        except asyncio.QueueFull:
            kind = "query_log" if isinstance(item, QueryLogRow) else "agents_cache"
            BACKGROUND_DROPPED.labels(kind).inc()
            log.warning("background queue full; dropped a %s write", kind)

    async def _run(self) -> None:
        last_purge = asyncio.get_running_loop().time()
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout=self._purge_every)
            except TimeoutError:
                item = None
            items = [] if item is None else [item]
            while len(items) < self._batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            if items:
                await self._write(items)
            if self._queue.empty():
                self._idle.set()
            now = asyncio.get_running_loop().time()
            if now - last_purge >= self._purge_every:
                last_purge = now
                try:
                    purged = await self.store.purge_expired()
                    if purged:
                        log.info("purged expired federated agents", extra={"rows": purged})
                except Exception:
                    BACKGROUND_FAILED.labels("purge").inc()
                    log.exception("cannot purge expired rows of federated_agents_cache")

    async def _write(self, items: list[QueryLogRow | CacheUpsert]) -> None:
        rows = [i for i in items if isinstance(i, QueryLogRow)]
        if rows:
            try:
                await self.store.insert_query_logs(rows)
            except Exception:
                BACKGROUND_FAILED.labels("query_log").inc()
                log.exception("cannot write %d row(s) to federation_query_log", len(rows))
        for upsert in (i for i in items if isinstance(i, CacheUpsert)):
            try:
                await self.store.upsert_cached_agents(upsert)
            except Exception:
                BACKGROUND_FAILED.labels("agents_cache").inc()
                log.exception("cannot upsert %d agent(s) of peer %s", len(upsert.agents), upsert.peer_id)

    async def drain(self, timeout: float = 5.0) -> None:
        """Waits until everything queued so far is written (shutdown, tests)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def stop(self) -> None:
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def expiry(ttl_seconds: int) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=ttl_seconds)
