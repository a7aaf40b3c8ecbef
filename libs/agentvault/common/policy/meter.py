"""Usage counters for policy decisions (calls in the window, in progress, today), shared by replicas in Redis."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

MAX_ARGUMENT_CHARS = 1_000
DAY_SECONDS = 86_400
# 128 bits of the hash: collisions between (caller, action, target) triples are out of reach.
_DIGEST_CHARS = 32

# One atomic step, so concurrent takes on any replica each see a distinct count and a take costs one round trip.
# Expired leases go first: a process that died mid-call stops counting as in progress once its lease has passed.
# KEYS: window, day, in-progress set. ARGV: now, lease expiry, ticket id, window TTL ms, day TTL ms, lease TTL ms.
_TAKE = """
local in_window = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local today = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
local concurrent = redis.call('ZCARD', KEYS[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
return {in_window - 1, concurrent, today - 1}
"""

# A counter that expired meanwhile is not recreated (a DECR would make a -1 without a TTL that lives forever).
# KEYS: window, day, in-progress set. ARGV: ticket id, 1 to undo the window and day counts too.
_REFUSE = """
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[2] == '1' then
  for i = 1, 2 do
    local count = tonumber(redis.call('GET', KEYS[i]))
    if count and count > 0 then
      redis.call('DECR', KEYS[i])
    end
  end
end
return 1
"""


@dataclass(frozen=True)
class Usage:
    """What the policy context gets: the calls of one (caller, action, target) made before this one."""

    calls_in_window: int
    concurrent_calls: int
    calls_today: int

    def counters(self, payload_size: int = 0) -> dict[str, int]:
        """The engine's measured context (schema.COUNTERS), with the payload size the enforcer measured itself."""
        return {
            "payload_size": payload_size,
            "calls_in_window": self.calls_in_window,
            "concurrent_calls": self.concurrent_calls,
            "calls_today": self.calls_today,
        }


class Ticket:
    """One counted call: `refuse` if it was not made, else `done` when it finished.

    Each undo is sent at most once: a retry after a failure that Redis may still have applied could undo another
    call's count. A lost undo errs towards denying: the counts fall back with the window, the day or the lease.
    """

    __slots__ = ("_counted", "_in_progress", "_keys", "_meter", "_ticket_id", "usage")

    def __init__(self, meter: Meter, keys: list[str], ticket_id: str, usage: Usage) -> None:
        self.usage = usage
        self._meter = meter
        self._keys = keys
        self._ticket_id = ticket_id
        self._counted = True
        self._in_progress = True

    def counters(self, payload_size: int = 0) -> dict[str, int]:
        """`usage.counters(payload_size)`: what the enforcer hands the engine."""
        return self.usage.counters(payload_size)

    async def refuse(self) -> None:
        """The call was not made (denied, or waiting for an approval): undoes whatever of its counts remain."""
        if not (self._counted or self._in_progress):
            return
        undo_counts = self._counted
        self._counted = self._in_progress = False
        await self._meter._refuse(keys=self._keys, args=[self._ticket_id, "1" if undo_counts else "0"])

    async def done(self) -> None:
        """The call finished: it is no longer in progress (it still counts in its window and day)."""
        if not self._in_progress:
            return
        self._in_progress = False
        await self._meter.redis.zrem(self._keys[2], self._ticket_id)


class Meter:
    """Counts calls per (caller, action, target) in Redis: fixed windows of `window_seconds` aligned to the epoch,
    UTC days, and calls in progress (each held by a lease of `lease_seconds`)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        window_seconds: float = 60.0,
        lease_seconds: float = 300.0,
        clock: Callable[[], float] = time.time,
        prefix: str = "policy:meter",
    ) -> None:
        if not window_seconds > 0 or not lease_seconds > 0:
            raise ValueError("window_seconds and lease_seconds must be positive")
        self.redis = redis
        self.window_seconds = window_seconds
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.prefix = prefix
        # A key outlives its window by one more, so a late refuse still finds it; a day likewise.
        self._window_ttl_ms = max(1, math.ceil(2 * window_seconds * 1000))
        self._day_ttl_ms = 2 * DAY_SECONDS * 1000
        self._lease_ttl_ms = max(1, math.ceil(lease_seconds * 1000))
        self._take: Any = redis.register_script(_TAKE)
        self._refuse: Any = redis.register_script(_REFUSE)

    def _scope(self, caller: str, action: str, target: str) -> str:
        for name, value in (("caller", caller), ("action", action), ("target", target)):
            if not isinstance(value, str) or len(value) > MAX_ARGUMENT_CHARS:
                raise ValueError(f"{name} must be a string of at most {MAX_ARGUMENT_CHARS} characters")
        # Hashed, so no outsider-chosen string becomes a key; JSON, so no two triples join to the same text.
        digest = hashlib.sha256(json.dumps([caller, action, target]).encode()).hexdigest()[:_DIGEST_CHARS]
        # The braces are a Redis Cluster hash tag: one triple's keys share a slot, as a script needs.
        return f"{self.prefix}:{{{digest}}}"

    def keys(self, caller: str, action: str, target: str, now: float) -> list[str]:
        """The window, day and in-progress keys a call at `now` counts in."""
        scope = self._scope(caller, action, target)
        window = math.floor(now / self.window_seconds)
        day = math.floor(now / DAY_SECONDS)  # epoch seconds have no leap seconds, so this is the UTC day
        return [f"{scope}:w:{window}", f"{scope}:d:{day}", f"{scope}:c"]

    async def take(self, caller: str, action: str, target: str) -> Ticket:
        """Counts this call (one round trip) and returns its ticket, whose usage holds the counts before it.
        Redis errors propagate: the enforcer decides to fail closed."""
        now = self.clock()
        keys = self.keys(caller, action, target, now)
        ticket_id = secrets.token_hex(8)
        args = [repr(now), repr(now + self.lease_seconds), ticket_id]
        in_window, concurrent, today = await self._take(
            keys=keys, args=[*args, self._window_ttl_ms, self._day_ttl_ms, self._lease_ttl_ms]
        )
        return Ticket(self, keys, ticket_id, Usage(int(in_window), int(concurrent), int(today)))
