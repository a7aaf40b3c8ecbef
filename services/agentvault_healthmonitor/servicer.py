"""HealthMonitorService over gRPC: converts protobuf to domain objects and back, and nothing else."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from agentvault.common.enums import enum_words
from agentvault.common.errors import NotFound, Unavailable, invalid
from agentvault.common.remote_auth import AdminGate
from agentvault.healthmonitor.v1 import health_monitor_service_pb2 as pb
from agentvault.healthmonitor.v1 import health_monitor_service_pb2_grpc as pb_grpc
from agentvault_healthmonitor.domain import AGENT, PEER, State, Summary, overall_status
from agentvault_healthmonitor.events import ChangeEvent, EventHub, WatchEnded
from agentvault_healthmonitor.monitor import Monitor
from agentvault_healthmonitor.registry import peer_status
from agentvault_healthmonitor.store import Store

# The domain's overall words ("", healthy, degraded, down) are OverallStatus's words.
OVERALL = enum_words(pb.OverallStatus.DESCRIPTOR)
DEFAULT_WINDOW = 86400
MAX_WINDOW = 30 * 86400
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_ID = 64
# Summaries aggregate a day of history per peer; one computation serves every request for up to this long.
MAX_SUMMARY_CACHE_SECONDS = 5.0


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def peer_health(peer_id: str, name: str, state: State | None, summary: Summary | None) -> pb.PeerHealth:
    state = state or State(PEER, peer_id)
    summary = summary or Summary(0, 0, 0.0)
    return pb.PeerHealth(
        peer_id=peer_id,
        name=name or state.name,
        status=peer_status(state.status),
        response_time_ms=state.response_time_ms,
        last_check=_timestamp(state.last_check),
        error=state.error,
        consecutive_failures=state.consecutive_failures,
        is_down=state.is_down,
        uptime_percent=round(summary.uptime_percent, 3),
        avg_response_time_ms=round(summary.avg_response_time_ms, 3),
    )


def event_to_proto(event: ChangeEvent) -> pb.WatchHealthResponse:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(datetime.fromisoformat(event.time))
    return pb.WatchHealthResponse(
        subject_kind=event.subject_kind,
        subject_id=event.subject_id,
        name=event.name,
        previous_status=peer_status(event.previous_status),
        status=peer_status(event.status),
        is_down=event.is_down,
        error=event.error,
        time=ts,
        response_time_ms=event.response_time_ms,
    )


class HealthMonitorServicer(pb_grpc.HealthMonitorServiceServicer):
    def __init__(
        self, store: Store, monitor: Monitor, hub: EventHub, gate: AdminGate, window_seconds: int, interval: float
    ) -> None:
        self.store = store
        self.summary_ttl = min(MAX_SUMMARY_CACHE_SECONDS, interval)
        self.monitor = monitor
        self.hub = hub
        self.gate = gate
        self.window_seconds = window_seconds
        self._summaries: tuple[float, frozenset[str], dict[str, Summary]] = (0.0, frozenset(), {})

    async def _peer_summaries(self, ids: list[str]) -> dict[str, Summary]:
        at, cached_ids, cached = self._summaries
        if time.monotonic() - at < self.summary_ttl and cached_ids == frozenset(ids):
            return cached
        found = await self.store.summaries(PEER, ids, self.window_seconds)
        self._summaries = (time.monotonic(), frozenset(ids), found)
        return found

    async def GetFederationHealth(
        self, request: pb.GetFederationHealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetFederationHealthResponse:
        await self.gate.require_admin(context.invocation_metadata())
        peers = await self.monitor.current_peers()
        ids = [p.id for p in peers]
        states = await self.store.states(PEER, ids)
        summaries = await self._peer_summaries(ids)
        current = [states.get(p.id) or State(PEER, p.id) for p in peers]
        return pb.GetFederationHealthResponse(
            overall_status=pb.OverallStatus.ValueType(OVERALL.number(overall_status(current)) or 0),
            active_peers=sum(1 for s in current if s.status == "healthy"),
            total_peers=len(peers),
            peers=[peer_health(p.id, p.name, states.get(p.id), summaries.get(p.id)) for p in peers],
        )

    async def GetPeerHealthHistory(
        self, request: pb.GetPeerHealthHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPeerHealthHistoryResponse:
        await self.gate.require_admin(context.invocation_metadata())
        if not request.peer_id:
            raise invalid("peer_id", "is required")
        if len(request.peer_id) > MAX_ID:
            raise invalid("peer_id", f"must be at most {MAX_ID} characters")
        if request.window_seconds < 0 or request.limit < 0:
            raise invalid("window_seconds" if request.window_seconds < 0 else "limit", "must not be negative")
        window = min(request.window_seconds or DEFAULT_WINDOW, MAX_WINDOW)
        limit = min(request.limit or DEFAULT_LIMIT, MAX_LIMIT)
        peer = next((p for p in await self.monitor.current_peers() if p.id == request.peer_id), None)
        state = (await self.store.states(PEER, [request.peer_id])).get(request.peer_id)
        if peer is None and state is None:
            raise NotFound(f"peer {request.peer_id} not found", "PEER_NOT_FOUND", peer_id=request.peer_id)
        summary = (await self.store.summaries(PEER, [request.peer_id], window)).get(request.peer_id)
        history = await self.store.history(PEER, request.peer_id, limit)
        return pb.GetPeerHealthHistoryResponse(
            summary=peer_health(request.peer_id, peer.name if peer else "", state, summary),
            checks=[
                pb.HealthCheck(
                    status=peer_status(h.status),
                    response_time_ms=h.response_time_ms,
                    error=h.error,
                    time=_timestamp(h.checked_at),
                )
                for h in history
            ],
        )

    async def GetAgentHealthHistory(
        self, request: pb.GetAgentHealthHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAgentHealthHistoryResponse:
        await self.gate.require_admin(context.invocation_metadata())
        if not request.agent_id:
            raise invalid("agent_id", "is required")
        try:
            uuid.UUID(request.agent_id)
        except ValueError:
            raise invalid("agent_id", "must be a UUID") from None
        if request.limit < 0:
            raise invalid("limit", "must not be negative")
        history = await self.store.history(AGENT, request.agent_id, min(request.limit or DEFAULT_LIMIT, MAX_LIMIT))
        return pb.GetAgentHealthHistoryResponse(
            checks=[
                pb.HealthCheck(
                    status=peer_status(h.status),
                    response_time_ms=h.response_time_ms,
                    error=h.error,
                    time=_timestamp(h.checked_at),
                )
                for h in history
            ]
        )

    async def WatchHealth(
        self, request: pb.WatchHealthRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchHealthResponse]:
        await self.gate.require_admin(context.invocation_metadata())
        # Subscribed before reading the current state, so a change in between is sent (maybe twice), never lost.
        async with self.hub.watch() as watcher:
            if request.include_current:
                peers = await self.monitor.current_peers()
                states = await self.store.states(PEER, [p.id for p in peers])
                for peer in peers:
                    state = states.get(peer.id) or State(PEER, peer.id)
                    yield pb.WatchHealthResponse(
                        subject_kind=PEER,
                        subject_id=peer.id,
                        name=peer.name,
                        status=peer_status(state.status),
                        is_down=state.is_down,
                        error=state.error,
                        time=_timestamp(state.last_check),
                        response_time_ms=state.response_time_ms,
                    )
            while True:
                try:
                    event = await watcher.next()
                except WatchEnded as exc:
                    raise Unavailable(str(exc), "WATCH_INTERRUPTED") from None
                yield event_to_proto(event)
