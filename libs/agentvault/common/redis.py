"""redis-py asyncio client with the timeouts a service wants."""

from __future__ import annotations

import redis.asyncio as aioredis


def create_redis(url: str, *, timeout: float = 5) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
        retry_on_timeout=True,
    )
