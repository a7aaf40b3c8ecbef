"""The active peers, from the registry's ResolvePeers, reloaded at most every DISCOVERY_PEER_LIST_TTL."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from agentvault.common import peers
from agentvault.common.peers import PeerTarget
from agentvault.common.token_source import TokenFetchFailed, TokenSource
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc
from agentvault_discovery.settings import DiscoverySettings

log = logging.getLogger(__name__)


class PeerDirectory:
    """The active peers, from the registry's ResolvePeers, kept for a second or two so a search costs no extra hop."""

    def __init__(self, stub: fed_grpc.PeerServiceAsyncStub, identity: TokenSource, settings: DiscoverySettings) -> None:
        self._stub = stub
        # This service's own identity: ResolvePeers needs federation:resolve, which no caller lends it.
        self._identity = identity
        self._settings = settings
        self._peers: list[PeerTarget] = []
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self) -> list[PeerTarget]:
        now = time.monotonic()
        if now - self._loaded_at < self._settings.peer_list_ttl_seconds:
            return self._peers
        # One reload at a time: concurrent searches wait for it instead of each calling the registry.
        async with self._lock:
            if time.monotonic() - self._loaded_at < self._settings.peer_list_ttl_seconds:
                return self._peers
            assert self._settings.box is not None
            try:
                token = await self._identity.token()
                self._peers = await peers.load_peers(self._stub, token, self._settings.box)
            except TokenFetchFailed as exc:
                log.error("cannot load federation peers: no token for this service: %s", exc)
                self._loaded_at = time.monotonic() - self._settings.peer_list_ttl_seconds + 0.5
                return self._peers
            except grpc.aio.AioRpcError as exc:
                # A stale list beats no federation while the registry blips; it is retried on the next search.
                log.error("cannot load federation peers from the registry: %s %s", exc.code().name, exc.details())
                self._loaded_at = time.monotonic() - self._settings.peer_list_ttl_seconds + 0.5
                return self._peers
            self._loaded_at = time.monotonic()
            return self._peers

    def invalidate(self) -> None:
        self._loaded_at = float("-inf")

    @property
    def known(self) -> list[PeerTarget]:
        """The list as last loaded, without asking the registry."""
        return self._peers
