"""Token revocations against a real Redis: every watcher hears them, reloads after a lost connection, stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from agentvault.common import jose_keys
from agentvault.common.errors import Unauthenticated, Unavailable
from agentvault.common.jwt_auth import JwtValidator
from agentvault.common.revocations import ENTRY_OVERHEAD, RevocationWatcher, revoke

from ..conftest import Infra

WAIT_SECONDS = 10.0


async def eventually(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        result = condition()
        if result if isinstance(result, bool) else await result:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def scope() -> str:
    # Each test's key and channel are its own; pub/sub channels are global across Redis databases.
    return "t" + secrets.token_hex(6)


@pytest.fixture
async def redis(infra: Infra) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(f"{infra.redis_base}/0")
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def running(infra: Infra, scope: str, **kwargs: Any) -> AsyncIterator[RevocationWatcher]:
    """A watcher on its own Redis connection, as in another process, running until the block ends."""
    name = f"{scope}-{secrets.token_hex(3)}"
    client = aioredis.Redis.from_url(f"{infra.redis_base}/0", client_name=name)
    watcher = RevocationWatcher(client, key=f"{scope}:revoked", channel=f"{scope}:revocations", **kwargs)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.synced.wait(), WAIT_SECONDS)
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


async def test_a_revocation_reaches_every_watcher(infra: Infra, redis: aioredis.Redis, scope: str) -> None:
    async with running(infra, scope) as first, running(infra, scope) as second:
        jti = secrets.token_urlsafe(12)
        assert not await second.is_revoked(jti)
        await revoke(redis, jti, time.time() + 600, key=first.key, channel=first.channel)
        # Through the channel into each process's own set, not by asking Redis.
        await eventually(lambda: first.holds(jti) and second.holds(jti), "both watchers to hear the revocation")
        assert await second.is_revoked(jti)
        assert await redis.zscore(first.key, jti) is not None


async def test_a_revoked_token_is_refused_by_another_process_validator(
    infra: Infra, redis: aioredis.Redis, scope: str
) -> None:
    key = jose_keys.generate_key()

    async def jwks() -> dict[str, Any]:
        return jose_keys.jwks([key])

    signed = jose_keys.sign_access_token(
        key, issuer="iss", audience="aud", subject="c", client_id="c", scopes=["agents:read"], ttl=300, kind="service"
    )
    async with running(infra, scope) as elsewhere:
        check = JwtValidator("iss", "aud", jwks, revoked=elsewhere.is_revoked)
        await check.validate(signed.token)
        started = time.monotonic()
        await revoke(redis, signed.jti, signed.expires_at, key=elsewhere.key, channel=elsewhere.channel)
        await eventually(lambda: elsewhere.holds(signed.jti), "the other watcher to hear the revocation")
        heard_after = time.monotonic() - started
        with pytest.raises(Unauthenticated) as err:
            await check.validate(signed.token)
        assert err.value.reason == "TOKEN_REVOKED"
        print(f"revocation heard by the other watcher after {heard_after * 1000:.1f} ms")


async def test_revocations_made_before_the_subscription_are_loaded(
    infra: Infra, redis: aioredis.Redis, scope: str
) -> None:
    early, expired = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    await revoke(redis, early, time.time() + 600, key=f"{scope}:revoked", channel=f"{scope}:revocations")
    await redis.zadd(f"{scope}:revoked", {expired: time.time() - 1})
    async with running(infra, scope) as watcher:
        assert watcher.holds(early) and not watcher.holds(expired)
        assert watcher.loads == 1


async def test_a_resubscription_reloads_what_was_missed(infra: Infra, redis: aioredis.Redis, scope: str) -> None:
    async with running(infra, scope) as watcher:
        missed = secrets.token_urlsafe(12)
        # Written but never heard: what a revocation published while the watcher was disconnected looks like.
        await redis.zadd(watcher.key, {missed: time.time() + 600})
        assert not watcher.holds(missed)
        loads = watcher.loads
        name = (await watcher.redis.client_getname()) or ""
        killed = 0
        for client in await redis.client_list():
            if client.get("name") == name and int(client.get("psub", 0) or 0) + int(client.get("sub", 0) or 0):
                killed += await redis.client_kill_filter(_id=client["id"])
        assert killed == 1
        await eventually(lambda: watcher.loads > loads and watcher.synced.is_set(), "the watcher to resubscribe")
        assert watcher.holds(missed)


async def test_while_unsynced_lookups_ask_redis(redis: aioredis.Redis, scope: str) -> None:
    watcher = RevocationWatcher(redis, key=f"{scope}:revoked", channel=f"{scope}:revocations")
    jti = secrets.token_urlsafe(12)
    assert not await watcher.is_revoked(jti)
    await revoke(redis, jti, time.time() + 600, key=watcher.key, channel=watcher.channel)
    assert await watcher.is_revoked(jti)
    await redis.delete(watcher.key)


async def test_no_redis_and_no_subscription_is_unavailable_not_a_pass() -> None:
    from agentvault.devserver.embedded import free_port

    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        with pytest.raises(Unavailable) as err:
            await RevocationWatcher(client).is_revoked("some-jti")
        assert err.value.reason == "REVOCATIONS_UNAVAILABLE"
    finally:
        await client.aclose()


async def test_memory_is_bounded_in_bytes_expired_first(redis: aioredis.Redis, scope: str) -> None:
    now = [1_000_000.0]
    jti_bytes = ENTRY_OVERHEAD + 16
    watcher = RevocationWatcher(
        redis, key=f"{scope}:revoked", channel=f"{scope}:revocations", budget_bytes=10 * jti_bytes, clock=lambda: now[0]
    )
    watcher.synced.set()  # as after a subscription: lookups trust the local set while it is complete
    soon = [f"soon-{i:011d}" for i in range(5)]
    later = [f"late-{i:011d}" for i in range(5)]
    for jti in soon:
        watcher._add(jti, now[0] + 10)
    for jti in later:
        watcher._add(jti, now[0] + 1000)
    assert len(watcher) == 10 and watcher.bytes == 10 * jti_bytes
    now[0] += 11  # the short-lived ones have expired: they go first, nothing unexpired is dropped
    watcher._add("new-000000000000", now[0] + 1000)
    assert watcher.bytes <= watcher.budget_bytes
    assert all(watcher.holds(j) for j in later) and not any(watcher.holds(j) for j in soon)
    assert await watcher.is_revoked(later[0])

    # Over the budget with nothing expired: the soonest to expire is dropped, and lookups of jtis the set
    # no longer holds ask Redis until that entry would have expired.
    dropped = "drop-00000000000"
    await redis.zadd(watcher.key, {dropped: now[0] + 5})
    watcher._add(dropped, now[0] + 5)
    for i in range(10):
        watcher._add(f"more-{i:011d}", now[0] + 2000)
    assert watcher.bytes <= watcher.budget_bytes
    assert not watcher.holds(dropped)
    assert await watcher.is_revoked(dropped)  # from Redis: a dropped revocation is still honoured
    await redis.delete(watcher.key)


async def test_malformed_messages_are_ignored(infra: Infra, redis: aioredis.Redis, scope: str) -> None:
    async with running(infra, scope) as watcher:
        for junk in (b"not json", b'{"jti": 5, "exp": 1}', b"[]", b"x" * 5000):
            await redis.publish(watcher.channel, junk)
        jti = secrets.token_urlsafe(12)
        await revoke(redis, jti, time.time() + 600, key=watcher.key, channel=watcher.channel)
        await eventually(lambda: watcher.holds(jti), "the valid revocation after the junk")
        assert len(watcher) == 1
