"""redis-py asyncio client with the timeouts a service wants."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import redis.asyncio as aioredis


def create_redis(url: str, *, timeout: float = 5) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
        retry_on_timeout=True,
    )


def raise_if_cancelling() -> None:
    """Re-raises a cancellation redis-py swallowed: its pub/sub reads can turn CancelledError into a connection
    error, and a listener that loops on errors would then never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# How long one wait for a pub/sub message lasts before the follower looks at its own cancellation again.
LISTEN_POLL_SECONDS = 1.0


class ChannelListener(Protocol):
    """What a follower of one Redis channel does at each step (see `follow_channel`)."""

    async def on_subscribe(self) -> None:
        """Redis confirmed the subscription (also after redis-py resubscribed on its own): whatever was published
        while unsubscribed never arrives, so this is where the listener reloads its state."""

    async def on_message(self, data: Any) -> None: ...

    async def on_tick(self) -> None:
        """After every bounded wait, with or without a message."""

    async def on_lost(self, exc: Exception) -> None:
        """The subscription failed; the follower resubscribes after a backoff."""

    async def on_closed(self) -> None:
        """The subscription ended (lost or cancelled): whatever relied on it must stop relying."""


async def follow_channel(
    redis: aioredis.Redis, channel: str, listener: ChannelListener, *, first_delay: float, max_delay: float
) -> None:
    """Follows `channel` until cancelled, resubscribing after any Redis failure with a doubling backoff (reset at
    each confirmed subscription). Waits are bounded so that a cancellation redis-py swallowed is still seen."""
    delay = first_delay
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel)
            while True:
                message = await pubsub.get_message(timeout=LISTEN_POLL_SECONDS)
                raise_if_cancelling()
                await listener.on_tick()
                kind = message.get("type") if message else None
                if kind == "message":
                    await listener.on_message(message.get("data"))
                elif kind == "subscribe":
                    await listener.on_subscribe()
                    delay = first_delay
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise_if_cancelling()
            await listener.on_lost(exc)
        finally:
            await listener.on_closed()
            await pubsub.aclose()
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)
