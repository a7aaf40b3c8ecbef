"""A control plane for enforcers on a hot path: trust cached briefly, interactions and audit lines batched."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from agentvault.common.batching import BatchWriter
from agentvault.common.lru import Lru
from agentvault.common.policy.enforcer import AuditEntry, ControlPlane
from agentvault.common.policy.remote import MAX_BATCH
from agentvault.common.policy.request import Caller, Trust

# Each cached trust is a few short strings: the count bounds the bytes (about 1 KiB an entry at most).
MAX_TRUSTS = 50_000
TRUST_SECONDS = 2.0


@dataclass(frozen=True)
class _Interaction:
    caller: Caller
    agent_id: str
    violation: str | None


class BufferedControlPlane:
    """Wraps a ControlPlane (the registry's, over gRPC) for a service that decides on every message.

    - Trust is cached for `trust_seconds` per (caller, agent): a change made in the registry (by hand, or a drop
      after violations) is enforced here within that time. A violation recorded here drops the entry at once, so
      this replica sees its own drops on the next call.
    - Interactions and decision-log lines are written in batches off the request path (one RPC per batch, at most
      `linger` seconds late). What does not fit the bounded queue is dropped and counted
      (background_writes_dropped_total): the decision itself never waits for its log line.
    - Grants are spent synchronously: two replicas must not both spend the last use.
    """

    def __init__(
        self,
        inner: ControlPlane,
        *,
        trust_seconds: float = TRUST_SECONDS,
        linger: float = 0.05,
        max_queue: int = 20_000,
    ) -> None:
        self.inner = inner
        self.trust_seconds = trust_seconds
        self._trusts: Lru[tuple[str, str], tuple[Trust, float]] = Lru(MAX_TRUSTS)
        self._interactions: BatchWriter[_Interaction] = BatchWriter(
            "policy-interactions", self._write_interactions, max_queue=max_queue, batch=MAX_BATCH, linger=linger
        )
        self._audit: BatchWriter[AuditEntry] = BatchWriter(
            "policy-audit", self.inner.audit, max_queue=max_queue, batch=MAX_BATCH, linger=linger
        )

    def start(self) -> None:
        self._interactions.start()
        self._audit.start()

    async def stop(self) -> None:
        await self._interactions.stop()
        await self._audit.stop()

    async def drain(self) -> None:
        await self._interactions.drain()
        await self._audit.drain()

    async def trust(self, caller: Caller, agent_id: str) -> Trust:
        key = (caller.uid, agent_id)
        now = time.monotonic()
        found = self._trusts.get(key)
        if found is not None and found[1] > now:
            return found[0]
        trust = await self.inner.trust(caller, agent_id)
        self._trusts.put(key, (trust, now + self.trust_seconds))
        return trust

    async def record(self, caller: Caller, agent_id: str, violation: str | None) -> None:
        if violation:
            self._trusts.pop((caller.uid, agent_id))
            self._trusts.pop((caller.uid, ""))
        self._interactions.submit(_Interaction(caller, agent_id, violation))

    async def consume(self, grant_id: str) -> bool:
        return await self.inner.consume(grant_id)

    async def audit(self, entries: Sequence[AuditEntry]) -> None:
        for entry in entries:
            self._audit.submit(entry)

    async def _write_interactions(self, items: list[_Interaction]) -> None:
        record_many = getattr(self.inner, "record_many", None)
        if record_many is not None:
            await record_many([(i.caller, i.agent_id, i.violation) for i in items])
            return
        for item in items:
            await self.inner.record(item.caller, item.agent_id, item.violation)
