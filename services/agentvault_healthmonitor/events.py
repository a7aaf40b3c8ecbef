"""Status-change events: published on Redis pub/sub so every replica's watchers see every change."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

WATCHER_QUEUE = 1000


@dataclass(frozen=True)
class ChangeEvent:
    subject_kind: str
    subject_id: str
    name: str
    previous_status: str
    status: str
    is_down: bool
    error: str
    time: str  # RFC 3339
    response_time_ms: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> ChangeEvent:
        return cls(**json.loads(raw))


class WatchEnded(Exception):
    """The stream cannot continue without losing events; the watcher should reconnect."""


class Watcher:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[ChangeEvent | WatchEnded] = asyncio.Queue(WATCHER_QUEUE)
        self.ended = False

    def offer(self, item: ChangeEvent | WatchEnded) -> None:
        if self.ended:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # A watcher that cannot keep up is ended rather than silently skipping changes.
            self.ended = True
            self.queue.get_nowait()
            self.queue.put_nowait(WatchEnded("the watcher fell behind; reconnect with include_current"))
            return
        if isinstance(item, WatchEnded):
            self.ended = True

    async def next(self) -> ChangeEvent:
        item = await self.queue.get()
        if isinstance(item, WatchEnded):
            raise item
        return item


class EventHub:
    """Publishes changes to a Redis channel and fans what arrives on it out to this replica's watchers."""

    def __init__(self, redis_url: str, channel: str) -> None:
        self.channel = channel
        self.publisher = aioredis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
        # The subscriber blocks on its socket for as long as nothing changes, so it has no read timeout.
        self.subscriber = aioredis.Redis.from_url(redis_url, socket_connect_timeout=5, health_check_interval=30)
        self._watchers: set[Watcher] = set()
        self.subscribed = asyncio.Event()

    async def publish(self, event: ChangeEvent) -> None:
        try:
            await self.publisher.publish(self.channel, event.to_json())
        except (RedisError, OSError) as exc:
            # Local watchers still hear it; other replicas' watchers are ended by their own lost subscription.
            log.warning("cannot publish a health event: %s", exc)
            self._deliver(event)

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[Watcher]:
        watcher = Watcher()
        self._watchers.add(watcher)
        try:
            yield watcher
        finally:
            self._watchers.discard(watcher)

    def _deliver(self, item: ChangeEvent | WatchEnded) -> None:
        for watcher in list(self._watchers):
            watcher.offer(item)

    async def run(self) -> None:
        """Subscribes until cancelled, resubscribing after Redis failures."""
        delay = 0.2
        while True:
            try:
                async with self.subscriber.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    self.subscribed.set()
                    delay = 0.2
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        try:
                            self._deliver(ChangeEvent.from_json(message["data"]))
                        except (ValueError, TypeError) as exc:
                            log.warning("ignoring a malformed health event: %s", exc)
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("health event subscription lost (%s); resubscribing", exc)
                # Changes published while unsubscribed are lost to this replica, so its watchers must resync.
                self._deliver(WatchEnded("the event subscription was interrupted; reconnect with include_current"))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        await self.publisher.aclose()
        await self.subscriber.aclose()
