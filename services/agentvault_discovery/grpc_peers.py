"""gRPC peers: pooled channels, signed SearchAgents calls answering raw bytes, and GetSharingGeneration."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Gauge

from agentvault.common import peers, signing, tracing
from agentvault.common.peers import PeerTarget
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_discovery import domain
from agentvault_discovery.outcomes import REASON_INVALID, REASON_REJECTED, REASON_UNAVAILABLE, PeerError
from agentvault_discovery.routes import Route
from agentvault_discovery.settings import DiscoverySettings

log = logging.getLogger(__name__)

SEARCH_METHOD = "/agentvault.federation.v1.FederationService/SearchAgents"
GENERATION_METHOD = "/agentvault.federation.v1.FederationService/GetSharingGeneration"

PEER_CHANNELS = Gauge("federation_peer_channels", "Open gRPC channels to federation peers.")


@dataclass(frozen=True)
class _PeerChannel:
    """A pooled channel to a peer, its SearchAgents call, which answers raw bytes (digested before parsing), and
    its GetSharingGeneration call."""

    channel: grpc.aio.Channel
    search: grpc.aio.UnaryUnaryMultiCallable
    generation: grpc.aio.UnaryUnaryMultiCallable


def parse_search(raw: bytes) -> tuple[list[pb.Agent], int]:
    """A gRPC peer's SearchAgents answer: its agents, each still to be validated, and its sharing generation."""
    try:
        reply = fed_pb.SearchAgentsResponse.FromString(raw)
    except DecodeError:
        raise PeerError(REASON_INVALID, "peer answered with an unreadable message") from None
    return list(reply.agents), reply.generation


def rpc_error(exc: grpc.aio.AioRpcError) -> Exception:
    """A failed call to a peer as the error its outcome reports; the details may name internal addresses, so they
    go only into the detail."""
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return PeerError(REASON_REJECTED, f"authentication rejected by peer: {code.name}: {exc.details()}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return PeerError(REASON_REJECTED, f"peer answer rejected: {code.name}: {exc.details()}")
    return PeerError(REASON_UNAVAILABLE, f"peer call failed: {code.name}: {exc.details()}")


class GrpcPeers:
    """The channels to gRPC peers, pooled for the process, and the two calls made on them."""

    def __init__(self, settings: DiscoverySettings) -> None:
        self._settings = settings
        self._channels: dict[tuple[str, bool], _PeerChannel] = {}
        self._client_credentials: grpc.ChannelCredentials | None = None

    async def search(self, peer: PeerTarget, route: Route, query: domain.PeerQuery) -> bytes:
        request = fed_pb.SearchAgentsRequest(
            search=query.search,
            agent_type=query.agent_type,
            tag=query.tag,
            capability_kind=query.capability_kind,  # type: ignore[arg-type]
            capability_name=query.capability_name,
            capability_version=query.capability_version,
            page_size=query.limit,
        )
        try:
            # A CLIENT span per peer call (when spans are recorded): the peer's server span is its child.
            with tracing.span(SEARCH_METHOD, tracing.CLIENT, attributes={"peer.name": peer.name}):
                reply = await self._channel(route.grpc_endpoint, route.mtls).search(
                    request,
                    metadata=self._signed_metadata(peer, SEARCH_METHOD, request),
                    timeout=self._settings.query_timeout_seconds,
                )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc) from None
        if not isinstance(reply, bytes):
            raise PeerError(REASON_INVALID, "peer call failed: no answer")
        return reply

    async def generation(self, peer: PeerTarget, route: Route) -> int | None:
        """The peer's sharing generation; None when the peer does not implement the call (a mesh that predates
        generations)."""
        request = fed_pb.GetSharingGenerationRequest()
        call = self._channel(route.grpc_endpoint, route.mtls).generation
        try:
            raw = await call(
                request,
                metadata=self._signed_metadata(peer, GENERATION_METHOD, request),
                timeout=self._settings.query_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise rpc_error(exc) from None
        try:
            return int(fed_pb.SharingGeneration.FromString(raw).generation)
        except DecodeError:
            raise PeerError(REASON_INVALID, "peer answered GetSharingGeneration with an unreadable message") from None

    def _channel(self, endpoint: str, mtls: bool) -> _PeerChannel:
        key = (endpoint, mtls)
        known = self._channels.get(key)
        if known is not None:
            return known
        options = [
            # A peer answering more than this is refused by gRPC itself, before the message is built.
            ("grpc.max_receive_message_length", self._settings.max_peer_response_bytes),
            ("grpc.max_send_message_length", 1024 * 1024),
            ("grpc.keepalive_time_ms", 60_000),
            # Fail fast when a peer is down instead of waiting out the deadline in connection backoff.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        if mtls:
            if self._settings.tls is None:
                raise PeerError(
                    REASON_UNAVAILABLE, "peer requires mutual TLS but FEDERATION_TLS_CA/CERT/KEY are not set"
                )
            if self._client_credentials is None:
                self._client_credentials = peers.client_credentials(self._settings.tls)
            channel = grpc.aio.secure_channel(endpoint, self._client_credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(endpoint, options=options)
        search: grpc.aio.UnaryUnaryMultiCallable = channel.unary_unary(
            SEARCH_METHOD, request_serializer=fed_pb.SearchAgentsRequest.SerializeToString
        )
        generation: grpc.aio.UnaryUnaryMultiCallable = channel.unary_unary(
            GENERATION_METHOD, request_serializer=fed_pb.GetSharingGenerationRequest.SerializeToString
        )
        self._channels[key] = _PeerChannel(channel, search, generation)
        PEER_CHANNELS.set(len(self._channels))
        return self._channels[key]

    def _signed_metadata(self, peer: PeerTarget, method: str, request: Any) -> list[tuple[str, str]]:
        metadata: list[tuple[str, str]] = [(signing.REGISTRY_HEADER, self._settings.registry_name)]
        if peer.api_key:
            nonce = signing.new_nonce()
            body = signing.grpc_body(request.SerializeToString(deterministic=True))
            metadata += [
                ("authorization", f"Bearer {peer.api_key}"),
                (signing.NONCE_HEADER, nonce),
                (signing.SIGNATURE_HEADER, signing.sign(signing.GRPC_METHOD, method, body, peer.api_key, nonce=nonce)),
            ]
        # W3C trace context (outside the signature, like a request id): the peer mesh continues this trace.
        metadata.extend(tracing.inject({}).items())
        return metadata

    def prune(self, in_use: set[tuple[str, bool]], spawn: Callable[[Coroutine[Any, Any, None], str], None]) -> None:
        """Closes (through `spawn`) the channels no remaining peer uses."""
        for endpoint in [k for k in self._channels if k not in in_use]:
            closing = self._channels.pop(endpoint)
            spawn(closing.channel.close(), f"close the channel to {endpoint[0]}")
        PEER_CHANNELS.set(len(self._channels))

    async def close(self) -> None:
        for peer_channel in self._channels.values():
            await peer_channel.channel.close()
        self._channels.clear()
        PEER_CHANNELS.set(0)
