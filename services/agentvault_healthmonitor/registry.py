"""The registry as this service uses it: peers and agents to check, status write-back, and who a caller is."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from agentvault.common import agents as agent_rules
from agentvault.common.agent_auth import resolve_agent_auth
from agentvault.common.enums import enum_words
from agentvault.common.peers import load_peers
from agentvault.common.secretbox import SecretBox
from agentvault.common.token_source import BearerInterceptor, TokenSource
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault.registry.v1 import registry_service_pb2_grpc as reg_grpc
from agentvault_healthmonitor.domain import AgentSubject, PeerSubject, State

# The domain's status words are PeerStatus's words (domain.STATUSES; tests/healthmonitor check they all map).
PEER_STATUS = enum_words(fed_pb.PeerStatus.DESCRIPTOR)


def peer_status(word: str) -> Any:
    """The PeerStatus number for a domain status word; UNSPECIFIED for "" (never checked)."""
    return PEER_STATUS.number(word) or fed_pb.PEER_STATUS_UNSPECIFIED


AUTH_KIND = enum_words(reg_pb.AgentAuthKind.DESCRIPTOR)

PAGE_SIZE = 500
CALL_TIMEOUT = 5.0


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def agent_health(state: State) -> Any:
    """What the registry shows for an agent: healthy after a success, unhealthy once down, else unchanged."""
    if state.status == "healthy":
        return reg_pb.HEALTH_STATUS_HEALTHY
    if state.is_down:
        return reg_pb.HEALTH_STATUS_UNHEALTHY
    return None


class RegistryClient:
    """Calls as this service itself: `identity` (its own OAuth client) supplies the token of every call, added by
    the channel's BearerInterceptor, which also retries once with a fresh token after UNAUTHENTICATED."""

    def __init__(self, address: str, identity: TokenSource, box: SecretBox | None) -> None:
        self.channel = grpc.aio.insecure_channel(address, interceptors=[BearerInterceptor(identity)])
        self.peers_stub = fed_grpc.PeerServiceStub(self.channel)
        self.registry_stub = reg_grpc.RegistryServiceStub(self.channel)
        self.box = box
        self.identity = identity
        # The interceptor puts the token in; no call carries any other credential.
        self._metadata: tuple[tuple[str, str], ...] = ()

    async def close(self) -> None:
        await self.channel.close()

    async def peers(self) -> list[PeerSubject]:
        if self.box is not None:
            # load_peers also decrypts each peer's key; the probes never send it (they call public RPCs).
            token = await self.identity.token()
            targets = await load_peers(self.peers_stub, token, self.box, CALL_TIMEOUT)
            return [
                PeerSubject(t.id, t.name, t.registry_url, t.protocol, t.grpc_endpoint, t.require_mtls) for t in targets
            ]
        reply = await self.peers_stub.ResolvePeers(
            fed_pb.ResolvePeersRequest(), metadata=self._metadata, timeout=CALL_TIMEOUT
        )
        return [
            PeerSubject(
                r.peer.id,
                r.peer.name,
                r.peer.registry_url.rstrip("/"),
                r.peer.protocol,
                r.peer.grpc_endpoint,
                r.peer.require_mtls,
            )
            for r in reply.peers
        ]

    async def agents(self) -> list[AgentSubject]:
        found: list[AgentSubject] = []
        token = ""
        while True:
            reply = await self.registry_stub.ListAgents(
                reg_pb.ListAgentsRequest(has_health_check_url=True, page_size=PAGE_SIZE, page_token=token),
                metadata=self._metadata,
                timeout=CALL_TIMEOUT,
            )
            # `auth` is shown to this service (agents:connect) without secrets: its kind says whether to resolve.
            found.extend(
                AgentSubject(
                    a.id,
                    a.name,
                    a.health_check_url,
                    a.health_status,
                    a.auth.kind,
                    f"{a.update_time.seconds}.{a.update_time.nanos}",
                )
                for a in reply.agents
                if a.health_check_url
            )
            token = reply.next_page_token
            if not token:
                return found

    async def agent_auth(self, agent_id: str) -> tuple[agent_rules.AgentAuth, str]:
        """How to authenticate to an agent, with its secret decrypted (ResolveAgentAuth, agents:connect)."""
        return await resolve_agent_auth(self.registry_stub, agent_id, self.box, timeout=CALL_TIMEOUT)

    async def report_peer(self, peer_id: str, state: State) -> None:
        assert state.last_check is not None
        await self.peers_stub.ReportPeerHealth(
            fed_pb.ReportPeerHealthRequest(
                peer_id=peer_id,
                status=peer_status(state.status),
                agent_count=state.agent_count or 0,
                is_down=state.is_down,
                consecutive_failures=state.consecutive_failures,
                check_time=timestamp(state.last_check),
            ),
            metadata=self._metadata,
            timeout=CALL_TIMEOUT,
        )

    async def learn_route(self, peer_id: str, protocol: int, grpc_endpoint: str) -> None:
        """Writes how a peer was reached into its record, where the operator left protocol or endpoint to be
        learned from the peer's discovery document (the record then shows what was used, not "unspecified")."""
        paths = ["protocol", "grpc_endpoint"] if grpc_endpoint else ["protocol"]
        await self.peers_stub.UpdatePeer(
            fed_pb.UpdatePeerRequest(
                peer=fed_pb.Peer(id=peer_id, protocol=protocol, grpc_endpoint=grpc_endpoint),  # type: ignore[arg-type]
                update_mask=field_mask_pb2.FieldMask(paths=paths),
            ),
            metadata=self._metadata,
            timeout=CALL_TIMEOUT,
        )

    async def report_agent(self, agent_id: str, health: Any) -> None:
        await self.registry_stub.ReportAgentHealth(
            reg_pb.ReportAgentHealthRequest(id=agent_id, health_status=health),
            metadata=self._metadata,
            timeout=CALL_TIMEOUT,
        )
