"""Peers' answers in Redis, one key per (peer, query hash), each carrying the sharing generation it was built at."""

from __future__ import annotations

import asyncio
import logging
import struct

import redis.asyncio as aioredis

from agentvault.common.lru import Lru
from agentvault.common.peers import PeerTarget
from agentvault_discovery.answers import Answer, Answers, Parser
from agentvault_discovery.outcomes import PeerError

log = logging.getLogger(__name__)

# Cached answers kept in memory with the bytes they were read from, keyed by their Redis key.
DECODED_ENTRIES = 1024
# Redis values: this byte, the generation the answer was built at (8 bytes, big-endian), the answer. A first byte
# of 1 is never the start of a protobuf message (field number 0), so values written before are told apart.
CACHE_FORMAT = b"\x01"
_GENERATION = struct.Struct(">Q")
_HEADER = len(CACHE_FORMAT) + _GENERATION.size


def cache_key(peer_id: str, query_hash: str) -> str:
    return f"federation:{peer_id}:{query_hash}"


def encode(answer: Answer) -> bytes:
    """The Redis value of a validated answer."""
    return CACHE_FORMAT + _GENERATION.pack(answer.generation) + answer.clean


class AnswerCache:
    """Reads (one MGET per search), decodes and writes (one pipeline per search) cached peer answers."""

    def __init__(self, redis: aioredis.Redis, ttl_seconds: int, answers: Answers, parse: Parser, budget: int) -> None:
        self.redis = redis
        self._ttl = ttl_seconds
        self._answers = answers
        self._parse = parse
        self._decoded: Lru[str, tuple[bytes, Answer]] = Lru(
            DECODED_ENTRIES, budget=budget, weigh=lambda v: len(v[0]) + v[1].weight
        )

    @property
    def memo_bytes(self) -> int:
        return self._decoded.bytes

    async def read(self, targets: list[PeerTarget], query_hash: str, deadline: float) -> dict[str, bytes]:
        """Every asked peer's cached answer in one round trip, by peer id; a Redis failure costs the cache, not
        the search, and a slow Redis only what is left of the search's deadline."""
        if not self._ttl:
            return {}
        asked = [p for p in targets if not p.is_down]
        if not asked:
            return {}
        try:
            async with asyncio.timeout_at(deadline):
                values = await self.redis.mget([cache_key(p.id, query_hash) for p in asked])
        except Exception as exc:
            log.warning("federation cache read failed: %s", exc)
            return {}
        return {
            p.id: (v if isinstance(v, bytes) else v.encode())
            for p, v in zip(asked, values, strict=True)
            if v is not None
        }

    def decode(self, peer: PeerTarget, key: str, raw: bytes) -> Answer | None:
        """The cached answer, None when unreadable. Bytes read before under the same key cost a comparison, not
        even a digest; others are validated like a peer's answer."""
        known = self._decoded.get(key)
        if known is not None and known[0] == raw:
            return known[1]
        if not raw.startswith(CACHE_FORMAT) or len(raw) < _HEADER:
            return None  # written by an older version, without the generation it was built at: refetched
        (generation,) = _GENERATION.unpack_from(raw, len(CACHE_FORMAT))
        try:
            # Memoized by the whole value: the same agents cached at another generation are another answer.
            answer = self._answers.answer(peer, raw, lambda b: (self._parse(b[_HEADER:])[0], generation))
        except PeerError:
            log.warning("unreadable federation cache entry %s; ignored", key)
            return None
        return self._decoded.put(key, (raw, answer))[1]

    async def put(self, answers: dict[str, bytes]) -> None:
        """Every fresh answer of one search written in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, value in answers.items():
                pipe.set(key, value, ex=self._ttl)
            await pipe.execute()

    async def clear(self, peer_id: str) -> int:
        """Deletes every cached answer of the peer; returns how many."""
        cleared = 0
        batch: list[bytes | str] = []
        async for key in self.redis.scan_iter(match=f"federation:{peer_id}:*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                cleared += await self.redis.delete(*batch)
                batch = []
        if batch:
            cleared += await self.redis.delete(*batch)
        return cleared

    def forget_peers_but(self, current: set[str] | dict[str, PeerTarget]) -> None:
        self._decoded.drop_if(lambda k: k.split(":", 2)[1] not in current)
