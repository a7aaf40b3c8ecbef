"""Status changes and inbox wake-ups, on one Redis channel every replica follows, and to this process at once.

Nothing here is needed for a message to be delivered: a lost event only delays a waiter until its next poll (every
inbox stream and worker also looks at the database on a timer). Events carry ids and statuses, never content.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from agentvault.common.redis import follow_channel
from agentvault_messaging.store import Row

log = logging.getLogger(__name__)

CHANNEL = "messages:events"
WATCH_QUEUE = 1000
# Events waiting to be published to the other replicas (each a few hundred bytes) and how many go in one PUBLISH.
MAX_OUTGOING = 20_000
PUBLISH_BATCH = 500


@dataclass(frozen=True)
class Event:
    id: str
    status: str
    inbox: str
    transport: str
    sender_id: str
    sender_agent: str
    sender_inbox: str
    recipient_agent: str
    recipient_owner: str
    conversation_id: str

    @classmethod
    def of(cls, row: Row) -> Event:
        return cls(
            str(row.id),
            row.status,
            row.inbox,
            row.transport,
            row.sender_id,
            row.sender_agent,
            row.sender_inbox,
            row.recipient_agent,
            row.recipient_owner,
            row.conversation_id,
        )


# Statuses after which an inbox delivery is no longer with its receiver ("released": nacked, visible again).
SETTLED = frozenset({"acknowledged", "dead_lettered", "expired", "released"})
MAX_SETTLED = 10_000


class InboxWaiter:
    """Woken when an inbox may have something new, and told which of its deliveries were settled (so a stream
    knows its receiver's pace without asking the database)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._settled: set[str] = set()
        # Whether something may have arrived since the last clear (a wake-up for a settled delivery alone says
        # nothing new arrived: a stream with room left need not look).
        self.fresh = False

    def set(self) -> None:
        self.fresh = True
        self._event.set()

    def clear(self) -> None:
        self._event.clear()
        self.fresh = False

    async def wait(self, seconds: float) -> bool:
        """Until woken (True), or `seconds` passed (False: then the caller looks at the database anyway)."""
        try:
            await asyncio.wait_for(self._event.wait(), max(0.0, seconds))
        except TimeoutError:
            return False
        return True

    def settle(self, message_id: str) -> None:
        if len(self._settled) < MAX_SETTLED:  # beyond, the stream's visibility timeouts free the room
            self._settled.add(message_id)
        self._event.set()

    def settled_ids(self) -> list[str]:
        out = list(self._settled)
        self._settled.clear()
        return out


@dataclass(eq=False)
class Watcher:
    """One status watch: the events it matches, queued (bounded: one that falls behind is ended, not skipped)."""

    ids: frozenset[str] = frozenset()
    conversation_id: str = ""
    agent_id: str = ""
    # Who may see what: None for an admin, else the principal ids and inboxes it may follow.
    viewer: frozenset[str] | None = None
    queue: asyncio.Queue[Event | None] = field(default_factory=lambda: asyncio.Queue(WATCH_QUEUE))

    def matches(self, e: Event) -> bool:
        if self.viewer is not None and not ({e.sender_id, e.sender_inbox, e.inbox, e.recipient_owner} & self.viewer):
            return False
        if self.ids and e.id not in self.ids:
            return False
        if self.conversation_id and e.conversation_id != self.conversation_id:
            return False
        return not self.agent_id or self.agent_id in (e.recipient_agent, e.sender_agent)


class Hub:
    """Publishes events (to Redis, and to this process's own waiters without the round trip) and dispatches those of
    every replica to inbox waiters, the push workers' wake-up and status watchers."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.origin = uuid.uuid4().hex
        self._inbox_waiters: dict[str, set[InboxWaiter]] = {}
        self.push_wakeup = asyncio.Event()
        self._watchers: set[Watcher] = set()
        # Events for the other replicas, published in batches by one task: what comes while a PUBLISH is on its
        # way goes in the next, one round trip for many sends (bounded: beyond, the other replicas' waiters poll).
        self._outgoing: list[list[str]] = []
        self._publisher: asyncio.Task[None] | None = None

    async def publish(self, rows: Iterable[Row], status: str = "") -> None:
        """Announces rows as they are now; `status` overrides theirs (e.g. "released" for a nacked delivery).
        This process's waiters at once; the other replicas' by the publishing task, soon after."""
        events = [Event.of(row) for row in rows]
        if status:
            events = [dataclasses.replace(e, status=status) for e in events]
        if not events:
            return
        self._dispatch(events)
        room = MAX_OUTGOING - len(self._outgoing)
        self._outgoing.extend(list(e.__dict__.values()) for e in events[: max(room, 0)])
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_outgoing())

    async def _publish_outgoing(self) -> None:
        while self._outgoing:
            batch, self._outgoing = self._outgoing[:PUBLISH_BATCH], self._outgoing[PUBLISH_BATCH:]
            payload = json.dumps({"o": self.origin, "e": batch})
            try:
                await self.redis.publish(CHANNEL, payload)
            except Exception as exc:  # the other replicas' waiters poll; the sends themselves are durable
                log.warning("cannot publish message events: %s", exc)

    def _dispatch(self, events: list[Event]) -> None:
        for e in events:
            if e.transport == "inbox":
                if e.status in SETTLED:
                    for waiter in self._inbox_waiters.get(e.inbox, ()):
                        waiter.settle(e.id)
                        if e.status == "released":  # nacked: visible again, to be taken
                            waiter.set()
                elif e.status == "accepted":
                    for waiter in self._inbox_waiters.get(e.inbox, ()):
                        waiter.set()
            elif e.status == "accepted":
                self.push_wakeup.set()
            for watcher in list(self._watchers):
                if watcher.matches(e):
                    try:
                        watcher.queue.put_nowait(e)
                    except asyncio.QueueFull:
                        self._watchers.discard(watcher)
                        watcher.queue.get_nowait()
                        watcher.queue.put_nowait(None)

    @contextlib.contextmanager
    def waiting(self, inbox: str) -> Iterator[InboxWaiter]:
        """A waiter woken by what happens in `inbox`, for as long as the block lasts."""
        waiter = InboxWaiter()
        self._inbox_waiters.setdefault(inbox, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._inbox_waiters.get(inbox)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._inbox_waiters[inbox]

    def watch(self, watcher: Watcher) -> None:
        self._watchers.add(watcher)

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    # ChannelListener ----------------------------------------------------------------------------------------

    async def on_subscribe(self) -> None:
        # Whatever was published while unsubscribed is made up for by the pollers: wake them all now.
        for waiters in self._inbox_waiters.values():
            for waiter in waiters:
                waiter.set()
        self.push_wakeup.set()

    async def on_message(self, data: Any) -> None:
        try:
            decoded = json.loads(data)
            if decoded.get("o") == self.origin:
                return
            events = [Event(*map(str, item)) for item in decoded["e"]]
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring a malformed message event: %s", exc)
            return
        self._dispatch(events)

    async def on_tick(self) -> None:
        return None

    async def on_lost(self, exc: Exception) -> None:
        log.warning("message events lost (%s); following again", exc)

    async def on_closed(self) -> None:
        return None

    async def run(self) -> None:
        await follow_channel(self.redis, CHANNEL, self, first_delay=0.1, max_delay=5.0)
