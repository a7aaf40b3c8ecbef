"""Whether a cached answer may be served: its peer's sharing generation, heard recently, must be unchanged."""

from __future__ import annotations

import asyncio
import functools
import time

from prometheus_client import Counter

from agentvault.common.peers import PeerTarget
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault_discovery.grpc_peers import GrpcPeers
from agentvault_discovery.routes import Route

FEDERATION_REVALIDATIONS = Counter(
    "federation_cache_revalidations_total",
    "Cached answers checked against a peer's sharing generation, by result.",
    ["result"],
)


def _address(peer: PeerTarget) -> tuple[str, str, str]:
    return peer.id, peer.registry_url, peer.grpc_endpoint


class Generations:
    """Each peer's sharing generation as last heard, and the checks asking for it (one per peer at a time)."""

    def __init__(self, grpc_peers: GrpcPeers, revalidate_seconds: float) -> None:
        self._grpc = grpc_peers
        self._interval = revalidate_seconds
        # Each peer's sharing generation as last heard from it, with the monotonic time it was heard; keyed by the
        # peer's addresses too, so a re-pointed peer is asked again.
        self._confirmed: dict[tuple[str, str, str], tuple[int, float]] = {}
        # One generation check per peer at a time, shared by the searches that need it.
        self._checks: dict[str, asyncio.Task[int]] = {}

    def heard(self, peer: PeerTarget, generation: int) -> None:
        self._confirmed[_address(peer)] = (generation, time.monotonic())

    async def still_current(self, peer: PeerTarget, route: Route, generation: int) -> bool:
        """Whether an answer built at `generation` may still be served: the peer's generation, heard at most
        FEDERATION_REVALIDATE_INTERVAL ago (asked again otherwise, once for every search waiting), is the same."""
        if route.protocol != fed_pb.PEER_PROTOCOL_GRPC:
            return True
        known = self._confirmed.get(_address(peer))
        if known is None or time.monotonic() - known[1] >= self._interval:
            check = self._checks.get(peer.id)
            if check is None:
                check = asyncio.create_task(self._ask(peer, route))
                self._checks[peer.id] = check
                check.add_done_callback(functools.partial(self._check_done, peer.id))
            # Shielded: a search whose deadline ends does not cancel the check others wait for.
            current = await asyncio.shield(check)
        else:
            current = known[0]
        FEDERATION_REVALIDATIONS.labels("current" if current == generation else "changed").inc()
        return current == generation

    def _check_done(self, peer_id: str, task: asyncio.Task[int]) -> None:
        self._checks.pop(peer_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here: the searches that waited for it may all have given up

    async def _ask(self, peer: PeerTarget, route: Route) -> int:
        generation = await self._grpc.generation(peer, route)
        # None: a mesh that predates generations; its cached answers live out FEDERATION_CACHE_TTL as before.
        current = generation or 0
        self.heard(peer, current)
        return current

    def prune(self, targets: list[PeerTarget]) -> None:
        """Forgets the generations of peers that are gone or re-pointed."""
        addresses = {_address(p) for p in targets}
        for address in [a for a in self._confirmed if a not in addresses]:
            del self._confirmed[address]

    def cancel(self) -> None:
        for check in list(self._checks.values()):
            check.cancel()
