"""The background work: keep the schedule in step with the registry, claim due subjects, check, record, report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import replace
from datetime import datetime

import grpc
from prometheus_client import Gauge, Histogram

from agentvault_healthmonitor.checks import Prober
from agentvault_healthmonitor.domain import AGENT, HEALTHY, PEER, AgentSubject, PeerSubject, is_change
from agentvault_healthmonitor.events import ChangeEvent, EventHub
from agentvault_healthmonitor.registry import RegistryClient, agent_health
from agentvault_healthmonitor.settings import HealthMonitorSettings
from agentvault_healthmonitor.store import Store

log = logging.getLogger(__name__)

PEER_HEALTH = Gauge(
    "federation_peer_health", "Health status of federation peer (1=healthy, 0=unhealthy)", ["peer_name"]
)
CHECK_DURATION = Histogram(
    "health_check_duration_seconds",
    "Time one health check took, by what was checked and what it saw.",
    ["subject_kind", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# The peer list is re-read at most this often (and at least once per interval) to pick up added peers.
MAX_SYNC_PERIOD = 10.0
# How often a replica looks for due subjects when nothing finished in between.
MAX_TICK = 1.0
PRUNE_EVERY = 3600.0


class Monitor:
    def __init__(
        self,
        settings: HealthMonitorSettings,
        store: Store,
        prober: Prober,
        registry: RegistryClient,
        hub: EventHub,
    ) -> None:
        self.settings = settings
        self.store = store
        self.prober = prober
        self.registry = registry
        self.hub = hub
        self.peers: dict[str, PeerSubject] = {}
        self.agents: dict[str, AgentSubject] = {}
        self._peers_at = 0.0
        self._refresh_lock = asyncio.Lock()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._gauge_names: set[str] = set()

    @property
    def sync_period(self) -> float:
        return min(self.settings.interval, MAX_SYNC_PERIOD)

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._sync_loop(), name="health-sync"),
            asyncio.create_task(self._check_loop(), name="health-checks"),
            asyncio.create_task(self._maintenance_loop(), name="health-maintenance"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in [*tasks, *self._in_flight]:
                task.cancel()
            await asyncio.gather(*tasks, *self._in_flight, return_exceptions=True)

    # Subjects ----------------------------------------------------------------------------------------

    async def current_peers(self, max_age: float = 2.0) -> list[PeerSubject]:
        """Active peers for a reader, re-read from the registry when the cached list is older than `max_age`.

        Only the list is refreshed here; the schedule follows on the next sync, so a read never writes.
        """
        if time.monotonic() - self._peers_at > max_age:
            async with self._refresh_lock:
                # Checked again under the lock: a burst of readers costs the registry one call, not one each.
                if time.monotonic() - self._peers_at > max_age:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        self.peers = {p.id: p for p in await self.registry.peers()}
                        self._peers_at = time.monotonic()
        return sorted(self.peers.values(), key=lambda p: (p.name, p.id))

    async def sync(self) -> None:
        """Re-reads peers and agents and makes the shared schedule match them."""
        peers = {p.id: p for p in await self.registry.peers()}
        await self.store.sync_subjects(PEER, list(peers))
        self.peers, self._peers_at = peers, time.monotonic()
        self.prober.forget(set(peers))
        if self.settings.check_agents:
            agents = {a.id: a for a in await self.registry.agents()}
            await self.store.sync_subjects(AGENT, list(agents))
            for gone in self.agents.keys() - agents.keys():
                self.prober.connector.forget(gone)  # its credentials (and cached token) go with it
            self.agents = agents
        await self._refresh_gauges()

    async def _sync_loop(self) -> None:
        while True:
            try:
                await self.sync()
            except grpc.aio.AioRpcError as exc:
                log.warning("cannot read peers and agents from the registry: %s %s", exc.code().name, exc.details())
            except Exception:  # keep monitoring with the last known subjects
                log.exception("subject sync failed")
            await asyncio.sleep(self.sync_period)

    async def _refresh_gauges(self) -> None:
        # Every replica exports every peer, from the shared state, whichever replica checked it.
        states = await self.store.states(PEER, list(self.peers))
        names = set()
        for peer in self.peers.values():
            state = states.get(peer.id)
            PEER_HEALTH.labels(peer.name).set(1 if state is not None and state.status == HEALTHY else 0)
            names.add(peer.name)
        for gone in self._gauge_names - names:
            with contextlib.suppress(KeyError):
                PEER_HEALTH.remove(gone)
        self._gauge_names = names

    # Checks ------------------------------------------------------------------------------------------

    async def _check_loop(self) -> None:
        tick = min(MAX_TICK, self.settings.interval / 5)
        while True:
            free = self.settings.concurrency - len(self._in_flight)
            known = {PEER: list(self.peers), AGENT: list(self.agents)}
            claimed: list[tuple[str, str, datetime]] = []
            if free > 0 and (known[PEER] or known[AGENT]):
                try:
                    claimed = await self.store.claim(self.settings.replica_id, known, free, self.settings.interval)
                except Exception:  # the database may be restarting; try again next tick
                    log.exception("cannot claim due health checks")
            for kind, subject_id, claimed_at in claimed:
                task = asyncio.create_task(self._check(kind, subject_id, claimed_at))
                self._in_flight.add(task)
                task.add_done_callback(self._done)
            if claimed and len(claimed) == free:
                # More may be due: go again as soon as a check finishes.
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), tick)
                continue
            # Jitter: replicas polling in lockstep would let the same one win every claim; random phases
            # spread the checks over the replicas while the leases still keep each subject to one check.
            await asyncio.sleep(tick * random.uniform(0.5, 1.5))  # noqa: S311 - scheduling jitter, not security

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("health check task failed", exc_info=task.exception())

    async def _check(self, kind: str, subject_id: str, claimed_at: datetime) -> None:
        subject: PeerSubject | AgentSubject | None = (self.peers if kind == PEER else self.agents).get(subject_id)
        if subject is None:
            return  # removed since the claim
        # The database's claim time, not this host's clock: replicas' clocks differ, and history rows of one
        # subject must be exactly an interval or more apart whichever replica wrote them.
        checked_at = claimed_at
        if isinstance(subject, PeerSubject):
            result = await self.prober.check_peer(subject)
        else:
            result = await self.prober.check_agent(subject)
        CHECK_DURATION.labels(kind, result.status).observe(result.response_time_ms / 1000)
        before, after = await self.store.record(
            kind,
            subject_id,
            subject.name,
            result,
            checked_at,
            self.settings.replica_id,
            self.settings.unhealthy_threshold,
        )
        if is_change(before, after):
            log.info(
                "%s %s is %s%s",
                kind,
                subject.name,
                after.status,
                " (down)" if after.is_down else "",
                extra={"subject_id": subject_id, "previous": before.status, "error": after.error},
            )
            await self.hub.publish(
                ChangeEvent(
                    subject_kind=kind,
                    subject_id=subject_id,
                    name=after.name,
                    previous_status=before.status,
                    status=after.status,
                    is_down=after.is_down,
                    error=after.error,
                    time=checked_at.isoformat(),
                    response_time_ms=after.response_time_ms,
                )
            )
        try:
            if isinstance(subject, PeerSubject):
                PEER_HEALTH.labels(subject.name).set(1 if result.ok else 0)
                await self.registry.report_peer(subject_id, after)
                learned = (result.learned_protocol, result.learned_grpc_endpoint)
                if result.learned_protocol and learned != (subject.protocol, subject.grpc_endpoint):
                    await self.registry.learn_route(subject_id, *learned)
                    self.peers[subject_id] = replace(subject, protocol=learned[0], grpc_endpoint=learned[1])
            else:
                health = agent_health(after)
                # Written only when it differs from what the registry shows, which every sync re-reads.
                if health is not None and health != subject.registry_health:
                    await self.registry.report_agent(subject_id, health)
                    self.agents[subject_id] = replace(subject, registry_health=health)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # deleted meanwhile: nothing to report to
                log.warning("cannot report %s %s health to the registry: %s", kind, subject.name, exc.code().name)

    # Maintenance -------------------------------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        while True:
            try:
                if await self.store.claim_maintenance("prune", self.settings.replica_id, PRUNE_EVERY):
                    deleted = await self.store.prune(self.settings.history_retention_seconds)
                    log.info("pruned health history", extra={"deleted": deleted})
            except Exception:
                log.exception("health history pruning failed")
            await asyncio.sleep(60)
