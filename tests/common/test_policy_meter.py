"""The policy usage meter against a real Redis: counts before each call, windows, days, leases, replicas, TTLs."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from agentvault.common.policy.meter import MAX_ARGUMENT_CHARS, Meter, Usage
from agentvault.common.policy.request import counters
from agentvault.devserver.embedded import free_port

from ..conftest import Infra

MIDNIGHT = datetime(2026, 11, 27, tzinfo=UTC).timestamp()
CALL = ("agent:alice", "tool.invoke", "tool:search")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis(infra: Infra) -> AsyncIterator[aioredis.Redis]:
    # Database 0: meshes are numbered from 1. Each test's prefix is unique, so its keys are its own.
    client = aioredis.Redis.from_url(f"{infra.redis_base}/0")
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return "t" + secrets.token_hex(6) + ":meter"


@pytest.fixture
def clock() -> Clock:
    # Mid-window and mid-day, so only the tests that move it to a boundary cross one.
    return Clock(MIDNIGHT - 12 * 3600 + 30)


def meter(redis: aioredis.Redis, prefix: str, clock: Clock, **kwargs: float) -> Meter:
    return Meter(redis, clock=clock, prefix=prefix, **kwargs)


async def usages(m: Meter, count: int, call: tuple[str, str, str] = CALL) -> list[Usage]:
    return [(await m.take(*call)).usage for _ in range(count)]


async def test_a_decision_sees_the_calls_before_it(redis: aioredis.Redis, prefix: str, clock: Clock) -> None:
    m = meter(redis, prefix, clock)
    assert await usages(m, 3) == [Usage(0, 0, 0), Usage(1, 1, 1), Usage(2, 2, 2)]
    ticket = await m.take(*CALL)
    assert ticket.usage.counters(payload_size=512) == {
        "payload_size": 512,
        "calls_in_window": 3,
        "concurrent_calls": 3,
        "calls_today": 3,
    }
    # What the engine accepts as its measured context, unchanged; the ticket hands the enforcer the same.
    assert counters(ticket.usage.counters()) == {**ticket.usage.counters(), "payload_size": 0}
    assert ticket.counters(512) == ticket.usage.counters(512)


async def test_the_window_rolls_over_at_its_boundary(redis: aioredis.Redis, prefix: str, clock: Clock) -> None:
    m = meter(redis, prefix, clock, window_seconds=60)
    clock.now = MIDNIGHT - 3600 - 0.001  # the last instant of a window aligned to the epoch
    await usages(m, 2)
    assert (await m.take(*CALL)).usage.calls_in_window == 2
    clock.now = MIDNIGHT - 3600
    usage = (await m.take(*CALL)).usage
    assert usage.calls_in_window == 0 and usage.calls_today == 3 and usage.concurrent_calls == 3
    clock.now = MIDNIGHT - 3600 + 59.999
    assert (await m.take(*CALL)).usage.calls_in_window == 1


async def test_the_day_rolls_over_at_utc_midnight(redis: aioredis.Redis, prefix: str, clock: Clock) -> None:
    m = meter(redis, prefix, clock, window_seconds=3600 * 5)  # windows that do not end at midnight
    clock.now = MIDNIGHT - 12 * 3600
    await usages(m, 2)
    clock.now = MIDNIGHT - 0.001
    assert (await m.take(*CALL)).usage.calls_today == 2
    clock.now = MIDNIGHT
    usage = (await m.take(*CALL)).usage
    assert usage.calls_today == 0 and usage.calls_in_window == 1


async def test_refuse_undoes_all_three_counts_once(redis: aioredis.Redis, prefix: str, clock: Clock) -> None:
    m = meter(redis, prefix, clock)
    refused = await m.take(*CALL)
    await usages(m, 2)
    await refused.refuse()
    await refused.refuse()
    await refused.done()  # after a refuse, nothing is left to end
    assert (await m.take(*CALL)).usage == Usage(2, 2, 2)


async def test_done_ends_in_progress_only_and_once(redis: aioredis.Redis, prefix: str, clock: Clock) -> None:
    m = meter(redis, prefix, clock)
    finished = await m.take(*CALL)
    await usages(m, 1)
    await finished.done()
    await finished.done()
    assert (await m.take(*CALL)).usage == Usage(2, 1, 2)
    # A refuse after done still undoes what remains counted (window and day), and only that.
    await finished.refuse()
    await finished.refuse()
    assert (await m.take(*CALL)).usage == Usage(2, 2, 2)


async def test_a_refuse_does_not_recreate_an_expired_counter(redis: aioredis.Redis, prefix: str, clock: Clock) -> None:
    m = meter(redis, prefix, clock)
    ticket = await m.take(*CALL)
    window, day, _ = m.keys(*CALL, clock.now)
    await redis.delete(window, day)  # as their TTLs do when a refuse comes late
    await ticket.refuse()
    assert await redis.exists(window, day) == 0


async def test_a_call_never_done_stops_counting_after_its_lease(
    redis: aioredis.Redis, prefix: str, clock: Clock
) -> None:
    m = meter(redis, prefix, clock, lease_seconds=30)
    start = clock.now
    await m.take(*CALL)  # its process died: no done, no refuse
    clock.now = start + 29.999
    second = await m.take(*CALL)
    assert second.usage.concurrent_calls == 1
    await second.done()
    clock.now = start + 30
    assert (await m.take(*CALL)).usage.concurrent_calls == 0


async def test_replicas_share_counts_and_concurrent_takes_are_distinct(
    infra: Infra, redis: aioredis.Redis, prefix: str, clock: Clock
) -> None:
    other_client = aioredis.Redis.from_url(f"{infra.redis_base}/0")
    try:
        one, other = meter(redis, prefix, clock), meter(other_client, prefix, clock)
        first = await one.take(*CALL)
        assert (await other.take(*CALL)).usage == Usage(1, 1, 1)
        await first.done()
        assert (await other.take(*CALL)).usage == Usage(2, 1, 2)

        fresh = ("agent:bob", *CALL[1:])
        tickets = await asyncio.gather(*((one if i % 2 else other).take(*fresh) for i in range(50)))
        assert sorted(t.usage.calls_in_window for t in tickets) == list(range(50))
        assert sorted(t.usage.concurrent_calls for t in tickets) == list(range(50))
        assert sorted(t.usage.calls_today for t in tickets) == list(range(50))
    finally:
        await other_client.aclose()


async def test_keys_are_hashed_and_expire(redis: aioredis.Redis, prefix: str, clock: Clock) -> None:
    m = meter(redis, prefix, clock, window_seconds=10, lease_seconds=45)
    await m.take(*CALL)
    window, day, in_progress = m.keys(*CALL, clock.now)
    assert 0 < await redis.pttl(window) <= 20_000
    assert 0 < await redis.pttl(day) <= 2 * 86_400_000
    assert 0 < await redis.pttl(in_progress) <= 45_000
    stored = sorted([k.decode() async for k in redis.scan_iter(match=f"{prefix}:*")])
    assert stored == sorted([window, day, in_progress])
    assert not any(part in key for key in stored for part in ("alice", "tool.invoke", "search"))


async def test_separate_calls_are_independent(redis: aioredis.Redis, prefix: str, clock: Clock) -> None:
    m = meter(redis, prefix, clock)
    await usages(m, 3)
    for other in [
        ("agent:carol", *CALL[1:]),
        (CALL[0], "message.send", CALL[2]),
        (*CALL[:2], "tool:fetch"),
        # The same text split differently is another call, whatever separator a join would use.
        ("agent", "alice:tool.invoke", "tool:search"),
        ("agent:alice:tool.invoke", "", "tool:search"),
    ]:
        assert (await m.take(*other)).usage == Usage(0, 0, 0), other
    await m.take("a\0b", "c", "d")
    assert (await m.take("a", "b\0c", "d")).usage == Usage(0, 0, 0)
    assert (await m.take(*CALL)).usage == Usage(3, 3, 3)


async def test_bad_arguments_are_a_value_error(redis: aioredis.Redis, prefix: str, clock: Clock) -> None:
    m = meter(redis, prefix, clock)
    assert (await m.take("x" * MAX_ARGUMENT_CHARS, *CALL[1:])).usage == Usage(0, 0, 0)
    for bad in [("x" * (MAX_ARGUMENT_CHARS + 1), *CALL[1:]), (CALL[0], 7, CALL[2]), (*CALL[:2], None)]:
        with pytest.raises(ValueError, match="at most 1000 characters"):
            await m.take(*bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        Meter(redis, window_seconds=0)


async def test_a_redis_failure_propagates() -> None:
    down = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        with pytest.raises(RedisConnectionError):
            await Meter(down).take(*CALL)
    finally:
        await down.aclose()
