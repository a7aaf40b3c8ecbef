"""redis-py asyncio client with the timeouts a service wants."""

from __future__ import annotations

import asyncio

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
