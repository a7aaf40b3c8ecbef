"""The edge's gRPC side: one channel per backend address, one multicallable per method, health checks."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentvault_edge.routes import Route

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    # A backend that restarts is back in well under a second; the default backoff (1 s doubling to 120 s)
    # would keep answering 503 long after it returned.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class Backends:
    """One grpc.aio channel per backend address, reused, and one multicallable per method."""

    def __init__(self, addresses: Mapping[str, str]) -> None:
        self._addresses = addresses
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._callables: dict[tuple[str, str], Any] = {}

    def address(self, api: str) -> str:
        return self._addresses[api]

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    def _callable(self, route: Route) -> Any:
        key = (route.api, route.grpc_path)
        found = self._callables.get(key)
        if found is None:
            channel = self.channel(self.address(route.api))
            # A client-streaming method is called as a bidirectional one: on the wire they are alike, and the
            # WebSocket in front reads any number of answers (one, for a unary response) the same way.
            if route.client_streaming:
                factory: Any = channel.stream_stream
            else:
                factory = channel.unary_stream if route.server_streaming else channel.unary_unary
            found = factory(
                route.grpc_path,
                request_serializer=route.request_class.SerializeToString,
                response_deserializer=route.response_class.FromString,
            )
            self._callables[key] = found
        return found

    def unary(self, route: Route) -> grpc.aio.UnaryUnaryMultiCallable:
        return self._callable(route)

    def server_stream(self, route: Route) -> grpc.aio.UnaryStreamMultiCallable:
        return self._callable(route)

    def bidi_stream(self, route: Route) -> grpc.aio.StreamStreamMultiCallable:
        return self._callable(route)

    async def check(self, apis: Sequence[str], deadline: float) -> dict[str, dict[str, str]]:
        """grpc.health.v1 Check of each distinct backend address behind `apis`."""
        by_address: dict[str, list[str]] = {}
        for api in apis:
            by_address.setdefault(self.address(api), []).append(api)

        async def probe(address: str) -> str:
            stub = health_pb2_grpc.HealthStub(self.channel(address))
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=deadline)
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

        statuses = await asyncio.gather(*(probe(address) for address in by_address))
        return {
            address: {"status": status, "apis": ",".join(apis)}
            for (address, apis), status in zip(by_address.items(), statuses, strict=True)
        }

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._callables.clear()
        for channel in channels:
            await channel.close()
