"""Peers' answers validated by the registry's own rules, deduplicated by DID, capped, memoized by their bytes."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from agentvault.common.lru import Lru
from agentvault.common.peers import PeerTarget
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_discovery import domain

log = logging.getLogger(__name__)

# Validated peer answers kept in memory, keyed by peer and a digest of the bytes the peer sent.
ANSWER_ENTRIES = 256
# Validated agents kept in memory, keyed by a digest of the agent's bytes as the peer sent them: the same agent
# comes back in the answers to many different queries, and its validation is a pure function of those bytes.
AGENT_ENTRIES = 16384
# A validated agent in memory costs about 1.2 times its serialized size (upb, measured); 2 leaves headroom, plus
# a fixed part per agent for the Python objects around it.
MEMORY_PER_WIRE_BYTE = 2
MEMORY_PER_AGENT = 512

FEDERATION_INVALID_AGENTS = Counter(
    "federation_invalid_agents_total", "Agents from peers dropped because they failed validation.", ["peer_name"]
)

# Bytes to (agents still to be validated, the peer's sharing generation or 0); raises PeerError when unreadable.
Parser = Callable[[bytes], tuple[list[pb.Agent], int]]


@dataclass(frozen=True)
class Answer:
    """A peer's answer after validation: what is used, what was dropped, and its serialized form for the cache."""

    agents: list[pb.Agent]
    invalid: int
    clean: bytes
    version: bytes
    # The peer's sharing generation the answer was built at; 0 when the peer does not say (REST peers).
    generation: int = 0
    # For each agent, a digest of the bytes it was validated from (which identify it, and its clean form).
    digests: tuple[bytes, ...] = ()

    @property
    def weight(self) -> int:
        return len(self.clean) * (1 + MEMORY_PER_WIRE_BYTE) + MEMORY_PER_AGENT * len(self.agents)


class Answers:
    """Validates peers' answers; the same bytes from the same peer are validated once, and so is the same agent
    in different answers. The two memos share `budget` half and half."""

    def __init__(self, max_results_per_peer: int, budget: int) -> None:
        self._limit = max_results_per_peer
        # Peers mostly send the same bytes for the same query: those are parsed and validated once.
        self._memo: Lru[tuple[str, bytes], Answer] = Lru(ANSWER_ENTRIES, budget=budget // 2, weigh=lambda a: a.weight)
        self._agents: Lru[bytes, pb.Agent] = Lru(AGENT_ENTRIES, budget=budget // 2)

    @property
    def memo_bytes(self) -> int:
        return self._memo.bytes + self._agents.bytes

    def answer(self, peer: PeerTarget, raw: bytes, parse: Parser) -> Answer:
        """The peer's answer parsed and validated. Raises PeerError when the bytes cannot be parsed."""
        memo_key = (peer.id, hashlib.blake2b(raw, digest_size=16).digest())
        answer = self._memo.get(memo_key)
        if answer is None:
            parsed, generation = parse(raw)
            agents, digests, invalid = self._validate(peer, parsed)
            clean = fed_pb.SearchAgentsResponse(agents=agents).SerializeToString()
            answer = self._memo.put(
                memo_key,
                Answer(
                    agents,
                    invalid,
                    clean,
                    hashlib.blake2b(clean, digest_size=16).digest(),
                    generation,
                    tuple(digests),
                ),
            )
        elif answer.invalid:
            FEDERATION_INVALID_AGENTS.labels(peer.name).inc(answer.invalid)
        return answer

    def forget_peers_but(self, current: set[str] | dict[str, PeerTarget]) -> None:
        """Drops the answers of peers not in `current` (validated agents are not a peer's: they stay)."""
        self._memo.drop_if(lambda k: k[0] not in current)

    def _sanitize(self, agent: pb.Agent) -> tuple[pb.Agent | None, bytes]:
        """domain.sanitize, once per distinct agent, and the digest of the agent's bytes."""
        wire = agent.SerializeToString()
        digest = hashlib.blake2b(wire, digest_size=16).digest()
        known = self._agents.get(digest)
        if known is not None:
            return known, digest
        clean = domain.sanitize(agent)
        if clean is None:
            # Refused agents are not kept: a peer sending junk must not push valid agents out.
            return None, digest
        # The clean agent (at most the size of the one sent) and the Python objects around it.
        return self._agents.put(digest, clean, MEMORY_PER_WIRE_BYTE * len(wire) + MEMORY_PER_AGENT), digest

    def _validate(self, peer: PeerTarget, raw: list[pb.Agent]) -> tuple[list[pb.Agent], list[bytes], int]:
        limit = self._limit
        agents: list[pb.Agent] = []
        digests: list[bytes] = []
        seen: set[str] = set()
        invalid = 0
        for agent in raw[: limit * 2]:
            clean, digest = self._sanitize(agent)
            if clean is None:
                invalid += 1
                continue
            if clean.did in seen:
                continue
            seen.add(clean.did)
            agents.append(clean)
            digests.append(digest)
            if len(agents) >= limit:
                break
        if invalid:
            FEDERATION_INVALID_AGENTS.labels(peer.name).inc(invalid)
            log.warning("peer %s sent %d invalid agent(s); ignored", peer.name, invalid)
        if len(raw) > limit:
            log.warning("peer %s sent %d agents, more than the %d asked for; extra ignored", peer.name, len(raw), limit)
        return agents, digests, invalid
