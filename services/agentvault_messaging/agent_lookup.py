"""Agents as the caller sees them, read from the registry with the caller's credential and kept a moment.

A send and a tool call each name an agent; asking the registry every time cost each of them a round trip (about
1 ms) and the registry a call. The registry answers with the caller's credential forwarded, so what is kept is keyed
by the credential's SHA-256 and the agent id: one caller never sees what another may see. Kept AGENT_CACHE_SECONDS
(a change to the agent, its sharing or the credential shows within that), bounded in bytes (agents are anyone's to
register).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import grpc

from agentvault.common.auth import AUTHORIZATION_KEY
from agentvault.common.errors import NotFound, Unavailable
from agentvault.common.interceptors import caller_metadata
from agentvault.common.lru import Lru
from agentvault.registry.v1 import registry_service_pb2 as reg_pb

log = logging.getLogger(__name__)

AGENT_CACHE_SECONDS = 2.0
AGENT_CACHE_BYTES = 32 * 1024 * 1024
REGISTRY_TIMEOUT = 5.0


class AgentLookup:
    def __init__(self, registry: Any, budget: int = AGENT_CACHE_BYTES, seconds: float = AGENT_CACHE_SECONDS) -> None:
        self.registry = registry  # RegistryService stub; calls carry the caller's own credential
        self.seconds = seconds
        self._agents: Lru[tuple[bytes, str], tuple[reg_pb.Agent, float]] = Lru(50_000, budget=budget)

    async def get(self, agent_id: str, context: grpc.aio.ServicerContext) -> reg_pb.Agent:
        """The agent as the caller may see it (a private agent of someone else is not found: AGENT_NOT_FOUND).
        `agent_id` must be a UUID already (the callers check it with their own field path)."""
        metadata = tuple(caller_metadata(context))
        credential = next((v for k, v in metadata if k == AUTHORIZATION_KEY), "")
        key = (hashlib.sha256(credential.encode() if isinstance(credential, str) else credential).digest(), agent_id)
        now = time.monotonic()
        cached = self._agents.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        agent = await fetch_agent(self.registry, agent_id, metadata)
        # Python's objects weigh a few times the wire size.
        self._agents.put(key, (agent, now + self.seconds), 4 * agent.ByteSize())
        return agent


async def fetch_agent(registry: Any, agent_id: str, metadata: tuple[tuple[str, Any], ...]) -> reg_pb.Agent:
    """GetAgent with the caller's forwarded `metadata`, its refusals as AGENT_NOT_FOUND (what the caller may not see
    does not exist for it), any other failure REGISTRY_UNAVAILABLE."""
    try:
        agent: reg_pb.Agent = await registry.GetAgent(
            reg_pb.GetAgentRequest(id=agent_id), metadata=metadata, timeout=REGISTRY_TIMEOUT
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        ):
            raise NotFound(f"agent {agent_id} not found", "AGENT_NOT_FOUND", id=agent_id) from None
        log.warning("registry GetAgent failed: %s %s", exc.code().name, exc.details())
        raise Unavailable("the registry cannot be asked now", "REGISTRY_UNAVAILABLE") from None
    return agent
