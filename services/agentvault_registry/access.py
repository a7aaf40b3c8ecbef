"""The registry as control plane of access: connections and trust, approvals and their watch, grants, and the
permission request (the registry is the enforcer of capability.request)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import empty_pb2
from prometheus_client import Counter, Gauge

from agentvault.common import agents as agent_rules
from agentvault.common import pagination
from agentvault.common.errors import Aborted, FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted, invalid
from agentvault.common.lru import Lru
from agentvault.common.policy import ACTIONS, Outcome, Trust, agent_target, capability_target, remote, tool_target
from agentvault.common.policy.api import (
    APPROVAL_STATUSES,
    CAPABILITY_KINDS,
    DEFAULT_DURATION,
    MAX_CALLS,
    MAX_DURATION,
    MAX_NOTE,
    MAX_PURPOSE,
    MAX_WAIT,
)
from agentvault.common.policy.enforcer import CONNECTION_KINDS, SERVICE_TYPE, AuditEntry, Enforcer, default_trust
from agentvault.common.policy.request import Caller, caller, parse_uid
from agentvault.common.principal import ADMIN_SCOPE, POLICIES_ADMIN, POLICIES_ENFORCE, POLICIES_READ, Principal
from agentvault.common.redis import follow_channel
from agentvault.common.remote_auth import check_scope
from agentvault.common.versions import ConstraintError, parse_constraint, parse_version
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault_registry.auth import Authenticator
from agentvault_registry.connection_store import ConnectionRecord, ConnectionStore, TrustChangeRecord
from agentvault_registry.grant_store import APPROVALS_CHANNEL, ApprovalRecord, GrantStore, NewGrant, NotPending
from agentvault_registry.policy_store import DecisionRecord, GrantRecord, PolicyStore
from agentvault_registry.servicer import may_see
from agentvault_registry.store import Store

log = logging.getLogger(__name__)

TRUST_CHANGES = Counter("policy_trust_changes_total", "Automatic and manual trust changes, by new level.", ["to"])
APPROVALS = Counter("policy_approvals_total", "Approvals by event: created, approved, denied, expired.", ["event"])
APPROVALS_PENDING = Gauge("policy_approvals_pending", "Approvals waiting for an answer, as this replica last saw.")

# How long whether a peer is blocked is remembered: a peer's calls come many a second, a trust change is seen
# within this.
PEER_TRUST_MEMO_SECONDS = 1.0
# A peer over its rate limit is counted one violation per this many seconds (the limiter's window).
RATE_ABUSE_SECONDS = 60.0
# How many answered approvals a watch that asks for them starts with.
ANSWERED_AT_START = 100
# A watcher that falls this many events behind is dropped (its stream ends with RESOURCE_EXHAUSTED) so that one
# slow reader never holds memory for everyone else's events.
WATCH_QUEUE = 256


@dataclass(frozen=True)
class AccessSettings:
    approval_ttl: float = 3600.0  # seconds an approval waits for an answer
    sweep_seconds: float = 1.0  # how often approvals that ran out are marked expired
    log_allows: bool = True  # allows too go to the decision log (its retention bounds it)


# Protos ------------------------------------------------------------------------------------------------------


def _ts(target: Any, value: datetime | None) -> None:
    if value is not None:
        target.FromDatetime(value)


def connection_to_proto(record: ConnectionRecord, changes: list[TrustChangeRecord] = ()) -> ppb.Connection:  # type: ignore[assignment]
    message = ppb.Connection(
        id=str(record.id),
        caller_kind=record.caller_kind,
        caller_id=record.caller_id,
        agent_id=record.agent_id,
        trust_level=record.trust_level,
        interactions=record.interactions,
        violations=record.violations,
        clean_interactions=record.clean_interactions,
        recent_changes=[change_to_proto(c) for c in changes],
    )
    _ts(message.create_time, record.created_at)
    _ts(message.last_seen_time, record.last_seen_at)
    _ts(message.trust_change_time, record.trust_changed_at)
    return message


def change_to_proto(change: TrustChangeRecord) -> ppb.TrustChange:
    message = ppb.TrustChange(
        from_level=change.from_level, to_level=change.to_level, reason=change.reason, changed_by=change.changed_by
    )
    _ts(message.change_time, change.changed_at)
    return message


def grant_to_proto(record: GrantRecord) -> ppb.Grant:
    message = ppb.Grant(
        id=str(record.id),
        caller=record.caller,
        action=record.action,
        target=record.target,
        uses_left=record.uses_left or 0,
        approval_id=str(record.approval_id) if record.approval_id else "",
        granted_by=record.granted_by,
        target_agent_id=record.target_agent_id,
    )
    _ts(message.expire_time, record.expires_at)
    _ts(message.create_time, record.created_at)
    _ts(message.revoke_time, record.revoked_at)
    return message


def approval_to_proto(record: ApprovalRecord) -> ppb.Approval:
    message = ppb.Approval(
        id=str(record.id),
        status=record.status,
        caller=record.caller,
        action=record.action,
        target=record.target,
        target_agent_id=record.target_agent_id,
        purpose=record.purpose,
        reasons=list(record.reasons),
        policy_ids=list(record.policy_ids),
        grant_action=record.grant_action,
        grant_target=record.grant_target,
        grant_duration_seconds=record.grant_duration_seconds,
        grant_uses=record.grant_uses or 0,
        decided_by=record.decided_by,
        note=record.note,
        grant_id=str(record.grant_id) if record.grant_id else "",
    )
    _ts(message.create_time, record.created_at)
    _ts(message.expire_time, record.expires_at)
    _ts(message.decide_time, record.decided_at)
    return message


# The enforcer's control plane, here in the registry: its own database ---------------------------------------


class RegistryControlPlane:
    """agentvault.common.policy.enforcer.ControlPlane on the registry's stores."""

    def __init__(
        self,
        connections: ConnectionStore,
        grants: GrantStore,
        policies: PolicyStore,
        announce: Callable[[int], Any],
    ) -> None:
        self.connections = connections
        self.grants = grants
        self.policies = policies
        self._announce = announce
        self._peers: Lru[str, tuple[float, bool]] = Lru(4096)
        self._rate_abuse: Lru[str, float] = Lru(4096)

    async def trust(self, caller: Caller, agent_id: str) -> Trust:
        kind = caller.type.removeprefix("Caller::").lower()
        return await self.connections.trust(kind, caller.id, agent_id, default_trust(caller.type))

    async def record(self, caller: Caller, agent_id: str, violation: str | None) -> None:
        await self.record_many(caller, agent_id, (violation,))

    async def record_many(self, caller: Caller, agent_id: str, violations: Sequence[str | None]) -> None:
        """Interactions of one caller with one agent, in order (one transaction: connection_store.record_many)."""
        kind = caller.type.removeprefix("Caller::").lower()
        for change in await self.connections.record_many(kind, caller.id, agent_id, violations):
            TRUST_CHANGES.labels(change.to_level).inc()
            log.warning(
                "trust changed",
                extra={"caller": caller.uid, "agent_id": agent_id, "from": change.from_level, "to": change.to_level},
            )

    async def consume(self, grant_id: str) -> bool:
        try:
            used = await self.grants.consume(uuid.UUID(grant_id))
        except ValueError:
            return False
        if used is None:
            return False
        if used[1]:
            await self._announce(used[1])
        return True

    async def peer_blocked(self, name: str) -> bool:
        """Whether a peer mesh is blocked on this mesh; remembered a second (a peer calls many times a second)."""
        now = time.monotonic()
        known = self._peers.get(name)
        if known is not None and known[0] > now:
            return known[1]
        found = await self.connections.find("peer", name, "")
        blocked = found is not None and found.trust_level == Trust.BLOCKED
        self._peers.put(name, (now + PEER_TRUST_MEMO_SECONDS, blocked))
        return blocked

    async def peer_violation(self, name: str, reason: str, *, rate: bool) -> None:
        """A peer's bad signature, replay or rate abuse: counted against its connection (never failing the call).
        Going over the rate limit counts once per rate window, not once per refused call: a burst is one abuse."""
        if rate:
            now = time.monotonic()
            last = self._rate_abuse.get(name)
            if last is not None and now - last < RATE_ABUSE_SECONDS:
                return
            self._rate_abuse.put(name, now)
        try:
            await self.connections.contact("peer", name, "", Trust.UNTRUSTED)
            await self.record(Caller("Caller::Peer", name, Trust.UNTRUSTED), "", reason[:MAX_NOTE])
        except Exception as exc:
            log.warning("cannot record the peer's violation: %s", exc)
        self._peers.pop(name)

    async def audit(self, entries: Any) -> None:
        await self.policies.log_decisions(
            [DecisionRecord(e.caller, e.action, e.target, e.outcome, e.policy_ids, e.reason) for e in entries]
        )


