"""How each peer is reached (REST, or gRPC at an endpoint, with or without mTLS): configured, or discovered."""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp

from agentvault.common import peers
from agentvault.common.peers import PeerTarget
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault_discovery.outcomes import REASON_INVALID, REASON_UNAVAILABLE, PeerError

# How long a protocol learned from a peer's discovery document is trusted before it is read again.
DISCOVERY_TTL_SECONDS = 600.0


@dataclass(frozen=True)
class Route:
    protocol: int
    grpc_endpoint: str
    mtls: bool
    learned_at: float


class Routes:
    """Each peer's route; learned ones are kept per (peer, registry URL), so a re-pointed peer is asked again."""

    def __init__(self, session: aiohttp.ClientSession, timeout_seconds: float) -> None:
        self._session = session
        self._timeout = timeout_seconds
        self._learned: dict[tuple[str, str], Route] = {}

    async def get(self, peer: PeerTarget) -> Route:
        if peer.protocol == fed_pb.PEER_PROTOCOL_REST:
            return Route(fed_pb.PEER_PROTOCOL_REST, "", False, 0.0)
        if peer.protocol == fed_pb.PEER_PROTOCOL_GRPC and peer.grpc_endpoint:
            return Route(fed_pb.PEER_PROTOCOL_GRPC, peer.grpc_endpoint, peer.require_mtls, 0.0)
        key = (peer.id, peer.registry_url)
        cached = self._learned.get(key)
        if cached is not None and time.monotonic() - cached.learned_at < DISCOVERY_TTL_SECONDS:
            return cached
        try:
            found = await peers.discover(self._session, peer.registry_url, self._timeout)
        except aiohttp.ClientError as exc:
            # Not cached: an unreachable peer is down, not a REST peer, and is asked again next time.
            raise PeerError(
                REASON_UNAVAILABLE, f"cannot reach {peer.registry_url}: {exc.__class__.__name__}: {exc}"
            ) from None
        if peer.protocol == fed_pb.PEER_PROTOCOL_GRPC and found.protocol != fed_pb.PEER_PROTOCOL_GRPC:
            raise PeerError(REASON_INVALID, "peer is configured for gRPC federation but publishes no gRPC endpoint")
        route = Route(found.protocol, found.grpc_endpoint, peer.require_mtls or found.mtls_required, time.monotonic())
        self._learned[key] = route
        return route

    def prune(self, targets: list[PeerTarget]) -> set[tuple[str, bool]]:
        """Forgets the routes of peers that are gone or re-pointed; returns the gRPC (endpoint, mTLS) pairs the
        remaining peers use, configured or learned."""
        current = {p.id: p for p in targets}
        for key in [k for k in self._learned if current.get(k[0]) is None or current[k[0]].registry_url != k[1]]:
            del self._learned[key]
        in_use: set[tuple[str, bool]] = set()
        for p in targets:
            if p.protocol == fed_pb.PEER_PROTOCOL_GRPC and p.grpc_endpoint:
                in_use.add((p.grpc_endpoint, p.require_mtls))
            route = self._learned.get((p.id, p.registry_url))
            if route is not None and route.grpc_endpoint:
                in_use.add((route.grpc_endpoint, route.mtls))
        return in_use
