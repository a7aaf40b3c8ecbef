"""Messages sent open: parts the sender appends after the send, stored, and streamed to readers as they come."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from agentvault.common import agents as rules
from agentvault.common.errors import FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted, invalid
from agentvault.common.redis import follow_channel
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault_messaging import metrics, model
from agentvault_messaging.settings import MessagingSettings
from agentvault_messaging.store import Row, Store

log = logging.getLogger(__name__)

CHANNEL = "messages:parts"
OPEN, CLOSED, ABORTED = "open", "closed", "aborted"
# One read of a stream from the database: at most this many parts, and (beyond its first part) this many bytes, so
# a reader holds one page at a time whatever the stream's size; gRPC flow control paces the rest.
PAGE_PARTS = 64
PAGE_BYTES = 1024 * 1024
MAX_REASON = 1024
# A reader may not see a message's parts before the message may be delivered to it.
UNSEEN = frozenset({"held", "refused"})


@dataclass(frozen=True)
class State:
    state: str
    reason: str
    parts: int
    bytes: int


def _body(part: mpb.Part) -> bytes:
    return part.SerializeToString(deterministic=True)


class PartStore:
    """The message_streams and message_parts tables; each append is one transaction holding the stream's row."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def open(self, message_id: uuid.UUID, parts: Sequence[mpb.Part]) -> None:
        """Opens the stream of a message sent open, its first parts numbered from 1 (again: nothing changes)."""
        bodies = [_body(p) for p in parts]
        async with self.pool.acquire() as conn, conn.transaction():
            created = await conn.fetchval(
                "INSERT INTO message_streams (message_id, parts, bytes) VALUES ($1, $2, $3) "
                "ON CONFLICT (message_id) DO NOTHING RETURNING true",
                message_id,
                len(bodies),
                sum(map(len, bodies)),
            )
            if created and bodies:
                await conn.execute(
                    "INSERT INTO message_parts (message_id, idx, body) "
                    "SELECT $1, i::int, b FROM unnest($2::bytea[]) WITH ORDINALITY AS t(b, i)",
                    message_id,
                    bodies,
                )

    async def state(self, message_id: uuid.UUID) -> State | None:
        record = await self.pool.fetchrow(
            "SELECT state, reason, parts, bytes FROM message_streams WHERE message_id = $1", message_id
        )
        return State(**dict(record)) if record else None

    async def states(self, message_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, State]:
        """The streams of these messages (one statement on the primary key), by message id."""
        records = await self.pool.fetch(
            "SELECT message_id, state, reason, parts, bytes FROM message_streams WHERE message_id = ANY($1::uuid[])",
            list(message_ids),
        )
        return {r["message_id"]: State(r["state"], r["reason"], r["parts"], r["bytes"]) for r in records}

    async def count_open(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM message_streams WHERE state = 'open'"))

    async def page(self, message_id: uuid.UUID, after: int, upto: int) -> list[tuple[int, bytes]]:
        """Parts after `after` up to `upto`, in order: at most PAGE_PARTS, and PAGE_BYTES beyond the first."""
        records = await self.pool.fetch(
            "SELECT idx, body FROM (SELECT idx, body, sum(length(body)) OVER (ORDER BY idx) - length(body) AS before "
            "FROM message_parts WHERE message_id = $1 AND idx > $2 AND idx <= $3 ORDER BY idx LIMIT $4) t "
            "WHERE before < $5 ORDER BY idx",
            message_id,
            after,
            upto,
            PAGE_PARTS,
            PAGE_BYTES,
        )
        return [(r["idx"], r["body"]) for r in records]

    async def append(
        self,
        message_id: uuid.UUID,
        first: int,
        parts: Sequence[mpb.Part],
        end: str,
        reason: str,
        max_parts: int,
        max_bytes: int,
    ) -> State | None:
        """Stores the parts not stored yet (those already stored must be the same) and ends the stream when `end`
        says so (closed or aborted); None when the message has no stream."""
        bodies = [_body(p) for p in parts]
        async with self.pool.acquire() as conn, conn.transaction():
            record = await conn.fetchrow(
                "SELECT state, reason, parts, bytes FROM message_streams WHERE message_id = $1 FOR UPDATE", message_id
            )
            if record is None:
                return None
            now = State(**dict(record))
            if first > now.parts + 1:
                raise FailedPrecondition(
                    f"parts must come in order: the next index of this stream is {now.parts + 1}, not {first}",
                    "PART_INDEX_GAP",
                    expected_index=str(now.parts + 1),
                )
            stored = bodies[: now.parts + 1 - first]
            if stored:
                same = await conn.fetch(
                    "SELECT body FROM message_parts WHERE message_id = $1 AND idx >= $2 AND idx < $3 ORDER BY idx",
                    message_id,
                    first,
                    first + len(stored),
                )
                if [r["body"] for r in same] != stored:
                    raise FailedPrecondition(
                        f"parts from index {first} are already stored with other content",
                        "PARTS_CONFLICT",
                        expected_index=str(now.parts + 1),
                    )
            new = bodies[len(stored) :]
            if now.state != OPEN:
                if new or (end and end != now.state):
                    raise FailedPrecondition(
                        f"this stream is {now.state}: nothing more can be appended",
                        "STREAM_CLOSED",
                        state=now.state,
                    )
                return now  # a retry of what was already done
            size = now.bytes + sum(map(len, new))
            count = now.parts + len(new)
            if count > max_parts or size > max_bytes:
                raise ResourceExhausted(
                    f"a stream holds at most {max_parts} parts and {max_bytes} bytes (MESSAGING_STREAM_MAX_PARTS, "
                    "MESSAGING_STREAM_MAX_BYTES)",
                    "STREAM_TOO_LARGE",
                    limit_parts=str(max_parts),
                    limit_bytes=str(max_bytes),
                )
            if new:
                await conn.execute(
                    "INSERT INTO message_parts (message_id, idx, body) "
                    "SELECT $1, $2 + i::int, b FROM unnest($3::bytea[]) WITH ORDINALITY AS t(b, i)",
                    message_id,
                    now.parts,
                    new,
                )
            after = State(end or OPEN, reason if end == ABORTED else "", count, size)
            await conn.execute(
                "UPDATE message_streams SET state = $2, reason = $3, parts = $4, bytes = $5, updated_at = now() "
                "WHERE message_id = $1",
                message_id,
                after.state,
                after.reason,
                after.parts,
                after.bytes,
            )
        # Counted once committed: a retry returns above, before anything is counted twice.
        metrics.STREAM_PARTS.inc(len(new))
        if end:
            metrics.STREAMS_ENDED.labels(end).inc()
        return after

    async def abort_idle(self, idle_seconds: float, limit: int) -> list[uuid.UUID]:
        """Aborts open streams without an append for `idle_seconds`, so their readers end."""
        records = await self.pool.fetch(
            "UPDATE message_streams SET state = 'aborted', reason = $2, updated_at = now() WHERE message_id IN ("
            "SELECT message_id FROM message_streams WHERE state = 'open' "
            "AND updated_at < now() - make_interval(secs => $1) ORDER BY updated_at LIMIT $3 FOR UPDATE SKIP LOCKED) "
            "RETURNING message_id",
            idle_seconds,
            f"no part came for {idle_seconds:g} seconds (MESSAGING_STREAM_IDLE_SECONDS)",
            limit,
        )
        return [r["message_id"] for r in records]


class PartStreams:
    """AppendParts and StreamParts; readers are woken over Redis (every replica) and poll as the fallback."""

    def __init__(self, settings: MessagingSettings, store: Store, parts: PartStore, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.store = store
        self.parts = parts
        self.redis = redis
        self.origin = uuid.uuid4().hex
        self._waiters: dict[str, set[asyncio.Event]] = {}

    # Sending -----------------------------------------------------------------------------------------------

    async def opened(self, message: mpb.Message, row: Row) -> None:
        """After a send: the stream of a message sent open."""
        if message.streaming:
            await self.parts.open(row.id, message.parts)

    async def _stream_of(self, row: Row) -> State | None:
        state = await self.parts.state(row.id)
        if state is None and mpb.Message.FromString(row.body).streaming:
            # The send stored the message but its stream was not opened (the process stopped in between).
            await self.parts.open(row.id, mpb.Message.FromString(row.body).parts)
            state = await self.parts.state(row.id)
        return state

    async def append(
        self, request: mpb.AppendPartsRequest, sender_inbox: str, may_see: Callable[[Row], bool]
    ) -> mpb.AppendPartsResponse:
        key = model.require_uuid("message_id", request.message_id)
        v = rules.Violations()
        if request.first_index < 1:
            v.add("first_index", "must be 1 or more (the index of the first part given)")
        if len(request.parts) > model.MAX_PARTS:
            v.add("parts", f"must have at most {model.MAX_PARTS} parts (got {len(request.parts)})")
        for i, part in enumerate(request.parts[: model.MAX_PARTS]):
            model.check_part(v, f"parts[{i}]", part)
        rules.check_text(v, "abort_reason", request.abort_reason, max_len=MAX_REASON)
        v.raise_if_any()
        size = request.ByteSize()
        if size > self.settings.max_message_bytes:
            raise ResourceExhausted(
                f"the append is {size} bytes; at most {self.settings.max_message_bytes} are accepted "
                "(MESSAGING_MAX_MESSAGE_BYTES)",
                "MESSAGE_TOO_LARGE",
                size=str(size),
                limit=str(self.settings.max_message_bytes),
            )
        row = await self.store.get(key)
        if row is None or not may_see(row):
            raise NotFound(f"message {request.message_id} not found", "MESSAGE_NOT_FOUND")
        if row.sender_inbox != sender_inbox:
            raise PermissionDenied("only the sender of a message may append parts to it", "NOT_THE_SENDER")
        if await self._stream_of(row) is None:
            raise FailedPrecondition(f"message {request.message_id} was not sent streaming", "NOT_STREAMING")
        end = ABORTED if request.abort_reason else CLOSED if request.final else ""
        state = await self.parts.append(
            key,
            request.first_index,
            request.parts,
            end,
            request.abort_reason,
            self.settings.stream_max_parts,
            self.settings.stream_max_bytes,
        )
        if state is None:  # deleted meanwhile (retention)
            raise NotFound(f"message {request.message_id} not found", "MESSAGE_NOT_FOUND")
        await self.wake([key])
        return mpb.AppendPartsResponse(next_index=state.parts + 1, state=state.state)

    # Reading -----------------------------------------------------------------------------------------------

    async def check_read(
        self, request: mpb.StreamPartsRequest, reader_inbox: str, may_see: Callable[[Row], bool]
    ) -> Row:
        """The message whose parts the caller may read (checked before the stream starts)."""
        key = model.require_uuid("message_id", request.message_id)
        if request.after_index < 0:
            raise invalid("after_index", "must be 0 (from the first part) or the last index received")
        row = await self.store.get(key)
        if row is None or not may_see(row):
            raise NotFound(f"message {request.message_id} not found", "MESSAGE_NOT_FOUND")
        if row.status in UNSEEN and row.sender_inbox != reader_inbox:
            raise FailedPrecondition(f"message {request.message_id} is {row.status}", "MESSAGE_NOT_DELIVERABLE")
        if await self._stream_of(row) is None:
            raise FailedPrecondition(f"message {request.message_id} was not sent streaming", "NOT_STREAMING")
        return row

    async def read(self, row: Row, after: int) -> AsyncIterator[mpb.StreamPartsResponse]:
        """The parts after `after`, stored ones first, then each as it is appended; then the stream's end. The
        state is read before the parts, so a part appended in between is seen on the next round, never lost."""
        with self._waiting(str(row.id)) as woken:
            while True:
                woken.clear()
                state = await self.parts.state(row.id)
                if state is None:  # deleted meanwhile (retention)
                    raise NotFound(f"message {row.id} not found", "MESSAGE_NOT_FOUND")
                if after < state.parts:
                    for index, body in await self.parts.page(row.id, after, state.parts):
                        yield mpb.StreamPartsResponse(index=index, part=mpb.Part.FromString(body))
                        after = index
                    continue
                if state.state != OPEN:
                    yield mpb.StreamPartsResponse(index=state.parts, state=state.state, reason=state.reason)
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), self.settings.poll_seconds)

    # Wake-ups ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _waiting(self, message_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiters.setdefault(message_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(message_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[message_id]

    def _dispatch(self, ids: Sequence[str]) -> None:
        for message_id in ids:
            for event in self._waiters.get(message_id, ()):
                event.set()

    async def wake(self, ids: Sequence[uuid.UUID]) -> None:
        """Wakes the readers of these streams, here at once and in every other replica over Redis."""
        if not ids:
            return
        text = [str(i) for i in ids]
        self._dispatch(text)
        try:
            await self.redis.publish(CHANNEL, json.dumps({"o": self.origin, "m": text}))
        except Exception as exc:  # the other replicas' readers poll
            log.warning("cannot publish part wake-ups: %s", exc)

    async def on_subscribe(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    async def on_message(self, data: Any) -> None:
        try:
            decoded = json.loads(data)
            if decoded.get("o") == self.origin:
                return
            ids = [str(i) for i in decoded["m"]]
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring a malformed part wake-up: %s", exc)
            return
        self._dispatch(ids)

    async def on_tick(self) -> None:
        return None

    async def on_lost(self, exc: Exception) -> None:
        log.warning("part wake-ups lost (%s); following again", exc)

    async def on_closed(self) -> None:
        return None

    async def run(self) -> None:
        await follow_channel(self.redis, CHANNEL, self, first_delay=0.1, max_delay=5.0)

    async def sweep(self) -> int:
        """Aborts the open streams idle too long (the sweeper calls this)."""
        ids = await self.parts.abort_idle(self.settings.stream_idle_seconds, 1000)
        metrics.STREAMS_ENDED.labels("idle").inc(len(ids))
        await self.wake(ids)
        # On the partial index of open streams; every replica sets the same figure.
        metrics.STREAMS_OPEN.set(await self.parts.count_open())
        return len(ids)

    async def annotate(self, messages: Sequence[mpb.Message]) -> None:
        """Fills stream_state and stream_parts of the messages sent streaming (one statement for them all)."""
        streaming = {uuid.UUID(m.id): m for m in messages if m.streaming and m.id}
        if not streaming:
            return
        for message_id, state in (await self.parts.states(list(streaming))).items():
            streaming[message_id].stream_state = state.state
            streaming[message_id].stream_parts = state.parts