# Approvals: events to watchers and waiters, across replicas ---------------------------------------------------


@dataclass(eq=False)  # each watcher is itself (hashable by identity), however alike two are
class _Watcher:
    principal: Principal
    queue: asyncio.Queue[ppb.ApprovalEvent | None]


class ApprovalHub:
    """Every approval event, to this replica's watchers (those who may see it) and waiters (of one approval).

    An event is dispatched here at once and published on Redis (`approvals:changes`, "<event> <id> <replica>") so
    the other replicas dispatch it too; a replica skips its own. Waiters also re-read their approval every second,
    so an event lost with a Redis outage delays an answer by a second, never loses it.
    """

    def __init__(self, store: GrantStore, redis: aioredis.Redis, settings: AccessSettings) -> None:
        self.store = store
        self.redis = redis
        self.settings = settings
        self.replica = uuid.uuid4().hex[:12]
        self._watchers: set[_Watcher] = set()
        self._waiters: dict[uuid.UUID, set[asyncio.Event]] = {}

    async def publish(self, event: str, approval: ApprovalRecord) -> None:
        APPROVALS.labels(event).inc()
        self._dispatch(event, approval)
        try:
            await self.redis.publish(APPROVALS_CHANNEL, f"{event} {approval.id} {self.replica}")
        except Exception as exc:  # other replicas' waiters still re-read each second
            log.warning("cannot publish the approval event: %s", exc)

    def _dispatch(self, event: str, approval: ApprovalRecord) -> None:
        for waiter in self._waiters.get(approval.id, ()):
            waiter.set()
        message = ppb.ApprovalEvent(event=event, approval=approval_to_proto(approval))
        for watcher in list(self._watchers):
            p = watcher.principal
            if not approval.visible_to(p.id, _sees_approvals(p)):
                continue
            try:
                watcher.queue.put_nowait(message)
            except asyncio.QueueFull:
                self._watchers.discard(watcher)
                with contextlib.suppress(asyncio.QueueFull):
                    watcher.queue.get_nowait()
                    watcher.queue.put_nowait(None)  # tells the stream it fell behind

    async def watch(self, principal: Principal, include_answered: bool) -> AsyncIterator[ppb.ApprovalEvent]:
        watcher = _Watcher(principal, asyncio.Queue(WATCH_QUEUE))
        self._watchers.add(watcher)
        try:
            admin = _sees_approvals(principal)
            if include_answered:
                recent = await self.store.page_approvals(
                    ANSWERED_AT_START * 2, None, status="", viewer=None if admin else principal.id
                )
                answered = [a for a in recent if a.status != "pending"][:ANSWERED_AT_START]
                for approval in reversed(answered):
                    yield ppb.ApprovalEvent(event=approval.status, approval=approval_to_proto(approval))
            for approval in await self.store.pending():
                if approval.visible_to(principal.id, admin):
                    yield ppb.ApprovalEvent(event="pending", approval=approval_to_proto(approval))
            while True:
                message = await watcher.queue.get()
                if message is None:
                    raise ResourceExhausted(
                        f"the watch fell more than {WATCH_QUEUE} events behind; start it again", "WATCH_TOO_SLOW"
                    )
                yield message
        finally:
            self._watchers.discard(watcher)

    async def wait(self, approval_id: uuid.UUID, seconds: float) -> ApprovalRecord | None:
        """The approval once answered or expired, or as it is after `seconds`."""
        deadline = time.monotonic() + seconds
        event = asyncio.Event()
        self._waiters.setdefault(approval_id, set()).add(event)
        try:
            while True:
                found = await self.store.get_approval(approval_id)
                left = deadline - time.monotonic()
                if found is None or found.status != "pending" or left <= 0:
                    return found
                event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, 1.0))
        finally:
            waiters = self._waiters.get(approval_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[approval_id]

    async def sweep(self) -> None:
        """Marks approvals that ran out as expired and tells their watchers; every replica sweeps, and each row is
        marked by exactly one statement."""
        while True:
            try:
                for approval in await self.store.expire_due():
                    await self.publish("expired", approval)
                APPROVALS_PENDING.set(await self.store.count_pending())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("approval sweep failed: %s", exc)
            await asyncio.sleep(self.settings.sweep_seconds)

    async def run(self) -> None:
        await follow_channel(self.redis, APPROVALS_CHANNEL, self, first_delay=0.5, max_delay=10.0)

    # The channel follower's steps.

    async def on_subscribe(self) -> None:
        pass

    async def on_message(self, data: Any) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        parts = text.split()
        if len(parts) != 3 or parts[2] == self.replica:
            return
        try:
            found = await self.store.get_approval(uuid.UUID(parts[1]))
        except ValueError:
            return
        if found is not None:
            self._dispatch(parts[0], found)

    async def on_tick(self) -> None:
        pass

    async def on_lost(self, exc: Exception) -> None:
        log.warning("approval channel lost (%s); waiters re-read their approval each second", exc)

    async def on_closed(self) -> None:
        pass


def _is_admin(principal: Principal) -> bool:
    return principal.has_scope(ADMIN_SCOPE) or principal.has_scope(POLICIES_ADMIN)


def _sees_approvals(principal: Principal) -> bool:
    """Admins, and the enforcing services (policies:enforce): they hold what waits for an answer (a held message)
    and must learn every answer; they cannot answer one (that stays with the target's owner or an admin)."""
    return _is_admin(principal) or principal.has_scope(POLICIES_ENFORCE)


def uuid_field(field_path: str, value: str) -> uuid.UUID:
    """A required UUID field of a request; INVALID_ARGUMENT naming it otherwise."""
    if not value:
        raise invalid(field_path, "is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise invalid(field_path, "must be a UUID") from None


def _position(token: str, query: str) -> tuple[datetime, uuid.UUID] | None:
    after = pagination.decode(token, query)
    if after is None:
        return None
    created, key = pagination.time_and_id(after)
    try:
        return created, uuid.UUID(key)
    except ValueError:
        raise invalid("page_token", "is not a valid page token") from None


def _sequence(token: str, query: str) -> int | None:
    after = pagination.decode(token, query)
    if after is None:
        return None
    if len(after) != 1 or not isinstance(after[0], int):
        raise invalid("page_token", "is not a valid page token")
    return after[0]


def _note(v: agent_rules.Violations, value: str) -> None:
    agent_rules.check_text(v, "note", value, max_len=MAX_NOTE, multiline=True)


def _check_caller(v: agent_rules.Violations, at: str, caller_type: str, caller_id: str, agent_id: str) -> None:
    """A caller of the enforcers' control plane: its Cedar type, its id and the agent that sees it."""
    if caller_type not in remote.CALLER_TYPES:
        v.add(at + "caller_type", f"must be one of: {', '.join(remote.CALLER_TYPES)}")
    agent_rules.check_text(v, at + "caller_id", caller_id, max_len=remote.MAX_CALLER_ID, required=True)
    agent_rules.check_text(v, at + "agent_id", agent_id, max_len=remote.MAX_AGENT_ID)


def _check_uid(v: agent_rules.Violations, path: str, value: str, prefix: str, max_len: int) -> str:
    """The entity type of a uid as the engine writes it (Caller::Agent::"id"); it ends up in a grant's Cedar text,
    so nothing but a known type and one JSON string is accepted. "" when it is not one."""
    agent_rules.check_text(v, path, value, max_len=max_len, required=True)
    parsed = parse_uid(value) if len(value) <= max_len else None
    if value.strip() and (parsed is None or not parsed[0].startswith(prefix)):
        v.add(path, f'must be an entity uid, {prefix}<Type>::"<id>" with the id as a JSON string')
        return ""
    return parsed[0] if parsed else ""


def _check_action(v: agent_rules.Violations, path: str, value: str) -> None:
    if value not in ACTIONS:
        v.add(path, f"must be one of: {', '.join(ACTIONS)}")


def _check_policy_ids(v: agent_rules.Violations, path: str, values: Any) -> None:
    if len(values) > remote.MAX_POLICY_IDS:
        v.add(path, f"must be at most {remote.MAX_POLICY_IDS} (got {len(values)})")
        return
    for i, value in enumerate(values):
        agent_rules.check_text(v, f"{path}[{i}]", value, max_len=remote.MAX_POLICY_ID, required=True)


# The RPCs ------------------------------------------------------------------------------------------------------


class AccessServicer:
    """PolicyService's connections, approvals, grants, decision log and permission requests."""

    def __init__(
        self,
        auth: Authenticator,
        agents: Store,
        connections: ConnectionStore,
        grants: GrantStore,
        policies: PolicyStore,
        approvals: ApprovalHub,
        enforcer: Enforcer,
        control: RegistryControlPlane,
        announce: Callable[[int], Any],
        mesh: str,
        settings: AccessSettings,
    ) -> None:
        self.auth = auth
        self.agents = agents
        self.connections = connections
        self.grants = grants
        self.policies = policies
        self.approvals = approvals
        self.enforcer = enforcer
        self.control = control
        self._announce = announce
        self.mesh = mesh
        self.settings = settings

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return await self.auth.require(context.invocation_metadata())

    async def _owns_agent(self, principal: Principal, agent_id: str) -> bool:
        if not agent_id:
            return False
        agent = await self.agents.get_agent(agent_id)
        return agent is not None and principal.owns(agent.owner)

    # Connections --------------------------------------------------------------------------------------------

    async def ListConnections(
        self, request: ppb.ListConnectionsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ListConnectionsResponse:
        principal = await self._principal(context)
        size = pagination.page_size(request.page_size)
        after = _position(request.page_token, f"connections:{request.trust_level}:{request.agent_id}")
        if request.trust_level and request.trust_level not in set(Trust):
            raise invalid("trust_level", f"must be one of: {', '.join(Trust)}")
        agent_id = None if not request.agent_id else ("" if request.agent_id == "-" else request.agent_id)
        if agent_id:
            uuid_field("agent_id", agent_id)
        sees_all = _is_admin(principal) or principal.has_scope(POLICIES_READ)
        records = await self.connections.page(
            size + 1,
            after,
            trust_level=request.trust_level,
            agent_id=agent_id,
            owner=None if sees_all else principal.id,
        )
        token = ""
        if len(records) > size:
            last = records[size - 1]
            token = pagination.encode(
                [last.last_seen_at.isoformat(), str(last.id)], f"connections:{request.trust_level}:{request.agent_id}"
            )
        return ppb.ListConnectionsResponse(
            connections=[connection_to_proto(r) for r in records[:size]], next_page_token=token
        )

    async def _connection(self, principal: Principal, connection_id: uuid.UUID, write: bool) -> ConnectionRecord:
        found = await self.connections.get(connection_id)
        if found is None:
            raise NotFound(f"connection {connection_id} not found", "CONNECTION_NOT_FOUND", id=str(connection_id))
        admin = _is_admin(principal) or (not write and principal.has_scope(POLICIES_READ))
        if not admin and not await self._owns_agent(principal, found.agent_id):
            # Not told apart from a missing one: who is connected to whom is not for everyone to learn.
            raise NotFound(f"connection {connection_id} not found", "CONNECTION_NOT_FOUND", id=str(connection_id))
        return found

    async def GetConnection(
        self, request: ppb.GetConnectionRequest, context: grpc.aio.ServicerContext
    ) -> ppb.Connection:
        principal = await self._principal(context)
        found = await self._connection(principal, uuid_field("id", request.id), write=False)
        changes = [c for _, c in await self.connections.changes(found.id, 20)]
        return connection_to_proto(found, changes)

    async def SetTrustLevel(
        self, request: ppb.SetTrustLevelRequest, context: grpc.aio.ServicerContext
    ) -> ppb.Connection:
        principal = await self._principal(context)
        v = agent_rules.Violations()
        if request.trust_level not in set(Trust):
            v.add("trust_level", f"must be one of: {', '.join(Trust)}")
        agent_rules.check_text(v, "reason", request.reason, max_len=MAX_NOTE, required=True)
        connection_id = uuid_field("id", request.id)
        v.raise_if_any()
        await self._connection(principal, connection_id, write=True)
        updated = await self.connections.set_trust(
            connection_id, Trust(request.trust_level), request.reason.strip(), principal.id
        )
        if updated is None:
            raise NotFound(f"connection {connection_id} not found", "CONNECTION_NOT_FOUND", id=str(connection_id))
        TRUST_CHANGES.labels(updated.trust_level).inc()
        log.info(
            "trust set", extra={"connection_id": str(connection_id), "to": updated.trust_level, "by": principal.id}
        )
        changes = [c for _, c in await self.connections.changes(connection_id, 20)]
        return connection_to_proto(updated, changes)

    async def ListTrustChanges(
        self, request: ppb.ListTrustChangesRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ListTrustChangesResponse:
        principal = await self._principal(context)
        connection_id = uuid_field("connection_id", request.connection_id)
        size = pagination.page_size(request.page_size)
        before = _sequence(request.page_token, f"trust:{connection_id}")
        await self._connection(principal, connection_id, write=False)
        rows = await self.connections.changes(connection_id, size + 1, before)
        token = pagination.encode([rows[size - 1][0]], f"trust:{connection_id}") if len(rows) > size else ""
        return ppb.ListTrustChangesResponse(changes=[change_to_proto(c) for _, c in rows[:size]], next_page_token=token)

    # The permission request ---------------------------------------------------------------------------------

    async def RequestCapability(
        self, request: ppb.RequestCapabilityRequest, context: grpc.aio.ServicerContext
    ) -> ppb.CapabilityDecision:
        principal = await self._principal(context)
        v = agent_rules.Violations()
        agent_id = request.agent_id
        try:
            uuid.UUID(agent_id)
        except ValueError:
            v.add("agent_id", "must be the agent's UUID")
        agent_rules.check_pattern(
            v, "capability", request.capability, agent_rules.CAPABILITY_NAME, "1-128 letters, digits and ._/:-"
        )
        if request.kind and request.kind not in CAPABILITY_KINDS:
            v.add("kind", f"must be one of: {', '.join(CAPABILITY_KINDS)} (or empty for any)")
        constraint = None
        if request.version_constraint:
            try:
                constraint = parse_constraint(request.version_constraint)
            except ConstraintError as exc:
                v.add("version_constraint", str(exc))
        agent_rules.check_text(v, "purpose", request.purpose, max_len=MAX_PURPOSE, multiline=True)
        if not 0 <= request.max_calls <= MAX_CALLS:
            v.add("max_calls", f"must be from 0 (unlimited) to {MAX_CALLS}")
        if not 0 <= request.duration_seconds <= MAX_DURATION:
            v.add("duration_seconds", f"must be from 1 to {MAX_DURATION} (0: {DEFAULT_DURATION})")
        if not 0 <= request.wait_seconds <= MAX_WAIT:
            v.add("wait_seconds", f"must be from 0 to {MAX_WAIT}")
        v.raise_if_any()
        agent = await self.agents.get_agent(agent_id)
        if agent is None or not may_see(agent.spec.sharing, agent.owner, principal):
            raise NotFound(f"agent {agent_id} not found", "AGENT_NOT_FOUND", id=agent_id)
        offered = [
            c
            for c in agent.spec.capabilities
            if c.name == request.capability and (not request.kind or c.kind == request.kind)
        ]
        if not offered:
            raise NotFound(
                f"agent {agent_id} offers no capability {request.capability!r}"
                + (f" of kind {request.kind}" if request.kind else ""),
                "CAPABILITY_NOT_FOUND",
                agent_id=agent_id,
            )
        fitting = [c for c in offered if constraint is None or (c.version and constraint.matches(c.version))]
        if not fitting:
            versions = ", ".join(c.version or "unversioned" for c in offered)
            raise FailedPrecondition(
                f"version out of range: {request.capability!r} is offered at {versions}, "
                f"the request asks for {request.version_constraint}",
                "CAPABILITY_VERSION_MISMATCH",
                agent_id=agent_id,
            )
        chosen = max(fitting, key=lambda c: parse_version(c.version).key if c.version else ())
        target = capability_target(agent.id, chosen.name, chosen.kind, chosen.version, agent.owner, chosen.tags)
        who = caller(principal, Trust.UNTRUSTED, self.mesh)  # its trust is its connection's (the enforcer's step)
        verdict = await self.enforcer.decide(
            who, "capability.request", target, agent_id=agent.id, payload_size=request.ByteSize()
        )
        await verdict.done()  # the request itself is the call, and it is over
        if chosen.kind == "tool":
            grant_action, grant_target = "tool.invoke", tool_target(agent.id, chosen.name, chosen.version).uid
        else:
            grant_action, grant_target = "message.send", agent_target(agent.id).uid
        duration = request.duration_seconds or DEFAULT_DURATION
        uses = request.max_calls or None
        answer = ppb.CapabilityDecision(
            decision=verdict.outcome.value,
            reasons=verdict.decision.reasons,
            policy_ids=verdict.decision.policies,
            version=chosen.version,
            kind=chosen.kind,
        )
        if verdict.outcome is Outcome.DENY:
            return answer
        if verdict.outcome is Outcome.ALLOW:
            grant, version = await self.grants.create_grant(
                NewGrant(
                    caller=verdict.caller.uid,
                    holder=principal.id,
                    action=grant_action,
                    target=grant_target,
                    target_agent_id=agent.id,
                    target_owner=agent.owner,
                    duration_seconds=duration,
                    uses=uses,
                    granted_by="policy",
                )
            )
            await self._announce(version)
            answer.grant.CopyFrom(grant_to_proto(grant))
            log.info("capability granted", extra={"grant_id": str(grant.id), "caller": verdict.caller.uid})
            return answer
        approval = await self.grants.create_approval(
            caller=verdict.caller.uid,
            requested_by=principal.id,
            action="capability.request",
            target=target.uid,
            target_agent_id=agent.id,
            target_owner=agent.owner,
            purpose=request.purpose,
            reasons=verdict.decision.reasons,
            policy_ids=verdict.decision.policies,
            grant_action=grant_action,
            grant_target=grant_target,
            grant_duration_seconds=duration,
            grant_uses=uses,
            ttl_seconds=self.settings.approval_ttl,
        )
        await self.approvals.publish("created", approval)
        log.info("approval created", extra={"approval_id": str(approval.id), "caller": verdict.caller.uid})
        if request.wait_seconds:
            remaining = context.time_remaining()
            wait = (
                float(request.wait_seconds) if remaining is None else min(float(request.wait_seconds), remaining - 0.2)
            )
            approval = await self.approvals.wait(approval.id, max(0.0, wait)) or approval
        return await self._outcome(answer, approval)

    async def _outcome(self, answer: ppb.CapabilityDecision, approval: ApprovalRecord) -> ppb.CapabilityDecision:
        answer.approval.CopyFrom(approval_to_proto(approval))
        if approval.status == "approved" and approval.grant_id is not None:
            grant = await self.grants.get_grant(approval.grant_id)
            answer.decision = Outcome.ALLOW.value
            answer.reasons[:] = [f"approved by {approval.decided_by}" + (f": {approval.note}" if approval.note else "")]
            if grant is not None:
                answer.grant.CopyFrom(grant_to_proto(grant))
        elif approval.status in ("denied", "expired"):
            answer.decision = Outcome.DENY.value
            said = f"denied by {approval.decided_by}" if approval.status == "denied" else "the approval expired"
            answer.reasons[:] = [said + (f": {approval.note}" if approval.note else "")]
        return answer

    # Approvals ----------------------------------------------------------------------------------------------

    async def ListApprovals(
        self, request: ppb.ListApprovalsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ListApprovalsResponse:
        principal = await self._principal(context)
        if request.status and request.status not in APPROVAL_STATUSES:
            raise invalid("status", f"must be one of: {', '.join(APPROVAL_STATUSES)}")
        size = pagination.page_size(request.page_size)
        query = f"approvals:{request.status}"
        after = _position(request.page_token, query)
        records = await self.grants.page_approvals(
            size + 1, after, status=request.status, viewer=None if _is_admin(principal) else principal.id
        )
        page, token = pagination.page_of(records, size, query)
        return ppb.ListApprovalsResponse(approvals=[approval_to_proto(r) for r in page], next_page_token=token)

    async def _approval(self, principal: Principal, approval_id: uuid.UUID) -> ApprovalRecord:
        found = await self.grants.get_approval(approval_id)
        if found is None or not found.visible_to(principal.id, _sees_approvals(principal)):
            raise NotFound(f"approval {approval_id} not found", "APPROVAL_NOT_FOUND", id=str(approval_id))
        return found

    async def GetApproval(self, request: ppb.GetApprovalRequest, context: grpc.aio.ServicerContext) -> ppb.Approval:
        principal = await self._principal(context)
        return approval_to_proto(await self._approval(principal, uuid_field("id", request.id)))

    async def _answer(
        self, context: grpc.aio.ServicerContext, approval_id: str, approve: bool, note: str, duration: int, uses: int
    ) -> ppb.Approval:
        principal = await self._principal(context)
        v = agent_rules.Violations()
        _note(v, note)
        if not 0 <= duration <= MAX_DURATION:
            v.add("duration_seconds", f"must be from 1 to {MAX_DURATION} (0: as requested)")
        if not 0 <= uses <= MAX_CALLS:
            v.add("uses", f"must be from 0 (as requested) to {MAX_CALLS}")
        key = uuid_field("id", approval_id)
        v.raise_if_any()
        found = await self._approval(principal, key)
        if not (_is_admin(principal) or (found.target_owner and principal.owns(found.target_owner))):
            raise PermissionDenied(
                "only the owner of the target agent or an admin may answer this approval", "NOT_APPROVER"
            )
        try:
            answered = await self.grants.answer(
                key, approve=approve, by=principal.id, note=note.strip(), duration_seconds=duration, uses=uses or None
            )
        except NotPending as exc:
            # A conflict with the approval's state (someone answered first, or its time ran out): 409 at the edge.
            raise Aborted(
                f"approval {key} is {exc.approval.status}, not pending",
                "APPROVAL_NOT_PENDING",
                status=exc.approval.status,
            ) from None
        if answered is None:
            raise NotFound(f"approval {key} not found", "APPROVAL_NOT_FOUND", id=str(key))
        approval, grant, version = answered
        if version is not None:
            await self._announce(version)
        await self.approvals.publish(approval.status, approval)
        log.info(
            "approval answered",
            extra={
                "approval_id": str(key),
                "status": approval.status,
                "by": principal.id,
                "grant": str(grant.id) if grant else "",
            },
        )
        return approval_to_proto(approval)

    async def ApproveApproval(
        self, request: ppb.ApproveApprovalRequest, context: grpc.aio.ServicerContext
    ) -> ppb.Approval:
        return await self._answer(context, request.id, True, request.note, request.duration_seconds, request.uses)

    async def DenyApproval(self, request: ppb.DenyApprovalRequest, context: grpc.aio.ServicerContext) -> ppb.Approval:
        return await self._answer(context, request.id, False, request.note, 0, 0)

    async def WatchApprovals(
        self, request: ppb.WatchApprovalsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ppb.ApprovalEvent]:
        principal = await self._principal(context)
        async for event in self.approvals.watch(principal, request.include_answered):
            yield event

    # Grants -------------------------------------------------------------------------------------------------

    async def ListGrants(
        self, request: ppb.ListGrantsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ListGrantsResponse:
        principal = await self._principal(context)
        size = pagination.page_size(request.page_size)
        query = f"grants:{request.include_ended}"
        after = _position(request.page_token, query)
        viewer = None if _is_admin(principal) or principal.has_scope(POLICIES_READ) else principal.id
        records = await self.grants.page_grants(size + 1, after, include_ended=request.include_ended, viewer=viewer)
        page, token = pagination.page_of(records, size, query)
        return ppb.ListGrantsResponse(grants=[grant_to_proto(r) for r in page], next_page_token=token)

    async def RevokeGrant(self, request: ppb.RevokeGrantRequest, context: grpc.aio.ServicerContext) -> ppb.Grant:
        principal = await self._principal(context)
        key = uuid_field("id", request.id)
        found = await self.grants.get_grant(key)
        if found is None or not (_is_admin(principal) or principal.id in (found.holder, found.target_owner)):
            raise NotFound(f"grant {key} not found", "GRANT_NOT_FOUND", id=str(key))
        revoked = await self.grants.revoke_grant(key)
        if revoked is None:
            raise NotFound(f"grant {key} not found", "GRANT_NOT_FOUND", id=str(key))
        record, version = revoked
        if version is not None:
            await self._announce(version)
            log.info("grant revoked", extra={"grant_id": str(key), "by": principal.id})
        return grant_to_proto(record)

    # The decision log ---------------------------------------------------------------------------------------

    async def ListDecisions(
        self, request: ppb.ListDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ListDecisionsResponse:
        principal = await self._principal(context)
        if not (_is_admin(principal) or principal.has_scope(POLICIES_READ)):
            check_scope(principal, POLICIES_ADMIN)
        if request.outcome and request.outcome not in set(Outcome):
            raise invalid("outcome", "must be one of: allow, deny, ask")
        size = pagination.page_size(request.page_size)
        query = f"decisions:{request.outcome}"
        before = _sequence(request.page_token, query)
        rows = await self.policies.page_decisions(size + 1, before, request.outcome)
        token = pagination.encode([rows[size - 1][0]], query) if len(rows) > size else ""
        decisions = []
        for _, at, d in rows[:size]:
            message = ppb.Decision(
                caller=d.caller,
                action=d.action,
                target=d.target,
                outcome=d.outcome,
                policy_ids=list(d.policy_ids),
                reason=d.reason,
            )
            message.decide_time.FromDatetime(at)
            decisions.append(message)
        return ppb.ListDecisionsResponse(decisions=decisions, next_page_token=token)

    # Internal: the enforcers' control plane --------------------------------------------------------------------
    # What RegistryControlPlane does for the Enforcer in here, as RPCs for the enforcing services elsewhere
    # (agentvault.common.policy.remote.RemoteControlPlane). No HTTP route; scope policies:enforce.

    async def _enforcing(self, context: grpc.aio.ServicerContext) -> Principal:
        principal = await self._principal(context)
        check_scope(principal, POLICIES_ENFORCE)
        return principal

    async def ResolveTrust(
        self, request: ppb.ResolveTrustRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ResolveTrustResponse:
        await self._enforcing(context)
        v = agent_rules.Violations()
        _check_caller(v, "", request.caller_type, request.caller_id, request.agent_id)
        v.raise_if_any()
        if request.caller_type == SERVICE_TYPE:
            return ppb.ResolveTrustResponse(trust_level=Trust.TRUSTED.value)
        trust = await self.control.trust(Caller(request.caller_type, request.caller_id), request.agent_id)
        return ppb.ResolveTrustResponse(trust_level=Trust(trust).value)

    async def RecordInteractions(
        self, request: ppb.RecordInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._enforcing(context)
        v = agent_rules.Violations()
        if len(request.interactions) > remote.MAX_BATCH:
            v.add("interactions", f"must be at most {remote.MAX_BATCH} per call (got {len(request.interactions)})")
        else:
            for i, item in enumerate(request.interactions):
                _check_caller(v, f"interactions[{i}].", item.caller_type, item.caller_id, item.agent_id)
                agent_rules.check_text(v, f"interactions[{i}].violation", item.violation, max_len=MAX_NOTE)
        v.raise_if_any()
        # One transaction per connection, its interactions in their order (a batch mostly holds a few connections).
        by_connection: dict[tuple[str, str, str], list[str | None]] = {}
        for item in request.interactions:
            if item.caller_type in CONNECTION_KINDS:  # a service has no connection to count against
                key = (item.caller_type, item.caller_id, item.agent_id)
                by_connection.setdefault(key, []).append(item.violation.strip() or None)
        for (caller_type, caller_id, agent_id), violations in by_connection.items():
            await self.control.record_many(Caller(caller_type, caller_id), agent_id, violations)
        return empty_pb2.Empty()

    async def ConsumeGrant(
        self, request: ppb.ConsumeGrantRequest, context: grpc.aio.ServicerContext
    ) -> ppb.ConsumeGrantResponse:
        await self._enforcing(context)
        grant_id = uuid_field("grant_id", request.grant_id)
        return ppb.ConsumeGrantResponse(consumed=await self.control.consume(str(grant_id)))

    async def LogDecisions(
        self, request: ppb.LogDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._enforcing(context)
        v = agent_rules.Violations()
        if len(request.decisions) > remote.MAX_BATCH:
            v.add("decisions", f"must be at most {remote.MAX_BATCH} per call (got {len(request.decisions)})")
        else:
            for i, d in enumerate(request.decisions):
                at = f"decisions[{i}]."
                _check_uid(v, at + "caller", d.caller, "Caller::", remote.MAX_LOG_UID)
                _check_action(v, at + "action", d.action)
                _check_uid(v, at + "target", d.target, "Target::", remote.MAX_LOG_UID)
                if d.outcome not in set(Outcome):
                    v.add(at + "outcome", "must be one of: allow, deny, ask")
                _check_policy_ids(v, at + "policy_ids", d.policy_ids)
                agent_rules.check_text(v, at + "reason", d.reason, max_len=remote.MAX_LOG_REASON, multiline=True)
        v.raise_if_any()
        if request.decisions:
            await self.control.audit(
                [
                    AuditEntry(d.caller, d.action, d.target, d.outcome, tuple(d.policy_ids), d.reason)
                    for d in request.decisions
                ]
            )
        return empty_pb2.Empty()

    async def CreateApproval(
        self, request: ppb.CreateApprovalRequest, context: grpc.aio.ServicerContext
    ) -> ppb.Approval:
        principal = await self._enforcing(context)
        r = request
        v = agent_rules.Violations()
        _check_uid(v, "caller", r.caller, "Caller::", remote.MAX_APPROVAL_UID)
        agent_rules.check_text(v, "requested_by", r.requested_by, max_len=remote.MAX_REQUESTED_BY, required=True)
        _check_action(v, "action", r.action)
        _check_uid(v, "target", r.target, "Target::", remote.MAX_APPROVAL_UID)
        try:
            uuid.UUID(r.target_agent_id)
        except ValueError:
            v.add("target_agent_id", "must be the agent's UUID")
        agent_rules.check_text(v, "purpose", r.purpose, max_len=MAX_PURPOSE, multiline=True)
        if len(r.reasons) > remote.MAX_REASONS:
            v.add("reasons", f"must be at most {remote.MAX_REASONS} (got {len(r.reasons)})")
        else:
            for i, reason in enumerate(r.reasons):
                agent_rules.check_text(v, f"reasons[{i}]", reason, max_len=MAX_PURPOSE, required=True, multiline=True)
        _check_policy_ids(v, "policy_ids", r.policy_ids)
        _check_action(v, "grant_action", r.grant_action)
        grant_type = _check_uid(v, "grant_target", r.grant_target, "Target::", remote.MAX_APPROVAL_UID)
        if grant_type and r.grant_action in ACTIONS and ACTIONS[r.grant_action] != grant_type:
            v.add("grant_action", f"{r.grant_action} applies to {ACTIONS[r.grant_action]}, not {grant_type}")
        if not 0 <= r.grant_duration_seconds <= MAX_DURATION:
            v.add("grant_duration_seconds", f"must be from 1 to {MAX_DURATION} (0: {DEFAULT_DURATION})")
        if not 0 <= r.grant_uses <= MAX_CALLS:
            v.add("grant_uses", f"must be from 0 (unlimited) to {MAX_CALLS}")
        v.raise_if_any()
        agent = await self.agents.get_agent(r.target_agent_id)
        if agent is None:
            raise NotFound(f"agent {r.target_agent_id} not found", "AGENT_NOT_FOUND", id=r.target_agent_id)
        approval = await self.grants.create_approval(
            caller=r.caller,
            requested_by=r.requested_by.strip(),
            action=r.action,
            target=r.target,
            target_agent_id=agent.id,
            target_owner=agent.owner,
            purpose=r.purpose,
            reasons=list(r.reasons),
            policy_ids=list(r.policy_ids),
            grant_action=r.grant_action,
            grant_target=r.grant_target,
            grant_duration_seconds=r.grant_duration_seconds or DEFAULT_DURATION,
            grant_uses=r.grant_uses or None,
            ttl_seconds=self.settings.approval_ttl,
        )
        await self.approvals.publish("created", approval)
        log.info(
            "approval created",
            extra={"approval_id": str(approval.id), "caller": approval.caller, "by": principal.id},
        )
        return approval_to_proto(approval)


__all__ = ["AccessServicer", "AccessSettings", "ApprovalHub", "AuditEntry", "RegistryControlPlane"]
